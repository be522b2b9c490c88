"""Issue 20 items 4 and 6: NAT rebinding and migration through the balancer, mid-download.

The balancer's conntrack carries every 4-tuple it has seen, so steerd's host-ID rule (short
headers DNATed by the host ID in the DCID) decides exactly when a connection shows up on a
4-tuple the balancer has not seen: the client's NAT rebinds (new source port, same CIDs) or
the client migrates (new address and port, and a new CID). tests/e2e/test_multihost.py never
does that; this module does, for real, in the middle of a download:

- the client's UDP socket is replaced under a running aioquic or qh3 connection once a
  quarter of the body has arrived (``MovingSocket``): the server sees the same connection
  from a new source port (rebinding) or, after ``change_connection_id()``, a new CID from a
  new address and port (migration);
- the body arrives whole (length and SHA-256), the same worker (host, slot, pid) answers
  before and after, the balancer's conntrack DNATed the new 4-tuple to that host, and an
  nftables counter saw the new 4-tuple begin with a short header (so the host-ID rule, the
  only rule that DNATs short headers, put it there);
- the same moves through a plain L4 balancer (every packet DNATed by a 4-tuple hash): a move
  hashed to another host meets a steerd that does not own the CID and drops it, and the
  download stalls; at least one of 12 breaks there, none of the same 12 with steerd's rules;
- a rebinding after the host was removed from the hosts file: dropped by the balancer.

No timing assertions: a stalled download is one that does not finish in its session's
timeout, and each one counted as stalled is also shown misrouted by conntrack.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import pytest

from deploy.multihost import Topology, layout, topology
from deploy.netns import ip, list_netns
from deploy.quicclient import RequestFailed, Session
from quic.cid import katran_host_id
from steerd.daemon.dataplane.netns import netns_path

pytestmark = [pytest.mark.root, pytest.mark.serial]

V4, V6 = socket.AF_INET, socket.AF_INET6
CID_LEN = layout().cid_len
BIG, SMALL = 4 << 20, 1 << 20  # bodies of the single moves and of the 12-move batches
# The client's second address (migration), on its link to the balancer.
MIGRATE_TO = {V4: "198.18.0.11", V6: "fd00:5eed::11"}
WATCH = "steerd_mh_watch"  # our own nftables table in the balancer: a counter, no verdicts
# (stack, family, migrate): the 12 moves of each batch, both stacks, families and kinds
BATCH = [(("aioquic", "qh3")[i % 2], (V4, V6)[i // 2 % 2], i // 4 % 2 == 1) for i in range(12)]
BATCH_TIMEOUT = 30.0  # per download: a stalled one fails after this


@dataclass(frozen=True)
class Body:
    name: str
    size: int
    sha256: str


@dataclass
class Fleet:
    topo: Topology
    bodies: dict[int, Body]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests need root (network namespaces, BPF, nftables)")
    with topology(3) as t:
        namespaces = {t.client, t.balancer, *(h.netns for h in t.hosts.values())}
        pins = [h.pin_dir for h in t.hosts.values()]
        work = t.work
        bodies = {}
        for size in (BIG, SMALL):  # served by the file service of every host
            data = os.urandom(size)
            path = t.work / "files" / f"body-{size}.bin"
            path.write_bytes(data)
            os.chmod(path, 0o644)
            bodies[size] = Body(path.name, size, hashlib.sha256(data).hexdigest())
        for family, addr in MIGRATE_TO.items():
            extra = ["nodad"] if family == V6 else []
            plen = 64 if family == V6 else 24
            ip("addr", "add", f"{addr}/{plen}", "dev", t.pair.client_if, *extra,
               netns=t.client)
        nft(t, ruleset=f"table inet {WATCH} {{\n chain prerouting {{\n type filter hook "
            "prerouting priority -150; policy accept;\n udp dport 443 @th,64,1 0 ct state "
            "new counter\n }\n}\n")
        yield Fleet(t, bodies)
    assert t.problems == []
    assert namespaces.isdisjoint(list_netns())
    assert [p for p in pins if os.path.exists(p)] == []
    assert not work.exists()


def nft(topo: Topology, *args: str, ruleset: str | None = None) -> str:
    """nft in the balancer: a command line, or ``ruleset`` loaded with ``nft -f -``."""
    cmd = ["nsenter", f"--net={netns_path(topo.balancer)}", "nft", *args]
    proc = subprocess.run([*cmd, "-f", "-"] if ruleset is not None else cmd, input=ruleset,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def new_short_header_flows(topo: Topology) -> int:
    """Packets that opened a new 4-tuple in the balancer's conntrack with a short header:
    only a rebound or migrated client does that, and only the host-ID rule DNATs them."""
    ruleset = json.loads(nft(topo, "-j", "list", "table", "inet", WATCH))
    return sum(int(item["rule"]["expr"][-1]["counter"]["packets"])
               for item in ruleset["nftables"] if "rule" in item)


def not_ours_drops(topo: Topology) -> dict[int, int]:
    """Per host, short headers its steerd dropped because the CID names another host (the
    BPF steering program's counter and the classifier's reason together)."""
    out = {}
    for hid, host in topo.hosts.items():
        status = host.status()
        out[hid] = int(status["counters"].get("steer_drop_short_not_ours", 0)) + \
            int(status["classifier_drops"].get("short_header_not_ours", 0))
    return out


class MovingSocket:
    """Stands in for a Session's UDP socket and moves the connection to a new socket (new
    source port; with ``migrate``, also the client's second address) once ``after`` bytes
    came in. Why a wrapper: the move then happens inside the Session's own receive loop,
    mid-download, with the client code unchanged, exactly as a NAT rebinding looks to the
    server (the stack does not know its local address changed). With ``on_move`` (the
    stack's ``change_connection_id``) the client also switches to a new server CID, as an
    active migration does. Records the short-header DCIDs sent before and after the move:
    the bytes the balancer routes by."""

    def __init__(self, sock: socket.socket, make_next: Callable[[], socket.socket],
                 after: int, on_move: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.make_next = make_next
        self.after = after
        self.on_move = on_move
        self.received = 0
        self.received_after_move = 0
        self.port: int | None = None  # the new source port, once moved
        self.dcids_before: set[bytes] = set()
        self.dcids_after: set[bytes] = set()

    def fileno(self) -> int:
        return self.sock.fileno()

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        if data and not data[0] & 0x80:
            (self.dcids_after if self.port else self.dcids_before).add(data[1:1 + CID_LEN])
        return self.sock.sendto(data, addr)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        data, addr = self.sock.recvfrom(size)
        if self.port is not None:
            self.received_after_move += len(data)
        else:
            self.received += len(data)
            if self.received >= self.after:
                self.move()
        return data, addr

    def move(self) -> None:
        new = self.make_next()
        self.sock.close()  # what the old port still gets is lost, as behind a rebound NAT
        self.sock = new
        self.port = new.getsockname()[1]
        if self.on_move is not None:
            self.on_move()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Move:
    """One download with a rebinding or migration in the middle, and what each part saw."""

    stack: str
    family: int
    migrate: bool
    host: int | None = None  # where the connection was before the move
    worker: tuple[object, object] | None = None  # (slot, pid) before the move
    worker_after: tuple[int | None, object, object] | None = None  # (host, slot, pid) after
    port: int | None = None
    dnat_host: int | None = None  # where the balancer's conntrack sent the new 4-tuple
    dcids_before: set[bytes] = field(default_factory=set)
    dcids_after: set[bytes] = field(default_factory=set)
    received_after_move: int = 0
    error: str = ""

    @property
    def what(self) -> str:
        return (f"{self.stack} {socket.AddressFamily(self.family).name} "
                f"{'migration' if self.migrate else 'rebinding'}")


def connect(fleet: Fleet, stack: str, family: int, migrate: bool,
            timeout: float) -> tuple[Session, Move]:
    """A file-service connection through the balancer, and who serves it."""
    m = Move(stack, family, migrate)
    s = fleet.topo.session(stack, "file", family, timeout)
    try:
        before = fleet.topo.ask(s, "file")
    except BaseException:
        s.close()
        raise
    m.host, m.worker = before.host, (before.info["slot"], before.info["pid"])
    return s, m


def download_moving(fleet: Fleet, s: Session, m: Move, size: int) -> Move:
    """Download ``size`` bytes on ``s``, moving the client after a quarter of them, then ask
    who serves it now; closes ``s``."""
    topo, body = fleet.topo, fleet.bodies[size]
    family = m.family
    try:
        ms = MovingSocket(
            s.sock, lambda: topo.client_socket(family, MIGRATE_TO[family] if m.migrate
                                               else None),
            size // 4, s.conn.change_connection_id if m.migrate else None)
        s.sock = cast(socket.socket, ms)
        try:
            data = s.fetch(f"GET {body.name}")
            if len(data) != body.size or hashlib.sha256(data).hexdigest() != body.sha256:
                m.error = f"body of {len(data)} bytes, not the {body.size} served"
            else:
                after = topo.ask(s, "file")
                m.worker_after = (after.host, after.info["slot"], after.info["pid"])
        except RequestFailed as exc:
            m.error = str(exc)
        m.port, m.received_after_move = ms.port, ms.received_after_move
        m.dcids_before, m.dcids_after = ms.dcids_before, ms.dcids_after
        if ms.port is not None:
            m.dnat_host = topo.dnat_host(family, ms.port)
    finally:
        s.close()
    return m


def move_during_download(fleet: Fleet, stack: str, family: int, migrate: bool, size: int,
                         timeout: float) -> Move:
    return download_moving(fleet, *connect(fleet, stack, family, migrate, timeout), size)


def check_carried(m: Move) -> None:
    """A move the balancer routed by host ID: whole body, same worker, conntrack DNAT to
    the same host, and every CID the client sent naming that host."""
    assert m.error == "", f"{m.what}: {m.error}"
    assert m.port is not None and m.received_after_move > 0, m  # it did move mid-download
    assert m.worker_after == (m.host, *m.worker), m  # type: ignore[misc]
    assert m.dnat_host == m.host, m
    sent = m.dcids_before | m.dcids_after
    assert {r[1] for c in sent if (r := katran_host_id(c))} == {m.host}, m
    if m.migrate:  # a new CID from the new path, none of the old one
        assert m.dcids_after and m.dcids_after.isdisjoint(m.dcids_before), m
    else:  # a NAT rebinding keeps the CID
        assert m.dcids_after == m.dcids_before, m


@pytest.mark.parametrize(("stack", "family"), [("aioquic", V4), ("qh3", V6)],
                         ids=["aioquic-v4", "qh3-v6"])
@pytest.mark.parametrize("migrate", [False, True], ids=["rebinding", "migration"])
def test_move_mid_download_stays_on_its_worker(fleet: Fleet, stack: str, family: int,
                                               migrate: bool) -> None:
    flows = new_short_header_flows(fleet.topo)
    m = move_during_download(fleet, stack, family, migrate, BIG, timeout=60.0)
    check_carried(m)
    # the new 4-tuple began with a short header, which only the host-ID rule DNATs
    assert new_short_header_flows(fleet.topo) > flows
    print(f"{m.what}: {BIG} bytes intact, host {m.host} slot/pid {m.worker} before and "
          f"after, new source port {m.port} DNATed to host {m.dnat_host}")


def run_batch(fleet: Fleet) -> list[Move]:
    """The 12 moves at once (a stalled one costs its timeout once, not 12 times)."""
    with ThreadPoolExecutor(len(BATCH)) as pool:
        return list(pool.map(
            lambda b: move_during_download(fleet, *b, SMALL, BATCH_TIMEOUT), BATCH))


def test_plain_l4_balancer_breaks_moves_that_host_id_routing_carries(fleet: Fleet) -> None:
    topo = fleet.topo
    carried = run_batch(fleet)
    for m in carried:
        check_carried(m)
    topo.set_plain_l4(topo.hosts)
    try:
        drops_before = not_ours_drops(topo)
        plain = run_batch(fleet)
        drops = {h: n - drops_before[h] for h, n in not_ours_drops(topo).items()}
    finally:
        topo.set_balanced(topo.hosts)
    broken = [m for m in plain if m.error]
    misrouted = [m for m in plain if m.dnat_host != m.host]
    for m in plain:
        assert m.port is not None, m  # every one moved mid-download
    # the hash decides: each move hashed to another host stalled, each hashed home finished
    assert {id(m) for m in broken} == {id(m) for m in misrouted}, [
        (m.what, m.host, m.dnat_host, m.error) for m in plain]
    for m in plain:
        if not m.error:
            assert m.worker_after == (m.host, *m.worker), m  # type: ignore[misc]
    assert len(broken) >= 1
    assert sum(drops.values()) >= 1, drops  # the other hosts' steerd dropped them
    print(f"{len(BATCH)} moves (rebinding and migration, aioquic and qh3, v4 and v6) "
          f"mid-download of {SMALL} bytes: steerd lb-config ruleset: 0 broken; plain L4 "
          f"(4-tuple hash) balancer: {len(broken)} broken (stalled: the new 4-tuple hashed to "
          f"another host), {len(BATCH) - len(broken)} finished; wrong-host drops per host "
          f"{drops}")
    for m in broken:
        print(f"  broken: {m.what}: on host {m.host}, new 4-tuple hashed to host "
              f"{m.dnat_host}: {m.error}")


def test_rebinding_after_its_host_was_removed_is_dropped(fleet: Fleet) -> None:
    """A host taken out of the hosts file keeps its established 4-tuples (conntrack), but a
    new one naming it matches no map entry: the balancer drops it and the download stalls
    (the failure is certain, so a short timeout costs nothing)."""
    topo = fleet.topo
    s, m = connect(fleet, "aioquic", V4, False, timeout=10.0)
    victim = m.host
    assert victim is not None
    topo.set_balanced([h for h in topo.hosts if h != victim])
    try:
        flows = new_short_header_flows(topo)
        download_moving(fleet, s, m, SMALL)
        assert new_short_header_flows(topo) > flows  # the balancer saw the new 4-tuple
    finally:
        topo.set_balanced(topo.hosts)
    assert m.port is not None and m.error != "", m
    assert m.dnat_host is None, m  # dropped in the nat hook: no conntrack entry
    print(f"rebinding on host {victim} after its removal from the hosts file: dropped by "
          f"the balancer (no conntrack entry for the new source port {m.port}); the "
          f"download stalled: {m.error}")
