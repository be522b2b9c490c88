"""Views for ``steerd status`` and the metrics: BPF counters, per-app packets, classifier
drops; and the socket watchdog's findings, counted and turned into evictions."""

import logging
import os
import time
from typing import Any

from steerd.daemon.metrics import bump
from steerd.daemon.sockwatch import (
    PROGRAM,
    Finding,
    protection,
)

log = logging.getLogger("steerd")


_OFFENCE_MEMORY = 2.0  # seconds a 32-bit offence stays the suspect for a program finding


class StatusMixin:
    """Status, metrics sources and watchdog findings of :class:`~steerd.daemon.service.Daemon`."""

    # The state it uses, made in Daemon.__init__ (daemon.py): config, metrics, registry, groups,
    # control, jail, _repairs, _evictions, _offences, _unicast_error, _learn_error, _slot_apps,
    # _maps_lock, steering_attached, _loop, pool, _stopping, metrics_address.

    def counters(self) -> dict[str, int]:
        """BPF counters summed over the groups (each group counts what it steered). Also
        called from the metrics server's threads: under the lock stop() closes maps with."""
        total: dict[str, int] = {}
        with self._maps_lock:
            for group in self.groups:
                for name, value in group.dataplane.counters().items():
                    total[name] = total.get(name, 0) + value
        return total

    def _drops(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for report in self._current_reports():
            for reason, n in report.dropped.items():
                bump(total, reason, n)
        return total

    def _app_packets(self) -> dict[tuple[str, str], int]:
        """steerd_app_packets_total: every slot's statistics, summed per app."""
        slot_apps = self._slot_apps
        total: dict[tuple[str, str], int] = {}
        with self._maps_lock:
            for group in self.groups:
                for slot, row in group.learner.slot_stats(slot_apps).items():
                    app = slot_apps.get(slot)
                    if app is not None:
                        for what, value in row.items():
                            total[(app, what)] = total.get((app, what), 0) + value
        return total

    def _on_finding(self, finding: Finding) -> None:
        """From the watchdog's thread, after its repair: count and log it now, evict on the
        event loop (the registry and the control connections are the loop's)."""
        what = finding.what
        if finding.repaired:  # a new dict, never one a status request is copying
            self._repairs = {**self._repairs, what: self._repairs.get(what, 0) + 1}
            self.metrics.jail_repairs.labels(what).inc()
        whose = ("the group's steering program" if finding.app is None else
                 f"a worker socket of app {finding.app!r} (uid {finding.uid}, slot "
                 f"{finding.slot if finding.slot is not None else 'released'})")
        log.error("watchdog: %s changed on %s on %s: %s", what, whose, finding.address,
                  "set back" if finding.repaired else "REPAIR FAILED (trying again)")
        if self._loop is not None and not self._stopping:
            self._loop.call_soon_threadsafe(self._evict, finding)

    def _evict(self, finding: Finding) -> None:
        """Evict the app whose socket changed; for a group's program (no socket says who),
        the apps of the uids the jail's 32-bit hook saw (``Jail.drain_offences``, where the
        jail has one); nobody known: repaired and counted only."""
        now = time.monotonic()
        drain = getattr(self.jail, "drain_offences", None)
        if drain is not None:
            try:
                for o in drain():  # Offence(pid, uid, what, count), or a (pid, uid, what)
                    pid, uid, what = ((o.pid, o.uid, o.what) if hasattr(o, "pid")
                                      else tuple(o)[:3])
                    self._offences.append((now, pid, uid, what))
            except Exception:  # the offence record is a hint: never fatal
                log.exception("reading the jail's offences failed")
        own = {os.getpid(), *(self.pool.pids if self.pool is not None else ())}
        self._offences = [o for o in self._offences if now - o[0] < _OFFENCE_MEMORY
                          and o[1] not in own]
        if finding.what == PROGRAM:
            targets = {(uid, None) for _, _, uid, _ in self._offences}
        elif finding.uid is not None:
            targets = {(finding.uid, finding.app)}
        else:
            targets = set()
        if not targets:
            log.error("watchdog: nobody known to have changed the %s on %s: repaired only",
                      finding.what, finding.address)
            return
        for uid, app in targets:
            owners = self.registry.evictees(uid, app)
            message = (f"evicted: {finding.what} changed on a worker socket of "
                       f"{app or f'uid {uid}'} on {finding.address}"
                       if finding.what != PROGRAM else
                       f"evicted: the steering program of the group on {finding.address} was "
                       f"replaced or removed by uid {uid}")
            evicted = sum(self.control.evict(owner, message) for owner in owners)
            if evicted:
                bump(self._evictions, finding.what)
                self.metrics.jail_evictions.labels(finding.what).inc()
                log.error("watchdog: %s (%d control connection(s) closed, their slots "
                          "left the data plane)", message, evicted)

    def _status_extra(self) -> dict[str, Any]:
        return {
            "protection": protection(
                getattr(self.jail, "compat_refused_by", None),
                "a raw tracepoint" if getattr(self.jail, "compat_attached", False) else None),
            "watchdog": {"repairs": dict(self._repairs), "evictions": dict(self._evictions)},
            "listen": [g.address for g in self.groups],
            "port": self.config.listen.port,
            "pending_connections": sum(r.pending_connections for r in self._current_reports()),
            "pending_bytes": sum(r.pending_bytes for r in self._current_reports()),
            "classifier_processes": len(self.pool.pids) if self.pool is not None else 1,
            "classifier_restarts": self.pool.restarts if self.pool is not None else 0,
            "steering_attached": self.steering_attached,
            "jail_attached": self.jail is not None and self.jail.attached,
            "unicast_filter": self._unicast_error or "attached",
            "learned_mode": self._learn_error or "available",
            "retry_mode": sum(r.retrying for r in self._current_reports()),
            "classifier_drops": self._drops(),
            "counters": self.counters(),
            "metrics": (f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics"
                        if self.metrics_address else None),
        }
