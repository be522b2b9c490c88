"""The daemon test harness: a control server on a real AF_UNIX socket, run by an asyncio loop
in a background thread, with a recording SocketSink in place of the BPF data plane."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from steerd.app.protocol import Steering, socket_cookie
from steerd.daemon.config import Config
from steerd.daemon.control import ControlServer
from steerd.daemon.metrics import Metrics
from steerd.daemon.registry import Registry

T = TypeVar("T")
NOBODY = 65534


class RecordingSink:
    """A real, in-memory SocketSink: it keeps what the BPF sockarray would hold (slot ->
    the sockets' addresses) and every call, and lets a test wait for a state change made by
    the daemon thread. It refuses to overwrite a slot, which a sockarray would do silently:
    that is the invariant "a held slot is never handed out again" checked at the boundary."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[str, int]] = []
        self.workers: dict[int, list[tuple[int, str, int]]] = {}
        self.cookies: dict[int, list[int]] = {}
        self.steering: dict[int, Steering] = {}

    def add_worker(self, slot: int, sockets: Sequence[socket.socket]) -> None:
        with self.cond:
            if slot in self.workers:
                raise ValueError(f"slot {slot} is already in use")
            self.workers[slot] = [(s.family, *s.getsockname()[:2]) for s in sockets]
            self.cookies[slot] = [socket_cookie(s.fileno()) for s in sockets]
            self.calls.append(("add", slot))
            self.cond.notify_all()

    def remove_worker(self, slot: int) -> None:
        with self.cond:
            self.workers.pop(slot, None)
            self.cookies.pop(slot, None)
            self.calls.append(("remove", slot))
            self.cond.notify_all()

    def worker_cookies(self, slot: int) -> list[int | None]:
        with self.cond:
            return list(self.cookies.get(slot, []))

    def set_steering(self, slot: int, steering: Steering, fresh: bool) -> None:
        with self.cond:
            self.steering[slot] = steering

    def steering_stats(self, slot: int) -> dict[str, int]:
        return {}

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "condition not reached"


def free_udp_port() -> int:
    """A UDP port free on both 127.0.0.1 and ::1 (the tests' listen addresses)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
                try:
                    s6.bind(("::1", port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free UDP port")


class Daemon:
    """The control server plus its registry, sink and metrics, served from a thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.control.path
        self.port = config.listen.port
        self.metrics = Metrics()
        self.registry = Registry.from_config(config)
        self.sink = RecordingSink()
        self.server = ControlServer(config, self.registry, self.sink, metrics=self.metrics)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def in_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the daemon's thread (the registry is single-threaded by design)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Await a condition on daemon state that no sink call signals (e.g. a connection
        being closed), evaluating it on the daemon's own thread."""
        deadline = time.monotonic() + timeout
        while not self.in_loop(predicate):
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.002)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.metrics.close()
