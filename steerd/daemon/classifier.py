"""The classifier: what the daemon does with a datagram the steering program could not place.

Every datagram that reaches a classifier socket is either part of a new client's first flight
(assembled with :class:`quic.flight.FirstFlightAssembler` until the ClientHello is whole), a
straggler of a flight decided a moment ago (its route was written after the datagram had
already been queued here), a 1-RTT packet for a worker that is gone, or junk.

It is split in two halves:

* :class:`FlightFront` — header parsing, Initial decryption, CRYPTO reassembly, ClientHello
  parsing: the CPU-heavy half, pure. It turns datagrams into :data:`Event` s.
* :class:`Classifier` — the decision: registry lookup, ``initial_routes`` write, re-injection
  with the client's own source address, Version Negotiation, CONNECTION_CLOSE, Retry and
  stateless resets, counted in a :class:`~steerd.daemon.metrics.Tally`. It owns a front and
  feeds it (:meth:`Classifier.on_datagram`).

Each classifier process (steerd/daemon/pool.py; the main process itself with one classifier)
runs one ``Classifier`` on the classifier sockets of its index, deciding on its own replica of
the registry: the BPF program hashes the DCID over the classifier sockets, so every datagram of
one connection meets the same process. The main process holds the registry the replicas are
copied from and folds every process's tally into the one set of metrics.

Retry mode (RFC 9000 §8.1): under a flood of spoofed Initials, assembling every first flight
costs memory and CPU per spoofed address. With ``retry`` on (``always``, or ``auto`` while the
load is high), a new Initial without a token is answered with a Retry carrying a stateless
token (quic/token.py: bound to the client's address, SipHash-keyed, expiring) and nothing is
kept; only an Initial echoing a valid token is assembled and decided, so only clients that
own their source address cost anything. The worker accepts the retried connection from the
same token (steerd/app/sdk.py), reading it without the key: the classifier is the only place a
token is validated. So whenever a token key is configured, even with Retry ``off``, every
Initial carrying a token shaped like ours is validated here, and invalid or expired ones
(e.g. minted by an app) are dropped and counted: a forged token never gets a routed
connection.

Keys (issue 11): a first flight is the client's original DCID *and* its address (IP, port),
in the assembler (quic/flight.py) and in the bookkeeping here: the front's handed-over set and
the decision half's decided DCIDs. So a sender who learns or guesses a client's DCID cannot
add to, drop, or ride on that client's flight from another address; what it sends is a flight
of its own. For a datagram of a decided DCID from another address than the decided flight's,
that means:

* it is not a straggler of the decided flight: not re-injected to the decided worker, and not
  charged to that flight's straggler budget (``MAX_STRAGGLERS``), which a spoofer could
  otherwise use up so that the real client's own retransmissions were dropped. Re-injecting it
  would hand the worker a long-header packet of its connection from a new address, which its
  QUIC stack must treat as an (invalid, pre-handshake) path change at best; the kernel does
  deliver such packets once the route exists, but the classifier need not add to it;
* it is fed to the assembler as a new flight keyed by its own address, bounded like any other
  half-flight; should that flight complete, its DCID is already routed for another client, so
  it is dropped unanswered (``flight_dcid_taken``): the route is never rewritten (the first
  decision stands), and nothing is sent to an address that may be spoofed;
* a client whose NAT rebinds during its first flight is the same case: before the decision
  its datagrams from the two addresses are two pending flights (its retransmissions from the
  new address complete the second); after it, its retransmissions race the route write at
  worst (dropped here; the next ones reach the worker through the kernel route).

Sans-I/O in the aioquic manner: the side effects go through three narrow callables (route
writer, re-injector, reply sender) that the daemon wires to the data plane and real sockets.
"""

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from quic.builders import build_initial_close, build_retry, build_version_negotiation
from quic.cid import CONFIG_ROTATION_SHIFT, CR_UNROUTABLE, CidLayout
from quic.errors import QuicError
from quic.flight import (
    MIN_INITIAL_DATAGRAM,
    AssemblerConfig,
    FirstFlightAssembler,
    NeedMore,
    Ready,
    Rejected,
    VersionNegotiationNeeded,
)
from quic.packet import SUPPORTED_VERSIONS, PacketType, parse_long_header
from quic.reset import (
    MIN_RESET_LEN,
    TOKEN_LEN,
    build_stateless_reset,
    reset_token,
    slot_reset_key,
)
from quic.token import (
    DEFAULT_LIFETIME,
    build_retry_token,
    is_retry_token,
    validate_retry_token,
)
from steerd.daemon.config import RETRY_MODES
from steerd.daemon.metrics import Tally, bump
from steerd.daemon.ratelimit import TokenBucket
from steerd.daemon.registry import Registry
from steerd.daemon.reinject import SockAddr as Address  # IPv6 link-local: with its scope

# Datagrams of one decided DCID re-injected from the classifier at most (retransmissions of
# the first flight that raced the route write); past that the worker is presumed gone.
MAX_STRAGGLERS = 32

RETRY_CID_LEN = 16  # the Retry's SCID (the retried Initial's DCID): random, never one of ours


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """When the classifier answers new Initials with a Retry (see the module docstring).

    ``auto`` turns it on while pending first flights exceed ``pending_fraction`` of the
    assembler's cap, or while new token-less Initials arrive faster than ``initial_rate`` per
    second, and keeps it on ``hold`` seconds past the last such moment (so it does not flap
    with each second of a flood). Retries have their own send budget (``rate``, ``burst``): a
    Retry is far smaller than the >= 1200-byte Initial that triggers it (no amplification,
    RFC 9000 §8), and a legitimate client's Retry must not be starved by the replies the
    flood itself provokes, which the VN/CONNECTION_CLOSE/reset budget would do.
    """

    mode: str = "off"
    # quic.token.derive_token_key(daemon secret). Also with mode "off": then no Retry is sent
    # but tokens of ours that clients present are still validated (see the module docstring).
    key: bytes = b""
    lifetime: float = DEFAULT_LIFETIME
    pending_fraction: float = 0.25
    initial_rate: float = 2000.0
    hold: float = 5.0
    rate: float = 20000.0
    burst: int = 2000

    def __post_init__(self) -> None:
        if self.mode not in RETRY_MODES:
            raise ValueError(f"retry mode must be one of {RETRY_MODES}, got {self.mode!r}")
        if (self.mode != "off" or self.key) and len(self.key) < 16:
            raise ValueError("retry needs a token key of at least 16 bytes")


class RouteWriter(Protocol):
    """Writes ``initial_routes[dcid] = slot`` in the reuseport group ``group``."""

    def __call__(self, group: int, dcid: bytes, slot: int) -> None: ...


class Reinject(Protocol):
    """Sends ``datagrams`` to ``service`` as if from ``client``
    (:meth:`steerd.daemon.reinject.Reinjector.send`)."""

    def __call__(self, client: Address, service: Address, datagrams: Sequence[bytes]) -> int: ...


Reply = Callable[[bytes, Address, Address, int], None]  # (packet, to client, from service, group)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a datagram came from and went to: kept with each buffered datagram."""

    client: Address
    service: Address
    group: int


# -- events: what a front hands the decision half (plain, picklable) ---------------------------


@dataclass(frozen=True, slots=True)
class Flight:
    """A complete ClientHello and every datagram of its flight, in arrival order (all from the
    same client address: the assembler keys flights by DCID and address)."""

    version: int
    dcid: bytes
    scid: bytes
    sni: str | None
    alpn: tuple[str, ...]
    datagrams: tuple[tuple[bytes, Origin], ...]
    started: float  # arrival of its first datagram, for the decision-latency histogram


@dataclass(frozen=True, slots=True)
class NeedsVersionNegotiation:
    version: int
    dcid: bytes
    scid: bytes
    origin: Origin


@dataclass(frozen=True, slots=True)
class Straggler:
    """A long-header datagram of a DCID this front already handed over, from the same client
    address as the flight it handed over."""

    dcid: bytes
    data: bytes
    origin: Origin


@dataclass(frozen=True, slots=True)
class ShortHeader:
    """A 1-RTT packet the kernel could not deliver (dead worker, or not our CID)."""

    data: bytes
    origin: Origin


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: str
    rejected: bool = False  # a first-flight datagram the assembler refused (metrics)


Event = Flight | NeedsVersionNegotiation | Straggler | ShortHeader | Dropped | None


@dataclass(slots=True)
class FrontStats:
    """What a front reports for metrics: sizes now, drops since creation. The sizes cover both
    of the assembler's tables (flights with Initial data, and 0-RTT seen before any Initial):
    what the front holds in memory."""

    pending_connections: int = 0
    pending_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rejected: int = 0


class FlightFront:
    """Datagrams in, events out: the assembly half of the classifier (one per process)."""

    def __init__(
        self,
        assembler: AssemblerConfig | None = None,
        *,
        handed_ttl: float = 10.0,
        handed_max: int = 65536,
    ) -> None:
        self.assembler = FirstFlightAssembler(assembler or AssemblerConfig())
        # (DCID, client address) already handed over (decided or refused) -> until when: their
        # later datagrams are stragglers for the decision half, never fed again (which would
        # start a second decision). The same DCID from another address is not (see the module
        # docstring). A flight's start time, for the latency histogram, is the assembler's
        # (Ready.started), so no table here mirrors the assembler's pending ones.
        self._handed: OrderedDict[tuple[bytes, Address], float] = OrderedDict()
        self._handed_ttl = handed_ttl
        self._handed_max = handed_max
        self.dropped: dict[str, int] = {}
        self.rejected = 0

    def feed(self, data: bytes, origin: Origin, now: float) -> Event:
        if not data:
            return self._drop("empty")
        if not data[0] & 0x80:
            return ShortHeader(data, origin)
        try:
            dcid = parse_long_header(data, 0).dcid
        except QuicError as exc:
            return self._drop(exc.reason)
        client = origin.client
        key = (dcid, client)
        handed = self._handed.get(key)
        if handed is not None and handed > now:
            return Straggler(dcid, data, origin)
        result = self.assembler.feed(data, origin, now, client)
        if isinstance(result, NeedMore):
            return None
        if isinstance(result, Ready):
            self._hand_over(key, now)
            return Flight(result.version, result.dcid, result.scid, result.sni, result.alpn,
                          result.datagrams, result.started)
        if isinstance(result, VersionNegotiationNeeded):
            return NeedsVersionNegotiation(result.version, result.dcid, result.scid, origin)
        assert isinstance(result, Rejected)
        self.rejected += 1
        return self._drop(result.reason, rejected=True)

    def expire(self, now: float) -> None:
        """Age out pending flights and handed-over DCIDs (at every report tick)."""
        self.assembler.expire(now)
        handed = self._handed
        while handed and next(iter(handed.values())) <= now:
            handed.popitem(last=False)

    def knows(self, dcid: bytes, client: Address, now: float) -> bool:
        """Whether ``client``'s flight of ``dcid`` is being assembled or was just handed over
        (its later datagrams belong to a flight already under way, whatever Retry mode says;
        the same DCID from another address does not)."""
        handed = self._handed.get((dcid, client))
        return (handed is not None and handed > now) or self.assembler.is_pending(dcid, client)

    def forget(self, dcid: bytes, client: Address) -> None:
        """Treat the next datagram of ``client``'s ``dcid`` as new (its flight was held, not
        decided)."""
        self._handed.pop((dcid, client), None)

    def stats(self) -> FrontStats:
        asm = self.assembler
        return FrontStats(asm.pending_count + asm.early_count, asm.pending_bytes + asm.early_bytes,
                          dict(self.dropped), self.rejected)

    def _hand_over(self, key: tuple[bytes, Address], now: float) -> None:
        self._handed[key] = now + self._handed_ttl
        self._handed.move_to_end(key)
        if len(self._handed) > self._handed_max:
            self._handed.popitem(last=False)

    def _drop(self, reason: str, rejected: bool = False) -> Dropped:
        bump(self.dropped, reason)
        return Dropped(reason, rejected)


@dataclass(slots=True)
class ClassifierReport:
    """One classifier's sizes and drops (a classifier process sends its own periodically)."""

    pending_connections: int = 0  # both assembler tables (see FrontStats)
    pending_bytes: int = 0
    routes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # First flights that never completed (TTL or eviction), since start: connections that had
    # sent Initial data (the assembler's stats.expired + stats.evicted). Not the early table's
    # losses, which have their own count below: an entry there never carried an Initial, so
    # it is not yet a first flight (a random-DCID 0-RTT flood would otherwise read as lost
    # clients), and a real client that loses one still gets its flight decided when its
    # Initial arrives (only its 0-RTT datagrams are lost, which QUIC recovers).
    expired: int = 0
    retrying: bool = False  # Retry mode in force at the time of the report
    early_expired: int = 0  # 0-RTT-only entries (no Initial yet) that expired or were evicted


class _Decided:
    """A routed flight, for its stragglers: the slot, until when, the client address it came
    from (only its datagrams are stragglers) and how many were re-injected."""

    __slots__ = ("client", "expires", "slot", "stragglers")

    def __init__(self, slot: int, expires: float, client: Address) -> None:
        self.slot = slot
        self.expires = expires
        self.client = client
        self.stragglers = 0


class Classifier:
    """The decision half: turns each event into a route and a re-injection, or a reply.

    Each classifier process has one (its front and the decision half together, with its own
    replica of the registry), so capacity grows with processes. :meth:`on_datagram` is the
    entry point; :meth:`on_event` is the decision half alone, on what the front made.
    """

    def __init__(
        self,
        registry: Registry,
        write_route: RouteWriter,
        reinject: Reinject,
        reply: Reply,
        *,
        layout: CidLayout | None = None,
        reset_key: bytes | None = None,  # the daemon's master: slot keys derive from it
        assembler: AssemblerConfig | None = None,
        decided_ttl: float = 10.0,
        decided_max: int = 65536,
        send_rate: float = 1000.0,
        send_burst: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        hold_unowned_until: float = 0.0,
        retry: RetryConfig | None = None,
    ) -> None:
        self.registry = registry
        # After a daemon restart, until this time and while apps of the previous run have not
        # resumed their slots, a flight nobody owns yet is dropped unanswered (the client
        # retransmits) instead of refused: its app is probably about to come back.
        self.hold_unowned_until = hold_unowned_until
        self.write_route = write_route
        self.reinject = reinject
        self.reply = reply
        self.tally = Tally()  # what happened since the daemon last flushed it into metrics
        self.layout = layout
        self.reset_key = reset_key
        self.front = FlightFront(assembler, handed_ttl=decided_ttl, handed_max=decided_max)
        self.clock = clock
        # DCID -> its decision: datagrams of a decided flight that were queued here before the
        # route existed still go to the same worker, never to a second decision; only those
        # from the decided flight's client address (see the module docstring). The straggler
        # count bounds a loop: if the route's worker died, the kernel hands re-injected
        # datagrams back here, and they must not circle forever.
        self._decided: OrderedDict[bytes, _Decided] = OrderedDict()
        self._decided_ttl = decided_ttl
        self._decided_max = decided_max
        self.send_rate, self.send_burst = send_rate, send_burst
        self._budget = TokenBucket(send_rate, send_burst)
        self.dropped: dict[str, int] = {}
        self.retry = retry or RetryConfig()
        self._retry_budget = TokenBucket(self.retry.rate, self.retry.burst)
        self._retry_until = -1.0  # auto mode: on until then
        self._window_start = 0.0  # auto mode: token-less Initials counted per second
        self._window_count = 0

    # -- entry points -------------------------------------------------------------------------

    def on_datagram(self, data: bytes, origin: Origin, now: float) -> str:
        """Handle one datagram; returns the outcome token (for tests and logs)."""
        if (self.retry.mode != "off" or self.retry.key) and data and data[0] & 0x80:
            outcome = self._retry_gate(data, origin, now)
            if outcome is not None:
                return outcome
        event = self.front.feed(data, origin, now)
        if isinstance(event, Dropped) and event.rejected:
            self.tally.flight("rejected")
        return self.on_event(event, now)

    def on_event(self, event: Event, now: float) -> str:
        """Act on what a front made of a datagram; returns the outcome token."""
        if event is None:
            return "pending"
        if isinstance(event, Flight):
            return self._flight(event, now)
        if isinstance(event, Straggler):
            return self._straggler(event)
        if isinstance(event, ShortHeader):
            return self._short_header(event.data, event.origin, now)
        if isinstance(event, NeedsVersionNegotiation):
            return self._version_negotiation(event, now)
        return f"dropped:{event.reason}"  # counted by the front that dropped it

    def expire(self, now: float) -> None:
        """Age out pending flights and decided DCIDs; called at every report tick."""
        self.front.expire(now)
        decided = self._decided
        while decided and next(iter(decided.values())).expires <= now:
            decided.popitem(last=False)

    def report(self) -> ClassifierReport:
        """Sizes and drop counts of this classifier, for status and gauges."""
        front = self.front.stats()
        dropped = dict(front.dropped)
        for reason, n in self.dropped.items():
            bump(dropped, reason, n)
        stats = self.front.assembler.stats
        return ClassifierReport(front.pending_connections, front.pending_bytes,
                                len(self._decided), dropped, stats.expired + stats.evicted,
                                self.retrying(self.clock()),
                                stats.expired_early + stats.evicted_early)

    def retrying(self, now: float) -> bool:
        """Whether a token-less new Initial arriving now gets a Retry."""
        mode = self.retry.mode
        if mode == "always":
            return True
        if mode == "off":
            return False
        if now < self._retry_until:
            return True
        cfg = self.retry
        assembler = self.front.assembler
        if assembler.pending_count >= cfg.pending_fraction * assembler.config.max_pending:
            self._retry_until = now + cfg.hold
            return True
        return False

    # -- Retry mode -----------------------------------------------------------------------------

    def _retry_gate(self, data: bytes, origin: Origin, now: float) -> str | None:
        """The token check (whenever a key is configured) and Retry mode's look at a
        long-header datagram before assembly: None lets it through to the front; otherwise
        the outcome (Retry sent, or dropped)."""
        try:
            header = parse_long_header(data, 0)
        except QuicError:
            return None  # the front drops it and counts why
        if header.packet_type is not PacketType.INITIAL or header.version not in SUPPORTED_VERSIONS:
            return None
        token = header.token
        if token and is_retry_token(token):
            try:
                validate_retry_token(self.retry.key, token, origin.client[0], header.dcid, now,
                                     self.retry.lifetime)
            except QuicError as exc:
                bump(self.tally.tokens, exc.reason)
                return self._drop(exc.reason)
            bump(self.tally.tokens, "accepted")
            return None
        # No token of ours (none, or someone else's, e.g. an app's NEW_TOKEN): an address not
        # yet validated (RFC 9000 §8.1.3).
        if self.retry.mode == "auto":
            self._count_new_initial(now)
        if (
            not self.retrying(now)
            or len(data) < MIN_INITIAL_DATAGRAM
            or self.front.knows(header.dcid, origin.client, now)
        ):
            return None
        if not self._retry_budget.take(now):
            bump(self.tally.suppressed, "retry")
            return "retry_suppressed"
        scid = self._retry_cid()
        packet = build_retry(
            header.version, header.scid, scid, header.dcid,
            build_retry_token(self.retry.key, origin.client[0], header.dcid, scid, now),
        )
        self.reply(packet, origin.client, origin.service, origin.group)
        bump(self.tally.sent, "retry")
        return "retry"

    def _count_new_initial(self, now: float) -> None:
        """Auto mode's rate trigger: token-less Initials per one-second window (on as soon as
        a window holds more than ``initial_rate``)."""
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count > self.retry.initial_rate:
            self._retry_until = now + self.retry.hold

    def _retry_cid(self) -> bytes:
        # First octet with the unroutable config-rotation codepoint: never a CID of our
        # layout, so the data plane hands the retried Initial to a classifier, not a worker.
        first = (CR_UNROUTABLE << CONFIG_ROTATION_SHIFT) | (RETRY_CID_LEN - 1)
        return bytes((first,)) + os.urandom(RETRY_CID_LEN - 1)

    # -- outcomes -----------------------------------------------------------------------------

    def _flight(self, flight: Flight, now: float) -> str:
        first = flight.datagrams[0][1]
        prior = self._decided.get(flight.dcid)
        if prior is not None and prior.client != first.client and prior.expires > now:
            # Routed a moment ago for another client address: a spoofer (or a rebound NAT
            # whose client was already served); the first decision stands.
            return self._drop("flight_dcid_taken")
        decision = self.registry.decide(flight.sni, flight.alpn)
        if decision is None and now < self.hold_unowned_until and self.registry.orphans:
            self.front.forget(flight.dcid, first.client)
            self.tally.flight("held")
            return "held"
        if decision is None:
            self.tally.flight("no_owner")
            if self._budget.take(now):
                packet = build_initial_close(
                    flight.version, flight.dcid, flight.scid, self._server_cid()
                )
                self.reply(packet, first.client, first.service, first.group)
                bump(self.tally.sent, "connection_close")
            else:
                bump(self.tally.suppressed, "connection_close")
            return "no_application"
        # Every datagram of one flight arrived on the same group (the client's address family
        # and the service address it chose); route there and re-inject in arrival order.
        self.write_route(first.group, flight.dcid, decision.slot)
        self._decided[flight.dcid] = _Decided(decision.slot, now + self._decided_ttl,
                                              first.client)
        self._decided.move_to_end(flight.dcid)
        if len(self._decided) > self._decided_max:
            self._decided.popitem(last=False)
        sent = 0
        for data, origin in flight.datagrams:
            sent += self.reinject(origin.client, origin.service, (data,))
        tally = self.tally
        tally.flight("routed", decision.app)
        tally.reinjected += sent
        tally.latency(max(0.0, self.clock() - flight.started))
        return f"routed:{decision.app}:{decision.slot}"

    def _straggler(self, event: Straggler) -> str:
        decided = self._decided.get(event.dcid)
        if decided is None or decided.client != event.origin.client:
            # refused, its decision aged out, or another address's flight took the DCID
            return self._drop("straggler_undecided")
        if decided.stragglers >= MAX_STRAGGLERS:
            return self._drop("straggler_loop")
        decided.stragglers += 1
        self.tally.reinjected += self.reinject(
            event.origin.client, event.origin.service, (event.data,))
        return f"straggler:{decided.slot}"

    def _version_negotiation(self, vn: NeedsVersionNegotiation, now: float) -> str:
        self.tally.flight("version_negotiation")
        if not self._budget.take(now):
            bump(self.tally.suppressed, "version_negotiation")
            return "version_negotiation_suppressed"
        packet = build_version_negotiation(
            vn.dcid, vn.scid, list(SUPPORTED_VERSIONS), os.urandom(1)[0]
        )
        self.reply(packet, vn.origin.client, vn.origin.service, vn.origin.group)
        bump(self.tally.sent, "version_negotiation")
        return "version_negotiation"

    def _short_header(self, data: bytes, origin: Origin, now: float) -> str:
        """A 1-RTT packet the kernel could not deliver: its CID names a slot with no live
        worker (the worker died), or the CID is not ours. For our CIDs, answer with the
        stateless reset the dead worker advertised (the key of the slot the CID names,
        derived from the master), so its clients learn at once instead of after an idle
        timeout; anything else is dropped."""
        layout, master = self.layout, self.reset_key
        if layout is None or master is None or len(data) < 1 + layout.cid_len:
            return self._drop("short_header")
        dcid = data[1 : 1 + layout.cid_len]
        slot = layout.decode(dcid)
        if slot is None:
            return self._drop("short_header_not_ours")
        # RFC 9000 §10.3.3: a reset must be smaller than the packet that caused it (no loops
        # between two endpoints); one that cannot be is not sent.
        size = min(len(data) - 1, 43)
        if size < MIN_RESET_LEN:
            return self._drop("short_header_too_small_to_reset")
        if not self._budget.take(now):
            bump(self.tally.suppressed, "stateless_reset")
            return "stateless_reset_suppressed"
        token = reset_token(slot_reset_key(master, slot), dcid)
        packet = build_stateless_reset(token, os.urandom(size - TOKEN_LEN))
        self.reply(packet, origin.client, origin.service, origin.group)
        bump(self.tally.sent, "stateless_reset")
        return "stateless_reset"

    # -- helpers ------------------------------------------------------------------------------

    def _server_cid(self) -> bytes:
        # The refusing Initial's SCID is never used again: random, 8 bytes, not in our layout.
        return os.urandom(8)

    def _drop(self, reason: str) -> str:
        bump(self.dropped, reason)
        return f"dropped:{reason}"
