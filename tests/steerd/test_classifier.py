"""The classifier's decisions, sans I/O: real aioquic first flights in, the route, re-injection
and replies it asks for out (recorded by plain callables; the e2e tests wire the real ones)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated

from quic.cid import CidLayout
from quic.flight import AssemblerConfig
from quic.packet import PacketType, parse_long_header
from quic.reset import reset_token, slot_reset_key
from quic.token import build_retry_token, derive_token_key, validate_retry_token
from steerd.daemon.classifier import MAX_STRAGGLERS, Classifier, Origin, RetryConfig
from steerd.daemon.config import Config
from steerd.daemon.registry import Peer, Registry
from tests.quic.reference import verify_retry_integrity

CLIENT = ("198.18.0.1", 40000)
SERVICE = ("198.18.0.2", 443)
ORIGIN = Origin(CLIENT, SERVICE, 0)
KEY = os.urandom(32)  # the daemon's master key


@dataclass
class World:
    routes: list[tuple[int, bytes, int]] = field(default_factory=list)
    injected: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)

    def route(self, group: int, dcid: bytes, slot: int) -> None:
        self.routes.append((group, dcid, slot))

    def reinject(self, client: tuple[str, int], service: tuple[str, int], datagrams) -> int:
        assert client == CLIENT and service == SERVICE
        self.injected.extend(datagrams)
        return len(datagrams)

    def reply(self, packet: bytes, client, service, group: int) -> None:
        self.replies.append(packet)


def make(world: World, **kw) -> tuple[Classifier, Registry]:
    registry = Registry.from_config(Config())
    root = Peer(uid=0, gid=0)
    registry.register("files", ["smb"], [], 2, False, root, "o1")
    registry.register("web", ["h3"], [], 1, False, root, "o2")
    # The clock reads "now" for the decision-latency histogram: fixed, so latencies are exact.
    classifier = Classifier(registry, world.route, world.reinject, world.reply,
                            layout=CidLayout(), reset_key=KEY, clock=lambda: 2.5, **kw)
    return classifier, registry


def flight(alpns: list[str], two: bool = False) -> tuple[QuicConnection, list[bytes]]:
    config = QuicConfiguration(is_client=True, alpn_protocols=alpns)
    config.quantum_readiness_test = two
    conn = QuicConnection(configuration=config)
    conn.connect(SERVICE, now=time.time())
    return conn, [d for d, _ in conn.datagrams_to_send(now=time.time())]


def test_routes_and_reinjects_in_arrival_order() -> None:
    world = World()
    classifier, _ = make(world)
    _, datagrams = flight(["smb"], two=True)
    assert len(datagrams) == 2
    assert classifier.on_datagram(datagrams[1], ORIGIN, 1.0) == "pending"
    outcome = classifier.on_datagram(datagrams[0], ORIGIN, 1.001)
    assert outcome.startswith("routed:files:")
    (group, dcid, slot), = world.routes
    assert group == 0 and slot in (0, 1) and dcid == datagrams[0][6:6 + datagrams[0][5]]
    assert world.injected == [datagrams[1], datagrams[0]]
    tally = classifier.tally.take()
    assert tally.flights == {("routed", "files"): 1} and tally.reinjected == 2
    assert tally.latencies == [1.5]  # from the first datagram (t=1.0) to the decision
    assert classifier.tally.take().flights == {}  # taken means gone


def test_client_order_picks_app() -> None:
    world = World()
    classifier, _ = make(world)
    _, datagrams = flight(["h3", "smb"])
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.0).startswith("routed:web:")


def test_stragglers_follow_the_decision_but_cannot_loop() -> None:
    world = World()
    classifier, _ = make(world)
    _, datagrams = flight(["smb"])
    classifier.on_datagram(datagrams[0], ORIGIN, 1.0)
    for _ in range(MAX_STRAGGLERS):
        assert classifier.on_datagram(datagrams[0], ORIGIN, 1.1).startswith("straggler:")
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.2) == "dropped:straggler_loop"
    assert len(world.routes) == 1  # never a second decision
    assert len(world.injected) == 1 + MAX_STRAGGLERS


def test_unowned_alpn_closes_with_no_application_protocol() -> None:
    world = World()
    classifier, _ = make(world)
    conn, datagrams = flight(["nobody"])
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.0) == "no_application"
    assert not world.routes and not world.injected
    (packet,) = world.replies
    conn.receive_datagram(packet, SERVICE, now=time.time())
    conn.handle_timer(now=conn.get_timer())
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert terminated and terminated[0].error_code == 0x178


def test_replies_are_rate_limited() -> None:
    world = World()
    classifier, _ = make(world, send_rate=1.0, send_burst=3)
    outcomes = []
    for _ in range(5):
        _, datagrams = flight(["nobody"])
        outcomes.append(classifier.on_datagram(datagrams[0], ORIGIN, 5.0))
    assert outcomes.count("no_application") == 5  # every flight decided ...
    assert len(world.replies) == 3  # ... but only the burst was answered
    tally = classifier.tally.take()
    assert tally.flights == {("no_owner", ""): 5}
    assert tally.sent == {"connection_close": 3} and tally.suppressed == {"connection_close": 2}


def test_version_negotiation_answered() -> None:
    world = World()
    classifier, _ = make(world)
    dcid, scid = os.urandom(8), os.urandom(8)
    datagram = bytes([0xC0]) + bytes.fromhex("1a2a3a4a") + bytes([8]) + dcid + bytes([8]) + scid
    datagram += bytes(1200 - len(datagram))
    assert classifier.on_datagram(datagram, ORIGIN, 1.0) == "version_negotiation"
    (vn,) = world.replies
    assert vn[1:5] == bytes(4) and vn[6:14] == scid and vn[15:23] == dcid


def test_dead_worker_gets_stateless_reset_smaller_than_trigger() -> None:
    world = World()
    classifier, _ = make(world)
    cid = CidLayout().encode(7, os.urandom(6))
    packet = bytes([0x41]) + cid + os.urandom(30)
    assert classifier.on_datagram(packet, ORIGIN, 1.0) == "stateless_reset"
    (reset,) = world.replies
    # the token the dead worker advertised: its slot's key, not the master
    assert reset[-16:] == reset_token(slot_reset_key(KEY, 7), cid) and len(reset) < len(packet)
    assert reset[-16:] != reset_token(KEY, cid)
    assert reset[-16:] != reset_token(slot_reset_key(KEY, 6), cid)
    assert reset[0] & 0xC0 == 0x40
    tiny = bytes([0x41]) + cid + os.urandom(2)
    assert classifier.on_datagram(tiny, ORIGIN, 1.0) == "dropped:short_header_too_small_to_reset"
    foreign = bytes([0x41]) + bytes([0xE0]) + os.urandom(40)
    assert classifier.on_datagram(foreign, ORIGIN, 1.0) == "dropped:short_header_not_ours"


def test_bookkeeping_stays_bounded_under_a_flood_of_half_flights() -> None:
    world = World()
    classifier, _ = make(world, assembler=AssemblerConfig(max_pending=16))
    for i in range(200):
        _, datagrams = flight(["smb"], two=True)
        classifier.on_datagram(datagrams[0], ORIGIN, 1.0 + i / 1000)
    assert classifier.front.assembler.pending_count <= 16
    classifier.expire(1000.0)
    assert classifier.front.assembler.pending_count == 0
    assert classifier.report().expired == 200  # evicted, then expired: all lost first flights


SPOOFER = ("203.0.113.66", 5353)


def test_same_dcid_from_another_address_is_its_own_flight() -> None:
    """Issue 11 item 4: a sender who knows a client's DCID cannot complete, extend or ride on
    that client's flight from another address, before or after its decision."""
    world = World()
    classifier, _ = make(world)
    _, datagrams = flight(["smb"], two=True)
    spoofed = Origin(SPOOFER, SERVICE, 0)
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.0) == "pending"
    # Before the decision: the spoofer's copy of the second half is a flight of its own
    # (pending, not completing the client's), and the client's own second half completes it.
    assert classifier.on_datagram(datagrams[1], spoofed, 1.01) == "pending"
    outcome = classifier.on_datagram(datagrams[1], ORIGIN, 1.02)
    assert outcome.startswith("routed:files:")
    assert world.injected == datagrams and len(world.routes) == 1
    # After it: the spoofer's datagrams are no stragglers of the client's flight (never
    # re-injected; World.reinject would fail on its address), and do not use up its budget.
    for _ in range(MAX_STRAGGLERS + 5):
        assert classifier.on_datagram(datagrams[1], spoofed, 1.1) == "pending"
    # The spoofer's flight completing (it has both halves now) never rewrites the route.
    assert classifier.on_datagram(datagrams[0], spoofed, 1.2) == "dropped:flight_dcid_taken"
    assert len(world.routes) == 1 and not world.replies
    # The client's own stragglers still follow its decision, with their whole budget.
    for _ in range(MAX_STRAGGLERS):
        assert classifier.on_datagram(datagrams[0], ORIGIN, 1.3).startswith("straggler:")
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.3) == "dropped:straggler_loop"
    assert world.injected == datagrams + [datagrams[0]] * MAX_STRAGGLERS
    # A later straggler of the spoofer's (refused) flight is not re-injected either.
    assert classifier.on_datagram(datagrams[0], spoofed, 1.4) == "dropped:straggler_undecided"
    assert classifier.report().dropped == {
        "flight_dcid_taken": 1, "straggler_loop": 1, "straggler_undecided": 1}


def zero_rtt(dcid: bytes) -> bytes:
    """A 0-RTT datagram (payload opaque to the classifier)."""
    first = 0xC0 | (1 << 4) | 0x03
    body = os.urandom(300)
    return (bytes((first,)) + (1).to_bytes(4, "big") + bytes((len(dcid),)) + dcid
            + bytes((8,)) + os.urandom(8) + (0x4000 | len(body)).to_bytes(2, "big") + body)


def test_zero_rtt_flood_is_reported_apart_from_lost_flights() -> None:
    """Issue 11 item 2 through the classifier: a random-DCID 0-RTT flood neither evicts a
    half-assembled flight nor counts as expired first flights; its losses have their own
    count, and the gauges show what is held in both tables."""
    world = World()
    cfg = AssemblerConfig(max_pending=4)
    classifier, _ = make(world, assembler=cfg)
    _, datagrams = flight(["smb"], two=True)
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.0) == "pending"
    flood = 3 * (cfg.max_pending + cfg.max_early)
    for i in range(flood):
        assert classifier.on_datagram(zero_rtt(os.urandom(8)), ORIGIN, 1.0 + i * 1e-5) == "pending"
    report = classifier.report()
    assert report.pending_connections == 1 + cfg.max_early
    assert report.expired == 0 and report.early_expired == flood - cfg.max_early
    assert classifier.on_datagram(datagrams[1], ORIGIN, 1.1).startswith("routed:files:")
    classifier.expire(100.0)
    report = classifier.report()
    assert report.pending_connections == 0 and report.pending_bytes == 0
    assert report.expired == 0 and report.early_expired == flood


# -- Retry mode ---------------------------------------------------------------------------------

TOKEN_KEY = derive_token_key(KEY)


def retrying(world: World, mode: str = "always", assembler: AssemblerConfig | None = None,
             **kw) -> Classifier:
    retry = RetryConfig(mode=mode, key=TOKEN_KEY, lifetime=10.0, **kw)
    classifier, _ = make(world, retry=retry, assembler=assembler)
    return classifier


def answer_retry(conn: QuicConnection, packet: bytes) -> list[bytes]:
    """Give the client our Retry; what it sends next (its Initial again, with the token)."""
    conn.receive_datagram(packet, SERVICE, now=time.time())
    return [d for d, _ in conn.datagrams_to_send(now=time.time())]


def test_retry_always_then_the_token_is_accepted_and_routed() -> None:
    world = World()
    classifier = retrying(world)
    conn, datagrams = flight(["h3"])
    odcid = datagrams[0][6 : 6 + datagrams[0][5]]
    assert classifier.on_datagram(datagrams[0], ORIGIN, 1.0) == "retry"
    assert not world.routes and classifier.front.stats().pending_connections == 0  # stateless
    (packet,) = world.replies
    header = parse_long_header(packet)
    assert header.packet_type is PacketType.RETRY and verify_retry_integrity(packet, odcid)
    assert CidLayout().decode(header.scid) is None  # the data plane never routes it to a worker
    assert validate_retry_token(TOKEN_KEY, header.token, CLIENT[0], header.scid, 1.0) == odcid
    again = answer_retry(conn, packet)
    assert parse_long_header(again[0]).token == header.token
    assert classifier.on_datagram(again[0], ORIGIN, 1.2).startswith("routed:web:")
    (_, dcid, _), = world.routes
    assert dcid == header.scid and world.injected == [again[0]]
    tally = classifier.tally.take()
    assert tally.sent == {"retry": 1} and tally.tokens == {"accepted": 1}


def test_token_from_another_address_or_expired_is_dropped() -> None:
    world = World()
    classifier = retrying(world)
    conn, datagrams = flight(["h3"])
    classifier.on_datagram(datagrams[0], ORIGIN, 1.0)
    again = answer_retry(conn, world.replies[0])
    spoofed = Origin(("198.18.0.99", CLIENT[1]), SERVICE, 0)
    assert classifier.on_datagram(again[0], spoofed, 1.1) == "dropped:token_invalid"
    assert classifier.on_datagram(again[0], ORIGIN, 11.5) == "dropped:token_expired"
    assert not world.routes and not world.injected and len(world.replies) == 1
    assert classifier.tally.take().tokens == {"token_invalid": 1, "token_expired": 1}
    assert classifier.report().dropped == {"token_invalid": 1, "token_expired": 1}


def test_retry_auto_turns_on_under_load_and_off_after_hold() -> None:
    world = World()
    classifier = retrying(world, mode="auto", initial_rate=5, hold=2.0)
    outcomes = []
    for i in range(8):
        _, datagrams = flight(["nobody"])
        outcomes.append(classifier.on_datagram(datagrams[0], ORIGIN, 10.0 + i * 0.01))
    # Five new Initials within the second are fine; the sixth is over the rate.
    assert outcomes[:5] == ["no_application"] * 5 and outcomes[5:] == ["retry"] * 3
    assert classifier.report().retrying
    _, datagrams = flight(["h3"])
    assert classifier.on_datagram(datagrams[0], ORIGIN, 13.0).startswith("routed:web:")
    assert not classifier.retrying(13.0)


def test_retry_auto_on_pending_share_and_half_assembled_flights_finish() -> None:
    world = World()
    classifier = retrying(world, mode="auto", pending_fraction=0.5,
                          assembler=AssemblerConfig(max_pending=4))
    halves = [flight(["smb"], two=True)[1] for _ in range(3)]
    assert [classifier.on_datagram(h[0], ORIGIN, 1.0) for h in halves[:2]] == ["pending"] * 2
    # Two pending of four: on. A new flight is retried, the ones under way complete.
    assert classifier.on_datagram(halves[2][0], ORIGIN, 1.0) == "retry"
    assert classifier.on_datagram(halves[0][1], ORIGIN, 1.1).startswith("routed:files:")


def test_retries_have_their_own_budget() -> None:
    world = World()
    classifier = retrying(world, rate=1.0, burst=2)
    outcomes = [classifier.on_datagram(flight(["h3"])[1][0], ORIGIN, 1.0) for _ in range(3)]
    assert outcomes == ["retry", "retry", "retry_suppressed"]
    assert classifier.tally.take().suppressed == {"retry": 1}


def tokened_flight(alpns: list[str], token_for: Callable[[bytes], bytes]) -> list[bytes]:
    """A client's first flight carrying ``token_for(its DCID)`` (as if it echoed a Retry whose
    SCID was that DCID)."""
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=alpns))
    conn._peer_token = token_for(conn._peer_cid.cid)
    conn.connect(SERVICE, now=time.time())
    return [d for d, _ in conn.datagrams_to_send(now=time.time())]


def test_tokens_are_validated_even_with_retry_off() -> None:
    """Workers read tokens without the key, so the classifier must never route an Initial
    whose token it did not validate, whatever the Retry mode. An app deriving the token key
    the old way from the key it holds (its slot's) mints tokens that are dropped."""
    world = World()
    classifier = retrying(world, mode="off")
    app_key = derive_token_key(slot_reset_key(KEY, 0))
    forged = tokened_flight(
        ["h3"], lambda dcid: build_retry_token(app_key, CLIENT[0], os.urandom(8), dcid, 1.0))
    assert parse_long_header(forged[0]).token
    assert classifier.on_datagram(forged[0], ORIGIN, 1.0) == "dropped:token_invalid"
    # ... and so is one bound to another address, even under the daemon's own key
    elsewhere = tokened_flight(
        ["h3"], lambda dcid: build_retry_token(TOKEN_KEY, "198.18.0.77", b"", dcid, 1.0))
    assert classifier.on_datagram(elsewhere[0], ORIGIN, 1.0) == "dropped:token_invalid"
    assert not world.routes and not world.injected and not world.replies
    # a token the daemon issued (before switching Retry off) is still honoured
    good = tokened_flight(
        ["h3"], lambda dcid: build_retry_token(TOKEN_KEY, CLIENT[0], os.urandom(8), dcid, 1.0))
    assert classifier.on_datagram(good[0], ORIGIN, 1.5).startswith("routed:web:")
    # and with no token at all, mode off assembles as usual (no Retry)
    assert classifier.on_datagram(flight(["h3"])[1][0], ORIGIN, 1.6).startswith("routed:web:")
    assert not world.replies
    tally = classifier.tally.take()
    assert tally.tokens == {"token_invalid": 2, "accepted": 1} and not tally.sent


def test_retry_config_takes_a_key_with_mode_off() -> None:
    assert RetryConfig(mode="off", key=TOKEN_KEY).key == TOKEN_KEY
    assert RetryConfig().key == b""  # no key: no token check (no daemon secret to check with)
    for mode in ("off", "auto", "always"):
        with pytest.raises(ValueError, match="token key"):
            RetryConfig(mode=mode, key=b"short")
