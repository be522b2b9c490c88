"""What several hosts cost: the balancer's CPU per packet, and the host ID in steerd's steering.

    .venv/bin/python bench/multihost/run.py [--seconds S] [--rounds R] [--json]

Two measurements in one run, each side by side with its baseline (modes interleaved round by
round, so machine noise hits both alike), reported as ratios:

(i) **Through the balancer vs routed straight to the host.** Three namespaces: client ──
veth ── balancer ── veth ── host (the same addresses as deploy/multihost.py). The client
sends short-header QUIC packets for host ID 101 (bench/datapath's C sendmmsg sender, 8 source
ports, pinned to CPU 0); in the host a reuseport group of 4 sockets is drained by
bench/datapath's recvmmsg receiver (pinned to CPU 1). Modes:

- ``routed``: the balancer is a plain router (no nftables table, so no conntrack in its
  namespace); the client sends to the host's own address;
- ``balanced``: the balancer runs the ruleset ``steerd lb-config`` prints for a hosts file of
  3 hosts (101 is the one that exists); the client sends to the VIP, and the balancer DNATs
  by host ID. As in deployment, the nat rules run for the first packet of each 4-tuple and
  conntrack forwards the rest: what a packet of an established flow costs is the conntrack
  lookup and the NAT rewrite, and that is what this mode measures per packet.

Method: over veth, the whole path of a packet (the client's send, the balancer's receive,
forwarding and NAT, the host's receive up to the socket queue) runs on the sender's CPU,
either in the sender's own context (softirq at the end of its send call: counted in its
CLOCK_PROCESS_CPUTIME_ID) or in ksoftirqd/0 (counted from /proc/PID/schedstat). CPU 0 time
per packet that reached a socket, for the same load and the same host, compared between the
modes: the difference is the balancer's ruleset, and packets per CPU-second = 1e9 / that.
The receiver's own reading (CPU 1) is the same in both modes and not counted.

(ii) **What the host ID costs steerd's steering.** bench/datapath's ``steer`` mode (the
SK_REUSEPORT steering program picks one of 4 worker sockets by the slot in the DCID) with two
CID layouts of one run: host_id_len 0 (one host) and 3 (katran-v2: config_id 4, host ID in
bytes 1-3, what a fleet runs); slot 2 bytes and nonce 6 in both. Reported: CPU 0 ns per packet
and delivered pps (kernel BPF stats off), and the steering program's own run time per packet
(kernel bpf_stats on, in extra rounds: the stats add two clock reads per run, alike for both).

Needs root, gcc and taskset (as bench/datapath). Everything it creates is named
``steerd-mh-*`` (namespaces, BPF pin dirs) and removed on exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from deploy.demo import STEERD  # noqa: E402
from deploy.netns import LIVE, NetnsPair, _delete_netns, ip, netns_pair  # noqa: E402
from quic.cid import CidLayout  # noqa: E402
from steerd.daemon.dataplane import Dataplane, DataplaneConfig  # noqa: E402
from steerd.daemon.dataplane.netns import netns_path  # noqa: E402


def _load_datapath() -> Any:
    """bench/datapath/run.py as a module: its sender, receiver, socket group, CPU accounting
    and steer mode are the measurement, reused rather than copied."""
    spec = importlib.util.spec_from_file_location("bench_datapath_run",
                                                  HERE.parent / "datapath" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


datapath = _load_datapath()

PREFIX = "steerd-mh-"
PORT = 443
HOST_ID = 101
FLEET = (101, 102, 103)  # the hosts file's hosts; only 101 exists (all traffic is for it)
SIZE = 100  # UDP payload bytes
FLEET_LAYOUT = CidLayout(config_id=4, host_id=HOST_ID, host_id_len=3, balancer="katran-v2")
ONE_HOST_LAYOUT = CidLayout(config_id=4)  # host_id_len 0; slot and nonce as FLEET_LAYOUT
BALANCER_MODES = ("routed", "balanced")


def templates(path: Path, layout: CidLayout) -> None:
    """Short-header packets naming the 4 worker slots round robin, each its own nonce."""
    slots = datapath.WORKER_SLOTS
    with path.open("wb") as f:
        for i in range(datapath.TEMPLATES):
            cid = layout.encode(slots[i % len(slots)], os.urandom(layout.nonce_len))
            f.write((bytes([0x43]) + cid).ljust(SIZE, b"\x00"))


@contextmanager
def three_namespaces() -> Iterator[tuple[NetnsPair, NetnsPair]]:
    """(client/balancer pair, balancer/host link): the balancer is the pair's server side
    and the link's client side, as in deploy/multihost.py."""
    with netns_pair(tag="b", prefix=PREFIX) as pair:
        suffix = pair.client.rsplit("-", 1)[1]
        host = f"{PREFIX}bh-{suffix}"
        link = NetnsPair(client=pair.server, server=host, client_if=f"mb{suffix}",
                         server_if=f"mh{suffix}", client_v4=f"198.18.{HOST_ID}.1",
                         server_v4=f"198.18.{HOST_ID}.2", client_v6=f"fd00:5eed:{HOST_ID}::1",
                         server_v6=f"fd00:5eed:{HOST_ID}::2")
        try:
            LIVE.add(host)
            ip("netns", "add", host)
            ip("link", "set", "lo", "up", netns=host)
            ip("link", "add", link.server_if, "netns", host, "type", "veth", "peer", "name",
               link.client_if, "netns", pair.server)
            for ns, dev, v4 in ((host, link.server_if, link.server_v4),
                                (pair.server, link.client_if, link.client_v4)):
                ip("addr", "add", f"{v4}/24", "dev", dev, netns=ns)
                ip("link", "set", dev, "up", netns=ns)
            ip("route", "add", "default", "via", link.client_v4, netns=host)
            ip("route", "add", f"198.18.{HOST_ID}.0/24", "via", pair.server_v4,
               netns=pair.client)
            subprocess.run(["ip", "netns", "exec", pair.server, "sysctl", "-qw",
                            "net.ipv4.ip_forward=1"], check=True, timeout=30)
            yield pair, link
        finally:
            _delete_netns(host)


def nft(balancer: str, ruleset: str | None, *args: str) -> None:
    subprocess.run(["nsenter", f"--net={netns_path(balancer)}", "nft",
                    *(["-f", "-"] if ruleset is not None else args)],
                   input=ruleset, text=True, capture_output=True, check=True, timeout=30)


def lb_ruleset(pair: NetnsPair, workdir: Path) -> str:
    """The ruleset steerd lb-config prints for the fleet, as deploy/multihost.py applies it."""
    hosts = workdir / "hosts.toml"
    hosts.write_text("\n".join([
        "[balancer]", f'address = "{pair.server_v4}"', f"port = {PORT}",
        "[cid]", 'balancer = "katran-v2"', "config_id = 4", "host_id_len = 3",
        *(f'[[host]]\nid = {h}\naddress = "198.18.{h}.2"' for h in FLEET)]) + "\n")
    return subprocess.run([STEERD, "lb-config", str(hosts)], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def run_balancer_mode(mode: str, pair: NetnsPair, link: NetnsPair, ruleset: str,
                      sender: Path, receiver: Path, tmpl: Path,
                      seconds: float) -> dict[str, Any]:
    """One timed run of ``mode``: the client's flood, the host's sockets drained, CPU 0."""
    if mode == "balanced":
        nft(pair.server, ruleset)
        dst = pair.server_v4
    else:
        nft(pair.server, None, "flush", "ruleset")
        dst = link.server_v4
    socks = link.run_server(lambda: [_reuseport_socket() for _ in range(4)])
    try:
        errs_before = datapath.rcvbuf_errors(link)
        fds = [s.fileno() for s in socks]
        recv = subprocess.Popen(["taskset", "-c", "1", str(receiver), str(seconds + 1.0),
                                 *map(str, fds)], pass_fds=fds, stdout=subprocess.PIPE,
                                text=True)
        soft_before = datapath.ksoftirqd_ns(0)
        send = subprocess.run(
            ["ip", "netns", "exec", pair.client, "taskset", "-c", "0", str(sender), dst,
             str(PORT), str(seconds), str(datapath.SENDER_SOCKETS), str(tmpl), str(SIZE),
             str(datapath.SRC_PORT_BASE)],
            capture_output=True, text=True, timeout=seconds + 30, check=True)
        soft_ns = datapath.ksoftirqd_ns(0) - soft_before
        out, _ = recv.communicate(timeout=seconds + 30)
        sent, _failed, sender_ns = (int(x) for x in send.stdout.split())
        delivered = sum(int(x) for x in out.split())
        reached = delivered + datapath.rcvbuf_errors(link) - errs_before
        if reached < sent // 2:
            raise RuntimeError(f"{mode}: only {reached} of {sent} packets reached the host")
        return {"mode": mode, "sent": sent, "reached": reached, "pps": delivered / seconds,
                "cpu_ns_per_packet": (sender_ns + soft_ns) / reached}
    finally:
        for s in socks:
            s.close()


def _reuseport_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", PORT))
    return s


def balancer_bench(args: argparse.Namespace, workdir: Path, sender: Path,
                   receiver: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    tmpl = workdir / "fleet.bin"
    templates(tmpl, FLEET_LAYOUT)
    with three_namespaces() as (pair, link):
        ruleset = lb_ruleset(pair, workdir)
        run_balancer_mode("routed", pair, link, ruleset, sender, receiver, tmpl, 0.5)  # warm
        for rnd in range(args.rounds):
            for mode in BALANCER_MODES[rnd % 2:] + BALANCER_MODES[:rnd % 2]:
                r = run_balancer_mode(mode, pair, link, ruleset, sender, receiver, tmpl,
                                      args.seconds)
                results.append(r)
                print(f"  {mode:<9} {r['pps']:>11,.0f} pps  {r['cpu_ns_per_packet']:>6,.0f} "
                      "CPU0 ns/pkt", file=sys.stderr)
    return results


def steering_bench(args: argparse.Namespace, workdir: Path, sender: Path,
                   receiver: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """bench/datapath's steer mode with host_id_len 0 and 3: timed rounds, then rounds with
    bpf_stats on for the program's own run time."""
    import bcc

    layouts = {"host_id_len=0": ONE_HOST_LAYOUT, "host_id_len=3": FLEET_LAYOUT}
    timed: list[dict[str, Any]] = []
    stats: list[dict[str, Any]] = []
    dps: dict[str, Dataplane] = {}
    tmpls: dict[str, dict[str, Path]] = {}
    with netns_pair(tag="d", prefix=PREFIX) as pair:
        try:
            for name, layout in layouts.items():
                path = workdir / f"{name}.bin"
                templates(path, layout)
                tmpls[name] = {"layout": path}
                dps[name] = Dataplane(DataplaneConfig(
                    layout=layout, port=datapath.PORT, classifier_slots=1,
                    pin_dir=f"/sys/fs/bpf/{PREFIX}bench-{uuid.uuid4().hex[:8]}"))
                dps[name].load()
            null = bcc.BPF(text=datapath.NULL_XDP.encode()).load_func(b"null_xdp",
                                                                       bcc.BPF.XDP)
            names = list(layouts)
            datapath.run_mode("plain", pair, dps[names[0]], null, sender, receiver,
                              tmpls[names[0]], SIZE, 0.5)  # warm-up, not counted

            def one(name: str, into: list[dict[str, Any]]) -> None:
                r = datapath.run_mode("steer", pair, dps[name], null, sender, receiver,
                                      tmpls[name], SIZE, args.seconds)
                datapath.check(r)
                r["layout"] = name
                into.append(r)
                print(f"  steer {name} {r['pps']:>11,.0f} pps  "
                      f"{r['cpu_ns_per_packet']:>6,.0f} CPU0 ns/pkt", file=sys.stderr)

            for rnd in range(args.rounds):
                for name in names[rnd % 2:] + names[:rnd % 2]:
                    one(name, timed)
            stats_file = Path("/proc/sys/kernel/bpf_stats_enabled")
            was = stats_file.read_text().strip()
            stats_file.write_text("1")
            try:
                for rnd in range(3):
                    for name in names[rnd % 2:] + names[:rnd % 2]:
                        one(name, stats)
            finally:
                stats_file.write_text(was)
        finally:
            for dp in dps.values():
                dp.destroy()
    return timed, stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per mode and round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json", action="store_true", help="also print every run")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/multihost needs root (namespaces, nftables, BPF)", file=sys.stderr)
        return 1
    if not shutil.which("gcc") or not shutil.which("taskset") or not shutil.which("nft"):
        print("bench/multihost needs gcc, taskset and nft", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        workdir = Path(tmp)
        sender, receiver = datapath.build(workdir)
        lb = balancer_bench(args, workdir, sender, receiver)
        timed, stats = steering_bench(args, workdir, sender, receiver)

    def med(rows: list[dict[str, Any]], key: str, **match: str) -> float:
        return statistics.median(float(r[key]) for r in rows
                                 if all(r.get(k) == v for k, v in match.items()))

    routed, balanced = (med(lb, "cpu_ns_per_packet", mode=m) for m in BALANCER_MODES)
    h0, h3 = (med(timed, "cpu_ns_per_packet", layout=n)
              for n in ("host_id_len=0", "host_id_len=3"))
    p0, p3 = (med(timed, "pps", layout=n) for n in ("host_id_len=0", "host_id_len=3"))
    s0, s3 = (statistics.median(float(r["prog_ns_per_packet"]["steer"]) for r in stats
                                if r["layout"] == n)
              for n in ("host_id_len=0", "host_id_len=3"))
    summary = {
        "seconds": args.seconds, "rounds": args.rounds, "payload_bytes": SIZE,
        "balancer": {
            "routed_cpu_ns_per_packet": round(routed),
            "balanced_cpu_ns_per_packet": round(balanced),
            "balancer_extra_ns_per_packet": round(balanced - routed),
            "packets_per_cpu_second_ratio_balanced_to_routed": round(routed / balanced, 3),
            "pps_ratio_balanced_to_routed": round(med(lb, "pps", mode="balanced")
                                                  / med(lb, "pps", mode="routed"), 3),
        },
        "steering": {
            "host_id_len_0_cpu_ns_per_packet": round(h0),
            "host_id_len_3_cpu_ns_per_packet": round(h3),
            "packets_per_cpu_second_ratio_3_to_0": round(h0 / h3, 3),
            "pps_ratio_3_to_0": round(p3 / p0, 3),
            "steer_prog_ns_host_id_len_0": round(s0, 1),
            "steer_prog_ns_host_id_len_3": round(s3, 1),
        },
    }
    if args.json:
        summary["runs"] = {"balancer": lb, "steering": timed, "steering_stats": stats}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
