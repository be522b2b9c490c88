"""ClassifierPool with real forked processes (a tiny child body instead of a classifier):
supervision, versioned and coalesced snapshots, and the freeze a stopping daemon needs."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
from typing import Any, NoReturn

from steerd.daemon.pool import ClassifierPool


def child(index: int, channel: socket.socket) -> NoReturn:
    """Report the snapshot version it holds: at once, then after every message."""
    code = 0
    try:
        version = -1
        channel.send(pickle.dumps((version, None, {"index": index, "payload": None})))
        while message := channel.recv(1 << 20):
            version, payload = pickle.loads(message)
            channel.send(pickle.dumps((version, None, {"index": index, "payload": payload})))
    except OSError:
        code = 1
    os._exit(code)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.reports: dict[int, tuple[int, Any]] = {}
        self.state = "s0"

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.01)  # the pool's readers run on this loop
        await asyncio.wait_for(poll(), timeout)


def make(rec: Recorder) -> ClassifierPool:
    def report(index: int, tally: Any, rep: dict[str, Any]) -> None:
        rec.reports[index] = (pool._members[index].version, rep["payload"])

    pool = ClassifierPool(
        2, child, lambda: rec.state, report,
        on_lost=lambda i: rec.events.append(("lost", i)),
        on_ready=lambda i: rec.events.append(("ready", i)),
    )
    return pool


def test_snapshots_are_versioned_coalesced_and_frozen() -> None:
    async def main() -> None:
        rec = Recorder()
        pool = make(rec)
        pool.start()
        try:
            await rec.until(lambda: len(rec.reports) == 2)
            rec.state = "s1"
            for _ in range(5):  # five changes in one loop iteration: one push
                pool.changed()
            await rec.until(lambda: all(v == 1 for v, _ in rec.reports.values()))
            assert {p for _, p in rec.reports.values()} == {"s1"}
            rec.state = "s2"
            pool.changed(urgent=False)  # a load report: waits for the tick
            await asyncio.sleep(0.1)
            assert all(v == 1 for v, _ in rec.reports.values())
            pool.tick()
            await rec.until(lambda: all(v == 2 for v, _ in rec.reports.values()))
            pool.freeze()  # the daemon stops: the emptied registry must not go out
            rec.state = "empty"
            pool.changed()
            pool.tick()
            await asyncio.sleep(0.1)
            assert {p for _, p in rec.reports.values()} == {"s2"}
        finally:
            pool.stop()
    asyncio.run(main())


def test_a_dead_process_is_taken_out_replaced_and_brought_back() -> None:
    async def main() -> None:
        rec = Recorder()
        pool = make(rec)
        pool.start()
        try:
            await rec.until(lambda: rec.events.count(("ready", 0)) == 1
                            and rec.events.count(("ready", 1)) == 1)
            rec.state = "s1"
            pool.changed()
            await rec.until(lambda: all(v == 1 for v, _ in rec.reports.values()))
            victim = pool._members[1].pid
            os.kill(victim, signal.SIGKILL)
            # young (under RESPAWN_BACKOFF): lost at once, replaced after the backoff
            await rec.until(lambda: ("lost", 1) in rec.events)
            await rec.until(lambda: rec.events.count(("ready", 1)) == 2)
            assert pool.restarts == 1 and pool._members[1].pid != victim
            # the replacement is brought up to date: it forked with the registry, then gets
            # the latest snapshot with its version
            await rec.until(lambda: rec.reports[1] == (1, "s1"))
        finally:
            pool.stop()
        assert not any(os.path.exists(f"/proc/{pid}") for pid in (victim,))
    asyncio.run(main())


def mute_child(index: int, channel: socket.socket) -> NoReturn:
    """Like ``child``, but never acknowledges a snapshot whose payload is "mute" (a process
    wedged on it)."""
    code = 0
    try:
        channel.send(pickle.dumps((-1, None, {"index": index, "payload": None})))
        while message := channel.recv(1 << 20):
            version, payload = pickle.loads(message)
            if payload != "mute":
                channel.send(pickle.dumps((version, None, {"index": index,
                                                           "payload": payload})))
    except OSError:
        code = 1
    os._exit(code)


def test_a_reply_waits_until_every_process_holds_the_change(
        monkeypatch: Any) -> None:
    """``when_synced``: at once when nothing is pending; after an urgent change only once
    every process has reported the new version (what a control reply to a register waits
    for, so the first flight of a newly registered ALPN is never refused by a process still
    on the old registry); not for a load-only change; and at most SYNC_TIMEOUT for a
    process that never takes it."""
    import steerd.daemon.pool as pool_module

    monkeypatch.setattr(pool_module, "SYNC_TIMEOUT", 0.3)

    async def main() -> None:
        rec = Recorder()
        pool = ClassifierPool(2, mute_child, lambda: rec.state, lambda i, t, r: None,
                              on_lost=lambda i: None, on_ready=lambda i: None)
        pool.start()
        seen: list[list[int]] = []

        def reply() -> None:
            seen.append(sorted(m.version for m in pool._members.values()))

        try:
            await rec.until(lambda: len(pool._members) == 2
                            and all(m.ready for m in pool._members.values()))
            pool.when_synced(reply)
            assert seen == [[-1, -1]]  # nothing pushed, nothing pending: synchronously
            rec.state = "s1"
            pool.changed()
            pool.when_synced(reply)
            assert len(seen) == 1  # held: the push has not even gone out
            await rec.until(lambda: len(seen) == 2)
            assert seen[1] == [1, 1]  # called only once both processes hold version 1
            pool.changed(urgent=False)  # a load report holds no reply
            pool.when_synced(reply)
            assert len(seen) == 3
            pool.tick()  # version 2 out
            await rec.until(lambda: all(m.version == 2 for m in pool._members.values()))
            rec.state = "mute"
            pool.changed()
            pool.when_synced(reply)
            await asyncio.sleep(0.1)
            assert len(seen) == 3  # still waiting for the wedged processes
            await rec.until(lambda: len(seen) == 4)  # ... but not longer than the timeout
            assert seen[3] == [2, 2]
        finally:
            pool.stop()

    asyncio.run(main())
