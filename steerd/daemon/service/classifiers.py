"""The classifier wiring: the main process's classifier reading its sockets (one
classifier), or the pool of classifier processes (``[limits] classifiers`` > 1) and the body
each process runs; and the callables a classifier is given (route writes, replies)."""

import contextlib
import ctypes
import ipaddress
import logging
import os
import pickle
import selectors
import signal
import socket
import time
from typing import Any, NoReturn

from quic.token import derive_token_key
from steerd.daemon.classifier import Classifier, ClassifierReport, RetryConfig
from steerd.daemon.config import (
    Config,
    first_flight_capacity,
)
from steerd.daemon.control import IP_PKTINFO
from steerd.daemon.dataplane import DataplaneError
from steerd.daemon.metrics import bump
from steerd.daemon.pool import MESSAGE_MAX, ClassifierPool
from steerd.daemon.reinject import Reinjector
from steerd.daemon.service.datagrams import _IN6_PKTINFO, _IN_PKTINFO, receive
from steerd.daemon.service.startup import _Group
from steerd.daemon.service.tick import _REPORT_INTERVAL

log = logging.getLogger("steerd")


_PR_SET_PDEATHSIG = 1


def retry_config(config: Config, secret: bytes, share: int = 1) -> RetryConfig:
    """The classifier's Retry mode from [flood]; ``share`` divides the Retry budget among
    classifier processes. The token key derives from the daemon's master secret, which no app
    ever sees (apps get per-slot keys derived from it), so only the daemon mints tokens; it
    outlives restarts, so a token issued just before one is still good just after."""
    flood = config.flood
    return RetryConfig(
        mode=flood.retry, key=derive_token_key(secret), lifetime=flood.token_lifetime,
        pending_fraction=flood.retry_pending_fraction,
        initial_rate=flood.retry_initial_rate / share, hold=flood.retry_hold,
        rate=flood.retry_rate / share, burst=max(1, flood.retry_burst // share),
    )


class ClassifierMixin:
    """The classifier side of :class:`~steerd.daemon.service.Daemon`."""

    # The state it uses, made in Daemon.__init__ (daemon.py): config, metrics, registry, groups,
    # reinjector, classifier, pool, _reports, _socket_index.

    def _readable(self, group: _Group, sock: socket.socket) -> None:
        now = time.monotonic()
        for data, origin in receive(sock, group.index, group.address, self.config.listen.port,
                                    self.classifier.dropped):
            try:
                self.classifier.on_datagram(data, origin, now)
            except Exception:  # a bug must cost one datagram, never the daemon
                log.exception("classifier failed on a datagram from %s", origin.client)
                bump(self.classifier.dropped, "internal_error")

    def _start_children(self) -> None:
        """Fork one classifier process per classifier index (a ClassifierPool supervises
        them). Each reads the sockets of its index in every group (the BPF program's DCID
        hash picks the index, so every datagram of one connection meets the same process) and
        does the whole job itself — assembly, decision on its replica of the registry, route
        write, re-injection — so capacity grows with processes instead of queueing at one
        decider."""
        def lost(index: int) -> None:  # the steering program probes on to a live one
            self._reports.pop(index, None)
            for group in self.groups:
                with contextlib.suppress(DataplaneError):
                    group.dataplane.remove_classifier(index)

        def ready(index: int) -> None:  # at start, its sockets are in the map already
            for group in self.groups:
                with contextlib.suppress(DataplaneError):
                    group.dataplane.remove_classifier(index)
                group.dataplane.set_classifier(index, group.sockets[index])

        def report(index: int, tally: Any, rep: ClassifierReport) -> None:
            self.metrics.absorb(tally)
            self._reports[index] = rep

        self.pool = ClassifierPool(
            self.config.limits.classifiers, self._run_child,
            lambda: (self.registry, self.classifier.hold_unowned_until), report, lost, ready,
            count_restart=self.metrics.classifier_restarts.inc,
        )
        self.pool.start()

    def _run_child(self, index: int, channel: socket.socket) -> NoReturn:
        """Body of classifier process ``index``: exits with the main process (PDEATHSIG, or
        its channel closing). Messages in: (version, (registry replica, hold_unowned_until)),
        pickled. Messages out, at once and then every _REPORT_INTERVAL: (the version it
        holds, tally, report)."""
        code = 0
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._socket_index = index
            self.reinjector = Reinjector()  # raw sockets of its own
            classifier = self._child_classifier()
            port = self.config.listen.port
            sel = selectors.DefaultSelector()
            for group in self.groups:
                sel.register(group.sockets[index], selectors.EVENT_READ, group)
            sel.register(channel, selectors.EVENT_READ, None)
            channel.setblocking(True)
            next_report = time.monotonic()
            version = -1
            while True:
                for key, _ in sel.select(max(0.0, next_report - time.monotonic())):
                    if key.data is None:
                        message = channel.recv(MESSAGE_MAX)
                        if not message:
                            raise SystemExit(0)
                        version, (classifier.registry, classifier.hold_unowned_until) = (
                            pickle.loads(message))
                        next_report = time.monotonic()  # say at once: control replies wait
                        continue
                    group = key.data
                    now = time.monotonic()
                    for data, origin in receive(group.sockets[index], group.index,
                                                group.address, port, classifier.dropped):
                        try:
                            classifier.on_datagram(data, origin, now)
                        except Exception:  # a bug must cost one datagram, not the process
                            log.exception("classifier %d failed on a datagram", index)
                            bump(classifier.dropped, "internal_error")
                now = time.monotonic()
                if now >= next_report:
                    classifier.expire(now)
                    report = (version, classifier.tally.take(), classifier.report())
                    channel.send(pickle.dumps(report, pickle.HIGHEST_PROTOCOL))
                    next_report = now + _REPORT_INTERVAL
        except (SystemExit, BrokenPipeError, ConnectionResetError):
            pass
        except BaseException:
            log.exception("classifier process %d failed", index)
            code = 1
        os._exit(code)

    def _child_classifier(self) -> Classifier:
        """The classifier of a classifier process: its share of the bounds and budgets."""
        limits = self.config.limits
        return Classifier(
            self.registry, self._write_route, self.reinjector.send, self._reply,
            layout=self.config.cid, reset_key=self.classifier.reset_key,
            assembler=self.classifier.front.assembler.config,
            decided_ttl=limits.route_ttl,
            decided_max=-(-first_flight_capacity(limits) // limits.classifiers),  # its share
            send_rate=self.classifier.send_rate / limits.classifiers,
            send_burst=max(1, self.classifier.send_burst // limits.classifiers),
            hold_unowned_until=self.classifier.hold_unowned_until,
            retry=retry_config(self.config, self.classifier.reset_key or b"",
                               limits.classifiers),
        )

    def _write_route(self, group: int, dcid: bytes, slot: int) -> None:
        self.groups[group].dataplane.add_route(dcid, slot, ttl=self.config.limits.route_ttl)

    def _reply(self, packet: bytes, client: tuple[str, int], service: tuple[str, int],
               group: int) -> None:
        """Send from the service address the client used, via this process's socket."""
        sock = self.groups[group].sockets[self._socket_index]
        ip = ipaddress.ip_address(service[0])
        if ip.version == 4:
            anc = [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, ip.packed, bytes(4)))]
        else:
            anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(ip.packed, 0))]
        try:
            sock.sendmsg([packet], anc, 0, client)
        except OSError as exc:
            log.debug("reply to %s failed: %s", client, exc)
