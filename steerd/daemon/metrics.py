"""The daemon's Prometheus metrics, defined once, on a registry of their own.

A dedicated ``CollectorRegistry`` (not prometheus_client's global one) so that a test, or two
daemons in one process, each get their own numbers, and so that nothing an imported library
registers globally leaks into ``/metrics``. Every metric is created in ``Metrics.__init__``;
code elsewhere only increments them, never defines one, so the set of names is documented in
one place (here) and cannot drift.

The BPF counters live in per-CPU kernel maps that only the data plane can read; rather than
mirroring them into Python counters on a timer (stale, and a second source of truth),
``set_bpf_source`` installs a callable that is read at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from steerd.daemon.registry import Counts

# Decision latency: first datagram seen -> route written and datagrams re-injected. The target
# is p99 <= 1 ms, so the buckets are dense below a few ms.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
)


# Decision latencies one tally keeps between flushes at most (the latest ones: a ring), so a
# flood costs bounded memory.
MAX_LATENCY_SAMPLES = 4096


@dataclass(slots=True)
class Tally:
    """What a classifier did since its last flush, as plain numbers.

    Why not increment Prometheus objects directly: a label lookup and a lock per event cost
    more than the decision itself on the per-flight path, and a classifier process cannot
    touch the main process's metrics at all. A tally is cheap to bump, picklable, and
    :meth:`Metrics.absorb` folds it into the real metrics on the daemon's timer.
    """

    flights: dict[tuple[str, str], int] = field(default_factory=dict)  # (result, app) -> n
    reinjected: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # version_negotiation, ... -> n
    suppressed: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # Retry tokens: accepted, token_* -> n
    _seen_latencies: int = 0

    def flight(self, result: str, app: str = "") -> None:
        key = (result, app)
        self.flights[key] = self.flights.get(key, 0) + 1

    def latency(self, seconds: float) -> None:
        if len(self.latencies) < MAX_LATENCY_SAMPLES:
            self.latencies.append(seconds)
        else:
            self.latencies[self._seen_latencies % MAX_LATENCY_SAMPLES] = seconds
        self._seen_latencies += 1

    def take(self) -> Tally:
        """Hand over everything counted so far and start from zero."""
        taken = Tally(self.flights, self.reinjected, self.sent, self.suppressed, self.latencies,
                      self.tokens)
        self.flights, self.reinjected, self.sent, self.suppressed = {}, 0, {}, {}
        self.tokens = {}
        self.latencies, self._seen_latencies = [], 0
        return taken


def bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class _ScrapeCollector(Collector):
    """One counter family read at scrape time from a callable (label values -> value)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.source: Callable[[], Mapping[tuple[str, ...], int]] | None = None
        self.errors = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        source = self.source
        if source is not None:
            try:
                values = dict(source())
            except Exception:  # a broken map read must not break the whole scrape
                self.errors += 1
                values = {}
            for key in sorted(values):
                family.add_metric(list(key), float(values[key]))
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        # Known up front, so registering the collector does not call the source.
        yield CounterMetricFamily(self.name, "", labels=self.labels)


class Metrics:
    """All of the daemon's metric objects; one instance per daemon."""

    # Long on purpose: every metric defined once, one after another, each with its labels'
    # meaning; split up, they would only be harder to find.
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # label ``result``: routed (an app owns an offered ALPN, or the default app took it:
        # route + re-inject), no_owner (nobody does: CONNECTION_CLOSE
        # no_application_protocol), version_negotiation (unknown QUIC version: VN sent),
        # rejected (undecryptable or malformed; the reasons are in steerd status), expired
        # (not complete within pending_ttl, or evicted), early_expired (0-RTT that never met
        # its Initial: aged out or evicted), held (nobody owns it yet just after a restart,
        # apps still resuming: left unanswered)
        self.first_flights = Counter(
            "steerd_first_flights", "Client first flights by outcome and by the app chosen "
            "(app is empty when none was).", ["result", "app"], registry=r,
        )
        self.decision_seconds = Histogram(
            "steerd_decision_seconds", "Time from a first flight's first datagram to its "
            "route being written and its datagrams re-injected.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.pending_connections = Gauge(
            "steerd_pending_connections", "First flights being assembled.", registry=r,
        )
        self.pending_bytes = Gauge(
            "steerd_pending_bytes", "Datagram bytes buffered for pending first flights.",
            registry=r,
        )
        self.reinjected_datagrams = Counter(
            "steerd_reinjected_datagrams", "Datagrams re-injected with the client's source "
            "address after a decision.", registry=r,
        )
        self.version_negotiation_sent = Counter(
            "steerd_version_negotiation_sent", "Version Negotiation packets sent.", registry=r,
        )
        self.connection_close_sent = Counter(
            "steerd_connection_close_sent", "Initial CONNECTION_CLOSE (no_application_protocol)"
            " packets sent.", registry=r,
        )
        self.stateless_resets_sent = Counter(
            "steerd_stateless_resets_sent", "Stateless resets sent for 1-RTT packets whose "
            "CID names a worker that is gone.", registry=r,
        )
        self.send_suppressed = Counter(
            "steerd_send_suppressed", "VN, CONNECTION_CLOSE, stateless reset or Retry not sent "
            "because of the send rate limit.", ["kind"], registry=r,
        )
        self.retries_sent = Counter(
            "steerd_retries_sent", "Retry packets sent (Retry mode: new Initials without a "
            "valid token).", registry=r,
        )
        self.retry_tokens = Counter(
            "steerd_retry_tokens", "Initials carrying a steerd Retry token, by verdict "
            "(accepted, token_invalid, token_expired).", ["result"], registry=r,
        )
        self.retry_mode = Gauge(
            "steerd_retry_mode", "Classifiers answering new Initials with a Retry now.",
            registry=r,
        )
        self.routes = Gauge(
            "steerd_initial_routes", "Client DCID -> worker routes the daemon has written and "
            "not yet aged out.", registry=r,
        )
        self.apps = Gauge("steerd_apps", "Registered apps.", registry=r)
        self.generations = Gauge(
            "steerd_generations", "App generations by state (active or draining).", ["state"],
            registry=r,
        )
        self.workers = Gauge(
            "steerd_workers", "Worker slots in use (all generations).", registry=r,
        )
        self.free_slots = Gauge("steerd_free_worker_slots", "Worker slots free.", registry=r)
        self.control_messages = Counter(
            "steerd_control_messages", "Control-socket requests handled, by op.", ["op"],
            registry=r,
        )
        self.control_errors = Counter(
            "steerd_control_errors", "Control-socket requests refused or failed, by reason.",
            ["reason"], registry=r,
        )
        self.control_connections = Gauge(
            "steerd_control_connections", "Open control-socket connections.", registry=r,
        )
        self.classifier_restarts = Counter(
            "steerd_classifier_restarts", "Classifier processes that died and were replaced.",
            registry=r,
        )
        self.loop_stalls = Counter(
            "steerd_loop_stalls", "Times the daemon's event loop went without a tick for "
            "LOOP_STALL_SECONDS (steerd/daemon/watchdog.py); the log names where it was.",
            registry=r,
        )
        self.descriptors_left_open = Counter(
            "steerd_descriptors_left_open", "Descriptors a peer sent that were left open "
            "because the closer's queue was full (a close is stuck; steerd/daemon/closer.py).",
            registry=r,
        )
        self.jail_repairs = Counter(
            "steerd_jail_repairs", "What the socket watchdog found changed and set back, by "
            "what (reuseport, reuseaddr, device, connected, program; "
            "steerd/daemon/sockwatch.py).", ["what"], registry=r,
        )
        self.jail_evictions = Counter(
            "steerd_jail_evictions", "Apps evicted for changing a worker socket or the group's "
            "program, by what changed (steerd/daemon/sockwatch.py).", ["what"], registry=r,
        )
        self._bpf = _ScrapeCollector(
            "steerd_bpf_events",
            "Data-plane counters (guard, reuseport steering, socket jail, learning), per "
            "branch, summed over CPUs; names as bpf/steerd.h defines them (STEERD_CNT_*).",
            ["counter"])
        r.register(self._bpf)
        self._app_packets = _ScrapeCollector(
            "steerd_app_packets",
            "Per app, how its packets were steered and what its servers' packets showed "
            "(steered_learned_cid, steered_learned_peer, egress_long, egress_learned, "
            "egress_off_mode, egress_refused, egress_conflict, egress_full; bpf/steerd.h "
            "STEERD_SLOT_*), summed over its workers; from zero when a slot is handed out.",
            ["app", "what"])
        r.register(self._app_packets)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set_bpf_source(self, source: Callable[[], Mapping[str, int]] | None) -> None:
        """Export ``source()`` (counter name -> value) as steerd_bpf_events_total{counter}."""
        self._bpf.source = None if source is None else (
            lambda: {(name,): value for name, value in source().items()})

    def set_app_packets_source(
        self, source: Callable[[], Mapping[tuple[str, str], int]] | None
    ) -> None:
        """Export ``source()`` ((app, what) -> value) as steerd_app_packets_total."""
        self._app_packets.source = source

    def absorb(self, tally: Tally) -> None:
        """Fold a classifier's tally into the metrics (main process, on the timer)."""
        for (result, app), n in tally.flights.items():
            self.first_flights.labels(result, app).inc(n)
        if tally.reinjected:
            self.reinjected_datagrams.inc(tally.reinjected)
        sent = {
            "version_negotiation": self.version_negotiation_sent,
            "connection_close": self.connection_close_sent,
            "stateless_reset": self.stateless_resets_sent,
            "retry": self.retries_sent,
        }
        for kind, n in tally.sent.items():
            sent[kind].inc(n)
        for kind, n in tally.suppressed.items():
            self.send_suppressed.labels(kind).inc(n)
        for result, n in tally.tokens.items():
            self.retry_tokens.labels(result).inc(n)
        for seconds in tally.latencies:
            self.decision_seconds.observe(seconds)

    def update_registry(self, counts: Counts) -> None:
        """Refresh the app/generation/worker gauges after the registry changed."""
        self.apps.set(counts.apps)
        self.generations.labels("active").set(counts.active_generations)
        self.generations.labels("draining").set(counts.draining_generations)
        self.workers.set(counts.workers)
        self.free_slots.set(counts.free_slots)

    def serve(self, address: str, port: int) -> tuple[str, int]:
        """Serve /metrics over HTTP in a daemon thread; returns the bound (address, port)
        (port 0 picks a free one, which tests use)."""
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        self._server, self._thread = server, thread
        host, bound = server.server_address[:2]
        return str(host), int(bound)

    def close(self) -> None:
        """Stop the HTTP server and release its port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
