"""Restarts, drains and deaths of SDK apps, under real traffic.

Issue 5 §3: graceful restart under continuous load (zero failed requests, the old generation
exits once drained); SIGTERM lets a request in flight finish; a killed worker's clients get a
stateless reset promptly (not an idle timeout) while other workers and apps carry on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from deploy.netns import NetnsPair
from steerd.app.sdk import DEAD_WORKER_LOAD
from tests.e2e.conftest import Daemon
from tests.sdk.harness import (
    Loader,
    RequestFailed,
    RunningApp,
    Session,
    session,
    start_demo_app,
    start_loader,
)

pytestmark = pytest.mark.root


@pytest.fixture
def running() -> Iterator[list[RunningApp]]:
    made: list[RunningApp] = []
    try:
        yield made
    finally:
        for app in made:
            app.stop()


def _gone(pid: int, timeout: float) -> bool:
    """Wait (by polling /proc: the worker is not our child) until ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    pass  # exited, not yet reaped by its parent
                else:
                    time.sleep(0.02)
                    continue
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_graceful_restart_under_load(daemon: Daemon, pair: NetnsPair,
                                     running: list[RunningApp], loaders: list[Loader]) -> None:
    old = start_demo_app(daemon, "h3", workers=2, name="site")
    running.append(old)
    for stack in ("aioquic", "qh3"):
        loaders.append(start_loader(pair, stack, "h3", "/slow?ms=30"))
    new = start_demo_app(daemon, "h3", "--replace", workers=2, name="site")
    running.append(new)
    assert new.ready["generation"] == old.ready["generation"] + 1
    assert set(new.slots).isdisjoint(old.slots)
    # the old generation notices it was replaced, drains and exits by itself
    assert old.proc.wait(20) == 0
    for pid in old.pids.values():
        assert _gone(pid, 5), f"old worker {pid} still running"
    # the new generation serves: one more request of each loader lands there
    s = session(pair, "h3")
    try:
        assert json.loads(s.get("/count")[1])["generation"] == new.ready["generation"]
    finally:
        s.close()
    totals = [loader.finish() for loader in loaders]
    for t in totals:
        assert t["failed"] == 0, t["errors"]
        assert t["ok"] > 0
    seen = {g for t in totals for g in t["generations"]}
    assert str(old.ready["generation"]) in seen, totals
    assert str(new.ready["generation"]) in seen, totals
    assert new.stop() == 0


def test_sigterm_finishes_the_request_in_flight(daemon: Daemon, pair: NetnsPair,
                                                running: list[RunningApp]) -> None:
    app = start_demo_app(daemon, "h3", workers=1, name="slow")
    running.append(app)
    s = session(pair, "h3")
    try:
        sid = s.send_get("/slow?ms=800")
        stream = s.conn._streams[sid]
        s.wait(lambda: stream.sender.is_finished, "request acknowledged")
        app.proc.send_signal(signal.SIGTERM)  # the server holds the request: now drain
        status, body = s.response(sid)
        assert status == 200
        assert json.loads(body)["slot"] == app.slots[0]
        assert app.proc.wait(20) == 0
        # the server closed the connection once its request was answered
        assert s.wait_closed() is not None
    finally:
        s.close()


def test_killed_worker_clients_get_stateless_reset(daemon: Daemon, pair: NetnsPair,
                                                    running: list[RunningApp]) -> None:
    files = start_demo_app(daemon, "file", workers=2, name="files")
    running.append(files)
    web = start_demo_app(daemon, "h3", workers=1, name="web")
    running.append(web)
    victim: Session = session(pair, "smb")
    opened: list[Session] = []
    try:
        info = json.loads(victim.fetch("INFO"))
        slot, pid = info["slot"], info["pid"]
        token = victim.conn._peer_cid.stateless_reset_token
        # a qh3 client on the same worker: qh3 acts on stateless resets (aioquic ignores
        # them), so it shows the effect a client sees
        qh3_victim = None
        while qh3_victim is None and len(opened) < 10:
            candidate = session(pair, "smb", "qh3")
            opened.append(candidate)
            if json.loads(candidate.fetch("INFO"))["slot"] == slot:
                qh3_victim = candidate
        assert qh3_victim is not None, "no qh3 connection landed on the victim's worker"
        os.kill(pid, signal.SIGKILL)
        assert _gone(pid, 5)
        victim.sock.setblocking(False)  # take in what the worker sent before it died
        with contextlib.suppress(BlockingIOError):
            while True:
                victim.conn.receive_datagram(victim.sock.recv(65535), victim.server,
                                             now=time.time())
        victim.sock.setblocking(True)
        before = len(victim.received)
        sent_at = time.monotonic()
        victim.conn.send_stream_data(victim.conn.get_next_available_stream_id(), b"INFO\n",
                                     end_stream=True)
        victim.flush()
        victim.sock.settimeout(2.0)
        reset = victim.sock.recv(65535)
        delay = time.monotonic() - sent_at
        victim.received.append(reset)
        assert len(victim.received) == before + 1
        assert reset[0] & 0xC0 == 0x40, "a stateless reset looks like a short-header packet"
        assert reset[-16:] == token, (
            "not the reset token the worker advertised (daemon must send "
            "reset_token(key, cid) for a dead slot)")
        assert delay < 1.0
        started = time.monotonic()
        qh3_victim.timeout = 5.0
        with pytest.raises(RequestFailed, match="connection closed"):
            qh3_victim.fetch("INFO")
        assert time.monotonic() - started < 1.0, "qh3 noticed only by a timeout"
    finally:
        victim.close()
        for other_session in opened:
            other_session.close()
    # the other worker, and the other app, carry on
    for _ in range(3):
        other = session(pair, "smb")
        try:
            got = json.loads(other.fetch("INFO"))
        finally:
            other.close()
        assert got["slot"] != slot and got["slot"] in files.slots
    w = session(pair, "h3")
    try:
        assert w.get("/")[0] == 200
    finally:
        w.close()


def test_retry_through_the_daemon(daemon: Daemon, pair: NetnsPair,
                                  running: list[RunningApp]) -> None:
    """With address validation on, the client's second Initial goes to the Retry's SCID: it
    must carry the worker's server ID, so the kernel steers it to the same worker (whose
    per-process token key can validate it)."""
    app = start_demo_app(daemon, "h3", "--retry", workers=2, name="validated")
    running.append(app)
    for _ in range(4):  # several connections: both workers
        s = session(pair, "h3")
        try:
            info = json.loads(s.get("/count")[1])
            retry_scid = s.conn._retry_source_connection_id
        finally:
            s.close()
        assert retry_scid is not None, "the server did not send a Retry"
        assert app.layout.decode(retry_scid) == info["slot"]


def test_load_reports_reach_the_daemon(daemon: Daemon, pair: NetnsPair,
                                       running: list[RunningApp]) -> None:
    """Workers' open-connection counts arrive as load reports; a dead worker's slot is
    reported as fully loaded, so new connections avoid it."""
    app = start_demo_app(daemon, "file", workers=2, name="reporting")
    running.append(app)

    def loads() -> dict[int, float | None]:
        for a in daemon.status()["apps"]:
            if a["app"] == "reporting":
                return {w["slot"]: w["load"] for g in a["generations"] for w in g["workers"]}
        return {}

    deadline = time.monotonic() + 10
    while None in loads().values() or not loads():
        assert time.monotonic() < deadline, loads()
        time.sleep(0.1)
    held = session(pair, "smb")
    try:
        slot = json.loads(held.fetch("INFO"))["slot"]
        while loads()[slot] < 1:  # the open connection is counted
            assert time.monotonic() < deadline + 10, loads()
            time.sleep(0.1)
        os.kill(app.pids[slot], signal.SIGKILL)
        while loads()[slot] != DEAD_WORKER_LOAD:
            assert time.monotonic() < deadline + 20, loads()
            time.sleep(0.1)
    finally:
        held.close()
    assert app.proc.poll() is None, "the app carries on with its other worker"
