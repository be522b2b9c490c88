"""Learned mode in the kernel, selftest style: bpf/learn.c (egress) and the learned
lookups of bpf/steer.c, loaded for real, with crafted server packets leaving real worker
sockets.

Each test builds its own tiny world (:class:`World`): a client and a server namespace joined
by veth, a Dataplane with its own pin dir and a CID layout of 8 bytes (the learned CID
length, so a layout CID is not refused merely for its length), a reuseport group on PORT in
the server namespace with the steering program attached, and the Learner's egress program
at the cgroup v2 root. Worker sockets are listed in ``learn_sockets`` by their SO_COOKIE.
The egress program runs inside ``sendto()``, so the maps are final when it returns.
Everything is torn down in the fixture's finally path: sockets, the egress program
(``Dataplane.destroy`` calls ``remove_learner``), the pin dir and both namespaces.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from deploy.netns import NetnsPair, netns_pair
from quic.builders import build_retry
from quic.cid import CidLayout
from quic.packet import VERSION_1, VERSION_2, PacketType
from steerd.app.protocol import socket_cookie
from steerd.daemon.dataplane import Dataplane, DataplaneConfig
from steerd.daemon.dataplane.learn import MODE_LAYOUT, MODE_LEARNED, PIN_NAME, Learner, LearnLimits
from tests.dataplane.conftest import delta, find_tag, long_packet, new_tag, short_packet

pytestmark = pytest.mark.root

PORT = 4433
OTHER_PORT = 4434
CID_LEN = 8
# An 8-byte layout (first octet 0x27, host ID 0x2a, two slot bytes, four nonce bytes).
LAYOUT = CidLayout(config_id=1, host_id=0x2A, host_id_len=1, slot_len=2, nonce_len=4)
WORKER_SLOTS = 256  # the daemon's default pool (Learner.slot_stats reads every slot's row)
MARKER_SLOT = 200  # a layout-mode worker: its arrival proves earlier packets were handled
TTL = 300.0
UNPROVEN_TTL = LearnLimits().unproven_ttl  # what an entry learned on egress lives, unproven

FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


def random_cid(n: int = CID_LEN) -> bytes:
    """A CID that is not in the layout (unroutable config-rotation bits in the first octet)."""
    return bytes([0xE0 | os.urandom(1)[0] & 0x1F]) + os.urandom(n - 1)


def layout_cid(slot: int) -> bytes:
    return LAYOUT.encode(slot, os.urandom(LAYOUT.nonce_len))


def server_packet(kind: str, scid: bytes, dcid: bytes = b"") -> bytes:
    """A long-header packet as a server sends it (its SCID is what gets learned)."""
    dcid = dcid or os.urandom(8)
    version = VERSION_2 if kind.endswith("v2") else VERSION_1
    if kind.startswith("retry"):
        return build_retry(version, dcid, scid, os.urandom(8), b"retry-token-" + os.urandom(16))
    ptype = {"initial": PacketType.INITIAL, "handshake": PacketType.HANDSHAKE,
             "0rtt": PacketType.ZERO_RTT}[kind.split("-")[0]]
    return long_packet(ptype, dcid, new_tag(), version=version, size=1200, scid=scid)


def one_rtt(dcid: bytes = b"") -> bytes:
    return short_packet(dcid or random_cid(), new_tag())


@dataclass
class World:
    pair: NetnsPair
    dp: Dataplane
    learner: Learner
    workers: dict[int, socket.socket] = field(default_factory=dict)
    classifier: socket.socket | None = None
    clients: list[socket.socket] = field(default_factory=list)
    others: list[socket.socket] = field(default_factory=list)

    def _member(self, port: int = PORT) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
            sock.setblocking(False)
            return sock

        return self.pair.run_server(make)

    def worker(self, slot: int, mode: int = MODE_LEARNED, cid_len: int = CID_LEN) -> socket.socket:
        """A worker socket for ``slot`` (in ``workers`` and in ``learn_sockets``)."""
        sock = self.workers[slot] = self._member()
        self.dp.set_worker(slot, sock)
        self.learner.set_socket(socket_cookie(sock.fileno()), slot, mode, cid_len)
        return sock

    def client(self, family: int) -> socket.socket:
        """A client socket of ``family`` bound to the client address, its own port."""

        def make() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((self.pair.client_addr(family), 0))
            sock.setblocking(False)
            return sock

        sock = self.pair.run_client(make)
        self.clients.append(sock)
        return sock

    def other_port_socket(self) -> socket.socket:
        sock = self._member(OTHER_PORT)
        self.others.append(sock)
        return sock

    @staticmethod
    def dest(client: socket.socket) -> tuple[str, int]:
        """Where a dual-stack worker socket sends to reach ``client``."""
        host, port = client.getsockname()[:2]
        return (f"::ffff:{host}" if client.family == socket.AF_INET else host), port

    def serve(self, slot: int, packet: bytes, client: socket.socket) -> None:
        """Send ``packet`` from ``slot``'s worker socket to ``client`` (egress: learning)."""
        self.workers[slot].sendto(packet, self.dest(client))

    @staticmethod
    def peer(client: socket.socket) -> tuple[int, bytes, int, int]:
        """``client``'s key in ``learned_peers()``."""
        host, port = client.getsockname()[:2]
        family = client.family
        return (4 if family == socket.AF_INET else 6, socket.inet_pton(family, host), port, PORT)

    def deliver(self, sends: list[tuple[socket.socket, bytes]], timeout: float = 5.0
                ) -> dict[bytes, str]:
        """Send ``(client, payload)`` in order to the service port, then a marker to
        MARKER_SLOT from the last client; wait for it and drain every socket of the group.
        Returns tag -> receiving socket ("worker<slot>" or "classifier")."""
        labels = {s: f"worker{slot}" for slot, s in self.workers.items()}
        if self.classifier is not None:
            labels[self.classifier] = "classifier"
        for client, payload in sends:
            client.sendto(payload, (self.pair.server_addr(client.family), PORT))
        marker = new_tag()
        last = sends[-1][0] if sends else self.client(socket.AF_INET)
        last.sendto(short_packet(layout_cid(MARKER_SLOT), marker),
                    (self.pair.server_addr(last.family), PORT))
        got: dict[bytes, str] = {}
        seen = False
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for sock in labels:
                sel.register(sock, selectors.EVENT_READ)
            while not seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"marker not delivered; got so far: {got}")
                for key, _ in sel.select(left):
                    seen |= self._drain(key.fileobj, labels, got, marker)  # type: ignore[arg-type]
        for sock in labels:
            self._drain(sock, labels, got, marker)
        return got

    @staticmethod
    def _drain(sock: socket.socket, labels: dict[socket.socket, str], got: dict[bytes, str],
               marker: bytes) -> bool:
        seen = False
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return seen
            tag = find_tag(data)
            if tag == marker:
                assert labels[sock] == f"worker{MARKER_SLOT}", "marker mis-steered"
                seen = True
            else:
                got[tag or b"untagged:" + data] = labels[sock]

    def close(self) -> None:
        socks = [*self.workers.values(), *self.clients, *self.others]
        if self.classifier is not None:
            socks.append(self.classifier)
        for sock in socks:
            sock.close()


@pytest.fixture
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    pin_dir = f"/sys/fs/bpf/steerd-test-{uuid.uuid4().hex[:8]}"
    with netns_pair("l") as pair:
        dp = Dataplane(DataplaneConfig(layout=LAYOUT, port=PORT, classifier_slots=1,
                                       worker_slots=WORKER_SLOTS, pin_dir=pin_dir))
        learner = Learner(dp)
        w = World(pair, dp, learner)
        try:
            dp.load()
            learner.attach()
            assert os.path.exists(os.path.join(pin_dir, PIN_NAME))
            learner.configure(LearnLimits(ttl=TTL), [CID_LEN])
            marker = w.worker(MARKER_SLOT, MODE_LAYOUT, 0)
            w.classifier = w._member()
            dp.set_classifier(0, w.classifier)
            dp.attach_reuseport(marker)
            yield w
        finally:
            w.close()
            learner.close()
            dp.destroy()  # detaches and unpins the egress program (remove_learner) too
            assert not os.path.exists(pin_dir)


def counters(w: World) -> dict[str, int]:
    return w.dp.counters()


# -- learning on egress ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_server_long_headers_teach_cids_and_the_client_address(world: World, family: int) -> None:
    """Initial, Handshake and Retry, v1 and v2, from a learned-mode worker socket: each SCID
    is learned for the socket's slot, and the client's address:port once, all unproven (a
    short expiry, outside the quota: nothing yet shows the client is at that address)."""
    world.worker(5)
    client = world.client(family)
    kinds = ["initial-v1", "handshake-v1", "retry-v1", "initial-v2", "handshake-v2", "retry-v2"]
    scids = {kind: random_cid() for kind in kinds}
    before = counters(world)
    for kind, scid in scids.items():
        world.serve(5, server_packet(kind, scid), client)
    world.serve(5, server_packet("initial-v1", scids["initial-v1"]), client)  # known: kept
    world.serve(5, server_packet("0rtt-v1", random_cid()), client)  # a client's packet type
    world.serve(5, one_rtt(), client)  # 1-RTT: nothing to learn but the address
    learned = world.learner.learned_cids()
    assert {cid: slot for cid, (slot, _) in learned.items()} == dict.fromkeys(scids.values(), 5)
    assert world.learner.learned_cids(unproven=True) == learned
    now = time.monotonic_ns()
    assert all(now < expires <= now + int(UNPROVEN_TTL * 1e9) for _, expires in learned.values())
    peers = world.learner.learned_peers()
    assert {key: slot for key, (slot, _) in peers.items()} == {World.peer(client): 5}
    assert world.learner.learned_peers(unproven=True) == peers
    assert delta(before, counters(world)) == {"learn_cid": 6, "learn_peer": 1}
    assert world.learner.slot_stats() == {5: {"egress_long": 7, "egress_learned": 6}}
    assert world.learner.sweep() == {}  # nothing counts against the quota
    assert world.learner.unproven == {5: (6, 1)}


def test_only_listed_sockets_on_the_service_port_are_watched(world: World) -> None:
    client = world.client(socket.AF_INET)
    unlisted = world._member()  # a member of the group that Python never listed
    world.others.append(unlisted)
    other = world.other_port_socket()  # listed, but not on the service port
    world.learner.set_socket(socket_cookie(other.fileno()), 6, MODE_LEARNED, CID_LEN)
    before = counters(world)
    for sock in (unlisted, other):
        sock.sendto(server_packet("initial-v1", random_cid()), World.dest(client))
    assert world.learner.learned_cids() == {} and world.learner.learned_peers() == {}
    assert delta(before, counters(world)) == {}
    assert world.learner.slot_stats() == {}


def test_a_cid_in_the_layout_is_never_learned(world: World) -> None:
    world.worker(7)
    client = world.client(socket.AF_INET)
    before = counters(world)
    for slot in (7, 8, MARKER_SLOT):  # its own slot's, another's, a live worker's
        world.serve(7, server_packet("initial-v1", layout_cid(slot)), client)
    assert world.learner.learned_cids() == {}
    assert delta(before, counters(world)) == {"learn_refused": 3, "learn_peer": 1}
    assert world.learner.slot_stats() == {7: {"egress_long": 3, "egress_refused": 3}}


def test_a_cid_with_a_first_flight_route_is_never_learned(world: World) -> None:
    """A client-chosen DCID the classifier routed (to any slot) is not the server's CID."""
    world.worker(7)
    client = world.client(socket.AF_INET6)
    routed = random_cid()
    world.dp.add_route(routed, 9)
    before = counters(world)
    world.serve(7, server_packet("handshake-v2", routed), client)
    assert world.learner.learned_cids() == {}
    assert world.dp.routes()[routed][0] == 9
    assert delta(before, counters(world)) == {"learn_refused": 1, "learn_peer": 1}
    assert world.learner.slot_stats()[7] == {"egress_long": 1, "egress_refused": 1}


def test_a_cid_of_another_length_is_off_mode(world: World) -> None:
    world.worker(3)
    client = world.client(socket.AF_INET)
    before = counters(world)
    for n in (4, 7, 9, 20):
        world.serve(3, server_packet("initial-v1", random_cid(n)), client)
    world.serve(3, server_packet("handshake-v1", b""), client)  # a zero-length SCID
    assert world.learner.learned_cids() == {}
    assert delta(before, counters(world)) == {"learn_peer": 1}
    assert world.learner.slot_stats() == {3: {"egress_long": 5, "egress_off_mode": 5}}


def test_layout_mode_socket_counts_scids_that_are_not_its_own(world: World) -> None:
    """A layout-mode worker learns nothing; a long-header SCID that is not its own slot's
    layout CID is counted off_mode (how ``steerd status`` tells an app misbehaves)."""
    world.worker(4, MODE_LAYOUT, 0)
    client = world.client(socket.AF_INET)
    before = counters(world)
    world.serve(4, server_packet("initial-v1", layout_cid(4)), client)  # as registered
    world.serve(4, server_packet("handshake-v2", layout_cid(4)), client)
    world.serve(4, server_packet("initial-v1", layout_cid(5)), client)  # another slot's
    world.serve(4, server_packet("initial-v1", random_cid()), client)  # its own random CID
    world.serve(4, server_packet("retry-v1", random_cid(12)), client)
    world.serve(4, one_rtt(), client)
    assert world.learner.learned_cids() == {} and world.learner.learned_peers() == {}
    assert delta(before, counters(world)) == {}
    assert world.learner.slot_stats() == {4: {"egress_long": 5, "egress_off_mode": 3}}


@pytest.mark.parametrize("family", FAMILIES)
def test_first_writer_wins(world: World, family: int) -> None:
    """A second slot sending the first slot's SCID, or to the first slot's client, is counted
    as a conflict and changes nothing."""
    world.worker(1)
    world.worker(2)
    mine, theirs = world.client(family), world.client(family)
    scid = random_cid()
    world.serve(1, server_packet("initial-v1", scid), mine)
    expires = world.learner.learned_cids()[scid][1]
    before = counters(world)
    world.serve(2, server_packet("handshake-v1", scid), theirs)  # new address, taken CID
    world.serve(2, server_packet("retry-v2", scid), theirs)
    world.serve(2, one_rtt(), mine)  # slot 1's client
    assert world.learner.learned_cids() == {scid: (1, expires)}
    peers = {key: slot for key, (slot, _) in world.learner.learned_peers().items()}
    assert peers == {World.peer(mine): 1, World.peer(theirs): 2}
    assert delta(before, counters(world)) == {"learn_conflict": 3, "learn_peer": 1}
    assert world.learner.slot_stats()[2] == {"egress_long": 2, "egress_conflict": 3}
    assert world.learner.slot_stats()[1] == {"egress_long": 1, "egress_learned": 1}


def test_an_expired_entry_of_another_slot_is_taken_over(world: World) -> None:
    world.learner.configure(LearnLimits(ttl=0.001, unproven_ttl=0.001), [CID_LEN])
    world.worker(1)
    world.worker(2)
    client = world.client(socket.AF_INET)
    scid = random_cid()
    world.serve(1, server_packet("initial-v1", scid), client)
    time.sleep(0.01)  # past the 1 ms TTL
    world.learner.configure(LearnLimits(ttl=TTL), [CID_LEN])
    before = counters(world)
    world.serve(2, server_packet("handshake-v1", scid), client)
    assert world.learner.learned_cids()[scid][0] == 2
    assert world.learner.learned_peers()[World.peer(client)][0] == 2
    assert delta(before, counters(world)) == {"learn_cid": 1, "learn_peer": 1}


# -- quotas and the sweep --------------------------------------------------------------------


def test_unproven_budget_stops_a_slot_and_the_sweep_frees_it(world: World) -> None:
    """What a server's egress may learn before any client proves an entry: its slot's
    unproven budget (unproven_quota CIDs, apart from addresses)."""
    world.learner.configure(LearnLimits(unproven_quota=16, ttl=TTL), [CID_LEN])
    world.worker(11)
    world.worker(12)
    client = world.client(socket.AF_INET)
    scids = [random_cid() for _ in range(20)]
    before = counters(world)
    for scid in scids:
        world.serve(11, server_packet("initial-v1", scid), client)
    learned = world.learner.learned_cids()
    assert set(learned) == set(scids[:16])
    assert delta(before, counters(world)) == {"learn_cid": 16, "learn_full": 4, "learn_peer": 1}
    assert world.learner.slot_stats()[11] == {
        "egress_long": 20, "egress_learned": 16, "egress_full": 4}
    # another slot's quota is its own
    other = random_cid()
    world.serve(12, server_packet("initial-v1", other), world.client(socket.AF_INET))
    assert world.learner.learned_cids()[other][0] == 12
    # a sweep before the TTL keeps everything, and the budget stays spent
    assert world.learner.sweep() == {}
    assert world.learner.unproven == {11: (16, 1), 12: (1, 1)}
    before = counters(world)
    world.serve(11, server_packet("initial-v1", random_cid()), client)
    assert delta(before, counters(world)) == {"learn_full": 1}
    # a sweep past the unproven TTL (simulated time) deletes every entry and gives the
    # budget back
    later = time.monotonic_ns() + int((UNPROVEN_TTL + 1) * 1e9)
    assert world.learner.sweep(now_ns=later) == {} and world.learner.unproven == {}
    assert world.learner.learned_cids() == {} and world.learner.learned_peers() == {}
    fresh = [random_cid() for _ in range(16)]
    before = counters(world)
    for scid in fresh:
        world.serve(11, server_packet("handshake-v2", scid), client)
    assert set(world.learner.learned_cids()) == set(fresh)
    assert delta(before, counters(world)) == {"learn_cid": 16, "learn_peer": 1}


def test_unproven_peer_budget_stops_a_slot(world: World) -> None:
    world.learner.configure(LearnLimits(unproven_quota=16, ttl=TTL), [CID_LEN])
    world.worker(13)
    clients = [world.client(socket.AF_INET6) for _ in range(20)]
    before = counters(world)
    for client in clients:
        world.serve(13, one_rtt(), client)
    peers = world.learner.learned_peers()
    assert set(peers) == {World.peer(c) for c in clients[:16]}
    assert delta(before, counters(world)) == {"learn_peer": 16, "learn_full": 4}
    assert world.learner.slot_stats()[13] == {"egress_full": 4}
    assert world.learner.sweep() == {} and world.learner.unproven == {13: (0, 16)}


def test_sweep_deletes_only_expired_entries(world: World) -> None:
    world.worker(1)
    client = world.client(socket.AF_INET)
    old, new = random_cid(), random_cid()
    world.serve(1, server_packet("initial-v1", old), client)
    time.sleep(0.002)  # so the two expiries differ
    world.serve(1, server_packet("initial-v1", new), world.client(socket.AF_INET))
    expiry = world.learner.learned_cids()
    between = (expiry[old][1] + expiry[new][1]) // 2
    assert expiry[old][1] < between < expiry[new][1]
    # old and the first client's address (learned together) expire; new and its client stay
    assert world.learner.sweep(now_ns=between) == {}
    assert world.learner.unproven == {1: (1, 1)}
    assert set(world.learner.learned_cids()) == {new}
    assert World.peer(client) not in world.learner.learned_peers()


def test_forget_slot_removes_its_entries_and_its_sockets(world: World) -> None:
    world.worker(21)
    world.worker(22)
    a, b = world.client(socket.AF_INET), world.client(socket.AF_INET6)
    gone, kept = random_cid(), random_cid()
    world.serve(21, server_packet("initial-v1", gone), a)
    world.serve(22, server_packet("initial-v2", kept), b)
    world.learner.forget_slot(21)
    assert {cid: slot for cid, (slot, _) in world.learner.learned_cids().items()} == {kept: 22}
    assert {k: slot for k, (slot, _) in world.learner.learned_peers().items()} == {
        World.peer(b): 22}
    assert {slot for slot, _, _ in world.learner.sockets().values()} == {MARKER_SLOT, 22}
    before = counters(world)
    world.serve(21, server_packet("initial-v1", random_cid()), a)  # no longer listed
    assert delta(before, counters(world)) == {}


def test_a_forgotten_slot_starts_with_its_full_quota(world: World) -> None:
    """A slot is forgotten when its worker leaves; the next app given it must be able to
    learn at once, not only after the next sweep recounts the quota."""
    world.learner.configure(LearnLimits(unproven_quota=16, ttl=TTL), [CID_LEN])
    world.worker(31)
    client = world.client(socket.AF_INET)
    for _ in range(16):
        world.serve(31, server_packet("initial-v1", random_cid()), client)
    world.learner.forget_slot(31)
    world.workers.pop(31).close()
    world.worker(31)  # the slot's next app
    scid = random_cid()
    world.serve(31, server_packet("initial-v1", scid), client)
    assert scid in world.learner.learned_cids()


# -- proof of address: unproven entries, promotion ------------------------------------------


def spoofed_answers(w: World, slot: int, n: int, client: socket.socket) -> list[bytes]:
    """What a server does for ``n`` spoofed Initials: answers each from ``slot`` with a fresh
    SCID to a fresh client port (the forged sources; nobody there ever answers). Returns the
    SCIDs."""
    host = World.dest(client)[0]
    scids = [random_cid() for _ in range(n)]
    for i, scid in enumerate(scids):
        w.workers[slot].sendto(server_packet("initial-v1", scid), (host, 30000 + i))
    return scids


def prove(w: World, client: socket.socket, scid: bytes, slot: int) -> None:
    """The client answers the server's packet: a Handshake carrying ``scid``, delivered."""
    tag = new_tag()
    got = w.deliver([(client, long_packet(PacketType.HANDSHAKE, scid, tag, size=300))])
    assert got == {tag: f"worker{slot}"}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_clients_datagram_proves_the_cid_and_its_address(world: World, family: int) -> None:
    """The client's Handshake carries the CID the server sent only to its address: the CID
    entry and the address entry (same slot) are promoted to the full TTL and the quota. The
    server resending its packet does not keep an unproven entry alive."""
    world.worker(61)
    client = world.client(family)
    scid = random_cid()
    world.serve(61, server_packet("initial-v1", scid), client)
    expires = world.learner.learned_cids(unproven=True)[scid][1]
    world.serve(61, server_packet("handshake-v1", scid), client)  # a resend: not extended
    assert world.learner.learned_cids(unproven=True)[scid][1] == expires
    assert world.learner.learned_peers(unproven=True)[World.peer(client)][0] == 61
    before = counters(world)
    prove(world, client, scid, 61)
    assert delta(before, counters(world)) == {
        "steer_learned_cid": 1, "learn_promoted_cid": 1, "learn_promoted_peer": 1,
        "steer_short_worker": 1}
    now = time.monotonic_ns()
    assert world.learner.learned_cids(unproven=True) == {}
    assert world.learner.learned_peers(unproven=True) == {}
    slot, proven = world.learner.learned_cids(unproven=False)[scid]
    assert slot == 61 and now + int((TTL - 10) * 1e9) < proven <= now + int(TTL * 1e9)
    assert world.learner.learned_peers(unproven=False)[World.peer(client)][0] == 61
    assert world.learner.sweep() == {61: (1, 1)} and world.learner.unproven == {}
    before = counters(world)
    prove(world, client, scid, 61)  # proven already: steered, nothing more to promote
    assert delta(before, counters(world)) == {"steer_learned_cid": 1, "steer_short_worker": 1}


def test_an_address_is_proven_only_for_its_own_slot(world: World) -> None:
    """A datagram from an address slot 61 answered, carrying a CID slot 62 issued, proves
    that CID (it reached 62's client) but not the address for 61."""
    world.worker(61)
    world.worker(62)
    a, b = world.client(socket.AF_INET), world.client(socket.AF_INET)
    world.serve(61, one_rtt(), a)  # a's address: slot 61's, unproven
    theirs = random_cid()
    world.serve(62, server_packet("initial-v1", theirs), b)
    before = counters(world)
    prove(world, a, theirs, 62)
    assert delta(before, counters(world)) == {
        "steer_learned_cid": 1, "learn_promoted_cid": 1, "steer_short_worker": 1}
    assert world.learner.learned_peers(unproven=True)[World.peer(a)][0] == 61


def test_spoofed_answers_spend_no_quota_and_expire(world: World) -> None:
    """Ten times a slot's quota of spoofed Initials answered: every entry unproven, in the
    unproven budget; the slot still proves its whole quota of real clients, and a sweep past
    the unproven TTL leaves only those."""
    quota = 16
    world.learner.configure(LearnLimits(cid_quota=quota, peer_quota=quota, ttl=TTL,
                                        unproven_quota=20 * quota), [CID_LEN])
    world.worker(63)
    client = world.client(socket.AF_INET)
    spoofed = spoofed_answers(world, 63, 10 * quota, client)
    assert world.learner.sweep() == {}
    assert world.learner.unproven == {63: (10 * quota, 10 * quota)}
    real = [random_cid() for _ in range(quota)]
    before = counters(world)
    for scid in real:
        world.serve(63, server_packet("initial-v1", scid), client)
        prove(world, client, scid, 63)
    assert delta(before, counters(world)) == {
        "learn_cid": quota, "learn_peer": 1, "learn_promoted_cid": quota,
        "learn_promoted_peer": 1, "steer_learned_cid": quota, "steer_short_worker": quota}
    assert world.learner.sweep() == {63: (quota, 1)}
    assert world.learner.unproven == {63: (10 * quota, 10 * quota)}
    later = time.monotonic_ns() + int((UNPROVEN_TTL + 1) * 1e9)
    assert world.learner.sweep(now_ns=later) == {63: (quota, 1)}
    assert world.learner.unproven == {}
    assert set(world.learner.learned_cids()) == set(real)
    assert not set(spoofed) & set(world.learner.learned_cids())
    assert set(world.learner.learned_peers()) == {World.peer(client)}


def test_a_slot_at_its_quota_keeps_a_proven_entry_unproven(world: World) -> None:
    """Proof at a full quota: the datagram is delivered, the entry stays unproven (counted
    learn_promote_full, egress_full for the slot) and expires with its short TTL."""
    quota = 4
    world.learner.configure(LearnLimits(cid_quota=quota, peer_quota=quota, ttl=TTL), [CID_LEN])
    world.worker(64)
    client = world.client(socket.AF_INET6)
    scids = [random_cid() for _ in range(quota + 1)]
    for scid in scids[:quota]:
        world.serve(64, server_packet("initial-v1", scid), client)
        prove(world, client, scid, 64)
    world.serve(64, server_packet("initial-v1", scids[-1]), client)
    before = counters(world)
    prove(world, client, scids[-1], 64)
    assert delta(before, counters(world)) == {
        "steer_learned_cid": 1, "learn_promote_full": 1, "steer_short_worker": 1}
    assert world.learner.slot_stats()[64]["egress_full"] == 1
    assert set(world.learner.learned_cids(unproven=True)) == {scids[-1]}
    later = time.monotonic_ns() + int((UNPROVEN_TTL + 1) * 1e9)
    assert world.learner.sweep(now_ns=later) == {64: (quota, 1)}
    assert set(world.learner.learned_cids()) == set(scids[:quota])


# -- steering by what was learned (ingress) --------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_learned_cid_steers_short_and_long_headers(world: World, family: int) -> None:
    world.worker(41)
    world.worker(42)
    scid = random_cid()
    world.serve(42, server_packet("initial-v1", scid), world.client(family))
    client = world.client(family)  # another port: only the CID can name slot 42
    tags = [new_tag(), new_tag(), new_tag()]
    before = counters(world)
    got = world.deliver([
        (client, short_packet(scid, tags[0])),
        (client, long_packet(PacketType.HANDSHAKE, scid, tags[1], size=300)),
        (client, long_packet(PacketType.INITIAL, scid, tags[2], version=VERSION_2)),
    ])
    assert got == dict.fromkeys(tags, "worker42")
    # the first datagram carrying the CID proved it (not this client's address: another port)
    assert delta(before, counters(world)) == {"steer_learned_cid": 3, "steer_short_worker": 1,
                                              "learn_promoted_cid": 1}
    assert world.learner.slot_stats()[42]["steered_learned_cid"] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_a_learned_client_address_steers_unknown_short_header_cids(
    world: World, family: int
) -> None:
    """A client that moved to a CID the server gave it encrypted (NEW_CONNECTION_ID) is
    steered by its address:port once the address is proven; the same CID from another port
    is dropped, and the address never steers long headers."""
    world.worker(43)
    world.worker(44)
    known, stranger = world.client(family), world.client(family)
    scid = random_cid()
    world.serve(44, server_packet("initial-v1", scid), known)
    unknown = random_cid()
    # unproven, the address steers nothing (the server may have answered a forged source)
    early = new_tag()
    assert world.deliver([(known, short_packet(unknown, early))]) == {}
    # the client's Handshake carries the CID the server sent it: CID and address proven
    proof = new_tag()
    assert world.deliver([(known, long_packet(PacketType.HANDSHAKE, scid, proof, size=300))]) == {
        proof: "worker44"}
    assert world.learner.learned_peers(unproven=False)[World.peer(known)][0] == 44
    tags = [new_tag() for _ in range(4)]
    before = counters(world)
    got = world.deliver([
        (known, short_packet(unknown, tags[0])),
        (stranger, short_packet(unknown, tags[1])),
        (known, long_packet(PacketType.HANDSHAKE, unknown, tags[2], size=300)),
        (known, long_packet(PacketType.INITIAL, unknown, tags[3])),  # a new connection
    ])
    assert got == {tags[0]: "worker44", tags[3]: "classifier"}
    assert delta(before, counters(world)) == {
        "steer_learned_peer": 1, "steer_drop_short_not_ours": 1,
        "steer_drop_long_unroutable": 1, "steer_long_new": 1, "steer_to_classifier": 1,
        "steer_short_worker": 1,
    }
    assert world.learner.slot_stats()[44]["steered_learned_peer"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_expired_entries_steer_nothing(world: World, family: int) -> None:
    world.learner.configure(LearnLimits(ttl=0.001, unproven_ttl=0.001), [CID_LEN])
    world.worker(45)
    client = world.client(family)
    scid = random_cid()
    world.serve(45, server_packet("initial-v1", scid), client)  # CID and address learned
    assert scid in world.learner.learned_cids()
    time.sleep(0.01)  # past the 1 ms TTL; nothing swept them
    tags = [new_tag(), new_tag()]
    before = counters(world)
    got = world.deliver([
        (client, short_packet(scid, tags[0])),
        (client, long_packet(PacketType.HANDSHAKE, scid, tags[1], size=300)),
    ])
    assert got == {}
    assert delta(before, counters(world)) == {
        "steer_drop_short_not_ours": 1, "steer_drop_long_unroutable": 1, "steer_short_worker": 1,
    }
    assert "steered_learned_cid" not in world.learner.slot_stats().get(45, {})


def test_an_entry_naming_an_empty_slot_is_dropped(world: World) -> None:
    """Not a classifier: steerd cannot reset a learned-mode server's connections."""
    world.worker(46)
    client = world.client(socket.AF_INET)
    scid = random_cid()
    world.serve(46, server_packet("initial-v1", scid), client)
    proof = new_tag()  # the client proves CID and address (an unproven address steers nothing)
    assert world.deliver([(client, short_packet(scid, proof))]) == {proof: "worker46"}
    world.workers.pop(46).close()  # the kernel empties its sockarray slot
    tags = [new_tag(), new_tag()]
    before = counters(world)
    got = world.deliver([(client, short_packet(scid, tags[0])),
                         (client, short_packet(random_cid(), tags[1]))])  # by address
    assert got == {}
    assert delta(before, counters(world)) == {"steer_learned_dead_slot": 2,
                                              "steer_short_worker": 1}


def test_a_shorter_learned_cid_does_not_shadow_a_longer_one(world: World) -> None:
    """Two learned-mode apps with CID lengths 4 and 8: the 4-byte app learning the first 4
    bytes of the 8-byte app's CID must not take that app's short-header packets."""
    world.learner.configure(LearnLimits(ttl=TTL), [4, CID_LEN])
    world.worker(51)  # the victim: 8-byte CIDs
    world.worker(52, MODE_LEARNED, 4)  # 4-byte CIDs
    client = world.client(socket.AF_INET)
    victim = random_cid()
    world.serve(51, server_packet("initial-v1", victim), client)
    world.serve(52, server_packet("initial-v1", victim[:4]), world.client(socket.AF_INET))
    assert world.learner.learned_cids()[victim][0] == 51
    tag = new_tag()
    assert world.deliver([(world.client(socket.AF_INET), short_packet(victim, tag))]) == {
        tag: "worker51"}
