"""Start-up and stop: the order that makes a restart seamless (the previous run's pinned
programs steer while this run compiles its own; the compile is programs.py's), and a
stop that leaves the pinned data plane serving."""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time

from steerd.daemon.config import (
    first_flight_capacity,
)
from steerd.daemon.control import bind_group_socket
from steerd.daemon.dataplane import Dataplane, DataplaneConfig, DataplaneError
from steerd.daemon.dataplane.counters import write_every_cpu
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.dataplane.jail import Jail
from steerd.daemon.dataplane.learn import (
    Learner,
)
from steerd.daemon.dataplane.unicast import UnicastFilter
from steerd.daemon.service.files import (
    CLAIM_RESERVATION,
    claims_path,
    group_pin_dir,
    load_claims,
    lock_pin_dir,
)
from steerd.daemon.watchdog import LoopWatchdog, notify

log = logging.getLogger("steerd")


# After a restart, how long (past start-up) flights for ALPNs nobody owns yet are left
# unanswered while the previous run's apps resume (the client retransmits) rather than refused.
RESUME_GRACE = 5.0


_CANARY_SECRET_INDEX = header_constants()["STEERD_CANARY_SECRET"]


class _Group:
    """One reuseport group: a listen address, its data plane and its classifier sockets."""

    def __init__(self, index: int, address: str, dataplane: Dataplane) -> None:
        self.index = index
        self.address = address
        self.dataplane = dataplane
        self.learner = Learner(dataplane)
        self.sockets: list[socket.socket] = []


class StartupMixin:
    """start and stop of :class:`~steerd.daemon.service.Daemon`."""

    # The state it uses, made in Daemon.__init__ (daemon.py): config, pin_dir, metrics,
    # registry, groups, reinjector, classifier, control, jail, sockwatch, _canary_secret,
    # unicast, _lock, _loading, _maps_lock, steering_attached, _tick, _watchdog, _loop, pool,
    # _stopping, metrics_address, _stopped.

    async def start(self) -> None:
        """Open the data plane, the classifier sockets and the control socket, then load the
        programs. The order is what makes a restart seamless: a previous run's program stays
        attached to each group (the apps' sockets keep the groups alive) and its pinned maps
        are reopened here, so the new classifier sockets receive traffic and apps can resume
        within a moment, while compiling the programs takes seconds."""
        self._loop = asyncio.get_running_loop()
        self._lock = lock_pin_dir(self.pin_dir)  # before anything touches the pinned state
        for sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a stop during start-up
            self._loop.add_signal_handler(sig, self._stopped.set)  # is still a clean stop
        cfg, limits = self.config, self.config.limits
        try:
            self._open_groups()
            self.sockwatch.start()  # watches nothing until the first registration
            self._open_jail()
            self._bind_classifiers()
            # A group whose apps all left died with them, and its new one (our classifier
            # sockets) has no program: the kernel would hash. The previous run's pinned
            # program steers at once, until this run's is compiled.
            self.steering_attached = bool(self.groups) and all(
                g.dataplane.attach_pinned_steering(g.sockets[0]) for g in self.groups)
            self._reserve_previous_run()
            self._configure_learning()  # keeps the lengths the orphans' learned entries use
            if limits.classifiers > 1:
                self._start_children()
            self.metrics.set_bpf_source(self.counters)
            self.metrics.set_app_packets_source(self._app_packets)
            await self.control.start()
            if cfg.metrics.enabled:
                self.metrics_address = self.metrics.serve(cfg.metrics.address, cfg.metrics.port)
            self._watchdog = LoopWatchdog(threading.get_ident(),
                                          on_stall=lambda *_: self.metrics.loop_stalls.inc())
            self._watchdog.start()
            self._tick = asyncio.create_task(self._ticker())
            log.info("classifying and accepting apps")
            print("steerd: classifying", flush=True)  # before the (slow) program compile
            self._loading = threading.Event()
            await self._loop.run_in_executor(None, self._load_programs, self._loading)
            # Apps of a previous run have had the whole start-up to resume; give them a
            # little more, then flights nobody owns are refused again.
            self.classifier.hold_unowned_until = time.monotonic() + RESUME_GRACE
            self._registry_changed()
        except BaseException:
            await self.stop()
            raise

    def _open_groups(self) -> None:
        """One data plane per listen address, its pinned maps reopened (start, step 1)."""
        cfg, limits = self.config, self.config.limits
        for index, address in enumerate(cfg.listen.addresses):
            dp = Dataplane(
                DataplaneConfig(
                    layout=cfg.cid,
                    port=cfg.listen.port,
                    classifier_slots=limits.classifiers,
                    worker_slots=limits.worker_slots,
                    route_capacity=first_flight_capacity(limits),
                    learned_capacity=limits.learned_capacity,
                    pin_dir=group_pin_dir(self.pin_dir, address),
                )
            )
            group = _Group(index, address, dp)
            self.groups.append(group)
            dp.open_maps()
            # The canary's secret, before any program of ours (a previous run's too) runs.
            write_every_cpu(dp.map_fd("counters"), dp.ncpus, _CANARY_SECRET_INDEX,
                            int.from_bytes(self._canary_secret, sys.byteorder))

    def _open_jail(self) -> None:
        """The socket jail and the non-unicast filter opened (start, step 2)."""
        cfg = self.config
        if self.groups:
            # Before binding: a previous run's jail is still attached and refuses binds
            # to the port from any process it does not list. The classifier processes
            # forked later inherit the cgroup.
            self.jail = Jail(self.pin_dir, cfg.listen.port,
                             self.groups[0].dataplane.map_fd("counters"))
            self.jail.open()
            self.jail.enter_own_cgroup()
            # A previous run's filter stays attached until this run's is; the
            # broadcast addresses it needs are kept current from here on.
            self.unicast = UnicastFilter(self.pin_dir, cfg.listen.port,
                                         self.groups[0].dataplane.map_fd("counters"))
            self.unicast.open()
            self.unicast.sync_broadcasts()
            self._loop.add_reader(self.unicast.watch(), self.unicast.changed)

    def _bind_classifiers(self) -> None:
        """Each group's classifier sockets bound and put in its map (start, step 3)."""
        cfg, limits = self.config, self.config.limits
        for group in self.groups:
            address, dp = group.address, group.dataplane
            for j in range(limits.classifiers):
                sock = bind_group_socket(address, cfg.listen.port, classifier=True)
                group.sockets.append(sock)
                dp.set_classifier(j, sock)
                if limits.classifiers == 1:
                    self._loop.add_reader(sock.fileno(), self._readable, group, sock)

    def _reserve_previous_run(self) -> None:
        """The previous run's slots and claims held for its apps (start, step 4)."""
        cfg, limits = self.config, self.config.limits
        # Slots a previous run handed out whose sockets are still in the data plane:
        # their apps serve on; nobody else gets them until the apps resume or exit.
        orphans = [slot for slot in range(limits.worker_slots) if self._slot_alive(slot)]
        self.registry.reserve_orphans(orphans)
        if orphans:
            # Their claims too, before the control socket opens: nobody else may take
            # them while the apps resume.
            for why in self.registry.reserve_claims(
                    load_claims(claims_path(cfg)), time.monotonic() + CLAIM_RESERVATION):
                log.warning("claims of the previous run: %s", why)
        if orphans:
            log.info("slots %s still serve a previous run's apps: awaiting resume", orphans)

    async def stop(self) -> None:
        """Close the daemon's sockets and leave the pinned data plane as it is: programs,
        maps and guard keep steering the apps' connections, and the next run takes over.
        ``steerd purge`` removes it all."""
        notify("STOPPING=1")
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None
        if self._watchdog is not None:  # no ticks from here on: not a stall
            self._watchdog.stop()
            self._watchdog = None
        # Closing the control socket disconnects every app; that must not take their sockets
        # out of the data plane: they serve on, and resume with the next run.
        self._stopping = True
        self.sockwatch.stop()  # before the maps and sockets it uses close
        if self.pool is not None:
            self.pool.freeze()  # the classifiers hold their last replica: hold, never refuse
        await self.control.close()
        self.metrics.close()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        if self.jail is not None:
            # While no daemon runs, no process at all may touch the port's sockets.
            with contextlib.suppress(DataplaneError):
                self.jail.set_daemon_cgroups([])
            self.jail.leave_own_cgroup()
            self.jail.close()
            self.jail = None
        if self.unicast is not None and self._loop is not None and self.unicast.watch_fd >= 0:
            self._loop.remove_reader(self.unicast.watch_fd)
        for group in self.groups:
            for sock in group.sockets:
                if self._loop is not None and self.config.limits.classifiers == 1:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        if self._loading is not None and not self._loading.is_set():
            # a stop during start-up (a signal, a failure): the compile thread still holds
            # the map fds it was given; let it finish before they are closed
            await asyncio.get_running_loop().run_in_executor(None, self._loading.wait, 120)
        if self.unicast is not None:  # the pinned filter stays attached
            self.unicast.close()
            self.unicast = None
        self.metrics.set_bpf_source(None)
        self.metrics.set_app_packets_source(None)
        with self._maps_lock:  # a scrape thread may be reading counters right now
            for group in self.groups:
                group.learner.close()
                group.dataplane.close()
            self.groups.clear()
        self.reinjector.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
        self._stopped.set()
