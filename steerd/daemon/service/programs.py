"""The programs' thread: compile and attach, the jail first (until it holds, apps of other
uids get no sockets), then the non-unicast filter, each group's steering program (watched by
the socket watchdog from then on), learned mode, and the guard with its flood guard and
kernel Retry. A stop during start-up is noticed between compiles."""

import functools
import logging
import os
import threading

from steerd.daemon.dataplane import Dataplane, DataplaneError
from steerd.daemon.dataplane import guard as guard_mod
from steerd.daemon.dataplane.counters import read_counter
from steerd.daemon.dataplane.header import header_constants

log = logging.getLogger("steerd")


# Kernel Retry: one source prefix gets retry_rate / this (and retry_burst / this at once).
# When more prefixes than this flood at their full share, the Retry budget is spent before
# a real client's first Initial asks for its Retry, which then comes with a probability of
# this / the flooding prefixes: at 100, a flood from 256 /24s left that 0.39 (and cost a
# client PTO after PTO), so a flood needs more than 1000 prefixes to reach it.
RETRY_PREFIX_SHARE = 1000  # (burst: one second of that share)


_CANARY_COUNTER_INDEX = header_constants()["STEERD_CNT_STEER_CANARY"]


class ProgramsMixin:
    """The programs' loading of :class:`~steerd.daemon.service.Daemon`."""

    # The state it uses, made in Daemon.__init__ (daemon.py): config, groups, classifier, jail,
    # _jail_error, _kernel_retry_dp, sockwatch, unicast, _unicast_error, _learn_error,
    # steering_attached, _stopping.

    def _load_programs(self, done: threading.Event) -> None:
        """Compile and attach (in a thread: the event loop keeps classifying meanwhile). The
        jail first: until it holds, apps of other uids get no sockets. ``done`` is set when
        the thread no longer touches the maps (stop() waits for it before closing them)."""
        try:
            self._load_programs_now()
        finally:
            done.set()

    def _load_programs_now(self) -> None:
        cfg = self.config
        self._attach_jail()
        # A stop during start-up waits for this thread (it holds the maps' fds): give up
        # between compiles rather than compile on for a daemon that is going away.
        if self._stopping:
            return
        if self.unicast is not None:
            try:
                self.unicast.attach()
                self._unicast_error = ""
                log.info("non-unicast filter attached (cgroup ingress, UDP port %d, %s)",
                         cfg.listen.port, self.unicast.scope)
            except DataplaneError as exc:
                self._unicast_error = str(exc)
                log.error("non-unicast filter: %s; broadcasts can reach worker sockets", exc)
        for group in self.groups:
            if self._stopping:
                return
            group.dataplane.load_programs()
            # Replaces the group's program (a previous run's, or the kernel's hash).
            group.dataplane.attach_reuseport(group.sockets[0])
        self.steering_attached = True
        for group in self.groups:  # from now on, every group's program must be this one
            dp = group.dataplane
            self.sockwatch.add_group(
                group.address, cfg.listen.port,
                functools.partial(read_counter, dp.map_fd("counters"), dp.ncpus,
                                  _CANARY_COUNTER_INDEX),
                functools.partial(dp.attach_reuseport, group.sockets[0]))
        for group in self.groups:
            if self._stopping:
                return
            try:
                group.learner.attach()
            except DataplaneError as exc:  # layout-mode apps do not need it
                self._learn_error = str(exc)
                log.error("learned mode unavailable: %s", exc)
        self._attach_guard()

    def _attach_jail(self) -> None:
        """The jail's hooks attached (the first step of the programs' thread)."""
        cfg = self.config
        if self.jail is not None:
            try:
                self.jail.attach()
                log.info("socket jail attached (cgroup hooks for UDP port %d; 32-bit "
                         "setsockopt: %s)", cfg.listen.port,
                         "callers killed by the compat hook" if self.jail.compat_error is None
                         else f"not hooked: {self.jail.compat_error}")
            except DataplaneError as exc:
                self._jail_error = str(exc)
                log.error("socket jail: %s; worker sockets go only to uid %d%s", exc,
                          os.geteuid(), " and, as [security] allow_unjailed says, to every "
                          "other uid too (UNSAFE)" if cfg.security.allow_unjailed else "")

    def _attach_guard(self) -> None:
        """The guard on the configured interfaces, its flood guard and kernel Retry (the last
        step of the programs' thread)."""
        cfg = self.config
        if self.groups:
            dp0 = self.groups[0].dataplane
            for ifname in cfg.xdp.interfaces:
                if cfg.xdp.mode == "tc":
                    dp0.detach_stale_tc(ifname)  # a previous run's guard
                    dp0.attach_tc(ifname)
                    mode = "tc"
                else:
                    mode = dp0.attach_xdp(ifname, cfg.xdp.mode)  # replaces a previous one
                log.info("guard on %s (%s)", ifname, mode)
            flood = cfg.flood
            if cfg.xdp.interfaces and flood.guard_rate > 0:
                dp0.set_flood_guard(flood.guard_rate, flood.guard_burst,
                                    flood.guard_v4_prefix_len, flood.guard_v6_prefix_len,
                                    flood.guard_total_rate, flood.guard_total_burst)
                log.info("flood guard: %g new Initials/s per source prefix, burst %d; %s",
                         flood.guard_rate, flood.guard_burst,
                         f"{flood.guard_total_rate:g}/s in all" if flood.guard_total_rate
                         else "no total cap")
            elif cfg.xdp.interfaces:
                dp0.disable_flood_guard()  # a previous run's may still be configured
            if cfg.xdp.interfaces:
                self._kernel_retry(dp0)

    def _kernel_retry(self, dp: Dataplane) -> None:
        """The guard's Retry and token check (docs/DATAPLANE.md "Kernel Retry"): the token key
        (the classifier's, so either side validates the other's tokens), the Retries' budget,
        and Retry mode: on for good with ``retry = "always"``; with "auto" and "off" it stays
        off here and the classifier's Python Retry answers under load, as it does wherever
        no guard is attached."""
        flood = self.config.flood
        # One source prefix may take 0.1% of the Retry budget (retry_rate, retry_burst bound
        # all prefixes together), so a few prefixes cannot make steerd reflect at its cap.
        dp.set_retry(self.classifier.retry.key, flood.token_lifetime,
                     rate=flood.retry_rate / RETRY_PREFIX_SHARE,
                     burst=max(1, round(flood.retry_rate / RETRY_PREFIX_SHARE)),  # 1 s of it
                     total_rate=flood.retry_rate, total_burst=flood.retry_burst,
                     # "always" means every token-less Initial: none is let past
                     proven_ttl=flood.retry_proven_ttl if flood.retry == "auto" else 0.0,
                     proven_rate=flood.retry_proven_rate)
        dp.set_retry_until(guard_mod.RETRY_ALWAYS if flood.retry == "always" else 0)
        if flood.retry == "auto":
            # A quarter second of the rate as burst: a legitimate spike passes, a flood
            # turns Retry mode on within milliseconds, in the kernel, before Python sees it.
            dp.set_retry_auto(flood.retry_initial_rate,
                              max(1, int(flood.retry_initial_rate / 4)), flood.retry_hold)
            self._kernel_retry_dp = dp
        log.info("kernel Retry: %s; tokens checked in the guard", flood.retry)
