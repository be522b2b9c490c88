"""Benchmark: what the socket jail costs a syscall, with and without it, in one run.

    .venv/bin/python bench/jail/run.py [--calls N] [--rounds R] [--json]

A C loop (syscalls.c, built with gcc at run time) times ``getppid()`` (any syscall: the
32-bit hook, bpf/compat.c, sits on the sys_enter raw tracepoint and so runs, and
returns at its first comparison, for every syscall of the machine) and
``setsockopt(SO_RCVBUF)`` on a UDP socket bound to the jailed port (the cgroup setsockopt
hook, bpf/jail.c, then looks the option up in the allowlist), and on a socket of
another port (the hook returns at the port check). Modes, interleaved round by round so
machine noise hits both alike: ``plain`` (no jail) and ``jail`` (cgroup hooks and compat hook
attached for the port). Reported: median ns per call per mode and jail/plain ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steerd.daemon.dataplane.jail import Jail, remove_jail
from steerd.daemon.dataplane.maps import MAP_PERCPU_ARRAY, libbcc
from steerd.daemon.dataplane.programs import find_kernel_headers

HERE = Path(__file__).resolve().parent


def build(workdir: str) -> str:
    binary = os.path.join(workdir, "syscalls")
    subprocess.run(["gcc", "-O2", "-o", binary, str(HERE / "syscalls.c")], check=True)
    return binary


def measure(binary: str, sock: socket.socket, calls: int) -> dict[str, float]:
    out = subprocess.run([binary, str(calls), str(sock.fileno())], check=True,
                         capture_output=True, text=True, pass_fds=(sock.fileno(),)).stdout
    return {name: float(value) for name, value in (line.split() for line in out.splitlines())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    headers, _ = find_kernel_headers()
    if headers is not None:
        os.environ.setdefault("BCC_KERNEL_SOURCE", str(headers))
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        binary = build(work)
        service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        service.bind(("127.0.0.1", 0))
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.1", 0))
        pin_dir = tempfile.mkdtemp(prefix="steerd-bench-jail-", dir="/sys/fs/bpf")
        counters = libbcc().bcc_create_map(MAP_PERCPU_ARRAY, b"bench_jail_c", 4, 8, 64, 0)
        try:
            for _ in range(args.rounds):
                for mode in ("plain", "jail"):
                    jail = None
                    if mode == "jail":
                        jail = Jail(pin_dir, service.getsockname()[1], counters)
                        jail.open()
                        jail.attach()
                    try:
                        for label, sock in (("service", service), ("other", other)):
                            got = measure(binary, sock, args.calls)
                            results.setdefault(f"{mode} getppid", []).append(got["getppid"])
                            results.setdefault(f"{mode} setsockopt {label}", []).append(
                                got["setsockopt"])
                    finally:
                        if jail is not None:
                            jail.close()
                            remove_jail(pin_dir)
        finally:
            os.close(counters)
            os.rmdir(pin_dir)
            service.close()
            other.close()
    medians = {k: statistics.median(v) for k, v in results.items()}
    ratios = {k.removeprefix("jail "): medians[k] / medians["plain " + k.removeprefix("jail ")]
              for k in medians if k.startswith("jail ")}
    if args.json:
        print(json.dumps({"ns_per_call": medians, "jail_over_plain": ratios}, indent=2))
    else:
        for k, v in sorted(medians.items()):
            print(f"{k:32s} {v:8.1f} ns")
        for k, v in sorted(ratios.items()):
            print(f"ratio jail/plain {k:24s} {v:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
