"""Benchmark: packets per second delivered to worker sockets, plain SO_REUSEPORT against
steerd's steering program and steering + XDP guard, in one run.

    .venv/bin/python bench/datapath/run.py [--seconds S] [--rounds R] [--size B] [--json]

Set-up (root): a client and a server network namespace joined by veth (tests/netns.py).
In the server namespace, a reuseport group of 4 worker sockets and 1 classifier socket on
UDP port 4433. A C sendmmsg sender (sender.c, built with gcc at run time) in the client
namespace sends short-header QUIC packets whose DCIDs name the 4 worker slots, round robin
over 8 source ports; a C recvmmsg receiver (receiver.c) drains all sockets, so the reader
is not what is measured (the UDP RcvbufErrors counter is reported to prove it). Sender and
receiver are pinned to different CPUs. Modes, interleaved round by round so machine noise
hits all alike, each on a fresh socket group:

- plain: no program, the kernel's 4-tuple hash picks the socket;
- null-xdp: plain + an XDP program that only returns XDP_PASS, natively on the server veth.
  On veth, attaching any native XDP program moves receive onto veth's own NAPI ring and
  copies each locally-built skb into a page with XDP headroom; that cost belongs to veth,
  not to the guard (a NIC driver runs NAPI anyway), and this mode measures it;
- xdp: plain + the XDP guard natively on the server veth;
- steer: the SK_REUSEPORT steering program picks the socket by CID;
- steer+xdp: both, as deployed on a NIC;
- steer+tc: steering + the same guard at TC ingress (tcx), the choice for veth.

Reported: median delivered pps per mode over the rounds, and each mode's ratio to plain.
The steering modes also check that every worker received exactly its slots' share-ish
(each slot gets a quarter of the templates) and that the BPF counters saw the packets.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from quic.cid import CidLayout  # noqa: E402
from steerd.dataplane import XDP_FLAGS_DRV_MODE, Dataplane, DataplaneConfig  # noqa: E402
from steerd.dataplane.netns import run_in_netns  # noqa: E402
from tests.netns import NetnsPair, netns_pair  # noqa: E402

PORT = 4433
LAYOUT = CidLayout(config_id=1, host_id=0x2A, host_id_len=1, slot_len=2, nonce_len=6)
WORKER_SLOTS = (0, 1, 2, 3)
SENDER_SOCKETS = 8
TEMPLATES = 256
MODES = ("plain", "null-xdp", "xdp", "steer", "steer+xdp", "steer+tc")
NULL_XDP = "int null_xdp(struct xdp_md *ctx) { return XDP_PASS; }"


def build(workdir: Path) -> tuple[Path, Path]:
    """Compile sender and receiver; gcc is part of the toolchain deploy/setup.sh needs."""
    out = []
    for name in ("sender", "receiver"):
        exe = workdir / name
        subprocess.run(["gcc", "-O2", "-Wall", f"-I{HERE.parent / 'common'}", "-o", str(exe),
                        str(HERE / f"{name}.c")],
                       check=True)
        out.append(exe)
    return out[0], out[1]


def templates(path: Path, size: int) -> None:
    """Short-header packets, slots round robin, each with its own nonce."""
    with path.open("wb") as f:
        for i in range(TEMPLATES):
            slot = WORKER_SLOTS[i % len(WORKER_SLOTS)]
            packet = bytes([0x43]) + LAYOUT.encode(slot, os.urandom(LAYOUT.nonce_len))
            f.write(packet.ljust(size, b"\x00"))


def group(pair: NetnsPair) -> list[socket.socket]:
    """4 worker sockets then 1 classifier socket, one reuseport group in the server netns."""

    def make() -> list[socket.socket]:
        socks = []
        for _ in range(len(WORKER_SLOTS) + 1):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind(("::", PORT))
            socks.append(s)
        return socks

    return pair.run_server(make)


def rcvbuf_errors(pair: NetnsPair) -> int:
    """UDP RcvbufErrors in the server namespace (packets the sockets had to drop)."""
    text = pair.exec_server("cat", "/proc/net/snmp").stdout.splitlines()
    rows = [line.split() for line in text if line.startswith("Udp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index("RcvbufErrors")])


def ksoftirqd_ns(cpu: int) -> int:
    """Precise run time of ksoftirqd/CPU in ns (/proc/PID/schedstat)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != f"ksoftirqd/{cpu}":
                    continue
            with open(f"/proc/{pid}/schedstat") as f:
                return int(f.read().split()[0])
        except OSError:
            continue
    return 0


def prog_stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_cnt, run_time_ns) per program, from the kernel's BPF stats (via bpftool)."""
    from steerd.dataplane import _lib

    out = {}
    for name, fd in fds.items():
        buf = (ctypes.c_uint32 * 64)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))
        if _lib().bpf_obj_get_info(fd, buf, ctypes.byref(size)) != 0:
            raise RuntimeError(f"bpf_obj_get_info({name}) failed")
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(buf[1])],
                                         capture_output=True, text=True, check=True).stdout)
        out[name] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
    return out


def run_mode(mode: str, pair: NetnsPair, dp: Dataplane, null_xdp: Any, sender: Path,
             receiver: Path, tmpl: Path, size: int, seconds: float) -> dict[str, object]:
    import bcc

    socks = group(pair)
    xdp = mode in ("xdp", "steer+xdp")
    tc = mode == "steer+tc"
    dev = pair.server_if.encode()
    try:
        if mode.startswith("steer"):
            dp.attach_reuseport(socks[0])
            for slot, s in zip(WORKER_SLOTS, socks, strict=False):
                dp.set_worker(slot, s)
            dp.set_classifier(0, socks[-1])
        if xdp:
            dp.attach_xdp(pair.server_if, mode="native", netns=pair.server)
        if mode == "null-xdp":
            run_in_netns(pair.server, lambda: bcc.BPF.attach_xdp(dev, null_xdp, XDP_FLAGS_DRV_MODE))
        if tc:
            dp.attach_tc(pair.server_if, netns=pair.server)
        before, errs_before = dp.counters(), rcvbuf_errors(pair)
        fds = {"steer": dp.steer_prog_fd, "guard": dp.guard_prog_fd, "null": null_xdp.fd}
        stats_before = prog_stats(fds)
        sock_fds = [s.fileno() for s in socks]
        recv = subprocess.Popen(
            ["taskset", "-c", "1", str(receiver), str(seconds + 1.0), *map(str, sock_fds)],
            pass_fds=sock_fds, stdout=subprocess.PIPE, text=True,
        )
        soft_before = ksoftirqd_ns(0)
        send = subprocess.Popen(
            ["ip", "netns", "exec", pair.client, "taskset", "-c", "0", str(sender),
             pair.server_v4, str(PORT), str(seconds), str(SENDER_SOCKETS), str(tmpl), str(size)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        send_out, send_err = send.communicate(timeout=seconds + 30)
        soft_ns = ksoftirqd_ns(0) - soft_before
        out, _ = recv.communicate(timeout=seconds + 30)
        if send.returncode != 0 or recv.returncode != 0:
            raise RuntimeError(f"{mode}: sender {send_err} receiver rc {recv.returncode}")
        sent, _failed, sender_ns = (int(x) for x in send_out.split())
        # CPU 0 time spent on these packets: the sender with the softirq work the kernel ran
        # in its context, and ksoftirqd/0's share.
        cpu_seconds = (sender_ns + soft_ns) / 1e9
        per_socket = [int(x) for x in out.split()]
        after = dp.counters()
        stats_after = prog_stats(fds)
        delivered = sum(per_socket)
        reached = delivered + rcvbuf_errors(pair) - errs_before
        ns_per_run = {}
        for name, (cnt, ns) in stats_after.items():
            runs = cnt - stats_before[name][0]
            ns_per_run[name] = (ns - stats_before[name][1]) / runs if runs else None
        return {
            "mode": mode,
            "sent": sent,
            "delivered": delivered,
            "pps": delivered / seconds,
            # per packet that reached a socket (read or dropped at a full buffer): the kernel
            # did the whole receive path for both
            "cpu_ns_per_packet": cpu_seconds * 1e9 / reached if reached else None,
            # Packets that made it through XDP, lookup and steering to a socket queue, read
            # or not: the data path's own throughput even when the reader fell behind.
            "reached_pps": reached / seconds,
            "per_socket": per_socket,
            "rcvbuf_errors": rcvbuf_errors(pair) - errs_before,
            "prog_ns_per_packet": ns_per_run,
            "steer_short_worker": after["steer_short_worker"] - before["steer_short_worker"],
            "xdp_short": after["xdp_short"] - before["xdp_short"],
        }
    finally:
        if xdp:
            dp.detach_xdp(pair.server_if, netns=pair.server)
        if mode == "null-xdp":
            run_in_netns(pair.server, lambda: bcc.BPF.remove_xdp(dev, XDP_FLAGS_DRV_MODE))
        if tc:
            dp.detach_tc(pair.server_if, netns=pair.server)
        for s in socks:
            s.close()


def check(result: dict[str, object]) -> None:
    """Steering must actually steer: the classifier gets nothing, every worker its share,
    and the counters saw every delivered packet."""
    mode, per = result["mode"], result["per_socket"]
    assert isinstance(per, list)
    if str(mode).startswith("steer"):
        assert per[-1] == 0, f"{mode}: classifier got {per[-1]} packets"
        assert min(per[:-1]) > 0.2 * sum(per), f"{mode}: uneven steering {per}"
        assert result["steer_short_worker"] >= result["delivered"], result
    if mode in ("xdp", "steer+xdp", "steer+tc"):
        assert result["xdp_short"] >= result["delivered"], result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=100, help="UDP payload bytes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/datapath needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    if not shutil.which("gcc") or not shutil.which("taskset"):
        print("bench/datapath needs gcc and taskset", file=sys.stderr)
        return 1
    results: list[dict[str, object]] = []
    stats: list[dict[str, object]] = []
    with_namespaces(args, results, stats)
    report(args, results, stats)
    return 0


def with_namespaces(args: argparse.Namespace, results: list[dict[str, object]],
                    stats: list[dict[str, object]]) -> None:
    """Build the namespaces and the data plane, run every mode every round, tear down.

    Kernel BPF run-time statistics cost two clock reads per program run, so they are off
    for the timed rounds and on only for extra steer+xdp runs that measure the programs."""
    import bcc

    with tempfile.TemporaryDirectory() as tmp, netns_pair("bench") as pair:
        sender, receiver = build(Path(tmp))
        tmpl = Path(tmp) / "templates.bin"
        templates(tmpl, args.size)
        pin_dir = f"/sys/fs/bpf/steerd-bench-{uuid.uuid4().hex[:8]}"
        dp = Dataplane(DataplaneConfig(layout=LAYOUT, port=PORT, classifier_slots=1,
                                       pin_dir=pin_dir))
        try:
            dp.load()
            null = bcc.BPF(text=NULL_XDP.encode()).load_func(b"null_xdp", bcc.BPF.XDP)
            # Warm-up: neighbour resolution and caches, not counted.
            run_mode("plain", pair, dp, null, sender, receiver, tmpl, args.size, 0.5)
            for rnd in range(args.rounds):
                # Rotate the order so no mode always runs first (or after the same mode).
                for mode in MODES[rnd % len(MODES):] + MODES[: rnd % len(MODES)]:
                    result = run_mode(mode, pair, dp, null, sender, receiver, tmpl, args.size,
                                      args.seconds)
                    check(result)
                    results.append(result)
                    if not args.json:
                        print(f"  {mode:<10} {result['pps']:>12,.0f} pps  sent {result['sent']:,}"
                              f"  rcvbuf_errors {result['rcvbuf_errors']}"
                              f"  {result['cpu_ns_per_packet']:,.0f} CPU0 ns/pkt", file=sys.stderr)
            stats_file = Path("/proc/sys/kernel/bpf_stats_enabled")
            stats_was = stats_file.read_text().strip()
            stats_file.write_text("1")
            try:
                for _ in range(3):
                    for mode in ("steer+xdp", "null-xdp"):
                        stats.append(run_mode(mode, pair, dp, null, sender, receiver, tmpl,
                                              args.size, args.seconds))
            finally:
                stats_file.write_text(stats_was)
        finally:
            dp.destroy()


def report(args: argparse.Namespace, results: list[dict[str, object]],
           stats: list[dict[str, object]]) -> None:
    def series(key: str, mode: str) -> list[float]:
        return [float(r[key]) for r in results if r["mode"] == mode]  # type: ignore[arg-type]

    median = {m: statistics.median(series("pps", m)) for m in MODES}
    cost = {m: statistics.median(series("cpu_ns_per_packet", m)) for m in MODES}
    reached = {m: statistics.median(series("reached_pps", m)) for m in MODES}
    prog_medians = {
        name: statistics.median(
            float(r["prog_ns_per_packet"][name])  # type: ignore[index]
            for r in stats if r["prog_ns_per_packet"][name] is not None  # type: ignore[index]
        )
        for name in ("steer", "guard", "null")
    }
    summary = {
        "seconds": args.seconds, "rounds": args.rounds, "payload_bytes": args.size,
        "median_pps": median,
        "ratio_to_plain": {m: median[m] / median["plain"] for m in MODES},
        "min_max_pps": {m: (min(series("pps", m)), max(series("pps", m))) for m in MODES},
        "median_cpu_ns_per_packet": cost,
        "cpu_normalised_ratio_to_plain": {m: cost["plain"] / cost[m] for m in MODES},
        "median_reached_pps": reached,
        "steer_xdp_vs_null_xdp": median["steer+xdp"] / median["null-xdp"],
        "steer_xdp_vs_null_xdp_cpu": cost["null-xdp"] / cost["steer+xdp"],
        "rcvbuf_errors_total": sum(int(r["rcvbuf_errors"]) for r in results),  # type: ignore[call-overload]
        "prog_ns_per_packet": prog_medians,
        "programs_net_ns_per_packet": (
            prog_medians["steer"] + prog_medians["guard"] - 2 * prog_medians["null"]
        ),
        "runs": results,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'mode':<10} {'median pps':>12} {'vs plain':>9} {'min':>10} {'max':>10}"
              f" {'CPU0 ns/pkt':>12} {'pkts/CPU-s vs plain':>20}")
        for m in MODES:
            lo, hi = summary["min_max_pps"][m]  # type: ignore[index]
            print(f"{m:<10} {median[m]:>12,.0f} {median[m] / median['plain']:>8.3f}x"
                  f" {lo:>10,.0f} {hi:>10,.0f} {cost[m]:>12,.0f}"
                  f" {cost['plain'] / cost[m]:>19.3f}x")
        print(f"socket receive-buffer drops over all runs: {summary['rcvbuf_errors_total']}")
        progs = summary["prog_ns_per_packet"]
        for name, ns in progs.items():  # type: ignore[attr-defined]
            print(f"BPF {name} program: median {ns:.1f} ns per packet (kernel bpf_stats; the "
                  "null XDP program's figure is the stats' own overhead)")
        net = progs["steer"] + progs["guard"] - 2 * progs["null"]  # type: ignore[index]
        print(f"CPU 0 spends {cost['plain']:.0f} ns per packet (send + receive path) in plain "
              f"mode; the two programs' own run time, stats overhead taken out, is {net:.0f} ns "
              f"= {100 * net / cost['plain']:.1f}% of it")
        print(f"steer+tc against plain: {median['steer+tc'] / median['plain']:.3f}x pps, "
              f"{cost['plain'] / cost['steer+tc']:.3f}x packets per CPU-second")
        print(f"steer+xdp against null-xdp (the veth XDP-mode cost taken out): "
              f"{median['steer+xdp'] / median['null-xdp']:.3f}x pps, "
              f"{cost['null-xdp'] / cost['steer+xdp']:.3f}x packets per CPU-second")


if __name__ == "__main__":
    sys.exit(main())
