"""The tick (every ``_REPORT_INTERVAL``): pending flights aged out, orphaned slots released,
learned tables swept (in a thread), replicas pushed, gauges and the kernel Retry hold
updated, and the loop's watchdogs fed."""

import asyncio
import logging
import math
import time
from collections.abc import Sequence

from steerd.daemon.classifier import ClassifierReport
from steerd.daemon.dataplane import DataplaneError
from steerd.daemon.watchdog import notify

log = logging.getLogger("steerd")


_REPORT_INTERVAL = 0.5  # classifier processes report tallies and sizes this often


_SWEEP_INTERVAL = 5.0  # seconds between sweeps of the learned tables (expiry, quota counts)


class TickMixin:
    """The periodic work of :class:`~steerd.daemon.service.Daemon`."""

    # The state it uses, made in Daemon.__init__ (daemon.py): config, metrics, registry, groups,
    # classifier, _kernel_retry_dp, _learned_counts, _unproven_counts, _next_sweep, _maps_lock,
    # _watchdog, _ping_systemd, _loop, pool, _reports, _expired_counted, _early_expired_counted,
    # _stopping.

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(_REPORT_INTERVAL)
            try:
                self._tick_once()
            except Exception:  # a bug here must not stop the ticking (expiry, pushes, gauges)
                log.exception("periodic tick failed")
            self._beat()

    def _beat(self) -> None:
        """The loop is alive: tell both witnesses (steerd/daemon/watchdog.py)."""
        if self._watchdog is not None:
            self._watchdog.beat()
        if self._ping_systemd:
            notify("WATCHDOG=1")

    def _tick_once(self) -> None:
        if self.pool is None:
            self.classifier.expire(time.monotonic())
            self.metrics.absorb(self.classifier.tally.take())
        if self.registry.orphans:
            released = self.registry.release_orphans(self._slot_alive)
            if released:  # an app exited without resuming: slots are free
                for group in self.groups:
                    for slot in released:
                        group.learner.forget_slot(slot)
                self._registry_changed()
        now = time.monotonic()
        if now >= self._next_sweep and self._loop is not None:
            # In a thread (map syscalls release the GIL): a full table is 10^5 syscalls,
            # too long to hold up the classifier on the event loop.
            self._next_sweep = math.inf  # until this sweep is done
            self._loop.run_in_executor(None, self._sweep)
        if self.pool is not None:
            self.pool.tick()
        self._update_gauges()

    def _sweep(self) -> None:
        """Expire learned entries and recount the quotas (see Learner.sweep)."""
        counts: dict[int, tuple[int, int]] = {}
        unproven: dict[int, tuple[int, int]] = {}  # not yet proven by a client: not in quota
        try:
            with self._maps_lock:
                if self._stopping:
                    return
                for group in self.groups:
                    for slot, (cids, peers) in group.learner.sweep().items():
                        have = counts.get(slot, (0, 0))
                        counts[slot] = (have[0] + cids, have[1] + peers)
                    for slot, (cids, peers) in group.learner.unproven.items():
                        have = unproven.get(slot, (0, 0))
                        unproven[slot] = (have[0] + cids, have[1] + peers)
            self._learned_counts = counts
            self._unproven_counts = unproven
        except Exception:  # a failed sweep must not stop the next ones
            log.exception("sweeping the learned tables failed")
        finally:
            self._next_sweep = time.monotonic() + _SWEEP_INTERVAL

    def _current_reports(self) -> list[ClassifierReport]:
        if self.pool is None:
            return [self.classifier.report()]
        return list(self._reports.values())

    def _update_gauges(self) -> None:
        reports = self._current_reports()
        self._hold_kernel_retry(reports)
        self.metrics.pending_connections.set(sum(r.pending_connections for r in reports))
        self.metrics.pending_bytes.set(sum(r.pending_bytes for r in reports))
        self.metrics.routes.set(sum(r.routes for r in reports))
        self.metrics.retry_mode.set(sum(r.retrying for r in reports))
        # Reports carry totals since start; the counter wants what is new.
        expired = sum(r.expired for r in reports)
        if expired > self._expired_counted:
            self.metrics.first_flights.labels("expired", "").inc(expired - self._expired_counted)
            self._expired_counted = expired
        early = sum(r.early_expired for r in reports)  # 0-RTT that never met its Initial
        if early > self._early_expired_counted:
            self.metrics.first_flights.labels("early_expired", "").inc(
                early - self._early_expired_counted)
            self._early_expired_counted = early

    def _hold_kernel_retry(self, reports: Sequence[ClassifierReport]) -> None:
        """In "auto", the classifiers falling behind (their pending first flights past
        ``retry_pending_fraction``) also turn the guard's Retry mode on, for ``retry_hold``."""
        dp = self._kernel_retry_dp
        if dp is None or not any(r.retrying for r in reports):
            return
        until = time.monotonic_ns() + int(self.config.flood.retry_hold * 1e9)
        try:
            if dp.guard_config().retry_until_ns < until:
                dp.set_retry_until(until)
        except DataplaneError as exc:
            log.warning("kernel Retry: cannot turn Retry mode on: %s", exc)
