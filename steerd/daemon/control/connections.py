"""Connection handling: accept (with the global and per-uid limits), read a request and its
descriptors, send the reply in order, drop or evict a connection (its generations go too).

What a request means is requests.py's and the ``_op_*`` handlers' business."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from steerd.app.protocol import (
    FD_SIZE,
    SCM_MAX_FD,
    fds_from,
)
from steerd.daemon.control.sockets import peer_credentials
from steerd.daemon.ratelimit import TokenBucket
from steerd.daemon.registry import Peer

ACCEPT_BACKOFF = 0.1  # seconds without accepting after accept() failed (e.g. out of FDs)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    bucket: TokenBucket
    id: int
    closed: bool = field(default=False)
    request_fds: list[int] = field(default_factory=list)  # of the request being handled


class ConnectionsMixin:
    """The connections of :class:`~steerd.daemon.control.ControlServer`."""

    # The state it uses, made in ControlServer.__init__ (server.py): config, registry, sink,
    # clock, settle, _listener, _loop, _conns, _next_id, _max_message, _max_conns,
    # _max_uid_conns, _closer.

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. EMFILE: the listener stays readable, so pause instead of spinning
                self._error("accept_failed")
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(ACCEPT_BACKOFF, self._resume_accept)
                return
            sock.setblocking(False)
            if len(self._conns) >= self._max_conns:
                self._error("too_many_connections")
                with contextlib.suppress(OSError):
                    sock.send(self._encode(None, None, "too_many_connections",
                                           f"too many control connections (limit "
                                           f"{self._max_conns})"))
                self._closer.close_socket(sock)  # it may have queued descriptors
                continue
            try:
                peer = peer_credentials(sock)
            except OSError:
                self._error("no_credentials")
                self._closer.close_socket(sock)  # it may have queued descriptors
                continue
            if self._uid_connections_full(peer.uid):
                self._error("uid_connections")
                with contextlib.suppress(OSError):
                    sock.send(self._encode(
                        None, None, "uid_connections",
                        f"too many control connections for uid {peer.uid} (limit "
                        f"{self._max_uid_conns} per uid, [limits] uid_control_connections)"))
                self._closer.close_socket(sock)  # it may have queued descriptors
                continue
            limits = self.config.limits
            now = self.clock()
            self._next_id += 1
            conn = _Connection(
                sock=sock, peer=peer, id=self._next_id,
                bucket=TokenBucket(limits.control_rate, limits.control_burst, now),
            )
            self._conns[conn.id] = conn
            self._loop.add_reader(sock.fileno(), self._readable, conn)
            self._update_gauges()

    def _uid_connections_full(self, uid: int) -> bool:
        """Whether ``uid`` already holds its share of the control connections
        (SO_PEERCRED uid, as the ACL sees it): one tenant holding them all would lock every
        other app out of registering and resuming. Root is exempt, as in the registry: a
        uid-0 process can stop the daemon anyway, and the operator's ``steerd status`` must
        not queue behind root's apps; the global limit still bounds it."""
        if uid == 0:
            return False
        return sum(c.peer.uid == uid for c in self._conns.values()) >= self._max_uid_conns

    def _resume_accept(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _drop(self, conn: _Connection) -> None:
        """The app is gone (or must go): its generations and routes go with it, at once."""
        if conn.closed:
            return
        conn.closed = True
        assert self._loop is not None
        self._loop.remove_reader(conn.sock.fileno())
        self._closer.close_socket(conn.sock)  # its queue may hold a peer's descriptors
        del self._conns[conn.id]
        self._release(self.registry.disconnect(conn.id))
        self._update_gauges()

    def evict(self, owner: Hashable, message: str) -> bool:
        """End the registration of connection ``owner`` as if its app had died (every slot it
        holds leaves the data plane at once), after a last message saying why (``reason``
        ``evicted``). False if there is no such connection (any more)."""
        conn = self._conns.get(owner) if isinstance(owner, int) else None
        if conn is None or conn.closed:
            return False
        with contextlib.suppress(OSError):  # non-blocking: an app that cannot take it is
            conn.sock.send(self._encode(None, None, "evicted", message))  # evicted anyway
        self._drop(conn)
        return True

    def _release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self.sink.remove_worker(slot)

    def _readable(self, conn: _Connection) -> None:
        anc_space = socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE)
        try:
            data, ancdata, flags, _ = conn.sock.recvmsg(
                self._max_message + 1, anc_space, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        fds = fds_from(ancdata)
        if not data and not ancdata:
            self._drop(conn)  # orderly shutdown by the app
            return
        conn.request_fds = fds  # only a resume looks at them; never kept past the request
        try:
            reply, send_fds, cleanup = self._handle(conn, data, flags)
        finally:
            conn.request_fds = []
            self._closer.close(fds)  # off the loop: a peer's descriptor may linger
        assert self._loop is not None
        # Until the reply is out, this connection's next requests wait in its queue, so
        # replies keep their order however long ``settle`` holds one.
        self._loop.remove_reader(conn.sock.fileno())
        self.settle(lambda: self._finish(conn, reply, send_fds, cleanup))

    def _finish(self, conn: _Connection, reply: bytes, fds: Sequence[int],
                cleanup: Sequence[socket.socket]) -> None:
        try:
            self._send(conn, reply, fds)
        finally:
            for s in cleanup:
                s.close()
        if not conn.closed and self._loop is not None:
            self._loop.add_reader(conn.sock.fileno(), self._readable, conn)

    def _send(self, conn: _Connection, reply: bytes, fds: Sequence[int]) -> None:
        """Reply; an app that cannot take its reply (queue full, gone) is disconnected rather
        than waited for: the daemon never blocks on one app."""
        if conn.closed:
            return
        try:
            if fds:
                socket.send_fds(conn.sock, [reply], list(fds))
            else:
                conn.sock.send(reply)
        except OSError:
            self._error("send_failed")
            self._drop(conn)
