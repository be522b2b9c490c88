"""Benchmark: what the socket watchdog (steerd/daemon/sockwatch.py) costs, and how soon it
repairs.

    .venv/bin/python bench/sockwatch.py [--slots 64] [--looks 500] [--trials 30] [--json]

Set-up (root): in a fresh network namespace, an IPv4 and an IPv6 reuseport group on
loopback, each with steerd's steering program (a real Dataplane per group, so the canary
runs through the real program and counter) and ``--slots`` worker sockets, all watched, as
a daemon with that many slots on two listen addresses has them. Reported:

- one look (every worker socket's 4 getsockopt-class calls, one canary counter read per
  group, a canary sent when due) and one canary-only look: CPU time, median over ``--looks``
  looks made back to back, and the CPU share at the watchdog's periods (sockets every
  PERIOD, canaries every CANARY_PERIOD);
- repair latency with the watchdog's thread running: SO_REUSEPORT cleared on a random
  worker socket, and the IPv4 group's program detached, each ``--trials`` times, timed from
  the change until the socket shows the repair (the program: until it is attached again,
  and until the finding is reported, one canary later); median and max.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.netns import netns_pair
from steerd.daemon import sockwatch
from steerd.daemon.control import bind_group_socket
from steerd.daemon.dataplane import Dataplane, DataplaneConfig
from steerd.daemon.dataplane.counters import read_counter, write_every_cpu
from steerd.daemon.dataplane.header import header_constants

PORT = 4433


def run(slots: int, looks: int, trials: int) -> dict[str, float]:
    k = header_constants()
    secret = sockwatch.canary_secret()
    repaired = threading.Event()
    reattached = threading.Event()
    watch = sockwatch.SocketWatchdog(on_finding=lambda f: repaired.set())
    watch.set_secret(secret)
    dps: list[Dataplane] = []
    made: list[socket.socket] = []
    try:
        groups = []
        for address in ("127.0.0.1", "::1"):
            dp = Dataplane(DataplaneConfig(
                port=PORT, pin_dir=f"/sys/fs/bpf/steerd-bsw-{uuid.uuid4().hex[:8]}"))
            dps.append(dp)
            dp.load()
            first = bind_group_socket(address, PORT, classifier=True)
            made.append(first)
            dp.set_classifier(0, first)
            dp.attach_reuseport(first)
            fd = dp.map_fd("counters")
            write_every_cpu(fd, dp.ncpus, k["STEERD_CANARY_SECRET"],
                            int.from_bytes(secret, sys.byteorder))
            groups.append((address, dp, first))
        workers: list[socket.socket] = []
        for slot in range(slots):
            pair = [bind_group_socket(address, PORT) for address, _, _ in groups]
            made += pair
            workers += pair
            watch.watch(slot, f"app{slot}", 1000 + slot,
                        [(a, s.fileno()) for (a, _, _), s in zip(groups, pair, strict=True)])
        for address, dp, first in groups:
            watch.add_group(address, PORT, lambda dp=dp: read_counter(
                dp.map_fd("counters"), dp.ncpus, k["STEERD_CNT_STEER_CANARY"]),
                lambda dp=dp, first=first: (dp.attach_reuseport(first), reattached.set()))

        walls, cpus, canary_cpus = [], [], []
        for _ in range(looks):
            w, c = time.perf_counter(), time.thread_time()
            assert watch.look() == []
            walls.append(time.perf_counter() - w)
            cpus.append(time.thread_time() - c)
            c = time.thread_time()
            assert watch.look(sockets=False) == []
            canary_cpus.append(time.thread_time() - c)

        watch.start()
        flag_ms, program_ms, reported_ms = [], [], []
        for _ in range(trials):
            victim = random.choice(workers)
            repaired.clear()
            t = time.perf_counter()
            victim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            while not victim.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                time.sleep(0.0005)
            flag_ms.append((time.perf_counter() - t) * 1000)
            repaired.wait(5)
            time.sleep(random.uniform(0, sockwatch.PERIOD))  # a random phase
        for _ in range(trials):
            _, dp, first = groups[0]
            repaired.clear()
            reattached.clear()
            t = time.perf_counter()
            first.setsockopt(socket.SOL_SOCKET, 68, struct.pack("i", 0))
            assert reattached.wait(5), "no program repair within 5 s"
            program_ms.append((time.perf_counter() - t) * 1000)
            assert repaired.wait(5), "the repair was not reported"
            reported_ms.append((time.perf_counter() - t) * 1000)
            time.sleep(random.uniform(0, sockwatch.PERIOD) + 2 * sockwatch.CANARY_GRACE)
        look = statistics.median(walls)
        canary = statistics.median(canary_cpus)
        return {
            "sockets": len(workers), "groups": len(groups),
            "look_wall_ms": look * 1000, "look_cpu_ms": statistics.median(cpus) * 1000,
            "canary_look_cpu_ms": canary * 1000,
            "syscalls_per_look": 4 * len(workers) + 2 * len(groups),
            "syscalls_per_canary_look": 2 * len(groups),
            "cpu_share": statistics.median(cpus) / sockwatch.PERIOD
            + canary * (1 / sockwatch.CANARY_PERIOD - 1 / sockwatch.PERIOD),
            "flag_repair_ms_median": statistics.median(flag_ms),
            "flag_repair_ms_max": max(flag_ms),
            "program_repair_ms_median": statistics.median(program_ms),
            "program_repair_ms_max": max(program_ms),
            "program_reported_ms_median": statistics.median(reported_ms),
        }
    finally:
        watch.stop()
        for sock in made:
            sock.close()
        for dp in dps:
            dp.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--looks", type=int, default=500)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/sockwatch.py needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    with netns_pair("w") as pair:
        result = pair.run_server(lambda: run(args.slots, args.looks, args.trials))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<26} {value:.3f}" if isinstance(value, float) else f"{key:<26} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
