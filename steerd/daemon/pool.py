"""The classifier processes (``[limits] classifiers`` > 1): spawn, supervise, feed, stop.

Why one place: each process classifies the DCID-hash share of new connections that lands on
its classifier sockets, so everything that can go wrong with one of them costs that share of
every new connection. The pool owns that:

- **Supervision.** A process that dies (its channel reaches end of file) takes its share with
  it: the main process still holds its sockets, so the BPF ``classifiers`` map would keep
  steering to them and nobody would read. The pool calls ``on_lost(index)`` at once (the
  daemon takes the sockets out of the map: the steering program probes on to the next live
  classifier, so the share is served by the others, never black-holed), forks a replacement
  on the same sockets (datagrams queued meanwhile are read by it) and calls
  ``on_ready(index)`` when its first report arrives (the daemon puts the sockets back).
  Replacements that die within ``RESPAWN_BACKOFF`` of their start are respawned after it
  (a crash loop must not become a fork loop). Every loss is counted.
- **Snapshots.** The registry is pushed as a versioned pickle, only when it changed:
  ``changed()`` coalesces the changes of one loop iteration into one push; load-only changes
  (``changed(urgent=False)``) wait for the next tick. A send the channel cannot take now is
  not lost: each process reports the version it holds, and whoever is behind gets the latest
  again at the next tick.
- **Stop.** ``stop()`` closes the channels and reaps the processes; while the daemon stops it
  calls ``freeze()`` first, so the emptied registry of a closing control socket is never
  pushed (a stopping daemon must hold flights, not refuse them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

log = logging.getLogger("steerd")

RESPAWN_BACKOFF = 1.0  # seconds: a process that dies younger than this is respawned after it
CHANNEL_BUFFER = 4 << 20
MESSAGE_MAX = 1 << 22  # a registry snapshot or a report
SYNC_TIMEOUT = 2.0  # seconds a control reply waits at most for every process's new snapshot


@dataclass
class _Member:
    index: int
    pid: int
    channel: socket.socket
    started: float
    version: int = -1  # the snapshot version it reported holding
    ready: bool = False


class ClassifierPool:
    """``run_child(index, channel)`` is the body of a classifier process (never returns);
    ``on_report(index, tally, report)`` takes each periodic report; ``on_lost`` and
    ``on_ready`` take a process's sockets out of and back into the data plane;
    ``snapshot()`` is what to push (the registry replica); ``count_restart()`` counts a
    replacement. The processes belong to the socket jail by the cgroup they inherit."""

    def __init__(
        self,
        size: int,
        run_child: Callable[[int, socket.socket], NoReturn],
        snapshot: Callable[[], Any],
        on_report: Callable[[int, Any, Any], None],
        on_lost: Callable[[int], None],
        on_ready: Callable[[int], None],
        count_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self.size = size
        self._run_child = run_child
        self._snapshot = snapshot
        self._on_report, self._on_lost, self._on_ready = on_report, on_lost, on_ready
        self._count_restart = count_restart
        self._loop: asyncio.AbstractEventLoop | None = None
        self._members: dict[int, _Member] = {}
        self._version = 0
        self._payload: bytes | None = None  # the latest snapshot, pickled with its version
        self._dirty = False
        self._push_scheduled = False
        self._frozen = False
        self._waiters: list[tuple[int, Callable[[], None], asyncio.TimerHandle]] = []
        self.restarts = 0

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for index in range(self.size):
            self._spawn(index)

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self._members.values()]

    def _spawn(self, index: int) -> None:
        assert self._loop is not None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (parent_end, child_end):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHANNEL_BUFFER)
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            for other in self._members.values():  # the siblings' channels are not ours
                other.channel.close()
            self._run_child(index, child_end)  # never returns
        child_end.close()
        parent_end.setblocking(False)
        member = _Member(index, pid, parent_end, time.monotonic())
        self._members[index] = member
        self._loop.add_reader(parent_end.fileno(), self._readable, member)
        self._send(member)  # it forked with the registry as it is; the version says which

    def freeze(self) -> None:
        """No more pushes (the daemon is stopping: the registry is about to be emptied)."""
        self._frozen = True
        self._wake()

    def stop(self) -> None:
        self._frozen = True
        for member in list(self._members.values()):
            self._close(member)
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(member.pid, 0)
        self._members.clear()

    def _close(self, member: _Member) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(member.channel.fileno())
        member.channel.close()

    # -- snapshots -------------------------------------------------------------------------

    def changed(self, urgent: bool = True) -> None:
        """The registry changed: push it (urgent: in this loop iteration, coalesced; else at
        the next tick)."""
        self._dirty = True
        if urgent and not self._push_scheduled and self._loop is not None:
            self._push_scheduled = True
            self._loop.call_soon(self._push)

    def when_synced(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every process holds the registry as it is now (at once if
        it does; after ``SYNC_TIMEOUT`` at the latest, logged).

        Why: a control reply says the change is in force. An app told "registered" sends
        its address to clients at once; a process still deciding flights on the old
        snapshot would refuse their first ones for an ALPN nobody owned a moment ago."""
        # an urgent change of this loop iteration is pushed as the next version; load-only
        # changes (not urgent, pushed at the next tick) hold no reply
        target = self._version + (1 if self._push_scheduled else 0)
        if self._loop is None or self._synced(target):
            callback()
            return
        timer = self._loop.call_later(SYNC_TIMEOUT, self._sync_timeout, target, callback)
        self._waiters.append((target, callback, timer))

    def _synced(self, target: int) -> bool:
        # version 0: nothing pushed yet, every process forked with the registry as it is
        return (self._frozen or target <= 0
                or all(m.version >= target for m in self._members.values()))

    def _sync_timeout(self, target: int, callback: Callable[[], None]) -> None:
        for i, (t, cb, _) in enumerate(self._waiters):
            if t == target and cb is callback:
                del self._waiters[i]
                behind = sorted(m.index for m in self._members.values() if m.version < target)
                log.warning("classifier process(es) %s did not take the registry within %g s: "
                            "replying anyway", behind, SYNC_TIMEOUT)
                callback()
                return

    def _wake(self) -> None:
        """Call back whoever waits for a registry version every process now holds."""
        if not self._waiters:
            return
        due = [w for w in self._waiters if self._synced(w[0])]
        self._waiters = [w for w in self._waiters if not self._synced(w[0])]
        for _, callback, timer in due:
            timer.cancel()
            callback()

    def _push(self) -> None:
        self._push_scheduled = False
        if self._frozen or not self._dirty:
            return
        self._dirty = False
        self._version += 1
        self._payload = pickle.dumps((self._version, self._snapshot()),
                                     pickle.HIGHEST_PROTOCOL)
        for member in self._members.values():
            self._send(member)

    def _send(self, member: _Member) -> None:
        if self._payload is None or self._frozen:
            return
        try:
            member.channel.send(self._payload)
        except BlockingIOError:
            log.warning("classifier process %d is not reading its channel: the registry "
                        "goes again at the next tick", member.index)
        except OSError:
            pass  # it died: its channel's end of file says so

    def tick(self) -> None:
        """Every report interval: load-only changes go out, and whoever is behind gets the
        latest snapshot again (a send that failed, or a process that just started)."""
        self._push()
        for member in self._members.values():
            if member.version < self._version:
                self._send(member)

    # -- reports and deaths ----------------------------------------------------------------

    def _readable(self, member: _Member) -> None:
        for _ in range(64):
            try:
                message = member.channel.recv(MESSAGE_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:
                self._lost(member)
                return
            version, tally, report = pickle.loads(message)
            member.version = version
            if not member.ready:
                member.ready = True
                self._on_ready(member.index)
            self._on_report(member.index, tally, report)
            self._wake()

    def _lost(self, member: _Member) -> None:
        assert self._loop is not None
        self._close(member)
        self._members.pop(member.index, None)
        self._on_lost(member.index)
        self._wake()  # its replacement starts from the latest snapshot
        with contextlib.suppress(ChildProcessError):
            os.waitpid(member.pid, 0)
        if self._frozen:
            return
        self.restarts += 1
        self._count_restart()
        age = time.monotonic() - member.started
        log.error("classifier process %d (pid %d) died after %.1f s: respawning", member.index,
                  member.pid, age)
        if age < RESPAWN_BACKOFF:
            self._loop.call_later(RESPAWN_BACKOFF, self._respawn, member.index)
        else:
            self._respawn(member.index)

    def _respawn(self, index: int) -> None:
        if not self._frozen and index not in self._members:
            self._spawn(index)
