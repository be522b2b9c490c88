"""steerd/daemon/watchdog.py: a stalled event loop is reported, and the sd_notify sender.

The stall detector is tested two ways: step by step on a clock the test moves (exactly when
a stall is reported, once, and the recovery), and for real: an asyncio loop on its own
thread, fed by a ticker like the daemon's, that the test stalls by making one callback wait
on an event; the watchdog thread must report it, name the stalled function, count it in the
daemon's metric, and see the loop recover. The real daemon's READY=1 and WATCHDOG=1 are
checked in tests/security/test_hostile_descriptors.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from steerd.daemon.metrics import Metrics
from steerd.daemon.watchdog import LoopWatchdog, notify, watchdog_requested

WAIT = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stall_is_reported_once_and_the_recovery_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    reports: list[tuple[float, str]] = []
    dog = LoopWatchdog(threading.get_ident(), limit=5.0,
                       on_stall=lambda age, where: reports.append((age, where)), clock=clock)
    dog.beat()
    clock.now += 4.9
    assert dog.check() is False and reports == []
    clock.now += 0.1
    with caplog.at_level(logging.ERROR, logger="steerd"):
        assert dog.check() is True
    assert len(reports) == 1 and reports[0][0] == pytest.approx(5.0)
    # this thread is the "loop": the report names where it is, i.e. this test
    assert "test_a_stall_is_reported_once_and_the_recovery_logged" in reports[0][1]
    assert "event loop stalled: no tick for 5.0 s (limit 5.0 s); it is in" in caplog.text
    clock.now += 60
    assert dog.check() is True and len(reports) == 1  # the same stall: not again
    dog.beat()
    with caplog.at_level(logging.WARNING, logger="steerd"):
        assert dog.check() is False
    assert "event loop ticking again after a stall of 65.0 s" in caplog.text
    clock.now += 5.0
    assert dog.check() is True and len(reports) == 2 and dog.stalls == 2  # a new stall


def test_a_real_stalled_loop_is_reported_with_its_place(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    release = threading.Event()
    metrics = Metrics()
    reports: list[str] = []
    reported = threading.Event()
    dogs: list[LoopWatchdog] = []

    def on_stall(_age: float, where: str) -> None:
        metrics.loop_stalls.inc()  # as the daemon wires it
        reports.append(where)
        if "stall_here" in where:
            reported.set()

    async def ticker() -> None:  # the daemon's _ticker, in small
        while True:
            await asyncio.sleep(0.05)
            dogs[0].beat()

    def run() -> None:
        asyncio.set_event_loop(loop)
        dogs.append(LoopWatchdog(threading.get_ident(), limit=1.0, on_stall=on_stall))
        dogs[0].start()
        task = loop.create_task(ticker())
        loop.call_soon(started.set)
        loop.run_forever()
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))

    def stall_here() -> None:
        release.wait(WAIT * 2)  # the loop is stuck in this call until the test releases it

    thread = threading.Thread(target=run, daemon=True)
    caplog.set_level(logging.WARNING, logger="steerd")
    thread.start()
    try:
        assert started.wait(WAIT)
        loop.call_soon_threadsafe(stall_here)
        assert reported.wait(WAIT), f"no stall reported: {reports}"
        release.set()
        deadline = time.monotonic() + WAIT
        while "ticking again" not in caplog.text and time.monotonic() < deadline:
            reported.wait(0.05)  # the watchdog logs from its thread: poll the captured log
        assert "ticking again" in caplog.text
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        if dogs:
            dogs[0].stop()
        loop.close()
    ours = [w for w in reports if "stall_here" in w]
    assert len(ours) == 1, reports  # one report for one stall (a loaded machine may add others)
    assert "test_loop_watchdog.py" in ours[0]
    assert metrics.registry.get_sample_value("steerd_loop_stalls_total") == len(reports)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(WAIT)
    try:
        yield sock, path
    finally:
        sock.close()


def test_notify_speaks_sd_notify(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert notify("READY=1", {"NOTIFY_SOCKET": path})
    assert sock.recv(64) == b"READY=1"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        abstract.bind(f"\0steerd-notify-test-{os.getpid()}")
        abstract.settimeout(WAIT)
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": f"@steerd-notify-test-{os.getpid()}"})
        assert abstract.recv(64) == b"WATCHDOG=1"
    finally:
        abstract.close()
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(Path(path).with_name("absent"))})


def test_notify_never_blocks_on_a_full_receiver(receiver: tuple[socket.socket, str]) -> None:
    """A service manager that does not read must not stall the loop: the ping is dropped."""
    _, path = receiver
    for _ in range(100_000):
        if not notify("WATCHDOG=1", {"NOTIFY_SOCKET": path}):
            break
    else:
        pytest.fail("the receiver's queue never filled")


def test_watchdog_requested_only_for_this_process() -> None:
    me = str(os.getpid())
    assert watchdog_requested({"WATCHDOG_USEC": "30000000"})
    assert watchdog_requested({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me})
    assert not watchdog_requested({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert not watchdog_requested({"WATCHDOG_USEC": "0"})
    assert not watchdog_requested({"WATCHDOG_USEC": "soon"})
    assert not watchdog_requested({})
