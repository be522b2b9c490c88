"""Issue 7 item 3: a whole app crashes (SIGKILL to its process group: the SDK parent holding
the control connection and both its workers) while clients are connected to each worker.

What must hold, with the real daemon and the two demo apps of deploy/apps:
- each of the dead app's clients gets a stateless reset for its next 1-RTT packet: the reset
  token the worker advertised, within a second; a qh3 client (qh3 acts on stateless resets;
  aioquic 1.7.2 stores the tokens but never checks incoming packets against them) reports the
  connection closed at once, not after an idle timeout;
- the other app carries on: its open connection serves another request, and a new
  connection is served;
- a new first flight for the dead app's ALPN gets no_application_protocol (0x178) at once.

tests/sdk/test_lifecycle.py covers one killed *worker* of an app that lives on; here the app
itself dies, so its routes go too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deploy.netns import NetnsPair
from steerd.app.client import ControlClient
from tests.e2e.conftest import Daemon
from tests.sdk.harness import (
    RequestFailed,
    RunningApp,
    Session,
    kill_group,
    session,
    start_demo_app,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

NO_APPLICATION_PROTOCOL = 0x100 + 120  # CRYPTO_ERROR + TLS alert 120 (RFC 9001 §4.8)


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but unreaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _await(cond: Any, timeout: float, what: str) -> float:
    """Poll ``cond`` (a check of kernel or daemon state no event announces) until true;
    return the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.005)
    return time.monotonic() - t0


def _drain_socket(s: Session) -> None:
    """Take in whatever the worker sent before it died (acks, tickets), so the next datagram
    read is the answer to what we send next."""
    s.sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            data, addr = s.sock.recvfrom(65535)
            s.conn.receive_datagram(data, addr[:2], now=time.time())
    s.sock.setblocking(True)




@pytest.fixture
def apps(steerd: Daemon) -> Iterator[tuple[RunningApp, RunningApp]]:
    web = start_demo_app(steerd, "h3", workers=2, name="web")
    try:
        files = start_demo_app(steerd, "file", workers=1, name="files")
    except BaseException:
        web.stop()
        raise
    try:
        yield web, files
    finally:
        web.stop()  # already dead: only reaps and removes its work directory
        assert files.stop() == 0, "the surviving app did not drain cleanly"


def test_app_crash_resets_its_clients_and_spares_the_rest(
    pair: NetnsPair, steerd: Daemon, apps: tuple[RunningApp, RunningApp],
    sessions: list[Session],
) -> None:
    web, files = apps
    assert web.slots and files.slots
    # Clients on each of web's two workers: an aioquic one (to read the reset's bytes) and a
    # qh3 one (to see a client act on it), per slot.
    # (The daemon spreads new connections over the workers, often in turn: alternate the
    # stacks in a pattern that lands each stack on each worker either way.)
    by_slot: dict[int, dict[str, Session]] = {slot: {} for slot in web.slots}
    pattern = ["aioquic", "qh3", "qh3", "aioquic"]
    for i in range(24):
        if all(len(v) == 2 for v in by_slot.values()):
            break
        stack = pattern[i % 4]
        s = session(pair, "h3", stack)
        sessions.append(s)
        slot = json.loads(s.get("/count")[1])["slot"]
        by_slot[slot].setdefault(stack, s)
    assert all(len(v) == 2 for v in by_slot.values()), (
        f"clients did not reach both workers: { {k: sorted(v) for k, v in by_slot.items()} }")
    tokens = {slot: v["aioquic"].conn._peer_cid.stateless_reset_token
              for slot, v in by_slot.items()}
    survivor = session(pair, "smb")
    sessions.append(survivor)
    assert json.loads(survivor.fetch("INFO"))["app"] == "files"

    # The crash: SIGKILL to the app's whole process group.
    pids = [web.proc.pid, *web.pids.values()]
    killed_at = time.monotonic()
    kill_group(web.proc.pid)
    web.proc.wait(10)
    _await(lambda: not any(_alive(p) for p in pids), 5, "web's processes exit")
    with ControlClient(steerd.control) as c:
        noticed = _await(lambda: all(a["app"] != "web" for a in c.status()["apps"]), 5,
                         "the daemon drops the dead app")
    noticed_after = time.monotonic() - killed_at

    # 1. Each dead worker's aioquic client: its next 1-RTT packet gets the advertised reset.
    reset_delays = []
    for slot, clients in by_slot.items():
        victim = clients["aioquic"]
        _drain_socket(victim)
        victim.conn.send_ping(1)
        sent = time.monotonic()
        victim.flush()
        victim.sock.settimeout(2.0)
        reset = victim.sock.recv(65535)
        reset_delays.append(time.monotonic() - sent)
        assert reset[0] & 0xC0 == 0x40, "a stateless reset looks like a short header"
        assert reset[-16:] == tokens[slot], f"slot {slot}: not the advertised reset token"
        assert 21 <= len(reset)
    # ... and the qh3 client on each dead worker notices at once.
    qh3_delays = []
    for clients in by_slot.values():
        victim = clients["qh3"]
        victim.timeout = 5.0
        _drain_socket(victim)
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="connection closed"):
            victim.get("/count")
        qh3_delays.append(time.monotonic() - started)
    assert max(reset_delays) < 1.0 and max(qh3_delays) < 1.0, (reset_delays, qh3_delays)

    # 2. The other app carries on: on its open connection and on a new one.
    assert json.loads(survivor.fetch("INFO"))["app"] == "files"
    fresh = session(pair, "smb", "qh3")
    sessions.append(fresh)
    assert json.loads(fresh.fetch("INFO"))["app"] == "files"

    # 3. A new first flight for h3 gets no_application_protocol, at once.
    t0 = time.monotonic()
    orphan = session(pair, "h3")  # sends its Initial now
    sessions.append(orphan)
    orphan.sock.settimeout(2.0)
    data, addr = orphan.sock.recvfrom(65535)
    close_delay = time.monotonic() - t0
    orphan.received.append(data)
    orphan.conn.receive_datagram(data, addr[:2], now=time.time())
    event = orphan.wait_closed()  # aioquic reports it after its draining period
    assert event is not None and event.error_code == NO_APPLICATION_PROTOCOL, event
    assert close_delay < 1.0

    figures = {
        "daemon_noticed_s": round(noticed_after, 3), "status_poll_s": round(noticed, 3),
        "reset_ms": [round(d * 1000, 1) for d in reset_delays],
        "qh3_closed_ms": [round(d * 1000, 1) for d in qh3_delays],
        "no_application_protocol_ms": round(close_delay * 1000, 1),
    }
    print("app crash figures:", json.dumps(figures))


def test_dead_app_alpn_is_refused_right_after_the_crash(
    pair: NetnsPair, steerd: Daemon, sessions: list[Session]
) -> None:
    """No waiting for the daemon at all: the first flight goes out as soon as the app's
    processes are gone. Either the daemon already dropped the routes (close 0x178), or it
    must not strand the client: an answer still comes within a second."""
    web = start_demo_app(steerd, "h3", workers=1, name="web2")
    try:
        pids = [web.proc.pid, *web.pids.values()]
        os.killpg(web.proc.pid, signal.SIGKILL)
        web.proc.wait(10)
        _await(lambda: not any(_alive(p) for p in pids), 5, "web2's processes exit")
        orphan = session(pair, "h3")
        sessions.append(orphan)
        orphan.sock.settimeout(1.0)
        try:
            data, addr = orphan.sock.recvfrom(65535)
        except TimeoutError:
            pytest.fail("a first flight sent right after the crash got no answer in 1 s")
        orphan.conn.receive_datagram(data, addr[:2], now=time.time())
        event = orphan.wait_closed()
        assert event is not None and event.error_code == NO_APPLICATION_PROTOCOL, event
    finally:
        web.stop()
