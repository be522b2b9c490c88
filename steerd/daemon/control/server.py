"""``ControlServer``: the facade the daemon and the tests use. Its state, the callbacks the
daemon wires in, start (the socket file) and close; the work is mixed in from
connections.py (accept, read, reply, drop), requests.py (decode and dispatch), register.py
(the register op: worker sockets made and handed out) and ops.py (the other ops)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from steerd.daemon.closer import Closer
from steerd.daemon.config import Config
from steerd.daemon.control.connections import ConnectionsMixin, _Connection
from steerd.daemon.control.ops import OpsMixin
from steerd.daemon.control.register import RegisterOpMixin
from steerd.daemon.control.requests import RequestsMixin
from steerd.daemon.control.sockets import SocketSink, bind_group_socket
from steerd.daemon.metrics import Metrics
from steerd.daemon.registry import Registry

RESET_KEY_LEN = 32


CLOSER_STOP = 5.0  # seconds a stopping server waits for its closer to close what it holds


class ControlServer(ConnectionsMixin, RequestsMixin, RegisterOpMixin, OpsMixin):
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
