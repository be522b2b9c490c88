"""Closing what peers hand the daemon, off its event loop, in a way that cannot hang.

Why: a descriptor a peer passes by SCM_RIGHTS becomes the daemon's, and when the peer closes
its own copy the daemon's close is the last one, which runs the file's release in the
daemon's thread. Some releases wait: a TCP socket with ``SO_LINGER {1, 2^31-1}`` and a send
queue its peer never reads waits up to 68 years for the queue to drain; a file on a FUSE
mount waits for its server to answer FLUSH; a tty may wait to drain. So does closing an
AF_UNIX socket whose receive queue holds such descriptors in flight (the kernel drops them
with it), which is what the daemon's own control connections are. One such close on the
event loop froze every app's registrations, the classifier and the metrics.

So every descriptor a peer gave the daemon (and every control connection, whose queue a
peer fills) is handed to one :class:`Closer` thread, which first takes the wait out of it:

- a connection-oriented socket that is not AF_UNIX (TCP, SCTP, MPTCP, vsock) gets
  ``SO_LINGER {1, 0}``: its close sends a reset and returns at once;
- one of the daemon's own AF_UNIX sockets (a control connection; the listener, whose
  connections not yet accepted are taken and treated alike) is shut down, so that its peer
  can queue nothing more, and drained, the descriptors found in it treated as above, at most
  :data:`DRAIN_BUDGET` messages;
- anything else, an AF_UNIX socket a peer sent included, is closed as it is. Such a socket
  may be shared with its sender (its own control connection, say): reading its queue would
  steal the sender's messages.

A close that still blocks (a peer's AF_UNIX socket that alone holds a lingering socket in its
queue: the kernel nests these without limit, 11 levels were accepted here; a hung FUSE
server) holds only this thread; the queue in front of it is bounded (:data:`BACKLOG`), and
what does not fit is left open, counted and logged rather than closed on the loop. Nothing
here touches the descriptor's file system: sockets are told apart by ``getsockopt``
(ENOTSOCK), never ``fstat``, which on a FUSE file asks its server.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable

from steerd.app.protocol import FD_SIZE, SCM_MAX_FD, fds_from

log = logging.getLogger("steerd")

BACKLOG = 4096  # descriptors waiting for the closer at most; past it they are left open
DRAIN_BUDGET = 4096  # messages (or pending connections) read from one own socket at most
_LINGER_NOW = struct.pack("ii", 1, 0)
_ANC_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE)
_STOP = -1


def is_socket(fd: int) -> bool:
    """Whether ``fd`` is a socket, asked of the socket layer (``getsockopt`` fails with
    ENOTSOCK for anything else) so that no file system is consulted."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    sock.detach()
    return True


def defuse(fd: int, own: bool = False) -> None:
    """Make closing ``fd`` return at once, as far as the descriptor itself allows (see the
    module docstring); takes no ownership: the caller still closes ``fd``. ``own``: one of
    the daemon's own AF_UNIX sockets, which nobody else holds: shut down and drained (the
    descriptors found in it defused and closed here, at most :data:`DRAIN_BUDGET`)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return  # not a socket
    try:
        if sock.family != socket.AF_UNIX:
            if sock.type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOW)
                except OSError:
                    pass
            return
        if not own:
            return  # a peer's, perhaps shared with its sender: closed as it is
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        if listening:  # its connections not accepted yet: each may hold a queue
            sock.setblocking(False)
            for _ in range(DRAIN_BUDGET):
                try:
                    pending, _addr = sock.accept()
                except OSError:
                    break
                _release(pending.detach(), own=True)
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the peer can queue nothing more
        except OSError:
            pass
        stream_like = sock.type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
        for _ in range(DRAIN_BUDGET):
            try:
                data, anc, _flags, _addr = sock.recvmsg(
                    65536, _ANC_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except OSError:  # EAGAIN: empty
                break
            for inner in fds_from(anc):
                _release(inner, own=False)
            if not data and not anc and stream_like:
                break  # end of stream: the queue is empty
    finally:
        sock.detach()


def _release(fd: int, own: bool) -> None:
    """Defuse and close a descriptor found inside another."""
    try:
        defuse(fd, own)
    finally:
        os.close(fd)


class Closer:
    """One thread that defuses and closes descriptors handed to it (module docstring).

    ``close`` never blocks: it queues. ``on_overflow`` is called (on the caller's thread)
    for each descriptor that did not fit in the queue and was left open. The thread starts
    at the first ``close`` of each process (a forked child gets its own)."""

    def __init__(self, backlog: int = BACKLOG,
                 on_overflow: Callable[[int], None] | None = None) -> None:
        self._queue: queue.Queue[tuple[int, bool]] = queue.Queue(backlog)
        self._on_overflow = on_overflow
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def close(self, fds: Iterable[int], own: bool = False) -> None:
        """Close each of ``fds`` (the closer owns them from now on) off this thread;
        ``own``: sockets of the daemon's own that nobody else holds (see :func:`defuse`)."""
        self._ensure_thread()
        for fd in fds:
            try:
                self._queue.put_nowait((fd, own))
            except queue.Full:
                log.error("descriptor closer: %d descriptors wait already (a close is stuck): "
                          "leaving fd %d open", self._queue.maxsize, fd)
                if self._on_overflow is not None:
                    self._on_overflow(fd)

    def close_socket(self, sock: socket.socket) -> None:
        """Close one of the daemon's own sockets (a control connection, the listener),
        which it no longer uses (detached here)."""
        self.close([sock.detach()], own=True)

    def stop(self, timeout: float) -> bool:
        """Let the thread close what it holds and end; wait up to ``timeout`` seconds.
        Returns whether it ended (it is a daemon thread either way)."""
        thread = self._thread
        if thread is None or self._pid != os.getpid() or not thread.is_alive():
            return True
        try:
            self._queue.put((_STOP, False), timeout=timeout)
        except queue.Full:
            return False
        thread.join(timeout)
        return not thread.is_alive()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="steerd-closer",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            fd, own = self._queue.get()
            if fd == _STOP:
                return
            try:
                defuse(fd, own)
            except Exception:  # a surprise in one descriptor must not end the closer
                log.exception("descriptor closer: defusing fd %d failed", fd)
            try:
                os.close(fd)
            except OSError:
                pass
