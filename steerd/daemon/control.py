"""The control socket: apps claim ALPNs and server names and receive their worker sockets.

Why this shape:
- AF_UNIX SOCK_SEQPACKET keeps message boundaries (one JSON object per packet, no framing
  code) and, unlike a datagram socket, is connection-oriented: the daemon learns at once when
  an app dies (its end closes) and removes its routes, and SO_PEERCRED names the peer's uid
  and gid as the kernel saw them at connect time, which the ACL trusts.
- The daemon (root) creates every socket of the reuseport group, because all members of a
  group must have the same owner; it hands worker sockets to apps by SCM_RIGHTS, so apps need
  no privilege to serve port 443, and different users share it. The daemon closes its own
  copies right after the hand-over: when the app exits, its sockets are really closed and
  leave the group (the data plane only keeps them in its BPF map).
- The data plane is reached through the narrow ``SocketSink`` protocol, so this module can be
  tested end to end with real sockets without BPF (the BPF side has its own tests).

The protocol itself (messages, fields, errors) is documented in steerd/app/protocol.py, the
module both sides share; this is the daemon's side of it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import grp
import json
import math
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from quic.reset import slot_reset_key
from steerd.app.protocol import (
    FD_SIZE,
    LAYOUT,
    OPS,
    SCM_MAX_FD,
    Steering,
    fds_from,
    layout_dict,
    socket_cookie,
)
from steerd.daemon.closer import Closer, is_socket
from steerd.daemon.config import Config, render
from steerd.daemon.metrics import Metrics
from steerd.daemon.ratelimit import TokenBucket
from steerd.daemon.registry import Generation, Peer, Registry, RegistryError

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; CPython only exports it lately
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux >= 2.6.31
IPV6_MULTICAST_ALL = getattr(socket, "IPV6_MULTICAST_ALL", 29)  # Linux >= 4.20
RESET_KEY_LEN = 32
ACCEPT_BACKOFF = 0.1  # seconds without accepting after accept() failed (e.g. out of FDs)
CLOSER_STOP = 5.0  # seconds a stopping server waits for its closer to close what it holds


class SocketSink(Protocol):
    """What the control server needs from the data plane: put a worker's sockets in the BPF
    sockarray under its slot, and take them out.

    ``sockets`` has one socket per listen address, in the config's order (each address is its
    own reuseport group). The sink must not close them; it may keep references (or dups) until
    ``remove_worker``. ``remove_worker`` must be idempotent: a slot whose socket the kernel
    already dropped (the app closed it) is simply cleared.
    """

    def add_worker(self, slot: int, sockets: Sequence[socket.socket]) -> None: ...

    def remove_worker(self, slot: int) -> None: ...

    def worker_cookies(self, slot: int) -> list[int | None]:
        """The SO_COOKIE of the socket in ``slot`` of each group (None: empty), so a resuming
        app can prove the sockets it presents are the ones steering its connections."""
        ...

    def set_steering(self, slot: int, steering: Steering, fresh: bool) -> None:
        """``slot``'s sockets (already added) are steered as ``steering`` says; ``fresh``:
        a new registration (its per-slot statistics start from zero), not a resume."""
        ...

    def steering_stats(self, slot: int) -> dict[str, int]:
        """How ``slot``'s packets were steered and what its egress showed (``steerd
        status``): the data plane's per-slot statistics."""
        ...


def bind_group_socket(address: str, port: int, *, classifier: bool = False) -> socket.socket:
    """A UDP socket of the reuseport group on ``address``:``port``, owned by the daemon: a
    worker's (handed to an app), or with ``classifier`` one of the daemon's own classifier
    sockets (non-blocking, a large receive buffer, each datagram's local address reported).
    One function, so both always join the same group.

    IPv6 sockets are v6-only so that "0.0.0.0" and "::" are two separate groups, each with
    its own steering, instead of one IPv6 socket silently taking IPv4-mapped traffic.

    Multicast "all" is off: by default a wildcard-bound socket gets every multicast datagram
    to its port for any group some socket of the host joined (224.0.0.1 and ff02::1 always
    are), one clone per socket, bypassing the steering program. Off, it gets only the groups
    it joins itself (none). The ingress filter (steerd/bpf/unicast.c) drops what an app lets
    in again, and broadcasts.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    flags = socket.SOCK_CLOEXEC | (socket.SOCK_NONBLOCK if classifier else 0)
    sock = socket.socket(family, socket.SOCK_DGRAM | flags)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        if classifier:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def peer_credentials(sock: socket.socket) -> Peer:
    """The peer as the ACL sees it: SO_PEERCRED uid/gid, supplementary groups, names.

    Supplementary groups come from SO_PEERGROUPS (captured at connect time, like
    SO_PEERCRED); a peer in more groups than one getsockopt buffer holds is read from
    /proc/PID/status instead. Names are resolved here, once per connection, so the registry
    stays free of system calls.
    """
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: set[int] = set()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups.update(array.array("I", raw[: len(raw) - len(raw) % 4]))
    except OSError:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            pass  # primary gid only: fewer rights, never more
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    names = set()
    for g in groups | {gid}:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    return Peer(uid=uid, gid=gid, groups=frozenset(groups), user=user,
                group_names=frozenset(names))


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    bucket: TokenBucket
    id: int
    closed: bool = field(default=False)
    request_fds: list[int] = field(default_factory=list)  # of the request being handled


class ControlServer:
    """The daemon's control-socket server, driven by an asyncio loop (readers on the
    listening and connected sockets; every request is handled synchronously, as the registry
    is pure and fast)."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        sink: SocketSink,
        *,
        metrics: Metrics | None = None,
        reset_key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        status_extra: Callable[[], Mapping[str, Any]] | None = None,
        socket_factory: Callable[[str, int], socket.socket] = bind_group_socket,
        on_change: Callable[[], None] | None = None,
        socket_refusal: Callable[[int], tuple[str, str] | None] | None = None,
        on_load: Callable[[], None] | None = None,
        settle: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        # The master key: each worker gets slot_reset_key(master, slot) and derives its
        # stateless-reset tokens from it, so the daemon can reset connections of a dead
        # worker. Never sent to apps.
        self.reset_key = reset_key if reset_key is not None else os.urandom(RESET_KEY_LEN)
        self.clock = clock
        self.status_extra = status_extra
        self.socket_factory = socket_factory
        # Called after anything that may have changed the registry (the daemon copies it to
        # its classifier processes).
        self.on_change = on_change
        # Load reports change only the picker's figures: not urgent (default: on_change).
        self.on_load = on_load or on_change
        # Why worker sockets may not go to a peer of this uid now, as (reason, message): the
        # daemon's steering program or socket jail is not attached yet. None from it, or no
        # callable, lets them go.
        self.socket_refusal = socket_refusal
        # Runs a reply once what it reports is in force everywhere flights are decided (the
        # daemon's classifier processes hold the new registry); default: at once.
        self.settle = settle or (lambda reply: reply())
        self.path = config.control.path
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: dict[int, _Connection] = {}
        self._next_id = 0
        limits = config.limits
        self._max_message = limits.control_message_bytes
        self._max_conns = limits.control_connections
        self._max_uid_conns = limits.uid_control_connections
        # Whatever a peer sent, and every control connection (a peer fills its queue), is
        # closed by this thread, never on the loop: such a close can wait forever
        # (steerd/daemon/closer.py).
        self._closer = Closer(on_overflow=self._left_open)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket file (refusing to steal one a live daemon listens on) and serve."""
        self._loop = asyncio.get_running_loop()
        path = self.path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} exists and is not a socket; not replacing it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: left by a daemon that died
            else:
                raise OSError(f"another steerd is serving {path}")
            finally:
                probe.close()
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.bind(path)
            ctl = self.config.control
            if isinstance(ctl.group, int):
                os.chown(path, -1, ctl.group)
            elif ctl.group is not None:
                try:
                    gid = grp.getgrnam(ctl.group).gr_gid
                except KeyError:
                    raise OSError(f"[control] group {ctl.group!r} does not exist") from None
                os.chown(path, -1, gid)
            os.chmod(path, ctl.mode)
            sock.listen(min(self._max_conns, socket.SOMAXCONN))
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._accept)
        self._update_gauges()

    async def close(self) -> None:
        """Stop serving; every connected app is disconnected (and loses its routes)."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._listener is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._listener.fileno())
            # its connections not accepted yet may hold queued descriptors too
            self._closer.close_socket(self._listener)
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        # Let the closer finish (bounded, off the loop), so a clean stop leaves nothing open.
        await asyncio.get_running_loop().run_in_executor(None, self._closer.stop, CLOSER_STOP)

    # -- connections ------------------------------------------------------------------------

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

    # -- requests ---------------------------------------------------------------------------

    def _handle(
        self, conn: _Connection, data: bytes, flags: int
    ) -> tuple[bytes, list[int], list[socket.socket]]:
        """One request -> (reply bytes, FDs to attach, sockets to close after sending).

        The steps run in this order, and the first to refuse names the reason: cheap checks
        before decoding, decoding before dispatch. A refusal carries as much of the request
        as was understood by then (its id, then its op)."""
        op: str | None = None
        rid: str | int | None = None
        try:
            self._check_rate(conn)
            self._check_size(data, flags)
            message = self._decode(data)
            rid = self._request_id(message)
            op = self._request_op(message)
            self._check_fds(op, message, conn.request_fds)
            if self.metrics is not None:
                self.metrics.control_messages.labels(op).inc()
            body, fds, cleanup = getattr(self, f"_op_{op}")(conn, message)
        except Exception as e:  # every failure becomes a reply: see _refusal
            return self._refusal(op, rid, e), [], []
        reply = {"ok": True, "op": op, **({"id": rid} if rid is not None else {}), **body}
        return json.dumps(reply).encode(), fds, cleanup

    # The steps of _handle.

    def _check_rate(self, conn: _Connection) -> None:
        """One app must not be able to keep the daemon's single event loop busy: each
        connection gets its own token bucket, checked before any work is spent on the
        message."""
        if not conn.bucket.take(self.clock()):
            limits = self.config.limits
            raise _Refused(
                "rate_limited",
                f"rate limit: at most {limits.control_rate:g} messages per second "
                f"(burst {limits.control_burst})",
            )

    def _check_size(self, data: bytes, flags: int) -> None:
        """A truncated message must be refused, not parsed: its tail, and any file
        descriptors the kernel dropped, would otherwise go missing without a word."""
        if flags & socket.MSG_TRUNC or len(data) > self._max_message:
            raise _Refused(
                "too_large", f"message too large: the limit is {self._max_message} bytes"
            )
        if flags & socket.MSG_CTRUNC:
            raise _Refused(
                "unexpected_fds",
                f"unexpected file descriptors: too many, at most {SCM_MAX_FD} per request",
            )

    @staticmethod
    def _decode(data: bytes) -> dict[str, Any]:
        """Any peer may send anything: every way ``json.loads`` can fail becomes a refusal
        saying why, so that a hostile message costs a reply and never the daemon."""
        try:
            message = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise _Refused("bad_json", "invalid JSON: not UTF-8") from None
        except json.JSONDecodeError as e:
            raise _Refused("bad_json", f"invalid JSON: {e.msg} at byte {e.pos}") from None
        except RecursionError:
            raise _Refused("bad_json", "invalid JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer past Python's digit limit
            raise _Refused("bad_json", f"invalid JSON: {e}") from None
        if not isinstance(message, dict):
            raise _Refused(
                "bad_message",
                f"a request must be a JSON object, got {type(message).__name__}",
            )
        return message

    @staticmethod
    def _request_id(message: Mapping[str, Any]) -> str | int | None:
        """The id an app matches replies by; it is echoed in every reply from here on, so
        it must be something an app can compare (not a list, an object or a boolean)."""
        raw_id = message.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
            raise _Refused("bad_message", f'"id" must be a string or integer, got '
                           f"{render(raw_id)}")
        return raw_id

    @staticmethod
    def _request_op(message: Mapping[str, Any]) -> str:
        """The op picks the ``_op_*`` handler by name, so only the known ones may pass."""
        raw_op = message.get("op")
        if not isinstance(raw_op, str) or raw_op not in OPS:
            raise _Refused(
                "unknown_op", f"unknown op {render(raw_op)} (known: {', '.join(OPS)})"
            )
        return raw_op

    @staticmethod
    def _check_fds(op: str, message: Mapping[str, Any], fds: Sequence[int]) -> None:
        """Sockets come in with one request only, a resume proving which slots it holds, and
        nothing but sockets: any other descriptor, or any with another op, is refused so that
        an app learns its mistake instead of the daemon quietly closing what it sent (the
        closer does that, off the loop, whatever the verdict). Sockets are told apart by the
        socket layer, not fstat, which on a FUSE file would wait for its server."""
        if fds and not (op == "register" and "resume" in message):
            raise _Refused(
                "unexpected_fds",
                f"unexpected file descriptors: only a register with \"resume\" carries "
                f"them, got {len(fds)}",
            )
        for i, fd in enumerate(fds):
            if not is_socket(fd):
                raise _Refused(
                    "unexpected_fds",
                    f"unexpected file descriptors: a resume carries only sockets, descriptor "
                    f"{i} is not one",
                )

    def _refusal(self, op: str | None, rid: str | int | None, e: Exception) -> bytes:
        """Every failure is answered and counted, and the daemon keeps serving: a bug or a
        data-plane failure in one request must not take the control socket down for every
        app. A registry refusal gets the op put in front, as the registry cannot know which
        op asked (the server's own refusals name theirs)."""
        if isinstance(e, _Refused):
            self._error(e.reason)
            return self._encode(op, rid, e.reason, str(e))
        if isinstance(e, RegistryError):
            self._error(e.reason)
            return self._encode(op, rid, e.reason, f"{op}: {e}")
        self._error("internal_error")
        return self._encode(
            op, rid, "internal_error", f"{op}: internal error: {type(e).__name__}: {e}"
        )

    @staticmethod
    def _fields(op: str, message: Mapping[str, Any], allowed: tuple[str, ...],
                required: tuple[str, ...]) -> None:
        known = ("id", "op", *allowed)
        for key in message:
            if key not in known:
                raise _Refused(
                    "bad_message",
                    f"{op}: unknown field {render(key)} (known: {', '.join(sorted(known))})",
                )
        for key in required:
            if key not in message:
                raise _Refused("bad_message", f"{op}: missing field {render(key)}")

    def _op_register(
        self, conn: _Connection, m: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[int], list[socket.socket]]:
        self._fields("register", m,
                     ("alpn", "app", "cid_len", "cid_mode", "replace", "resume",
                      "server_names", "workers"),
                     ("alpn", "app"))
        if "resume" in m:
            return self._resume(conn, m)
        workers = m.get("workers", 1)
        limit = self.config.limits.workers_per_app
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= limit:
            # checked before sockets are made for them, not only by the registry
            raise _Refused(
                "bad_request",
                f'register: "workers" must be an integer 1..{limit}, got {render(workers)}',
            )
        if self.socket_refusal is not None:
            refusal = self.socket_refusal(conn.peer.uid)
            if refusal is not None:
                raise _Refused(refusal[0], f"register: {refusal[1]}")
        addresses = self.config.listen.addresses
        port = self.config.listen.port
        steering = _steering(m)
        if steering.learned and self.config.flood.retry == "always":
            raise _Refused("bad_request", 'register: learned mode cannot work with [flood] '
                           'retry = "always": a server that did not send the Retry cannot '
                           "complete the retried handshake (docs/DATAPLANE.md, learned mode)")
        gen = self.registry.register(
            m["app"], m["alpn"], m.get("server_names", []), workers, m.get("replace", False),
            conn.peer, conn.id, steering=steering,
        )
        made: list[socket.socket] = []
        added: list[int] = []
        try:
            for _ in gen.workers:
                for address in addresses:
                    made.append(self.socket_factory(address, port))
            for i, w in enumerate(gen.workers):
                self.sink.add_worker(w.slot, made[i * len(addresses) : (i + 1) * len(addresses)])
                added.append(w.slot)
                self.sink.set_steering(w.slot, gen.steering, fresh=True)
        except OSError as e:
            self._undo(gen, made, added)
            raise _Refused("socket_error", f"register: cannot create worker sockets: {e}") from None
        except BaseException:
            self._undo(gen, made, added)
            raise
        self._update_gauges()
        return self._register_reply(gen, addresses, port), [s.fileno() for s in made], made

    def _resume(
        self, conn: _Connection, m: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[int], list[socket.socket]]:
        """An app that outlived a daemon restart takes back its slots: it presents the worker
        sockets it holds (one per listen address per slot, in reply order); each must be the
        very socket the data plane has in that slot (same SO_COOKIE). Nothing is created or
        handed over: its connections never stopped flowing."""
        slots = m["resume"]
        addresses = self.config.listen.addresses
        if (
            not isinstance(slots, list) or not slots
            or any(isinstance(x, bool) or not isinstance(x, int) for x in slots)
        ):
            raise _Refused("bad_request",
                           f'register: "resume" must be a non-empty list of slots, got '
                           f"{render(slots)}")
        workers = m.get("workers", len(slots))
        if workers != len(slots):
            raise _Refused("bad_request", f'register: "workers" ({render(workers)}) must equal '
                           f'the number of slots resumed ({len(slots)})')
        fds = conn.request_fds
        if len(fds) != len(slots) * len(addresses):
            raise _Refused(
                "bad_resume",
                f"register: resuming {len(slots)} slot(s) takes {len(slots) * len(addresses)} "
                f"sockets (one per listen address per slot), got {len(fds)}",
            )
        for i, slot in enumerate(slots):
            want = self.sink.worker_cookies(slot)
            for j, address in enumerate(addresses):
                try:
                    have: int | None = socket_cookie(fds[i * len(addresses) + j])
                except OSError:
                    have = None
                if j >= len(want) or have is None or want[j] != have:
                    raise _Refused(
                        "bad_resume",
                        f"register: the socket given for slot {slot} on {address} is not the "
                        "one steering that slot",
                    )
        gen = self.registry.register(
            m["app"], m["alpn"], m.get("server_names", []), len(slots), m.get("replace", False),
            conn.peer, conn.id, resume=slots, steering=_steering(m),
        )
        for slot in slots:  # the mode may differ from the previous run's
            self.sink.set_steering(slot, gen.steering, fresh=False)
        # A sink that watches worker sockets (the daemon's socket watchdog) keeps its own
        # copies of the resumed ones: the app's are the only others.
        watch = getattr(self.sink, "watch_worker", None)
        if watch is not None:
            for i, slot in enumerate(slots):
                watch(slot, fds[i * len(addresses) : (i + 1) * len(addresses)])
        self._update_gauges()
        reply = self._register_reply(gen, addresses, self.config.listen.port)
        reply["resumed"] = True
        return reply, [], []

    def _undo(self, gen: Generation, made: list[socket.socket], added: list[int]) -> None:
        for slot in added:
            self.sink.remove_worker(slot)
        for s in made:
            s.close()
        self.registry.undo(gen)

    def _register_reply(
        self, gen: Generation, addresses: Sequence[str], port: int
    ) -> dict[str, Any]:
        n = len(addresses)
        return {
            "app": gen.app,
            "generation": gen.number,
            "workers": [
                {
                    "slot": w.slot, "server_id": w.server_id.hex(),
                    # this slot's key only: an app must not forge other apps' resets
                    "reset_key": slot_reset_key(self.reset_key, w.slot).hex(),
                    "sockets": [
                        {"address": a, "port": port, "fd_index": i * n + j}
                        for j, a in enumerate(addresses)
                    ],
                }
                for i, w in enumerate(gen.workers)
            ],
            "cid": layout_dict(self.registry.layout),
            "cid_mode": gen.steering.mode,
            **({"cid_len": gen.steering.cid_len} if gen.steering.learned else {}),
        }

    def _app_of(self, op: str, m: Mapping[str, Any]) -> str:
        app = m["app"]
        if not isinstance(app, str):
            raise _Refused("bad_request", f'{op}: "app" must be a string, got {render(app)}')
        return app

    def _op_deregister(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("deregister", m, ("app",), ("app",))
        app = self._app_of("deregister", m)
        freed = self.registry.deregister(app, conn.id)
        self._release(freed)
        self._update_gauges()
        return {"app": app, "slots": sorted(freed)}, [], []

    def _op_drain(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("drain", m, ("app",), ("app",))
        app = self._app_of("drain", m)
        gens = self.registry.drain(app, conn.id)
        self._update_gauges()
        return {"app": app, "generations": [g.number for g in gens]}, [], []

    def _op_load(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("load", m, ("app", "workers"), ("app", "workers"))
        app = self._app_of("load", m)
        reports = m["workers"]
        bad = _Refused(
            "bad_request",
            'load: "workers" must be a list of {"slot": integer, "load": number >= 0}, got '
            f"{render(reports)}",
        )
        if not isinstance(reports, list):
            raise bad
        loads: dict[int, float] = {}
        for r in reports:
            if not isinstance(r, dict) or set(r) != {"slot", "load"}:
                raise bad
            slot, load = r["slot"], r["load"]
            if (
                isinstance(slot, bool) or not isinstance(slot, int)
                or isinstance(load, bool) or not isinstance(load, int | float)
                or not 0 <= load < math.inf
            ):
                raise bad
            loads[slot] = float(load)
        self.registry.report_load(app, conn.id, loads)
        if self.on_load is not None:
            self.on_load()
        return {"app": app}, [], []

    def _op_status(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("status", m, (), ())
        status = self.registry.status(viewer_uid=conn.peer.uid)  # a tenant sees its own apps
        for app in status["apps"]:
            for gen in app["generations"]:
                for w in gen["workers"]:
                    w["steering"] = self.sink.steering_stats(w["slot"])
        status["control_connections"] = len(self._conns)
        if self.status_extra is not None:
            status.update(self.status_extra())
        return {"status": status}, [], []

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _encode(op: str | None, rid: str | int | None, reason: str, message: str) -> bytes:
        reply: dict[str, Any] = {"ok": False, "op": op}
        if rid is not None:
            reply["id"] = rid
        reply.update(reason=reason, error=message)
        return json.dumps(reply).encode()

    def _error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.control_errors.labels(reason).inc()

    def _left_open(self, fd: int) -> None:
        if self.metrics is not None:
            self.metrics.descriptors_left_open.inc()

    def _update_gauges(self) -> None:
        if self.on_change is not None:
            self.on_change()
        if self.metrics is not None:
            self.metrics.update_registry(self.registry.counts())
            self.metrics.control_connections.set(len(self._conns))

    @property
    def connections(self) -> int:
        return len(self._conns)



def _steering(m: Mapping[str, Any]) -> Steering:
    """The register message's ``cid_mode`` and ``cid_len`` (the registry checks them)."""
    mode = m.get("cid_mode", "layout")
    cid_len = m.get("cid_len", 0)
    if not isinstance(mode, str):
        raise _Refused("bad_request", f'register: "cid_mode" must be "layout" or "learned", '
                       f"got {render(mode)}")
    if isinstance(cid_len, bool) or not isinstance(cid_len, int):
        raise _Refused("bad_request", f'register: "cid_len" must be an integer, got '
                       f"{render(cid_len)}")
    if mode == "layout" and "cid_len" in m:
        raise _Refused("bad_request", 'register: "cid_len" is only for "cid_mode": "learned" '
                       "(layout mode issues the layout's CIDs)")
    return Steering(mode, cid_len) if mode != "layout" else LAYOUT
