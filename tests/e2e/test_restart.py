"""Issue 7 §2: the daemon restarts (SIGKILL or clean) while connections are established.

Established connections keep flowing through the kernel (pinned maps and programs; sockets
held by the apps); an app built to resume takes its slots back by itself; a connection that
starts during the gap is delayed (its Initial retransmitted), never sent to the wrong app
and never refused while its app may still come back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from deploy.netns import NetnsPair
from quic.cid import CidLayout
from steerd.daemon.dataplane.netns import netns_path
from steerd.daemon.service import group_pin_dir
from tests.e2e.conftest import (
    STEERD,
    Daemon,
    quic_client,
    spawn_daemon,
    start_app,
)

pytestmark = pytest.mark.root


def short_header(slot: int) -> bytes:
    """A 1-RTT packet of an established connection whose server CID names ``slot``."""
    layout = CidLayout()
    return bytes([0x40]) + layout.encode(slot, os.urandom(layout.nonce_len)) + os.urandom(40)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "clean"])
def test_restart_breaks_no_connection_and_apps_resume(
    own_daemon: tuple[NetnsPair, Daemon], how: signal.Signals
) -> None:
    pair, daemon = own_daemon
    web = start_app(daemon, "web", ["h3"], resume=True)
    files = start_app(daemon, "files", ["smb"])  # never resumes: its slot stays held
    client = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    flights = []
    try:
        (slot,) = web.registered["slots"]
        client.sendto(short_header(slot), (pair.server_v4, 4433))
        assert web.next_datagram() is not None

        daemon.proc.send_signal(how)
        assert daemon.proc.wait(10) in (0, -signal.SIGKILL)

        # The gap: established traffic still reaches its worker ...
        client.sendto(short_header(slot), (pair.server_v4, 4433))
        got = web.next_datagram()
        assert got is not None and got["slot"] == slot
        # ... a new connection's first flight reaches nobody (delayed, not misrouted).
        early = quic_client(pair, socket.AF_INET, ["h3"])
        flights.append(early)
        assert web.next_datagram(timeout=0.5) is None
        assert files.next_datagram(timeout=0.1) is None

        started = time.monotonic()
        spawn_daemon(daemon, until="classifying")
        classifying_after = time.monotonic() - started
        resumed = web.wait_event("resumed")
        assert resumed is not None and resumed["slots"] == [slot]
        assert resumed["reset_keys"] == web.registered["reset_keys"]  # tokens stay valid

        # The early client retransmits its Initial (as its PTO would): now it lands on web.
        deadline = time.monotonic() + 10
        delivered = None
        while delivered is None and time.monotonic() < deadline:
            for data in early.datagrams:
                early.sock.sendto(data, early.server)
            delivered = web.next_datagram(timeout=0.2)
        assert delivered is not None and tuple(delivered["from"]) == early.address
        back_after = time.monotonic() - started
        spawn_daemon_ready = daemon.proc  # the programs finish compiling in the background
        assert spawn_daemon_ready.poll() is None

        # files did not resume: its slot is held, and smb flights are held, not refused.
        status = daemon.status()
        assert status["slots"]["awaiting_resume"] == files.registered["slots"]
        held = quic_client(pair, socket.AF_INET, ["smb"])
        flights.append(held)
        assert held.receive(timeout=0.5) is None  # no CONNECTION_CLOSE during the grace
        assert files.next_datagram(timeout=0.2) is None  # files never re-registered
        client.sendto(short_header(slot), (pair.server_v4, 4433))
        assert web.next_datagram() is not None
        print(f"restart ({how.name}): classifying {classifying_after:.2f} s, first held flight "
              f"routed {back_after:.2f} s after the restart began")
    finally:
        client.close()
        for c in flights:
            c.close()
        web.close()
        files.close()


def test_second_daemon_on_the_same_pin_dir_touches_nothing(
    own_daemon: tuple[NetnsPair, Daemon],
) -> None:
    """A second ``steerd run`` by mistake (same config, same pin dir) is refused before it
    touches the pinned state, naming the live daemon; ``steerd purge`` refuses too. The
    running daemon keeps its jail listing and its classifiers: a new app still gets sockets
    (a bind the jail allows only to the listed daemon) and is still routed to."""
    pair, daemon = own_daemon
    net = f"--net={netns_path(pair.server)}"
    config = str(daemon.workdir / "steerd.toml")
    second = subprocess.run(
        ["nsenter", net, STEERD, "run", "-c", config, "--pin-dir", daemon.pin_dir],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert (f"another steerd (pid {daemon.proc.pid}) serves pin dir {daemon.pin_dir}"
            in second.stderr), second.stderr
    purge = subprocess.run(
        ["nsenter", net, STEERD, "purge", "-c", config, "--pin-dir", daemon.pin_dir],
        capture_output=True, text=True, timeout=60)
    assert purge.returncode == 1 and "another steerd" in purge.stderr, purge.stderr
    assert_new_app_routed(pair, daemon, "late")


def test_restart_with_no_apps_steers_at_once(own_daemon: tuple[NetnsPair, Daemon]) -> None:
    """With no app left, the reuseport group dies with the daemon's sockets; the next run's
    new group would be hashed by the kernel until its programs compile. It attaches the
    pinned program at once instead, so apps may register from its first moment."""
    pair, daemon = own_daemon
    daemon.proc.terminate()
    assert daemon.proc.wait(20) == 0
    spawn_daemon(daemon, until="classifying")
    status = daemon.status()
    assert status["steering_attached"] is True and status["jail_attached"] is True
    routes = json.loads(subprocess.run(
        ["bpftool", "-j", "map", "show", "pinned",
         os.path.join(group_pin_dir(daemon.pin_dir, pair.server_v4), "initial_routes")],
        capture_output=True, text=True, check=True).stdout)
    assert routes["max_entries"] == 131072  # sized for the default first_flight_rate
    assert_new_app_routed(pair, daemon, "early")


def assert_new_app_routed(pair: NetnsPair, daemon: Daemon, name: str) -> None:
    """A new app on ALPN h3 gets its sockets, and a new client's first flight reaches it."""
    app = start_app(daemon, name, ["h3"])
    try:
        client = quic_client(pair, socket.AF_INET, ["h3"])
        try:
            assert app.next_datagram() is not None
        finally:
            client.close()
    finally:
        app.close()
