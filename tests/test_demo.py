"""The README's first command, ./demo.sh, end to end: every real client is served by the app
that owns its ALPN, the table says so, and nothing is left behind, also when interrupted.

Why a test of the demo: it is the first thing a newcomer runs; if it breaks, the project
looks broken whatever the other tests say.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from steerd.daemon.dataplane.netns import netns_path

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[1]
# client label and ALPN (as printed) -> the app column's first word
EXPECTED = {
    ("Chromium (headless)", "h3"): "web",
    ("ngtcp2 gtlsclient", "h3"): "web",
    ("qh3", "h3"): "web",
    ("aioquic", "smb"): "files",
    ("aioquic", "doq"): "(refused:",
}


def _leftovers(stderr: str) -> list[str]:
    """What the run named (namespaces, work dir, pin dir) and still exists, and processes
    still running from its work dir."""
    names = re.search(r"namespaces (\S+) .* and (\S+) \(server", stderr)
    dirs = re.search(r"work dir (\S+), BPF pin dir (\S+)", stderr)
    assert names and dirs, f"the demo did not say what it made:\n{stderr}"
    left = [p for p in (netns_path(names[1]), netns_path(names[2]), dirs[1], dirs[2])
            if os.path.exists(p)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if dirs[1] in cmdline:
            left.append(f"process {pid}: {cmdline}")
    return left


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the demo needs root (network namespaces, BPF)")


def test_demo_serves_every_client_by_its_app() -> None:
    _require_root()
    started = time.monotonic()
    run = subprocess.run([str(ROOT / "demo.sh")], capture_output=True, text=True, timeout=240,
                         check=False)
    elapsed = time.monotonic() - started
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    rows = {}
    for line in run.stdout.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) == 6 and cols[0] != "CLIENT":
            rows[(cols[0], cols[2])] = cols
    assert set(rows) == set(EXPECTED), report
    for key, app in EXPECTED.items():
        cols = rows[key]
        assert cols[4].split()[0] == app, f"{key}: {cols}\n{report}"
        assert cols[5] == "ok", f"{key}: {cols}\n{report}"
    for name in ("web", "files"):
        assert f'steerd_first_flights_total{{app="{name}",result="routed"}}' in run.stdout
    assert 'result="no_owner"' in run.stdout, report
    assert "steerd_bpf_events_total" in run.stdout, report
    assert _leftovers(run.stderr) == []
    assert elapsed < 120, f"the demo took {elapsed:.0f} s\n{report}"


def test_demo_tears_down_when_interrupted() -> None:
    """SIGTERM (as Ctrl-C) while the apps start: everything still goes, exit status 130."""
    _require_root()
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "deploy" /
                                                                           "demo.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "starting app 'files'" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(seen) + err
    assert proc.returncode == 130, f"stdout:\n{out}\nstderr:\n{stderr}"
    assert "tearing down" in stderr
    assert _leftovers(stderr) == []
