"""``steerd doctor`` as a user runs it: a subprocess, its output and exit code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from steerd.daemon.dataplane.jail import cgroup2_root

pytestmark = pytest.mark.root


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steerd.cli", "doctor", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )


def test_doctor_passes_here_and_loads_for_real() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    proc = doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [line.split()[1] for line in proc.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")]
    assert names == ["root", "bcc", "kernel", "bpffs", "bpf", "programs", "cgroup", "socket",
                     "32-bit", "non-unicast", "protection"]
    text = " ".join(proc.stdout.split())  # the name column's width follows the longest name
    assert "programs load steer (SK_REUSEPORT) and guard (XDP and TC) compiled" in text
    # the jail probe really attached the cgroup hooks and saw them refuse and allow
    assert (f"socket jail hooks attached at {cgroup2_root()} refused bind, connect, "
            "SO_BINDTODEVICE and SO_REUSEPORT off on a jailed port, and allowed the listed "
            "daemon") in text
    # which protection holds against what the jail cannot refuse, in the words
    assert "protection watchdog only: repaired within 20 ms (32-bit callers killed" in text
    # the 32-bit probe really saw a forked int $0x80 caller killed and recorded
    assert ("32-bit entry 32-bit setsockopt outside the allowlist: the caller is killed by "
            "the compat hook") in text
    # the non-unicast probe really saw a broadcast dropped at a wildcard socket, unicast pass
    assert (f"non-unicast filter ingress hook attached at {cgroup2_root()} (its network "
            "namespace only) dropped a broadcast to a wildcard socket") in text
    scratch = proc.stdout.split("scratch pin dir ")[1].split()[0]
    assert scratch.startswith("/sys/fs/bpf/steerd-doctor-")
    assert not os.path.exists(scratch)  # the scratch programs and maps are gone


def test_doctor_names_what_is_missing_and_fails() -> None:
    proc = doctor("--pin-dir", "/tmp/steerd-not-bpffs",
                  env={"BCC_KERNEL_SOURCE": "/nonexistent-headers"})
    assert proc.returncode == 1
    assert "FAIL  kernel headers  no header tree: $BCC_KERNEL_SOURCE=/nonexistent-headers" in (
        proc.stdout)
    assert "fix: mount -t bpf bpf /sys/fs/bpf" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "prerequisite(s) missing: kernel headers, bpffs, programs load" in proc.stderr
