"""The daemon's event loop watchdog: a stalled loop is noticed and reported, never silent.

Why: everything the daemon does for apps and clients (control requests, first flights, the
tick that ages flights and pushes replicas) runs on one asyncio loop. A loop stuck in one
call (a close that waits, a bug that spins) keeps the process alive and its pid file
truthful while nothing is served. Two witnesses, independent of each other:

- **systemd** (``Type=notify``, ``WatchdogSec=`` in deploy/steerd.service): :func:`notify`
  sends ``READY=1`` once the daemon serves and ``WATCHDOG=1`` from every tick of the loop;
  when the pings stop for ``WatchdogSec``, systemd kills the daemon and restarts it
  (``Restart=on-failure``), which breaks no established connection (docs/OPERATIONS.md).
- **in process**, with or without systemd: :class:`LoopWatchdog`, a thread that the loop's
  tick feeds (:meth:`LoopWatchdog.beat`); when no beat came for ``limit`` seconds it logs an
  error naming where the loop is (the loop thread's innermost frames) and counts the stall
  (``steerd_loop_stalls_total``), and logs again when the loop ticks once more.

The sender is the sd_notify(3) protocol itself (one datagram to ``$NOTIFY_SOCKET``), a few
lines here rather than a dependency: python3-systemd is not one, and the protocol is stable.
It never blocks the loop: the socket is non-blocking, and a ping that does not fit is dropped
(the next tick sends another).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping

log = logging.getLogger("steerd")

LOOP_STALL_SECONDS = 5.0  # no tick for this long (the tick is every 0.5 s) is a stall


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager, as sd_notify(3) does.
    Returns whether it was sent: False without ``$NOTIFY_SOCKET`` (not under systemd's
    ``Type=notify``), for an address kind this sender does not speak (vsock), or when the
    datagram could not be queued at once."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                           | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %s: %s", state, exc)
        return False
    return True


def watchdog_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the service manager asked this process for ``WATCHDOG=1`` pings
    (``$WATCHDOG_USEC`` set, and ``$WATCHDOG_PID``, when set, naming this process)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return False
    pid = environ.get("WATCHDOG_PID")
    return usec > 0 and (pid is None or pid == str(os.getpid()))


def where(thread_id: int, frames: int = 3) -> str:
    """The innermost ``frames`` Python frames of thread ``thread_id``, innermost first, as
    ``file:line function`` (a call into C, such as a blocking close, shows as its caller)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "an unknown place (the loop thread is gone)"
    stack = traceback.extract_stack(frame)[-frames:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                       for f in reversed(stack))


class LoopWatchdog:
    """Notices that the loop on thread ``loop_thread`` stopped beating for ``limit`` seconds
    and calls ``on_stall(seconds, where)`` once per stall, from its own thread; logs the
    recovery. ``clock`` must be the one ``beat`` is measured against (monotonic)."""

    def __init__(self, loop_thread: int, limit: float = LOOP_STALL_SECONDS,
                 on_stall: Callable[[float, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop_thread = loop_thread
        self.limit = limit
        self.on_stall = on_stall
        self.clock = clock
        self.stalls = 0
        self._last = clock()
        self._stalled_since: float | None = None  # the last beat before the current stall
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """The loop is alive: called from its tick."""
        self._last = self.clock()

    def start(self) -> None:
        self._last = self.clock()
        self._thread = threading.Thread(target=self._watch, name="steerd-loop-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def check(self) -> bool:
        """One look at the loop (the thread's whole job, every ``limit / 5`` seconds):
        reports a stall once when no beat came for ``limit`` seconds, and logs the recovery.
        Returns whether the loop is stalled now."""
        last = self._last
        now = self.clock()
        if now - last < self.limit:
            if self._stalled_since is not None:
                log.warning("event loop ticking again after a stall of %.1f s",
                            last - self._stalled_since)
                self._stalled_since = None
            return False
        if self._stalled_since is not None:
            return True  # this stall is reported already
        self._stalled_since = last
        self.stalls += 1
        place = where(self.loop_thread)
        log.error("event loop stalled: no tick for %.1f s (limit %.1f s); it is in %s",
                  now - last, self.limit, place)
        if self.on_stall is not None:
            try:
                self.on_stall(now - last, place)
            except Exception:
                log.exception("loop watchdog: reporting the stall failed")
        return True

    def _watch(self) -> None:
        while not self._done.wait(self.limit / 5):
            self.check()
