"""What the control server calls on the daemon: the ``SocketSink`` (a worker's sockets into
and out of every group's data plane, under the socket watchdog), whether sockets may be
handed to a uid now, and the callbacks after a registry change (claims saved, replicas
pushed, a reply held until every classifier process has the change)."""

import logging
import os
import socket
from collections.abc import Callable, Sequence

from steerd.app.protocol import Steering
from steerd.daemon.dataplane.learn import (
    MODE_LAYOUT,
    MODE_LEARNED,
    LearnLimits,
)
from steerd.daemon.service.files import claims_path, save_claims

log = logging.getLogger("steerd")


class SinkMixin:
    """The control-facing operations of :class:`~steerd.daemon.service.Daemon`."""

    # The state it uses, made in Daemon.__init__ (daemon.py): config, registry, groups, jail,
    # _jail_error, sockwatch, _learned_counts, _unproven_counts, _slot_apps, _saved_claims,
    # _maps_lock, steering_attached, pool, _stopping.

    def add_worker(self, slot: int, sockets: Sequence[socket.socket]) -> None:
        for group, sock in zip(self.groups, sockets, strict=True):
            group.dataplane.set_worker(slot, sock)
        self.watch_worker(slot, [sock.fileno() for sock in sockets])

    def watch_worker(self, slot: int, fds: Sequence[int]) -> None:
        """The socket watchdog keeps its own copy of ``slot``'s sockets (one per group): the
        control server closes the daemon's after handing them over, or a resume's after the
        request."""
        gen = self.registry.slot_holder(slot)
        if gen is None:  # not registered (an undone registration): nothing to watch
            return
        self.sockwatch.watch(slot, gen.app, gen.uid,
                             [(group.address, fd) for group, fd in zip(self.groups, fds,
                                                                       strict=True)])

    def remove_worker(self, slot: int) -> None:
        if self._stopping:
            return
        self.sockwatch.release(slot)  # watched on until nobody holds its sockets
        for group in self.groups:
            group.dataplane.remove_worker(slot)
            group.learner.forget_slot(slot)

    def set_steering(self, slot: int, steering: Steering, fresh: bool) -> None:
        mode = MODE_LEARNED if steering.learned else MODE_LAYOUT
        for group in self.groups:
            cookie = group.dataplane.worker_cookie(slot)
            if cookie is None:
                continue
            if fresh:
                group.learner.clear_slot_stats(slot)
            group.learner.set_socket(cookie, slot, mode, steering.cid_len)

    def steering_stats(self, slot: int) -> dict[str, int]:
        total: dict[str, int] = {}
        with self._maps_lock:
            for group in self.groups:
                for name, value in group.learner.slot_stats([slot]).get(slot, {}).items():
                    total[name] = total.get(name, 0) + value
        cids, peers = self._learned_counts.get(slot, (0, 0))
        if cids or peers:
            total.update(learned_cids=cids, learned_peers=peers)
        cids, peers = self._unproven_counts.get(slot, (0, 0))
        if cids or peers:
            total.update(unproven_cids=cids, unproven_peers=peers)
        return total

    def _configure_learning(self) -> None:
        """Quotas, TTL and the CID lengths in use: the registry's learned-mode generations,
        and the apps of a previous run still awaiting resume (their learned entries steer
        their connections meanwhile; the data plane's socket list still says how)."""
        limits = self.config.limits
        learn = LearnLimits(limits.learned_quota, limits.learned_quota, limits.learned_ttl,
                            limits.learned_unproven_quota, limits.learned_unproven_ttl)
        orphans = self.registry.orphans
        for group in self.groups:
            lengths = set(self.registry.learned_lengths())
            lengths.update(cid_len for slot, mode, cid_len in group.learner.sockets().values()
                           if mode == MODE_LEARNED and slot in orphans)
            group.learner.configure(learn, lengths)

    def worker_cookies(self, slot: int) -> list[int | None]:
        return [group.dataplane.worker_cookie(slot) for group in self.groups]

    def socket_refusal(self, uid: int) -> tuple[str, str] | None:
        """Why worker sockets may not be handed to a peer of ``uid`` now, as (reason,
        message); None: they may.

        Before a steering program is attached to every group, the kernel would hash new
        datagrams over whatever sockets join it: nobody gets sockets. Without the jail, any
        holder of a worker socket can take the whole port, so only the daemon's own uid (who
        could do that anyway) gets sockets, unless the operator accepted the risk."""
        if not self.steering_attached:
            return ("not_ready", "no steering program is attached yet (the daemon is "
                    "starting: it compiles its programs); retry in a moment")
        if uid == os.geteuid() or (self.jail is not None and self.jail.attached):
            return None
        if self.config.security.allow_unjailed:
            return None
        return ("unjailed",
                f"the socket jail is not attached ({self._jail_error}), so worker sockets go "
                f"only to uid {os.geteuid()}; [security] allow_unjailed = true overrides this "
                "(unsafe: see docs/SECURITY.md)")

    def _slot_alive(self, slot: int) -> bool:
        return any(cookie is not None for cookie in self.worker_cookies(slot))

    def _save_claims(self) -> None:
        records = self.registry.claims_snapshot()
        if records == self._saved_claims:
            return
        try:
            save_claims(claims_path(self.config), records)
            self._saved_claims = records
        except OSError as exc:
            log.error("cannot save the claims for the next run: %s", exc)

    def _registry_changed(self, urgent: bool = True) -> None:
        """Keep the claims for the next run and the classifier processes' replicas current
        (registrations are rare, decisions are per flight: copying the table beats asking
        the main process). Load reports are not urgent: they go with the next tick."""
        if not self._stopping:  # a stopping daemon disconnects every app: keep their claims
            self._save_claims()
            if urgent:
                self._configure_learning()
                # for scrapes (other threads): a fresh dict, never one being changed
                self._slot_apps = {w["slot"]: a["app"] for a in self.registry.status()["apps"]
                                   for g in a["generations"] for w in g["workers"]}
        if self.pool is not None:
            self.pool.changed(urgent)

    def _settle(self, reply: Callable[[], None]) -> None:
        """Send a control reply once every classifier holds the registry it describes
        (``ClassifierPool.when_synced``); the in-process classifier reads it directly."""
        if self.pool is None:
            reply()
        else:
            self.pool.when_synced(reply)
