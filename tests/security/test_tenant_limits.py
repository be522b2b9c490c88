"""Tenant limits, shown by attacking for real (issue 18, item 6).

Before them one tenant could take every worker slot (``replace`` thrice with 64 workers: the
draining generations keep theirs) or every control connection, and so lock the others out of
registering, replacing and resuming. Here the daemon runs with the default limits (64 slots
and 16 control connections per uid, 3 generations per app, of 256 and 64). Two tenants serve
real clients (the demo's HTTP/3 site and file service, each as its own uid), and the attacker,
a process really running as uid nobody with a real registration, takes everything it can:
worker slots by registering and replacing with many workers, generations, connections. It
gets the exact errors; another tenant still registers, a third replaces, all of them resume
after a daemon restart (the attacker's own resume included: a limit never refuses one), and
the other tenants' clients see 0 failed requests throughout.

The attacker is a child forked from this test (``tests.daemon.test_control.fork_as``: uid and
gid nobody, no supplementary groups), driven one JSON command per line over a pipe: it holds
what it got (control connections, worker sockets) until the test ends.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.netns import NetnsPair
from deploy.quicclient import Session
from steerd.app.client import ControlClient, Registration
from steerd.app.protocol import ControlError
from tests.daemon.test_control import fork_as, read_json_line, reap
from tests.e2e.conftest import PORT, Daemon, _read_line, spawn_daemon
from tests.sdk.harness import Loader, RunningApp, start_demo_app
from tests.security.tenants import (
    NOBODY,
    WEB_UID,
    Tenants,
    acl_entry,
    assert_served,
    served_fixture,
    tenants_world,
)

pytestmark = [pytest.mark.root, pytest.mark.serial, pytest.mark.timeout(600)]

LATE_UID = 64123
UID_SLOTS, UID_CONNECTIONS = 64, 16  # the defaults: the config below sets no [limits]
ACL = acl_entry(LATE_UID, "h3", names=["late.example"]) + acl_entry(NOBODY, "hog", "hog2")

Emit = Callable[[dict[str, Any]], None]


world = tenants_world(ACL)
served = served_fixture(ipv6=False)


# -- the attacker ------------------------------------------------------------------------------


def attacker(control: str, cmd_r: int, cmd_w: int) -> Callable[[Emit], object]:
    """The forked child's program: one command per line on ``cmd_r``, one answer each.

    ``register``: a register (or replace) on its main control connection, kept.
    ``connect``: ``n`` more control connections at once, of which ``refused`` are expected
    to be refused: those answers, and each kept one's ``status`` (so it was served).
    ``resume``: after a daemon restart, its newest registration's slots back, on a new
    connection. Everything it got stays held until the commands end and the test says go.
    """

    def run(emit: Emit) -> object:
        os.close(cmd_w)
        held: list[Any] = []
        regs: list[Registration] = []
        main: ControlClient | None = None
        with os.fdopen(cmd_r) as commands:
            for line in commands:
                cmd = json.loads(line)
                try:
                    if cmd["op"] == "register":
                        if main is None:
                            main = ControlClient(control, timeout=30)
                            held.append(main)
                        reg = main.register(cmd["app"], [cmd["app"]], [], cmd["workers"],
                                            cmd.get("replace", False))
                        regs.append(reg)
                        emit({"ok": True, "slots": [w["slot"] for w in reg.workers]})
                    elif cmd["op"] == "connect":
                        emit(connect_many(control, cmd["n"], cmd["refused"], held))
                    elif cmd["op"] == "restarted":  # its connections died with the daemon
                        main = None
                        emit({"ok": True})
                    elif cmd["op"] == "resume":
                        client = ControlClient(control, timeout=30)
                        held.append(client)
                        back = client.resume(regs[-1].app, [regs[-1].app], [], regs[-1])
                        emit({"ok": True, "resumed": back.reply.get("resumed"),
                              "slots": [w["slot"] for w in back.workers]})
                except ControlError as e:
                    emit({"ok": False, "reason": e.reason, "error": str(e)})
        return held, regs

    return run


def connect_many(control: str, n: int, refused: int, held: list[Any]) -> dict[str, Any]:
    """``n`` connections at once. The daemon speaks first only to those it refuses (a reply,
    then the end), so await exactly ``refused`` readable ones, then show the others served."""
    made = [ControlClient(control, timeout=30) for _ in range(n)]
    held.extend(made)
    deadline = time.monotonic() + 30
    readable: list[ControlClient] = []
    while len(readable) < refused and time.monotonic() < deadline:
        ready, _, _ = select.select([c.sock for c in made], [], [], 0.5)
        readable = [c for c in made if c.sock in ready]
    replies = [c.receive()[0] for c in readable]
    served = [c.status()["control_connections"] for c in made if c not in readable]
    return {"ok": True, "refusals": replies, "served": len(served)}


@dataclass
class Attacker:
    pid: int
    out_fd: int
    go_fd: int
    cmd_w: int

    def ask(self, **cmd: Any) -> dict[str, Any]:
        os.write(self.cmd_w, (json.dumps(cmd) + "\n").encode())
        ready, _, _ = select.select([self.out_fd], [], [], 120)
        assert ready, f"the attacker did not answer {cmd}"
        answer = read_json_line(self.out_fd)
        assert "error" not in answer or "reason" in answer, answer  # not a crash
        return answer

    def end(self) -> int:
        """Stop taking commands, release everything, exit; its exit code."""
        os.close(self.cmd_w)
        return reap(self.pid, self.go_fd, self.out_fd)


def start_attacker(daemon: Daemon) -> Attacker:
    cmd_r, cmd_w = os.pipe()
    pid, out_fd, go_fd = fork_as(attacker(daemon.control, cmd_r, cmd_w), [])
    os.close(cmd_r)
    return Attacker(pid, out_fd, go_fd, cmd_w)


# -- what the test looks at ---------------------------------------------------------------------


def control_errors(daemon: Daemon) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for f in text_string_to_metric_families(daemon.metrics()) for s in f.samples
        if s.name == "steerd_control_errors_total"
    }


def slots_of(status: dict[str, Any], uid: int) -> list[int]:
    return sorted(w["slot"] for a in status["apps"] for g in a["generations"] if g["uid"] == uid
                  for w in g["workers"])


def app_of(pair: NetnsPair, server_name: str = "localhost") -> str:
    """Which app a new real h3 client sending ``server_name`` reaches (the demo site answers
    with its name). The name goes into the Session's constructor: it sends its ClientHello
    there, so a name set afterwards would reach the request's authority only."""
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((pair.client_v4, 0))
    s = Session("aioquic", sock, (pair.server_v4, PORT), "h3", server_name=server_name)
    try:
        return str(json.loads(s.get("/count")[1])["app"])
    finally:
        s.close()


def await_status(daemon: Daemon, done: Callable[[dict[str, Any]], bool],
                 timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(status := daemon.status()):
        assert time.monotonic() < deadline, f"not reached: {status}"
        time.sleep(0.1)
    return status


def await_line(daemon: Daemon, want: str, timeout: float = 120.0) -> None:
    """The daemon's stdout line ``want`` (read past the others) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while (line := _read_line(daemon.proc, deadline - time.monotonic())) is not None:
        if line.strip() == want:
            return
    raise AssertionError(f"the daemon never said {want!r}:\n{daemon.log()}")


def uid_slots_error(held: int, wanted: int) -> str:
    return (f"register: uid {NOBODY} holds {held} worker slots (draining generations and slots "
            f"awaiting a resume included) and asks for {wanted}: the limit is {UID_SLOTS} per "
            "uid ([limits] uid_worker_slots)")


# -- the test -------------------------------------------------------------------------------------


def test_one_tenant_at_its_limits_leaves_the_others_serving(
    world: Tenants, served: list[Loader]
) -> None:
    daemon, pair = world.daemon, world.pair
    late: RunningApp | None = None
    hog = start_attacker(daemon)
    try:
        # 1. Slots: register and replace with many workers, keeping the old ones draining.
        first = hog.ask(op="register", app="hog", workers=32)
        second = hog.ask(op="register", app="hog", workers=31, replace=True)
        third = hog.ask(op="register", app="hog", workers=1, replace=True)
        assert first["ok"] and second["ok"] and third["ok"], (first, second, third)
        assert hog.ask(op="register", app="hog", workers=1, replace=True) == {
            "ok": False, "reason": "generations",
            "error": 'register: app "hog" has 3 generations (1 active, 2 draining): the limit '
                     "is 3 per app ([limits] app_generations); a draining generation must exit "
                     "(deregister or close its control connection) before another replace"}
        assert hog.ask(op="register", app="hog2", workers=1) == {
            "ok": False, "reason": "uid_slots", "error": uid_slots_error(UID_SLOTS, 1)}
        # 2. Connections: it holds one; 15 more are served, the 16th is refused and closed.
        got = hog.ask(op="connect", n=UID_CONNECTIONS, refused=1)
        assert got["served"] == UID_CONNECTIONS - 1, got
        assert got["refusals"] == [{
            "ok": False, "op": None, "reason": "uid_connections",
            "error": f"too many control connections for uid {NOBODY} (limit {UID_CONNECTIONS} "
                     "per uid, [limits] uid_control_connections)"}]
        status = daemon.status()
        mine = first["slots"] + second["slots"] + third["slots"]
        assert slots_of(status, NOBODY) == sorted(mine) and len(mine) == UID_SLOTS
        assert status["control_connections"] >= UID_CONNECTIONS  # and root's status got in
        assert {k: control_errors(daemon).get(k) for k in
                ("generations", "uid_slots", "uid_connections")} == {
            "generations": 1.0, "uid_slots": 1.0, "uid_connections": 1.0}

        # 3. The others, meanwhile: a new tenant registers, web replaces itself.
        late = start_demo_app(daemon, "h3", "--server-name", "late.example", uid=LATE_UID,
                              name="late")
        assert app_of(pair, "late.example") == "late"
        old_web = world.web
        new_web = start_demo_app(daemon, "h3", "--replace", uid=WEB_UID, workers=2, name="web")
        world.web = new_web  # the fixture stops this one
        assert new_web.ready["generation"] == old_web.ready["generation"] + 1
        assert old_web.proc.wait(60) == 0  # replaced: it drained and left by itself
        old_web.stop()
        assert app_of(pair) == "web"

        # 4. A daemon restart: everyone resumes, the attacker too (never refused by a
        # limit), and its slots still count against it until then.
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        spawn_daemon(daemon, until="classifying")  # the apps resume while it compiles
        os.chmod(daemon.control, 0o666)  # a new socket file: open it to the tenants again
        assert hog.ask(op="restarted")["ok"]
        others = {"web", "files", "late"}
        status = await_status(daemon, lambda s: others <= {a["app"] for a in s["apps"]})
        assert hog.ask(op="register", app="hog2", workers=1) == {
            "ok": False, "reason": "uid_slots", "error": uid_slots_error(UID_SLOTS, 1)}
        back = hog.ask(op="resume")
        assert back == {"ok": True, "resumed": True, "slots": third["slots"]}, back
        status = await_status(daemon, lambda s: set(s["slots"]["awaiting_resume"]) == set(
            first["slots"] + second["slots"]))  # its draining generations never came back
        assert others | {"hog"} == {a["app"] for a in status["apps"]}
        assert app_of(pair) == "web" and app_of(pair, "late.example") == "late"
        # a daemon stopped while it still compiles waits for the compile, which may take
        # longer than the teardown gives it on a busy host: let it finish
        await_line(daemon, "steerd: ready")
    finally:
        code = hog.end()
        if late is not None:
            late.stop()
    assert code == 0
    assert_served(served)
