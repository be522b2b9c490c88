"""steerd on several hosts behind one L4 balancer, all in network namespaces (./demo.sh --hosts N).

Why: one host proves that apps share a port; a fleet must also keep every connection on the
host that owns it. steerd's server CIDs carry the host ID (quic/cid.py), and ``steerd
lb-config`` turns a hosts file into an nftables ruleset that routes long headers by a 4-tuple
hash and short headers by that host ID. This module builds the whole thing from real parts
and checks it end to end; the demo and tests/e2e/test_multihost.py both use it::

    client ns ── veth ── balancer ns ──┬── veth ── host 101 ns: steerd run, h3 site, file service
    (198.18.0.1)     (VIP 198.18.0.2,  ├── veth ── host 102 ns: ...
                      ip_forward, nft) └── veth ── host 103 ns: ...

- the client/balancer link is deploy/netns.py's ``netns_pair`` (the balancer is its "server"
  side, so the demo's client helpers, which talk to ``pair.server_v4``/``_v6``, reach the VIP);
- host ``i`` (ID ``100 + i``) is 198.18.(100+i).2 and fd00:5eed:(100+i)::2, default routes via
  the balancer: replies must pass the balancer's conntrack, which undoes the DNAT;
- the CID layout is Katran's v2 profile (config_id 4, 24-bit host ID in bytes 1-3): the same
  CIDs that this nftables balancer routes are routable by Katran too (docs/MULTIHOST.md);
- one hosts file per address family (lb-config takes one family per file), both applied;
- each host runs its own ``steerd run`` (own pin dir, control socket, config with its
  ``host_id``) and the demo's two apps as their own users, 2 workers each; every host
  serves the same certificate (made once here), as a real fleet behind one name does.

Teardown, also on failure and Ctrl-C: apps (SIGTERM: drain), daemons (SIGTERM), ``steerd
purge`` per host, namespaces, the work dir. Everything this module creates is named
``steerd-mh-*``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find deploy/

from deploy.apps.certs import ensure_cert
from deploy.demo import (
    APPS,
    FILES,
    INTERRUPTS,
    PORT,
    PYTHON,
    SITE,
    STEERD,
    AppUser,
    Proc,
    app_users,
    kill_client_programs,
    run_chromium,
    run_gtlsclient,
    spawn,
    write_config,
)
from deploy.netns import LIVE, NetnsPair, _delete_netns, ip, netns_pair
from deploy.proclines import Lines
from deploy.quicclient import RequestFailed, Session, _stack
from quic.cid import CidLayout, katran_host_id
from quic.packet import PacketType, parse_long_header
from steerd.daemon.dataplane.netns import netns_path, run_in_netns
from steerd.tools.lbconfig import HASH_SEED
from steerd.tools.lbconfig import TABLE as LB_TABLE

PREFIX = "steerd-mh-"
BALANCER = "katran-v2"
CONFIG_ID = 4
HOST_ID_LEN = 3
FIRST_HOST_ID = 101
WORKERS = 2
KINDS = {"h3": ("h3", "web"), "file": ("smb", "files")}  # request kind -> (ALPN, app)


def log(msg: str) -> None:
    print(f"multihost: {msg}", file=sys.stderr, flush=True)


def layout(host_id: int = 0) -> CidLayout:
    """The fleet's CID layout; ``host_id`` only matters for encoding."""
    return CidLayout(config_id=CONFIG_ID, host_id=host_id, host_id_len=HOST_ID_LEN,
                     balancer=BALANCER)


@dataclass
class Host:
    """One steerd host. ``link`` is its veth to the balancer seen as a namespace pair
    (client side = the balancer, server side = the host), so deploy/demo.py's
    ``write_config`` writes its daemon's config unchanged."""

    id: int
    link: NetnsPair
    workdir: Path
    pin_dir: str
    daemon: Proc | None = None
    apps: dict[str, Proc] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return self.link.server

    @property
    def config(self) -> Path:
        return self.workdir / "steerd.toml"

    @property
    def control(self) -> str:
        return str(self.workdir / "control.sock")

    def nsenter(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={netns_path(self.netns)}", *cmd]

    def status(self) -> dict[str, Any]:
        out = subprocess.run(self.nsenter(STEERD, "status", "--json", "--control",
                                          self.control),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return dict(json.loads(out))


@dataclass(frozen=True)
class Served:
    """One request's answer and where it came from. ``host`` is the host whose app reported
    that worker pid at start (the app's own word about its slot and pid, mapped by us);
    ``cid_host`` is the host ID Katran reads in the server's CID as the client saw it (the
    SCID of the server's first long-header packet): they must agree, or the balancer would
    send this connection's next new 4-tuple (NAT rebinding) to another host."""

    info: dict[str, Any]
    host: int | None
    app: str | None
    cid: bytes
    cid_host: int | None


@dataclass
class Topology:
    """A built fleet: the client/balancer pair, the hosts by ID, which hosts the balancer
    currently routes to, and problems met while tearing down (filled on exit)."""

    pair: NetnsPair
    hosts: dict[int, Host]
    work: Path
    users: dict[str, AppUser]
    balanced: tuple[int, ...] = ()
    problems: list[str] = field(default_factory=list)
    # Client source ports, each used once (below the kernel's ephemeral range, so no client
    # program draws one either): conntrack keeps a closed connection's DNAT for minutes, so
    # a new connection on a reused 4-tuple would follow it to its old host, even one since
    # removed from the balancer.
    ports: Iterator[int] = field(default_factory=lambda: itertools.count(10000))

    @property
    def client(self) -> str:
        return self.pair.client

    @property
    def balancer(self) -> str:
        return self.pair.server

    def vip(self, family: int) -> str:
        return self.pair.server_addr(family)

    def balancer_if(self, host_id: int) -> str:
        """The balancer's veth toward ``host_id`` (where a capture sees that host's traffic)."""
        return self.hosts[host_id].link.client_if

    # ---- the balancer ------------------------------------------------------------------

    def set_balanced(self, host_ids: Iterable[int]) -> None:
        """Route to exactly these hosts: write the hosts files and apply ``steerd lb-config
        FILE | nft -f -`` in the balancer, as an operator adds or removes a host. Flows
        already in conntrack keep their host."""
        ids = tuple(sorted(host_ids))
        for family, name in ((socket.AF_INET, "hosts-v4.toml"), (socket.AF_INET6,
                                                                 "hosts-v6.toml")):
            path = self.work / name
            path.write_text(hosts_file(self, ids, family))
            ruleset = subprocess.run([STEERD, "lb-config", str(path)], capture_output=True,
                                     text=True, timeout=60, check=False)
            if ruleset.returncode != 0:
                raise RuntimeError(f"steerd lb-config {path}: {ruleset.stderr.strip()}")
            load = subprocess.run(["nsenter", f"--net={netns_path(self.balancer)}", "nft",
                                   "-f", "-"], input=ruleset.stdout, capture_output=True,
                                  text=True, timeout=60, check=False)
            if load.returncode != 0:
                raise RuntimeError(f"nft -f (from {path}): {load.stderr.strip()}")
        self.balanced = ids

    def set_plain_l4(self, host_ids: Iterable[int]) -> None:
        """Replace the balancer's ruleset by what a plain L4 balancer does (every packet
        DNATed by a hash of its 4-tuple, ``plain_l4_ruleset``), in the same table, so
        ``set_balanced`` puts steerd's ruleset back in one transaction. The tests use it to
        show what breaks without host-ID routing."""
        ids = tuple(sorted(host_ids))
        for family in (socket.AF_INET, socket.AF_INET6):
            load = subprocess.run(["nsenter", f"--net={netns_path(self.balancer)}", "nft",
                                   "-f", "-"], input=plain_l4_ruleset(self, ids, family),
                                  capture_output=True, text=True, timeout=60, check=False)
            if load.returncode != 0:
                raise RuntimeError(f"nft -f (plain L4 ruleset): {load.stderr.strip()}")
        self.balanced = ids

    def dnat_host(self, family: int, sport: int) -> int | None:
        """The host the balancer's conntrack sends the client's flow from source port
        ``sport`` to (its reply source), or None if it holds no such flow: where the nat
        hook put that 4-tuple's first packet."""
        table = subprocess.run(["nsenter", f"--net={netns_path(self.balancer)}", "cat",
                                "/proc/net/nf_conntrack"], capture_output=True, text=True,
                               timeout=30, check=True).stdout
        by_addr = {ipaddress.ip_address(h.link.server_addr(family)): h.id
                   for h in self.hosts.values()}
        for line in table.splitlines():
            fields = line.split()
            if fields[:1] != ["ipv4" if family == socket.AF_INET else "ipv6"] or \
                    "udp" not in fields:
                continue
            pairs = [f.split("=", 1) for f in fields if "=" in f]
            # original direction first (src, dst, sport, dport), then the reply's
            srcs = [v for k, v in pairs if k == "src"]
            sports = [v for k, v in pairs if k == "sport"]
            if len(srcs) >= 2 and sports[:1] == [str(sport)]:
                return by_addr.get(ipaddress.ip_address(srcs[1]))
        return None

    # ---- hosts ---------------------------------------------------------------------------

    def who(self, pid: Any) -> tuple[int | None, str | None]:
        """(host ID, app name) of the worker with this pid, from the apps' ready lines."""
        for host in self.hosts.values():
            for name, app in host.apps.items():
                if pid in app.ready.get("pids", {}).values():
                    return host.id, name
        return None, None

    def restart_steerd(self, host_id: int, how: signal.Signals = signal.SIGTERM) -> None:
        """The daemon's zero-downtime restart on one host: stop it (its pinned maps and
        programs stay, the apps keep their sockets), start it again on the same config and
        pin dir, and return once it is ready and every app of the host has resumed."""
        host = self.hosts[host_id]
        assert host.daemon is not None
        if how == signal.SIGTERM:
            code = host.daemon.stop()
            if code != 0:
                raise RuntimeError(f"steerd on host {host_id} exited {code} on SIGTERM")
        else:  # a crash: the daemon and any classifier process it forked, all at once
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.daemon.proc.pid, how)
            host.daemon.proc.wait(15)
        host.daemon = None
        start_daemon(host)
        await_daemon(host)
        deadline = time.monotonic() + 60
        status = host.status()
        while status["slots"]["awaiting_resume"] or len(status["apps"]) < len(host.apps):
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {host_id}: apps did not resume: {status}")
            status = host.status()  # each look is a process start: paced by itself

    # ---- clients -------------------------------------------------------------------------

    def client_socket(self, family: int, address: str | None = None) -> socket.socket:
        """A UDP socket in the client namespace on a source port never used before (see
        ``ports``), bound to ``address`` if given (a second client address: migration)."""
        sock = run_in_netns(self.client, lambda: socket.socket(family, socket.SOCK_DGRAM))
        try:
            any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
            sock.bind((address or any_addr, next(self.ports)))
        except OSError:
            sock.close()
            raise
        return sock

    def session(self, stack: str, kind: str, family: int, timeout: float = 20.0) -> Session:
        """An established connection from the client namespace to the VIP (handshake done).
        The socket lives in the client namespace; the session may be driven from any
        thread."""
        sock = self.client_socket(family)
        server_name = SITE if kind == "h3" else FILES
        s = Session(stack, sock, (self.vip(family), PORT), KINDS[kind][0],
                    server_name=server_name, timeout=timeout)
        try:
            s.handshake()
        except BaseException:
            s.close()
            raise
        return s

    def ask(self, s: Session, kind: str) -> Served:
        """One request on an open connection: who answered, and whose host ID its CID holds."""
        if kind == "h3":
            status, body = s.get("/count")
            if status != 200:
                raise RequestFailed(f"GET /count: status {status}")
        else:
            body = s.fetch("INFO")
        info = dict(json.loads(body))
        host, app = self.who(info.get("pid"))
        cid = server_cid(s)
        read = katran_host_id(cid)
        return Served(info, host, app, cid, read[1] if read else None)

    def request(self, stack: str, kind: str, family: int, timeout: float = 20.0) -> Served:
        """A fresh connection, one request, closed."""
        s = self.session(stack, kind, family, timeout)
        try:
            return self.ask(s, kind)
        finally:
            s.close()

    def served_error(self, served: Served, kind: str) -> str:
        """Why ``served`` is wrong for a ``kind`` request, or "" if the right app answered on
        the host whose ID the server's CID carries. A client program that does not show its
        CIDs (``cid`` empty) is checked by the capture instead (``link_cids``)."""
        want = KINDS[kind][1]
        if served.app != want:
            return f"served by {served.app!r} (pid {served.info.get('pid')}), expected {want!r}"
        if served.cid and served.host != served.cid_host:
            return f"served by host {served.host} but its CID {served.cid.hex()} names " \
                   f"host {served.cid_host}"
        return ""

    @contextlib.contextmanager
    def capture(self, host_ids: Iterable[int] | None = None) -> Iterator[dict[int, Path]]:
        """dumpcap on the balancer's veth toward each host (UDP 443 only), one file per host;
        the files are complete once the block exits."""
        paths: dict[int, Path] = {}
        procs: list[subprocess.Popen[str]] = []
        try:
            for hid in host_ids if host_ids is not None else self.hosts:
                path = paths[hid] = self.work / f"wire-{hid}-{uuid.uuid4().hex[:6]}.pcapng"
                proc = subprocess.Popen(
                    ["nsenter", f"--net={netns_path(self.balancer)}", "dumpcap", "-q", "-i",
                     self.balancer_if(hid), "-f", f"udp port {PORT}", "-w", str(path)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                procs.append(proc)
                if Lines(proc).wait_for(lambda s: s.startswith("File:"), 30) is None:
                    raise RuntimeError(f"dumpcap on {self.balancer_if(hid)} did not start")
            yield paths
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # dumpcap writes out what it has
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def hosts_file(topo: Topology, ids: tuple[int, ...], family: int) -> str:
    """The hosts file ``steerd lb-config`` reads, for one address family."""
    parts = [f"# written by deploy/multihost.py: hosts {', '.join(map(str, ids))}",
             "[balancer]", f'address = "{topo.vip(family)}"', f"port = {PORT}",
             "[cid]", f'balancer = "{BALANCER}"', f"config_id = {CONFIG_ID}",
             f"host_id_len = {HOST_ID_LEN}"]
    for hid in ids:
        parts += ["[[host]]", f"id = {hid}",
                  f'address = "{topo.hosts[hid].link.server_addr(family)}"']
    return "\n".join(parts) + "\n"


def plain_l4_ruleset(topo: Topology, ids: tuple[int, ...], family: int) -> str:
    """What a plain L4 balancer does, in steerd lb-config's table: every packet to the VIP,
    long or short header, DNATed by ``jhash saddr . sport`` (the same hash and seed as
    lb-config's long-header rule, so a connection's first flight lands where it would with
    steerd's ruleset). A rebound or migrated client is a new 4-tuple, hashed afresh."""
    fam = "ip6" if family == socket.AF_INET6 else "ip"
    by_hash = ", ".join(f"{i} : {topo.hosts[h].link.server_addr(family)}"
                        for i, h in enumerate(ids))
    return "\n".join([
        f"table {fam} {LB_TABLE}",
        f"delete table {fam} {LB_TABLE}",
        f"table {fam} {LB_TABLE} {{",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        f"\t\t{fam} daddr {topo.vip(family)} udp dport {PORT} dnat to jhash {fam} saddr . "
        f"udp sport mod {len(ids)} seed 0x{HASH_SEED:x} map {{ {by_hash} }}",
        "\t}",
        "}",
        "",
    ])


def server_cid(s: Session) -> bytes:
    """The CID the server chose, as the client received it: the SCID of the server's first
    Initial or Handshake packet (a Retry's SCID is the daemon's, not the worker's)."""
    for datagram in s.received:
        if not datagram or not datagram[0] & 0x80:
            continue
        header = parse_long_header(datagram)
        if header.packet_type in (PacketType.INITIAL, PacketType.HANDSHAKE):
            return header.scid
    raise RequestFailed("no long-header packet from the server")


def link_cids(topo: Topology, paths: dict[int, Path]) -> tuple[dict[int, int], list[str]]:
    """tshark's reading of the captures on the balancer's host links: for each host, how
    many CIDs in our layout it saw (server SCIDs in long headers, client DCIDs in long and
    short headers), and every one that names another host. Independent of the clients'
    own account: this is what actually crossed each link."""
    counts: dict[int, int] = {}
    wrong: list[str] = []
    cid_len = layout().cid_len
    for hid, path in paths.items():
        proc = subprocess.run(
            ["tshark", "-n", "-r", str(path), "-d", f"udp.port=={PORT},quic", "-T", "fields",
             "-E", "separator=|", "-e", "udp.dstport", "-e", "quic.scid", "-e", "quic.dcid",
             "-e", "udp.payload"], capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"tshark on {path}: {proc.stderr.strip()}")
        counts[hid] = 0
        for line in proc.stdout.splitlines():
            dport, scids, dcids, payload = line.split("|")
            data = bytes.fromhex(payload.replace(":", ""))
            if not data:
                continue
            if int(dport) == PORT:  # to the host: its DCIDs (short: at the fixed length)
                cids = [data[1:1 + cid_len]] if not data[0] & 0x80 else \
                    [bytes.fromhex(d.replace(":", "")) for d in dcids.split(",") if d]
            else:  # from the host: the CIDs it chose
                cids = [bytes.fromhex(c.replace(":", "")) for c in scids.split(",") if c]
            for cid in cids:
                if layout().split(cid).config_rotation != CONFIG_ID or len(cid) != cid_len:
                    continue  # a client-chosen DCID (Initial): not ours to check
                read = katran_host_id(cid)
                counts[hid] += 1
                if read is None or read[1] != hid:
                    wrong.append(f"link to host {hid}: CID {cid.hex()} names "
                                 f"{read[1] if read else 'no host'}")
    return counts, wrong


# ---- building and tearing down -------------------------------------------------------------


def start_daemon(host: Host) -> None:
    host.daemon = spawn(f"steerd-{host.id}", host.netns,
                        [STEERD, "run", "-v", "-c", str(host.config), "--pin-dir",
                         host.pin_dir], host.workdir / "steerd.log", {})


def await_daemon(host: Host, timeout: float = 120) -> None:
    assert host.daemon is not None
    if host.daemon.lines.wait_for(lambda s: s.strip() == "steerd: ready", timeout) is None:
        raise RuntimeError(f"steerd on host {host.id} did not become ready")


def _add_host(topo: Topology, index: int, tag: str) -> Host:
    """A host namespace joined to the balancer by its own veth and subnets."""
    hid = FIRST_HOST_ID + index
    ns = f"{PREFIX}h{hid}-{tag}"
    link = NetnsPair(client=topo.balancer, server=ns, client_if=f"mb{hid}{tag}",
                     server_if=f"mh{hid}{tag}", client_v4=f"198.18.{hid}.1",
                     server_v4=f"198.18.{hid}.2", client_v6=f"fd00:5eed:{hid}::1",
                     server_v6=f"fd00:5eed:{hid}::2")
    LIVE.add(ns)
    ip("netns", "add", ns)
    ip("link", "set", "lo", "up", netns=ns)
    ip("link", "add", link.server_if, "netns", ns, "type", "veth", "peer", "name",
       link.client_if, "netns", topo.balancer)
    for netns, dev, v4, v6 in ((ns, link.server_if, link.server_v4, link.server_v6),
                               (topo.balancer, link.client_if, link.client_v4,
                                link.client_v6)):
        ip("addr", "add", f"{v4}/24", "dev", dev, netns=netns)
        ip("addr", "add", f"{v6}/64", "dev", dev, "nodad", netns=netns)
        ip("link", "set", dev, "up", netns=netns)
    ip("route", "add", "default", "via", link.client_v4, netns=ns)
    ip("-6", "route", "add", "default", "via", link.client_v6, netns=ns)
    workdir = topo.work / f"h{hid}"
    workdir.mkdir(mode=0o711)
    host = Host(hid, link, workdir, f"/sys/fs/bpf/{PREFIX}{hid}-{tag}")
    write_config(host.config, link, topo.users)
    with open(host.config, "a") as f:  # the demo's config plus this host's CID layout
        f.write(f'[cid]\nbalancer = "{BALANCER}"\nconfig_id = {CONFIG_ID}\n'
                f"host_id = {hid}\nhost_id_len = {HOST_ID_LEN}\n")
    return host


def _start_apps(topo: Topology, host: Host, files: Path) -> None:
    for name, script, extra in (
        ("web", "h3site.py", ["--server-name", SITE, "--server-name", "localhost"]),
        ("files", "fileserve.py", ["--root", str(files)]),
    ):
        host.apps[name] = spawn(f"{name}-{host.id}", host.netns, [
            *topo.users[name].setpriv(), PYTHON, str(APPS / script), "--app", name,
            "--control", host.control, "--cert-dir", str(topo.work / f"{name}-cert"),
            "--workers", str(WORKERS), *extra,
        ], host.workdir / f"{name}.log", {})


def _await_apps(host: Host) -> None:
    for name, app in host.apps.items():
        line = app.lines.wait_for(lambda s: '"ready"' in s, 60)
        if line is None:
            raise RuntimeError(f"app {name} on host {host.id} did not become ready")
        app.ready = json.loads(line)


def _stop_all(procs: list[Proc], what: str, problems: list[str]) -> None:
    """SIGTERM to all at once (each drains or shuts down in parallel), then reap each."""
    if not procs:
        return
    with ThreadPoolExecutor(len(procs)) as pool:
        for proc, code in zip(procs, pool.map(lambda p: p.stop(), procs), strict=True):
            if code != 0:
                problems.append(f"{what} {proc.name} exited {code}")


def _teardown(topo: Topology) -> None:
    hosts = list(topo.hosts.values())
    _stop_all([a for h in hosts for a in h.apps.values()], "app", topo.problems)
    _stop_all([h.daemon for h in hosts if h.daemon is not None], "daemon", topo.problems)
    for h in hosts:
        purge = subprocess.run(h.nsenter(STEERD, "purge", "-c", str(h.config), "--pin-dir",
                                         h.pin_dir),
                               capture_output=True, text=True, timeout=120, check=False)
        if purge.returncode != 0 or os.path.exists(h.pin_dir):
            topo.problems.append(f"steerd purge on host {h.id} failed ({purge.returncode}): "
                                 f"{purge.stderr.strip()}")


def _log_tails(topo: Topology) -> None:
    for h in topo.hosts.values():
        for logfile in sorted(h.workdir.glob("*.log")):
            if tail := logfile.read_text().strip().splitlines():
                log(f"last lines of host {h.id} {logfile.name}:\n  " + "\n  ".join(tail[-12:]))


@contextlib.contextmanager
def topology(n_hosts: int = 3, shield_teardown: bool = False) -> Iterator[Topology]:
    """Build the fleet, balance over every host, yield it; tear everything down on exit
    (also on an exception or KeyboardInterrupt). ``topo.problems`` then lists what went
    wrong in teardown (a nonzero exit, a purge that failed). ``shield_teardown`` (for the
    demo script) ignores further Ctrl-C and SIGTERM once teardown has begun, so a second
    Ctrl-C cannot leave pin dirs and namespaces behind."""
    if not 1 <= n_hosts <= 150:
        raise ValueError(f"hosts must be 1..150, got {n_hosts}")
    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    os.chmod(work, 0o711)  # the apps' users reach their control sockets and cert dirs
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        pair = cleanup.enter_context(netns_pair(prefix=PREFIX))
        tag = pair.client.rsplit("-", 1)[1]
        users, why_root = app_users()
        if why_root:
            log(f"apps run as root: {why_root}")
        topo = Topology(pair, {}, work, users)
        try:
            subprocess.run(["ip", "netns", "exec", topo.balancer, "sysctl", "-qw",
                            "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
                           check=True, timeout=30)
            for i in range(n_hosts):
                # register the deletion first: a failure half-way still removes the namespace
                cleanup.callback(_delete_netns, f"{PREFIX}h{FIRST_HOST_ID + i}-{tag}")
                host = _add_host(topo, i, tag)
                topo.hosts[host.id] = host
            log(f"namespaces {pair.client} (client), {topo.balancer} (balancer, VIP "
                f"{pair.server_v4} and {pair.server_v6}), "
                + ", ".join(h.netns for h in topo.hosts.values()))
            log(f"work dir {work}, BPF pin dirs "
                + ", ".join(h.pin_dir for h in topo.hosts.values()))
            for name in ("web", "files"):  # one certificate per app, served by every host
                user = users[name]
                cert_dir = work / f"{name}-cert"
                ensure_cert(cert_dir, [SITE, "localhost"] if name == "web" else ["localhost"])
                for path in (cert_dir, *cert_dir.iterdir()):
                    os.chown(path, user.uid, user.gid)
            files = work / "files"
            files.mkdir(mode=0o755)
            (files / "hello.txt").write_text("hello from the file service (not SMB)\n")
            os.chmod(files / "hello.txt", 0o644)
            log(f"starting {n_hosts} steerd daemons (each compiles its BPF programs)")
            for host in topo.hosts.values():
                start_daemon(host)
            for host in topo.hosts.values():
                await_daemon(host)
                _start_apps(topo, host, files)
            for host in topo.hosts.values():
                _await_apps(host)
            topo.set_balanced(topo.hosts)
            for stack in ("aioquic", "qh3"):
                # deploy.quicclient imports a stack at its first use; client threads that
                # import qh3 at once can meet it half-initialized (ImportError), so here first
                _stack(stack)
            yield topo
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException:
            _log_tails(topo)  # what the daemons and apps said, before the work dir goes
            raise
        finally:
            if shield_teardown:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
            log("tearing down: apps (SIGTERM: drain), daemons (SIGTERM), steerd purge per "
                "host, namespaces")
            _teardown(topo)
            for problem in topo.problems:
                log(problem)


# ---- the demo --------------------------------------------------------------------------------


@dataclass
class Row:
    client: str
    family: str
    kind: str
    run: Callable[[], Served]
    served: Served | None = None
    error: str = ""


def _program_served(topo: Topology, info: dict[str, Any]) -> Served:
    """Chromium and gtlsclient say only what the app said; the CID check for their
    connections is the capture's (``link_cids``)."""
    host, app = topo.who(info.get("pid"))
    return Served(info, host, app, b"", None)


def demo(n_hosts: int, verbose: bool) -> int:
    started = time.monotonic()
    status = 1
    with topology(n_hosts, shield_teardown=True) as topo:
        v4, v6 = socket.AF_INET, socket.AF_INET6
        cert = topo.work / "web-cert" / "cert.pem"
        rows: list[Row] = [
            Row("Chromium (headless)", "v4", "h3",
                lambda: _program_served(topo, run_chromium(topo.pair, topo.work, cert))),
            Row("ngtcp2 gtlsclient", "v6", "h3",
                lambda: _program_served(topo, run_gtlsclient(topo.pair, topo.work))),
        ]
        for stack in ("qh3", "aioquic"):
            for fam, fname in ((v4, "v4"), (v6, "v6")):
                for kind in ("h3", "file"):
                    rows.append(Row(stack, fname, kind,
                                    lambda s=stack, f=fam, k=kind: topo.request(s, k, f)))
        print(f"steerd demo: {n_hosts} hosts behind an nftables balancer "
              f"(steerd lb-config, {BALANCER}: host ID in CID bytes 1-{HOST_ID_LEN})\n"
              f"  client {topo.client} -> VIP {topo.pair.server_v4}, {topo.pair.server_v6} "
              f"UDP {PORT} in {topo.balancer}\n"
              + "\n".join(f"  host {h.id}: {h.netns}, {h.link.server_v4}, "
                          f"{h.link.server_v6}" for h in topo.hosts.values()), flush=True)
        log("running the clients; dumpcap on the balancer's host links")
        with topo.capture() as paths, ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(r.run) for r in rows]
            try:
                for row, fut in zip(rows, futures, strict=True):
                    try:
                        row.served = fut.result()
                    except (RequestFailed, OSError, ValueError,
                            subprocess.TimeoutExpired) as exc:
                        row.error = str(exc) or type(exc).__name__
                        continue
                    row.error = topo.served_error(row.served, row.kind)
                    if not row.error and row.served.host not in topo.balanced:
                        row.error = f"served by host {row.served.host}, not a balanced host"
            except KeyboardInterrupt:
                kill_client_programs()
                raise
        counts, wrong = link_cids(topo, paths)
        head = ("CLIENT", "IP", "ALPN", "HOST", "APP slot/pid", "CID NAMES", "RESULT")
        lines = [head]
        for r in rows:
            s = r.served
            lines.append((
                r.client, r.family, KINDS[r.kind][0], str(s.host) if s else "-",
                f"{s.app} {s.info.get('slot')}/{s.info.get('pid')}" if s else "-",
                (f"host {s.cid_host}" if s.cid else "(capture)") if s else "-",
                "ok" if s and not r.error else f"FAILED: {r.error}"))
        widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
        print()
        for x in lines:
            print("  ".join([*(c.ljust(w) for c, w in zip(x, widths, strict=False)), x[-1]]))
        print()
        per_host = {h: sum(1 for r in rows if r.served and r.served.host == h)
                    for h in topo.hosts}
        print("  connections per host: "
              + ", ".join(f"host {h}: {n}" for h, n in per_host.items()))
        print("  wire (tshark on the balancer's link to each host): "
              + ", ".join(f"host {h}: {n} CIDs" for h, n in counts.items())
              + (", every one naming that host" if not wrong else ""))
        for w in wrong[:10]:
            print(f"  WRONG {w}")
        status = 0 if all(r.served and not r.error for r in rows) and not wrong else 1
        if verbose or status:
            _log_tails(topo)  # before teardown removes the work dir
    if topo.problems:
        status = 1
    verdict = "every client was served by the right app on the host its CID names" \
        if status == 0 else "FAILED"
    print(f"\n{verdict} ({time.monotonic() - started:.1f} s, everything torn down)")
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="steerd on N hosts behind an nftables balancer")
    p.add_argument("--hosts", type=int, default=3, help="how many steerd hosts (default 3)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the logs' tails")
    args, _ = p.parse_known_args(argv)
    if os.geteuid() != 0:
        log("needs root (network namespaces, BPF, nftables): sudo ./demo.sh --hosts N")
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM: the same teardown as Ctrl-C
        signal.signal(sig, INTERRUPTS.handler)
    try:
        return demo(args.hosts, args.verbose)
    except KeyboardInterrupt:
        log("interrupted: torn down")
        return 130
    except (RuntimeError, OSError, ValueError) as exc:
        log(f"FAILED: {exc} (torn down)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
