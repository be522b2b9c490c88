"""Issue 18, items 3 and 5: nothing a tenant sends or plants can stall or block the daemon.

The world of tests/security/test_isolation.py: a real daemon, two tenants (the demo's HTTP/3
site and file service, as their own uids) loaded by real clients from the client namespace,
and the intruder registered for real as uid nobody. The intruder attaches descriptors to
control requests on its own control connection and plants lock files; each attempt must be
refused with its exact error (or fail with EACCES), ``steerd status`` must answer at once
afterwards (its subprocess deadline is the check: no timing asserts), a new connection must
still be served, and the other tenants' clients must see 0 failures during and after.

The lingering descriptor (a TCP socket whose close waits forever, tests/security/intruder.py
``lingering_tcp``) froze the daemon's event loop before: its far end, kept by the intruder,
must now see the daemon's close as a reset (TCP_CLOSE), which also shows the descriptor was
closed, not kept. The lock and sd_notify tests run a second daemon beside the world's (its own
pin dir, port and control socket), so the tenants are not disturbed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from steerd.daemon.dataplane.netns import netns_path
from steerd.daemon.service import RUN_DIR, _lock_path
from tests.e2e.conftest import STEERD, Daemon, spawn_daemon
from tests.sdk.harness import Loader
from tests.security import test_isolation
from tests.security.intruder import TCP_CLOSE
from tests.security.tenants import assert_served
from tests.security.test_isolation import World, first_flight

pytestmark = pytest.mark.root

# The fixtures of test_isolation.py's world (module scope: this module gets a world of its own).
world = test_isolation.world
served = test_isolation.served

WAIT = 30.0
ONLY_RESUME = 'unexpected file descriptors: only a register with "resume" carries them, got {}'
ONLY_SOCKETS = ("unexpected file descriptors: a resume carries only sockets, descriptor {} is "
                "not one")


def metric(daemon: Daemon, name: str, labels: str = "") -> float:
    """One sample of the daemon's /metrics (0 when absent)."""
    for line in daemon.metrics().splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    return 0.0


def refused(world: World, kinds: list[str], message: dict[str, Any]) -> dict[str, Any]:
    """The daemon's reply to ``message`` sent by the intruder with descriptors of ``kinds``
    attached (the intruder's copies closed at once)."""
    reply: dict[str, Any] = world.intruder.ask(op="fd_request", kinds=kinds,
                                               message=message)["reply"]
    return reply


def assert_daemon_serves(world: World) -> None:
    """``steerd status`` answers (within its subprocess deadline) and lists the tenants, and
    a new connection is served end to end."""
    apps = {a["app"] for a in world.daemon.status()["apps"]}
    assert {"web", "files"} <= apps, apps
    assert first_flight(world.pair, os.urandom(8), wait=WAIT)[1]


def test_lingering_descriptor_is_refused_reset_and_never_stalls(
    world: World, served: list[Loader]
) -> None:
    """The issue's attack, three sockets at once: refused with the exact error, each reset
    by the daemon's close (its far end sees TCP_CLOSE), the loop never stalled."""
    daemon = world.daemon
    stalls = metric(daemon, "steerd_loop_stalls_total")
    errors = metric(daemon, "steerd_control_errors_total", '{reason="unexpected_fds"}')
    reply = refused(world, ["lingering_tcp"] * 3, {"op": "status", "id": 1})
    assert reply == {"ok": False, "op": "status", "id": 1, "reason": "unexpected_fds",
                     "error": ONLY_RESUME.format(3)}
    assert world.intruder.ask(op="peers_reset", wait=WAIT)["states"] == [TCP_CLOSE] * 3
    assert_daemon_serves(world)
    # and again, now as a resume (the one op that takes descriptors): refused by cookie
    reply = refused(world, ["lingering_tcp"], {"op": "register", "app": "intruder",
                                               "alpn": ["doq"], "resume": [world.intruder.slot]})
    assert (reply["ok"], reply["reason"]) == (False, "bad_resume"), reply
    assert world.intruder.ask(op="peers_reset", wait=WAIT)["states"] == [TCP_CLOSE]
    assert_daemon_serves(world)
    assert metric(daemon, "steerd_control_errors_total", '{reason="unexpected_fds"}') == (
        errors + 1)
    assert metric(daemon, "steerd_loop_stalls_total") == stalls
    assert_served(served)


@pytest.mark.parametrize(("kinds", "message", "error"), [
    (["pipe"], {"op": "status"}, ONLY_RESUME.format(1)),
    (["file"], {"op": "status"}, ONLY_RESUME.format(1)),
    (["udp"], {"op": "register", "app": "x", "alpn": ["doq"]}, ONLY_RESUME.format(1)),
    (["pipe", "udp"], {"op": "register", "app": "x", "alpn": ["doq"], "replace": True},
     ONLY_RESUME.format(2)),
    (["pipe"], {"op": "register", "app": "intruder", "alpn": ["doq"], "resume": [0]},
     ONLY_SOCKETS.format(0)),
    (["udp", "file"], {"op": "register", "app": "intruder", "alpn": ["doq"], "resume": [0]},
     ONLY_SOCKETS.format(1)),
], ids=["status+pipe", "status+file", "register+socket", "register+pipe+socket",
        "resume+pipe", "resume+socket+file"])
def test_descriptors_where_none_belong_are_refused(
    world: World, served: list[Loader], kinds: list[str], message: dict[str, Any], error: str
) -> None:
    reply = refused(world, kinds, message)
    op = message["op"]
    assert reply == {"ok": False, "op": op, "reason": "unexpected_fds", "error": error}
    assert_daemon_serves(world)
    assert_served(served)


# -- a second daemon beside the world's (its own pin dir, port and control socket) ---------


SPARE_PORT = 4434


@contextlib.contextmanager
def spare_daemon(world: World, workdir: Path, pin_dir: str, until: str) -> Iterator[Daemon]:
    """``steerd run`` for ``pin_dir`` in the world's server namespace, beside its daemon
    (which it must not disturb: another port, control socket and pin dir, no metrics), up
    to its line ``steerd: UNTIL``; stopped (exit 0) and purged afterwards."""
    workdir.mkdir()
    (workdir / "steerd.toml").write_text(
        f'[listen]\naddresses = ["{world.pair.server_v4}"]\nport = {SPARE_PORT}\n'
        f'[control]\npath = "{workdir / "control.sock"}"\n[metrics]\nenabled = false\n')
    daemon = Daemon(world.pair, workdir, pin_dir, None,  # type: ignore[arg-type]
                    workdir / "daemon.log")
    code = 0
    try:
        spawn_daemon(daemon, until=until)
        yield daemon
    finally:
        if daemon.proc is not None:
            daemon.proc.terminate()
            code = daemon.proc.wait(120)  # a stop during start-up awaits the compile
        done = purge(daemon, pin_dir)
        left = os.path.exists(pin_dir)
    assert code == 0, daemon.log()
    assert done.returncode == 0, done.stderr
    assert not left, f"purge left {pin_dir}"


def purge(daemon: Daemon, pin_dir: str) -> subprocess.CompletedProcess[str]:
    """``steerd purge`` of ``pin_dir`` with ``daemon``'s config (which names the control
    socket whose runtime files purge removes too)."""
    return subprocess.run(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "purge",
         "-c", str(daemon.workdir / "steerd.toml"), "--pin-dir", pin_dir],
        capture_output=True, text=True, timeout=120)


def old_lock_path(pin_dir: str) -> str:
    """Where the lock was before issue 18: world-writable /run/lock."""
    return "/run/lock/steerd" + os.path.abspath(pin_dir).replace("/", "_") + ".lock"


def test_planted_lock_files_block_neither_run_nor_purge(
    world: World, served: list[Loader], tmp_path: Path
) -> None:
    """nobody plants (and holds, flock) lock files where the daemon once kept them, in
    /run/lock, for the world's pin dir and for a new one; in /run/steerd it cannot (EACCES).
    ``steerd purge`` of the new pin dir, then ``steerd run`` on it and its purge go ahead; the
    real lock still works: purge of the world's live pin dir is refused, naming its daemon."""
    daemon, intruder = world.daemon, world.intruder
    spare = f"/sys/fs/bpf/steerd-t-{uuid.uuid4().hex[:8]}"
    planted = [old_lock_path(daemon.pin_dir), old_lock_path(spare)]
    try:
        for path in planted:
            assert intruder.ask(op="plant_lock", path=path) == {"errno": 0}
        for pin_dir in (daemon.pin_dir, spare):
            assert intruder.ask(op="plant_lock", path=_lock_path(pin_dir)) == {
                "errno": errno.EACCES}
        st = os.stat(RUN_DIR)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)

        done = purge(daemon, daemon.pin_dir)
        assert done.returncode == 1
        assert done.stderr == (f"steerd purge: another steerd (pid {daemon.proc.pid}) serves "
                               f"pin dir {daemon.pin_dir}: one daemon per pin dir\n")
        with spare_daemon(world, tmp_path / "spare", spare, until="classifying") as other:
            done = purge(other, spare)  # while it runs: refused by the real lock
            assert done.returncode == 1 and f"(pid {other.proc.pid})" in done.stderr
        assert_daemon_serves(world)
    finally:
        intruder.ask(op="release_locks")
        for path in planted:
            Path(path).unlink(missing_ok=True)
    assert_served(served)


def test_ready_and_watchdog_pings_reach_the_service_manager(
    world: World, served: list[Loader], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real daemon started with NOTIFY_SOCKET and WATCHDOG_USEC in its environment (as
    systemd's Type=notify with WatchdogSec=2 sets them) says READY=1 once it serves,
    WATCHDOG=1 from its loop's tick, and STOPPING=1 when it stops."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    seen: list[str] = []
    arrived = threading.Condition()
    stop = threading.Event()
    receiver.settimeout(0.2)

    def collect() -> None:
        # Read from the start, as systemd does: pings sent while the daemon compiles must
        # not fill the socket's queue (10 datagrams) and push READY=1 out.
        while not stop.is_set():
            try:
                message = receiver.recv(256).decode()
            except TimeoutError:
                continue
            with arrived:
                seen.append(message)
                arrived.notify_all()

    def await_seen(done: Callable[[], bool], what: str) -> None:
        with arrived:
            assert arrived.wait_for(done, WAIT), f"no {what} within {WAIT} s: {seen}"

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        pin_dir = f"/sys/fs/bpf/steerd-t-{uuid.uuid4().hex[:8]}"
        with spare_daemon(world, tmp_path / "spare", pin_dir, until="ready"):
            await_seen(lambda: "READY=1" in seen
                       and seen[seen.index("READY=1"):].count("WATCHDOG=1") >= 2,
                       "READY=1 and two WATCHDOG=1 after it")
            with arrived:
                assert set(seen) == {"READY=1", "WATCHDOG=1"}, seen
                assert seen.count("READY=1") == 1, seen
        await_seen(lambda: "STOPPING=1" in seen, "STOPPING=1")
    finally:
        stop.set()
        reader.join(5)
        receiver.close()
    assert_served(served)
