"""Benchmark: packets per second delivered to worker sockets, plain SO_REUSEPORT against
steerd's steering program and steering + XDP guard, in one run.

    .venv/bin/python bench/datapath/run.py [--seconds S] [--rounds R] [--stats-rounds N]
        [--size B] [--json]

Set-up (root): a client and a server network namespace joined by veth (deploy/netns.py).
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
- steer+tc: steering + the same guard at TC ingress (tcx), the choice for veth;
- steer-learned: learned mode (bpf/learn.c, steerd/daemon/dataplane/learn.py): the
  DCIDs are random 8-byte CIDs outside the layout, pre-inserted into learned_cids for the 4
  worker slots, so every packet fails the layout decode and is steered by a learned_cids lookup;
- steer-learned-peer: DCIDs no table knows; the client's address and its 8 source ports are
  pre-inserted into learned_peers, so every packet misses learned_cids and is steered by
  learned_peers (the slowest path that still delivers);
- steer+unicast: steer, with the non-unicast filter (bpf/unicast.c) attached at the
  cgroup v2 root, as the daemon always has it: it runs for every datagram delivered to a
  socket; its cost on unicast traffic (which it passes);
- steer+learner: steer, with the learned-mode egress program (bpf/learn.c) attached at the
  cgroup v2 root, as it is whenever one app runs in learned mode: the sender's own egress
  passes through it (it exits early: not from the service port), its cost on traffic that
  is not learned.

The entries are written into the maps directly (steerd.dataplane.learn.Learner only learns,
sweeps and reads them); the sender binds its 8 sockets to fixed source ports (SRC_PORT_BASE
+ i) in every mode so the peer entries match.

Reported: median delivered pps per mode over the rounds, and each mode's ratio to plain (and
the learned modes' to steer). The steering modes also check that every worker received its
share (each slot gets a quarter of the templates or source ports) and that the BPF counters
of the path the mode exercises saw every delivered packet.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from deploy.netns import NetnsPair, netns_pair  # noqa: E402
from quic.cid import CidLayout  # noqa: E402
from steerd.daemon.dataplane import Dataplane, DataplaneConfig  # noqa: E402
from steerd.daemon.dataplane.guard import XDP_FLAGS_DRV_MODE  # noqa: E402
from steerd.daemon.dataplane.learn import PIN_NAME as LEARN_PIN_NAME  # noqa: E402
from steerd.daemon.dataplane.learn import Learner, LearnLimits, remove_learner  # noqa: E402
from steerd.daemon.dataplane.maps import libbcc  # noqa: E402
from steerd.daemon.dataplane.netns import run_in_netns  # noqa: E402
from steerd.daemon.dataplane.unicast import PROG_PIN as UNICAST_PIN_NAME  # noqa: E402
from steerd.daemon.dataplane.unicast import UnicastFilter, remove_unicast_filter  # noqa: E402

PORT = 4433
LAYOUT = CidLayout(config_id=1, host_id=0x2A, host_id_len=1, slot_len=2, nonce_len=6)
WORKER_SLOTS = (0, 1, 2, 3)
SENDER_SOCKETS = 8
TEMPLATES = 256
SRC_PORT_BASE = 40000  # the sender's socket i sends from this + i
MODES = ("plain", "null-xdp", "xdp", "steer", "steer+xdp", "steer+tc", "steer-learned",
         "steer-learned-peer", "steer+learner", "steer+unicast")
LEARNED_MODES = ("steer-learned", "steer-learned-peer")
LEARNED_CID_LEN = 8
# The counter that must have seen every delivered packet, per steering mode.
STEER_COUNTER = {"steer-learned": "steer_learned_cid", "steer-learned-peer": "steer_learned_peer"}
# Modes run again with kernel BPF statistics on, to measure the programs' own run time.
STATS_MODES = ("steer+xdp", "null-xdp", "steer-learned", "steer-learned-peer", "steer+learner",
               "steer+unicast")
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


def random_cids(n: int, avoid: set[bytes]) -> list[bytes]:
    """n distinct random learned-length CIDs that are not in the layout (the steering program
    decodes the layout's CID_LEN bytes after the first byte; the random CID is followed by
    zero padding there) and not in ``avoid``."""
    out: list[bytes] = []
    while len(out) < n:
        cid = os.urandom(LEARNED_CID_LEN)
        wire = cid.ljust(max(LAYOUT.cid_len, LEARNED_CID_LEN), b"\x00")
        if LAYOUT.decode(wire[: LAYOUT.cid_len]) is None and cid not in avoid and cid not in out:
            out.append(cid)
    return out


def cid_templates(path: Path, size: int, cids: list[bytes]) -> None:
    """Short-header packets with the given (not-layout) DCIDs."""
    with path.open("wb") as f:
        for cid in cids:
            f.write((bytes([0x43]) + cid).ljust(size, b"\x00"))


def _update(dp: Dataplane, name: str, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    if libbcc().bpf_update_elem(dp.map_fd(name), k, v, 0) != 0:
        raise RuntimeError(f"writing {name} failed: {os.strerror(ctypes.get_errno())}")


def learned_route(slot: int) -> bytes:
    """struct steerd_route: slot, flags, expires_ns (CLOCK_MONOTONIC). An hour ahead: far
    past half the TTL, so the steering program never rewrites it during the bench."""
    return struct.pack("=IIQ", slot, 0, time.monotonic_ns() + 3600 * 10**9)


def insert_learned(dp: Dataplane, cids: list[bytes], client_v4: str) -> None:
    """What bpf/learn.c would have learned from 4 learned-mode workers: each CID for slot
    i % 4 (struct steerd_route_key: len, CID zero-padded to 20, 3 pad), and the client's
    address with source port SRC_PORT_BASE + i for slot i % 4 (struct steerd_peer_key:
    family, pad, peer port and local port in network order, pad2, address)."""
    for i, cid in enumerate(cids):
        key = bytes([len(cid)]) + cid.ljust(20, b"\x00") + b"\x00" * 3
        _update(dp, "learned_cids", key, learned_route(WORKER_SLOTS[i % len(WORKER_SLOTS)]))
    addr = socket.inet_aton(client_v4).ljust(16, b"\x00")
    for i in range(SENDER_SOCKETS):
        key = (bytes([4, 0]) + (SRC_PORT_BASE + i).to_bytes(2, "big") + PORT.to_bytes(2, "big")
               + b"\x00\x00" + addr)
        _update(dp, "learned_peers", key, learned_route(WORKER_SLOTS[i % len(WORKER_SLOTS)]))


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


def pinned_fd(path: str) -> int:
    """An fd of the program pinned at ``path`` (the learner's, attached by Learner.attach)."""
    fd = libbcc().bpf_obj_get(path.encode())
    if fd < 0:
        raise RuntimeError(f"cannot open the pinned program {path}")
    return int(fd)


def prog_stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(run_cnt, run_time_ns) per program, from the kernel's BPF stats (via bpftool)."""
    out = {}
    for name, fd in fds.items():
        buf = (ctypes.c_uint32 * 64)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))
        if libbcc().bpf_obj_get_info(fd, buf, ctypes.byref(size)) != 0:
            raise RuntimeError(f"bpf_obj_get_info({name}) failed")
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(buf[1])],
                                         capture_output=True, text=True, check=True).stdout)
        out[name] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
    return out


def run_mode(mode: str, pair: NetnsPair, dp: Dataplane, null_xdp: Any, sender: Path,
             receiver: Path, tmpls: dict[str, Path], size: int,
             seconds: float) -> dict[str, object]:
    import bcc

    socks = group(pair)
    xdp = mode in ("xdp", "steer+xdp")
    tc = mode == "steer+tc"
    learned = mode in LEARNED_MODES
    learner = Learner(dp) if mode == "steer+learner" else None
    unicast = (UnicastFilter(dp.config.pin_dir, PORT, dp.map_fd("counters"), netns=pair.server)
               if mode == "steer+unicast" else None)
    unicast_fd = -1
    tmpl = tmpls.get(mode, tmpls["layout"])
    dev = pair.server_if.encode()
    learn_fd = -1
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
        if learned:
            # learned-mode apps registered 8-byte CIDs: the steering program tries that
            # length in learned_cids when a short header's DCID is not in the layout
            Learner(dp).configure(LearnLimits(), [LEARNED_CID_LEN])
        if learner is not None:
            learner.attach()
            learn_fd = pinned_fd(os.path.join(dp.config.pin_dir, LEARN_PIN_NAME))
        if unicast is not None:
            unicast.open()
            unicast.sync_broadcasts()
            unicast.attach()
            unicast_fd = pinned_fd(os.path.join(unicast.directory, UNICAST_PIN_NAME))
        before, errs_before = dp.counters(), rcvbuf_errors(pair)
        fds = {"steer": dp.steer_prog_fd, "guard": dp.guard_prog_fd, "null": null_xdp.fd}
        if learn_fd >= 0:
            fds["learn"] = learn_fd
        if unicast_fd >= 0:
            fds["unicast"] = unicast_fd
        stats_before = prog_stats(fds)
        sock_fds = [s.fileno() for s in socks]
        recv = subprocess.Popen(
            ["taskset", "-c", "1", str(receiver), str(seconds + 1.0), *map(str, sock_fds)],
            pass_fds=sock_fds, stdout=subprocess.PIPE, text=True,
        )
        soft_before = ksoftirqd_ns(0)
        send = subprocess.Popen(
            ["ip", "netns", "exec", pair.client, "taskset", "-c", "0", str(sender),
             pair.server_v4, str(PORT), str(seconds), str(SENDER_SOCKETS), str(tmpl), str(size),
             str(SRC_PORT_BASE)],
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
        prog_runs = {}
        for name, (cnt, ns) in stats_after.items():
            runs = cnt - stats_before[name][0]
            prog_runs[name] = runs
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
            # runs per program (0 unless kernel.bpf_stats_enabled is on)
            "prog_runs": prog_runs,
            **{name: after[name] - before[name]
               for name in ("steer_short_worker", "steer_learned_cid", "steer_learned_peer",
                            "steer_drop_short_not_ours", "steer_learned_dead_slot",
                            "xdp_short")},
        }
    finally:
        if unicast is not None:
            remove_unicast_filter(dp.config.pin_dir)
            unicast.close()
        if unicast_fd >= 0:
            os.close(unicast_fd)
        if learner is not None:
            remove_learner(dp.config.pin_dir)
            learner.close()
        if learn_fd >= 0:
            os.close(learn_fd)
        if learned:
            Learner(dp).configure(LearnLimits(), [])  # learned lookups off again
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
        counter = STEER_COUNTER.get(str(mode), "steer_short_worker")
        assert result[counter] >= result["delivered"], (counter, result)
        assert result["steer_drop_short_not_ours"] == 0, result
    if mode == "steer+learner" and result["prog_runs"]["learn"]:  # type: ignore[index]
        # (runs are counted only with bpf_stats on) every sent datagram's egress ran it
        assert result["prog_runs"]["learn"] >= result["sent"], result  # type: ignore[index]
    if mode in ("xdp", "steer+xdp", "steer+tc"):
        assert result["xdp_short"] >= result["delivered"], result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--stats-rounds", type=int, default=3,
                        help="extra rounds with kernel BPF statistics on (program run time)")
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
        tmpls = {"layout": Path(tmp) / "templates.bin",
                 "steer-learned": Path(tmp) / "learned.bin",
                 "steer-learned-peer": Path(tmp) / "unknown.bin"}
        templates(tmpls["layout"], args.size)
        learned_cids = random_cids(TEMPLATES, set())
        cid_templates(tmpls["steer-learned"], args.size, learned_cids)
        cid_templates(tmpls["steer-learned-peer"], args.size,
                      random_cids(TEMPLATES, set(learned_cids)))
        pin_dir = f"/sys/fs/bpf/steerd-bench-{uuid.uuid4().hex[:8]}"
        dp = Dataplane(DataplaneConfig(layout=LAYOUT, port=PORT, classifier_slots=1,
                                       pin_dir=pin_dir))
        try:
            dp.load()
            insert_learned(dp, learned_cids, pair.client_v4)
            null = bcc.BPF(text=NULL_XDP.encode()).load_func(b"null_xdp", bcc.BPF.XDP)
            # Warm-up: neighbour resolution and caches, not counted.
            run_mode("plain", pair, dp, null, sender, receiver, tmpls, args.size, 0.5)
            for rnd in range(args.rounds):
                # Rotate the order so no mode always runs first (or after the same mode).
                for mode in MODES[rnd % len(MODES):] + MODES[: rnd % len(MODES)]:
                    result = run_mode(mode, pair, dp, null, sender, receiver, tmpls,
                                      args.size, args.seconds)
                    check(result)
                    results.append(result)
                    if not args.json:
                        print(f"  {mode:<18} {result['pps']:>12,.0f} pps  sent {result['sent']:,}"
                              f"  rcvbuf_errors {result['rcvbuf_errors']}"
                              f"  {result['cpu_ns_per_packet']:,.0f} CPU0 ns/pkt", file=sys.stderr)
            stats_file = Path("/proc/sys/kernel/bpf_stats_enabled")
            stats_was = stats_file.read_text().strip()
            stats_file.write_text("1")
            try:
                for _ in range(args.stats_rounds):
                    for mode in STATS_MODES:
                        result = run_mode(mode, pair, dp, null, sender, receiver, tmpls,
                                          args.size, args.seconds)
                        check(result)
                        stats.append(result)
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

    def prog_median(mode: str, prog: str) -> float:
        return statistics.median(
            float(r["prog_ns_per_packet"][prog])  # type: ignore[index]
            for r in stats
            if r["mode"] == mode and r["prog_ns_per_packet"].get(prog) is not None  # type: ignore[attr-defined]
        )

    # program -> median ns per run, from the bpf_stats runs of the mode that exercises it
    prog_medians = {
        "steer": prog_median("steer+xdp", "steer"),
        "guard": prog_median("steer+xdp", "guard"),
        "null": prog_median("null-xdp", "null"),
        "steer_learned_cid": prog_median("steer-learned", "steer"),
        "steer_learned_peer": prog_median("steer-learned-peer", "steer"),
        "steer_with_learner": prog_median("steer+learner", "steer"),
        "learn": prog_median("steer+learner", "learn"),
        "steer_with_unicast": prog_median("steer+unicast", "steer"),
        "unicast": prog_median("steer+unicast", "unicast"),
    }
    steering = [m for m in MODES if m.startswith("steer")]
    summary = {
        "seconds": args.seconds, "rounds": args.rounds, "payload_bytes": args.size,
        "median_pps": median,
        "ratio_to_plain": {m: median[m] / median["plain"] for m in MODES},
        "min_max_pps": {m: (min(series("pps", m)), max(series("pps", m))) for m in MODES},
        "median_cpu_ns_per_packet": cost,
        "cpu_normalised_ratio_to_plain": {m: cost["plain"] / cost[m] for m in MODES},
        "ratio_to_steer": {m: median[m] / median["steer"] for m in steering},
        "cpu_normalised_ratio_to_steer": {m: cost["steer"] / cost[m] for m in steering},
        "median_reached_pps": reached,
        "steer_xdp_vs_null_xdp": median["steer+xdp"] / median["null-xdp"],
        "steer_xdp_vs_null_xdp_cpu": cost["null-xdp"] / cost["steer+xdp"],
        "rcvbuf_errors_total": sum(int(r["rcvbuf_errors"]) for r in results),  # type: ignore[call-overload]
        "prog_ns_per_packet": prog_medians,
        "programs_net_ns_per_packet": (
            prog_medians["steer"] + prog_medians["guard"] - 2 * prog_medians["null"]
        ),
        "runs": results,
        "stats_runs": stats,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'mode':<18} {'median pps':>12} {'vs plain':>9} {'min':>10} {'max':>10}"
              f" {'CPU0 ns/pkt':>12} {'pkts/CPU-s vs plain':>20} {'vs steer':>9}"
              f" {'pkts/CPU-s vs steer':>20}")
        for m in MODES:
            lo, hi = summary["min_max_pps"][m]  # type: ignore[index]
            vs_steer = (f" {median[m] / median['steer']:>8.3f}x"
                        f" {cost['steer'] / cost[m]:>19.3f}x" if m in steering else "")
            print(f"{m:<18} {median[m]:>12,.0f} {median[m] / median['plain']:>8.3f}x"
                  f" {lo:>10,.0f} {hi:>10,.0f} {cost[m]:>12,.0f}"
                  f" {cost['plain'] / cost[m]:>19.3f}x{vs_steer}")
        print(f"socket receive-buffer drops over all runs: {summary['rcvbuf_errors_total']}")
        progs = summary["prog_ns_per_packet"]
        print("BPF program run time per run, median (kernel bpf_stats; the null XDP program's "
              "figure is the stats' own overhead):")
        for name, ns in progs.items():  # type: ignore[attr-defined]
            print(f"  {name:<20} {ns:6.1f} ns")
        net = progs["steer"] + progs["guard"] - 2 * progs["null"]  # type: ignore[index]
        print(f"CPU 0 spends {cost['plain']:.0f} ns per packet (send + receive path) in plain "
              f"mode; the two programs' own run time, stats overhead taken out, is {net:.0f} ns "
              f"= {100 * net / cost['plain']:.1f}% of it")
        print(f"steer+tc against plain: {median['steer+tc'] / median['plain']:.3f}x pps, "
              f"{cost['plain'] / cost['steer+tc']:.3f}x packets per CPU-second")
        for m in ("steer-learned", "steer-learned-peer", "steer+learner", "steer+unicast"):
            print(f"{m} against steer: {median[m] / median['steer']:.3f}x pps, "
                  f"{cost['steer'] / cost[m]:.3f}x packets per CPU-second")
        print(f"steer+xdp against null-xdp (the veth XDP-mode cost taken out): "
              f"{median['steer+xdp'] / median['null-xdp']:.3f}x pps, "
              f"{cost['null-xdp'] / cost['steer+xdp']:.3f}x packets per CPU-second")


if __name__ == "__main__":
    sys.exit(main())
