"""The classifier: what the daemon does with a datagram the steering program could not place.

Every datagram that reaches a classifier socket is either part of a new client's first flight
(assembled with :class:`quic.flight.FirstFlightAssembler` until the ClientHello is whole), a
straggler of a flight decided a moment ago (its route was written after the datagram had
already been queued here), or something no live worker can take. On a decision the classifier
asks the registry for the owning app's worker, writes ``initial_routes[DCID]`` in the reuseport
group the client used, and re-injects the buffered datagrams with the client's own source
address, so the kernel steers them again and now delivers them to the worker.

Sans-I/O in the aioquic manner where it matters: :meth:`Classifier.on_datagram` takes the
datagram, the addresses and ``now``; the side effects go through three narrow callables
(route writer, re-injector, reply sender) that the daemon wires to the data plane and to real
sockets, and that tests can wire to the same real objects in a network namespace.
"""

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from quic.builders import build_initial_close, build_version_negotiation
from quic.cid import CidLayout
from quic.errors import QuicError
from quic.flight import (
    AssemblerConfig,
    FirstFlightAssembler,
    NeedMore,
    Ready,
    Rejected,
    VersionNegotiationNeeded,
)
from quic.packet import SUPPORTED_VERSIONS, parse_long_header
from quic.reset import MIN_RESET_LEN, TOKEN_LEN, build_stateless_reset, reset_token
from steerd.metrics import Metrics
from steerd.registry import Registry

Address = tuple[str, int]

# Datagrams of one decided DCID re-injected from the classifier at most (retransmissions of
# the first flight that raced the route write); past that the worker is presumed gone.
MAX_STRAGGLERS = 32


class RouteWriter(Protocol):
    """Writes ``initial_routes[dcid] = slot`` in the reuseport group ``group``."""

    def __call__(self, group: int, dcid: bytes, slot: int) -> None: ...


class Reinject(Protocol):
    """Sends ``datagrams`` to ``service`` as if from ``client`` (see steerd.reinject)."""

    def __call__(self, client: Address, service: Address, datagrams: Sequence[bytes]) -> int: ...


Reply = Callable[[bytes, Address, Address, int], None]  # (packet, to client, from service, group)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a datagram came from and went to: kept with each buffered datagram."""

    client: Address
    service: Address
    group: int


class _SendBudget:
    """Token bucket for what the classifier sends unasked (VN, CONNECTION_CLOSE): a spoofed
    flood must not turn the daemon into a reflector (RFC 9000 §21.5)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Classifier:
    """Assembles first flights and turns each into a route and a re-injection."""

    def __init__(
        self,
        registry: Registry,
        write_route: RouteWriter,
        reinject: Reinject,
        reply: Reply,
        *,
        metrics: Metrics | None = None,
        layout: CidLayout | None = None,
        reset_key: bytes | None = None,
        assembler: AssemblerConfig | None = None,
        decided_ttl: float = 10.0,
        decided_max: int = 65536,
        send_rate: float = 1000.0,
        send_burst: int = 1000,
        random: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.write_route = write_route
        self.reinject = reinject
        self.reply = reply
        self.metrics = metrics
        self.layout = layout
        self.reset_key = reset_key
        self.assembler = FirstFlightAssembler(assembler or AssemblerConfig())
        self.random = random
        self.clock = clock
        # DCID -> [slot, expires, stragglers]: datagrams of a decided flight that were queued
        # here before the route existed still go to the same worker, never to a second
        # decision. The straggler count bounds a loop: if the route's worker died, the kernel
        # hands re-injected datagrams back here, and they must not circle forever.
        self._decided: OrderedDict[bytes, list[float]] = OrderedDict()
        self._decided_ttl = decided_ttl
        self._decided_max = decided_max
        self._budget = _SendBudget(send_rate, send_burst)
        # DCID -> time of its first datagram, for the decision-latency histogram; capped like
        # the assembler's own table (oldest first), so a flood cannot grow it.
        self._first_seen: OrderedDict[bytes, float] = OrderedDict()
        self._first_seen_max = self.assembler.config.max_pending
        self.dropped: dict[str, int] = {}

    # -- the one entry point ------------------------------------------------------------------

    def on_datagram(self, data: bytes, origin: Origin, now: float) -> str:
        """Handle one datagram; returns the outcome token (for tests and logs)."""
        if not data:
            return self._drop("empty")
        if not data[0] & 0x80:
            return self._short_header(data, origin, now)
        try:
            dcid = parse_long_header(data, 0).dcid
        except QuicError as exc:
            return self._drop(exc.reason)
        decided = self._decided.get(dcid)
        if decided is not None and decided[1] > now:
            if decided[2] >= MAX_STRAGGLERS:
                return self._drop("straggler_loop")
            decided[2] += 1
            self.reinject(origin.client, origin.service, (data,))
            if self.metrics:
                self.metrics.reinjected_datagrams.inc()
            return f"straggler:{int(decided[0])}"
        if dcid not in self._first_seen:
            self._first_seen[dcid] = now
            if len(self._first_seen) > self._first_seen_max:
                self._first_seen.popitem(last=False)
        result = self.assembler.feed(data, origin, now)
        if isinstance(result, NeedMore):
            outcome = "pending"
        elif isinstance(result, Ready):
            outcome = self._ready(result, now)
        elif isinstance(result, VersionNegotiationNeeded):
            self._first_seen.pop(dcid, None)
            outcome = self._version_negotiation(result, origin, now)
        else:
            assert isinstance(result, Rejected)
            if result.connection_dropped or result.dcid is None:
                self._first_seen.pop(dcid, None)
            if self.metrics:
                self.metrics.first_flights.labels("rejected", "").inc()
            outcome = self._drop(result.reason)
        self._gauges()
        return outcome

    def expire(self, now: float) -> None:
        """Age out pending flights and decided DCIDs; the daemon calls this every second."""
        self.assembler.expire(now)
        decided = self._decided
        while decided:
            dcid, entry = next(iter(decided.items()))
            if entry[1] > now:
                break
            del decided[dcid]
        seen = self._first_seen
        while seen:
            dcid, first = next(iter(seen.items()))
            if now - first < self.assembler.config.ttl:
                break
            del seen[dcid]
        self._gauges()
        if self.metrics:
            self.metrics.routes.set(len(decided))

    # -- outcomes -----------------------------------------------------------------------------

    def _ready(self, ready: Ready, now: float) -> str:
        started = self._first_seen.pop(ready.dcid, now)
        decision = self.registry.decide(ready.sni, ready.alpn)
        first: Origin = ready.datagrams[0][1]
        if decision is None:
            if self.metrics:
                self.metrics.first_flights.labels("no_application", "").inc()
            if self._budget.take(now):
                packet = build_initial_close(
                    ready.version, ready.dcid, ready.scid, self._server_cid()
                )
                self.reply(packet, first.client, first.service, first.group)
                if self.metrics:
                    self.metrics.connection_close_sent.inc()
            elif self.metrics:
                self.metrics.send_suppressed.labels("connection_close").inc()
            return "no_application"
        # Every datagram of one flight arrived on the same group (the client's address family
        # and the service address it chose); route there and re-inject in arrival order.
        self.write_route(first.group, ready.dcid, decision.slot)
        self._decided[ready.dcid] = [decision.slot, now + self._decided_ttl, 0]
        self._decided.move_to_end(ready.dcid)
        while len(self._decided) > self._decided_max:
            self._decided.popitem(last=False)
        sent = 0
        for data, origin in ready.datagrams:
            sent += self.reinject(origin.client, origin.service, (data,))
        if self.metrics:
            self.metrics.first_flights.labels("routed", decision.app).inc()
            self.metrics.reinjected_datagrams.inc(sent)
            self.metrics.decision_seconds.observe(max(0.0, self.clock() - started))
            self.metrics.routes.set(len(self._decided))
        return f"routed:{decision.app}:{decision.slot}"

    def _version_negotiation(
        self, vn: VersionNegotiationNeeded, origin: Origin, now: float
    ) -> str:
        if self.metrics:
            self.metrics.first_flights.labels("version_negotiation", "").inc()
        if not self._budget.take(now):
            if self.metrics:
                self.metrics.send_suppressed.labels("version_negotiation").inc()
            return "version_negotiation_suppressed"
        packet = build_version_negotiation(
            vn.dcid, vn.scid, list(SUPPORTED_VERSIONS), self.random(1)[0]
        )
        self.reply(packet, origin.client, origin.service, origin.group)
        if self.metrics:
            self.metrics.version_negotiation_sent.inc()
        return "version_negotiation"

    def _short_header(self, data: bytes, origin: Origin, now: float) -> str:
        """A 1-RTT packet the kernel could not deliver: its CID names a slot with no live
        worker (the worker died), or the CID is not ours. For our CIDs, answer with the
        stateless reset the dead worker advertised (same HMAC key), so its clients learn at
        once instead of after an idle timeout; anything else is dropped."""
        layout, key = self.layout, self.reset_key
        if layout is None or key is None or len(data) < 1 + layout.cid_len:
            return self._drop("short_header")
        dcid = data[1 : 1 + layout.cid_len]
        if layout.decode(dcid) is None:
            return self._drop("short_header_not_ours")
        # RFC 9000 §10.3.3: a reset must be smaller than the packet that caused it (no loops
        # between two endpoints); one that cannot be is not sent.
        size = min(len(data) - 1, 43)
        if size < MIN_RESET_LEN:
            return self._drop("short_header_too_small_to_reset")
        if not self._budget.take(now):
            if self.metrics:
                self.metrics.send_suppressed.labels("stateless_reset").inc()
            return "stateless_reset_suppressed"
        packet = build_stateless_reset(reset_token(key, dcid), self.random(size - TOKEN_LEN))
        self.reply(packet, origin.client, origin.service, origin.group)
        if self.metrics:
            self.metrics.stateless_resets_sent.inc()
        return "stateless_reset"

    # -- helpers ------------------------------------------------------------------------------

    def _server_cid(self) -> bytes:
        # The refusing Initial's SCID is never used again: random, 8 bytes, not in our layout.
        return self.random(8)

    def _drop(self, reason: str) -> str:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return f"dropped:{reason}"

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.pending_connections.set(self.assembler.pending_count)
            self.metrics.pending_bytes.set(self.assembler.pending_bytes)
