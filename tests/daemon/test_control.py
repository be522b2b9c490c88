"""The control socket end to end: real AF_UNIX SEQPACKET sockets, real UDP worker sockets
handed over by SCM_RIGHTS, a client running as another uid, and /metrics over HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import select
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from quic.reset import slot_reset_key
from steerd.app.client import ControlClient
from steerd.app.protocol import ControlError
from steerd.daemon.config import AclRule, Config
from steerd.daemon.control import ControlServer
from tests.daemon.harness import NOBODY, Daemon

ROOT = Path(__file__).resolve().parents[2]


def socket_inodes() -> dict[int, int]:
    """Socket inode -> number of FDs of this process referring to it."""
    counts: dict[int, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            ino = int(link[8:-1])
            counts[ino] = counts.get(ino, 0) + 1
    return counts


def raw_reply(client: ControlClient, data: bytes, fds: tuple[int, ...] = ()) -> dict:
    client.send_raw(data, fds)
    reply, sockets = client.receive()
    assert sockets == []
    return reply


def test_register_hands_over_real_bound_udp_sockets(daemon: Daemon) -> None:
    before = socket_inodes()
    with ControlClient(daemon.path) as c:
        reg = c.register("web", ["h3"], ["Example.com"], workers=2)
        try:
            assert (reg.app, reg.generation) == ("web", 1)
            assert [w["slot"] for w in reg.workers] == [0, 1]
            assert [w["server_id"] for w in reg.workers] == ["0000", "0001"]
            assert reg.layout == daemon.config.cid
            # Each worker its own reset key (its slot's, from the master); never the master.
            master = daemon.server.reset_key
            assert "reset_key" not in reg.reply and master.hex() not in json.dumps(reg.reply)
            keys = [reg.reset_key_of(w["slot"]) for w in reg.workers]
            assert keys == [slot_reset_key(master, w["slot"]) for w in reg.workers]
            assert len(set(keys)) == 2 and master not in keys
            assert all(len(k) == 32 for k in keys)
            assert [bytes.fromhex(w["reset_key"]) for w in reg.workers] == keys
            with pytest.raises(KeyError):
                reg.reset_key_of(99)
            assert reg.reply["cid"]["cid_len"] == 9
            assert len(reg.sockets) == 4
            for w in reg.workers:
                for entry, sock in zip(w["sockets"], reg.worker_sockets(w["slot"]), strict=True):
                    assert sock.type == socket.SOCK_DGRAM
                    assert sock.getsockname()[:2] == (entry["address"], daemon.port)
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                    assert sock.family == (
                        socket.AF_INET6 if ":" in entry["address"] else socket.AF_INET
                    )
            assert daemon.sink.workers == {
                0: [(socket.AF_INET, "127.0.0.1", daemon.port), (socket.AF_INET6, "::1",
                                                                daemon.port)],
                1: [(socket.AF_INET, "127.0.0.1", daemon.port), (socket.AF_INET6, "::1",
                                                                daemon.port)],
            }
            # The daemon kept no copy: each worker socket is open exactly once in this
            # process (the client's end), so the app's exit really closes it.
            daemon.in_loop(lambda: None)  # the reply is sent, and its callback has finished
            # (the daemon's copies are closed by its closer thread, off the loop: await it)
            mine = [os.fstat(s.fileno()).st_ino for s in reg.sockets]
            deadline = time.monotonic() + 10
            while any(socket_inodes()[ino] != 1 for ino in mine):
                assert time.monotonic() < deadline, socket_inodes()
                time.sleep(0.01)
            decision = daemon.in_loop(lambda: daemon.registry.decide("example.com", ["h3"]))
            assert decision is not None and decision.slot in (0, 1)
        finally:
            reg.close()
    daemon.sink.wait_for(lambda: not daemon.sink.workers)
    assert daemon.sink.calls == [("add", 0), ("add", 1), ("remove", 0), ("remove", 1)]
    deadline = time.monotonic() + 10  # the daemon's end of the connection: closed off-loop
    while socket_inodes() != before:
        assert time.monotonic() < deadline, (socket_inodes(), before)
        time.sleep(0.01)


def test_worker_sockets_receive_datagrams(daemon: Daemon) -> None:
    with ControlClient(daemon.path) as c:
        reg = c.register("web", ["h3"], workers=1)
        try:
            for sock, (family, address) in zip(
                reg.sockets, [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                strict=True,
            ):
                sock.settimeout(5)
                with socket.socket(family, socket.SOCK_DGRAM) as sender:
                    sender.bind((address, 0))
                    sender.sendto(b"first flight", (address, daemon.port))
                    data, source = sock.recvfrom(2048)
                    assert data == b"first flight"
                    assert source[:2] == sender.getsockname()[:2]
        finally:
            reg.close()


def test_deregister_and_disconnect_free_everything(daemon: Daemon) -> None:
    baseline = len(socket_inodes())
    a = ControlClient(daemon.path)
    b = ControlClient(daemon.path)
    try:
        ra = a.register("web", ["h3"], workers=2)
        rb = b.register("files", ["smb"], workers=1)
        assert [w["slot"] for w in rb.workers] == [2]
        assert a.deregister("web") == [0, 1]
        assert set(daemon.sink.workers) == {2}
        assert daemon.in_loop(lambda: daemon.registry.decide(None, ["h3"])) is None
        with pytest.raises(ControlError) as e:
            a.deregister("files")  # not a's to remove
        assert (e.value.reason, str(e.value)) == (
            "not_registered", 'deregister: app "files" has no generation on this connection')
        b.close()  # the app dies: its routes go at once
        daemon.sink.wait_for(lambda: not daemon.sink.workers)
        assert daemon.in_loop(lambda: daemon.registry.decide(None, ["smb"])) is None
        status = a.status()
        assert status["apps"] == []
        # free again, but quarantined: other apps get them only after route_ttl
        assert status["slots"] == {"total": 8, "free": 8, "quarantined": 3,
                                   "awaiting_resume": []}
        ra.close()
        rb.close()
    finally:
        a.close()
        b.close()
    daemon.wait_until(lambda: daemon.server.connections == 0)
    # the daemon's ends of the connections are closed by its closer thread, off the loop
    daemon.wait_until(lambda: len(socket_inodes()) == baseline)


def test_replace_starts_a_generation_and_old_one_drains(daemon: Daemon) -> None:
    old = ControlClient(daemon.path)
    new = ControlClient(daemon.path)
    try:
        r1 = old.register("web", ["h3"], workers=1)
        with pytest.raises(ControlError) as e:
            new.register("web", ["h3"], workers=1)
        assert str(e.value) == (
            'register: app "web" is already registered (generation 1); send "replace": true '
            "to start a new generation"
        )
        r2 = new.register("web", ["h3"], workers=1, replace=True)
        assert (r2.generation, r2.workers[0]["slot"]) == (2, 1)
        assert set(daemon.sink.workers) == {0, 1}  # the draining generation keeps its slot
        gens = new.status()["apps"][0]["generations"]
        assert [(g["generation"], g["state"]) for g in gens] == [(1, "draining"), (2, "active")]
        assert daemon.in_loop(lambda: daemon.registry.decide(None, ["h3"])).slot == 1
        old.close()
        daemon.sink.wait_for(lambda: set(daemon.sink.workers) == {1})
        assert new.drain("web") == [2]
        assert daemon.in_loop(lambda: daemon.registry.decide(None, ["h3"])) is None
        r1.close()
        r2.close()
    finally:
        old.close()
        new.close()


def test_conflict_and_load_over_the_socket(daemon: Daemon) -> None:
    with ControlClient(daemon.path) as a, ControlClient(daemon.path) as b:
        ra = a.register("web", ["h3"], workers=2)
        with pytest.raises(ControlError) as e:
            b.register("other", ["h2", "h3"])
        assert e.value.reply == {
            "ok": False, "op": "register", "reason": "conflict",
            "error": 'register: ALPN "h3" for all server names is already claimed by app "web"',
        }
        a.load("web", {0: 7, 1: 2})
        assert [daemon.in_loop(lambda: daemon.registry.decide(None, ["h3"])).slot
                for _ in range(3)] == [1, 1, 1]
        workers = a.status()["apps"][0]["generations"][0]["workers"]
        assert [(w["load"], w["assigned"]) for w in workers] == [(7.0, 0), (2.0, 3)]
        ra.close()


MALFORMED = [
    (b"{", "bad_json", "invalid JSON: Expecting property name enclosed in double quotes at "
     "byte 1", None),
    (b"\xff\xfe", "bad_json", "invalid JSON: not UTF-8", None),
    (b"[1, 2]", "bad_message", "a request must be a JSON object, got list", None),
    (b'{"op": "fly"}', "unknown_op",
     'unknown op "fly" (known: deregister, drain, load, register, status)', None),
    (b'{"app": "web"}', "unknown_op",
     "unknown op null (known: deregister, drain, load, register, status)", None),
    (b'{"op": "status", "id": [1]}', "bad_message", '"id" must be a string or integer, got [1]',
     None),
    (b'{"op": "status", "verbose": true, "id": 7}', "bad_message",
     'status: unknown field "verbose" (known: id, op)', "status"),
    (b'{"op": "register", "app": "web"}', "bad_message", 'register: missing field "alpn"',
     "register"),
    (b'{"op": "register", "app": "web", "alpns": ["h3"]}', "bad_message",
     'register: unknown field "alpns" (known: alpn, app, cid_len, cid_mode, id, op, replace, '
     'resume, server_names, workers)', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "cid_mode": "random"}', "bad_request",
     'register: "cid_mode" must be "layout" or "learned", got "random"', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "cid_mode": 1}', "bad_request",
     'register: "cid_mode" must be "layout" or "learned", got 1', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "cid_mode": "learned"}', "bad_request",
     'register: "cid_len" must be 4..20 in learned mode, got 0', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "cid_mode": "learned", "cid_len": 21}',
     "bad_request", 'register: "cid_len" must be 4..20 in learned mode, got 21', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "cid_mode": "learned", "cid_len": "8"}',
     "bad_request", 'register: "cid_len" must be an integer, got "8"', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "cid_len": 8}', "bad_request",
     'register: "cid_len" is only for "cid_mode": "learned" (layout mode issues the layout\'s '
     'CIDs)', "register"),
    (b'{"op": "register", "app": "web", "alpn": "h3"}', "bad_request",
     'register: "alpn" must be a non-empty list of strings, got "h3"', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "workers": "2"}', "bad_request",
     'register: "workers" must be an integer 1..4, got "2"', "register"),
    (b'{"op": "register", "app": "web", "alpn": ["h3"], "workers": 5}', "bad_request",
     'register: "workers" must be an integer 1..4, got 5', "register"),
    (b'{"op": "register", "app": 5, "alpn": ["h3"]}', "bad_request",
     "register: \"app\": must be 1..64 characters of letters, digits, '.', '_' or '-', "
     "starting with a letter or digit, got 5", "register"),
    (b'{"op": "deregister", "app": ["web"]}', "bad_request",
     'deregister: "app" must be a string, got ["web"]', "deregister"),
    (b'{"op": "load", "app": "web", "workers": {"0": 1}}', "bad_request",
     'load: "workers" must be a list of {"slot": integer, "load": number >= 0}, got {"0": 1}',
     "load"),
    (b'{"op": "load", "app": "web", "workers": [{"slot": 0, "load": -1}]}', "bad_request",
     'load: "workers" must be a list of {"slot": integer, "load": number >= 0}, got '
     '[{"slot": 0, "load": -1}]', "load"),
    (b'{"op": "drain", "app": "web"}', "not_registered",
     'drain: app "web" has no generation on this connection', "drain"),
    (b'{"op": "status", "pad": "' + b"x" * 1100 + b'"}', "too_large",
     "message too large: the limit is 1024 bytes", None),
]


@pytest.mark.parametrize(("data", "reason", "error", "op"), MALFORMED)
def test_malformed_messages_get_exact_errors(
    daemon: Daemon, data: bytes, reason: str, error: str, op: str | None
) -> None:
    with ControlClient(daemon.path) as c:
        reply = raw_reply(c, data)
        expected = {"ok": False, "op": op, "reason": reason, "error": error}
        if b'"id": 7' in data:
            expected["id"] = 7
        assert reply == expected
        # the daemon carries on, on the same connection
        assert c.status()["apps"] == []
    families = {m.name: m for m in text_string_to_metric_families(scrape(daemon))}
    errors = {s.labels["reason"]: s.value for s in families["steerd_control_errors"].samples
              if s.name.endswith("_total")}
    assert errors == {reason: 1.0}


def test_file_descriptors_in_a_request_are_refused_and_closed(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        with ControlClient(daemon.path) as c:
            reply = raw_reply(c, b'{"op": "status"}', (r, r))
            assert reply == {
                "ok": False, "op": "status", "reason": "unexpected_fds",
                "error": 'unexpected file descriptors: only a register with "resume" carries '
                         "them, got 2",
            }
            os.close(r)
            r = -1
            # nobody holds the read end any more: the daemon closed what it received (off
            # its loop, steerd/daemon/closer.py: await it; POLLERR once no reader is left)
            poller = select.poll()
            poller.register(w, 0)
            assert poller.poll(30_000), "the daemon kept the read end open"
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")
            assert c.status()["apps"] == []
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)


def test_rate_limit(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(control_rate=0.1, control_burst=3)
    with ControlClient(daemon.path) as c:
        for _ in range(3):
            assert raw_reply(c, b'{"op": "status"}')["ok"] is True
        assert raw_reply(c, b'{"op": "status", "id": "x"}') == {
            "ok": False, "op": None, "reason": "rate_limited",  # not parsed: no id
            "error": "rate limit: at most 0.1 messages per second (burst 3)",
        }
    with ControlClient(daemon.path) as other:  # the limit is per connection
        assert raw_reply(other, b'{"op": "status"}')["ok"] is True


def test_connection_limit(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(control_connections=1)
    with ControlClient(daemon.path) as first:
        assert first.status()["control_connections"] == 1
        with ControlClient(daemon.path) as second:
            reply, _ = second.receive()
            assert reply == {
                "ok": False, "op": None, "reason": "too_many_connections",
                "error": "too many control connections (limit 1)",
            }
            with pytest.raises(ConnectionError):
                second.receive()
        assert first.status()["control_connections"] == 1


def test_socket_failure_rolls_back(daemon: Daemon) -> None:
    # Someone outside the group holds the port on ::1 (no SO_REUSEPORT): binding fails.
    squatter = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    squatter.bind(("::1", daemon.port))
    try:
        with ControlClient(daemon.path) as c:
            with pytest.raises(ControlError) as e:
                c.register("web", ["h3"], workers=2)
            assert (e.value.reason, str(e.value)) == (
                "socket_error",
                "register: cannot create worker sockets: [Errno 98] Address already in use",
            )
            status = c.status()
            assert status["apps"] == [] and status["slots"]["free"] == 8
            assert daemon.sink.workers == {}
    finally:
        squatter.close()


def test_stale_socket_is_replaced_and_a_live_one_is_not(daemon: Daemon, sockdir: str) -> None:
    second = ControlServer(daemon.config, daemon.registry, daemon.sink)
    with pytest.raises(OSError) as e:
        daemon.run(second.start())
    assert str(e.value) == f"another steerd is serving {daemon.path}"
    stale = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: what a crashed daemon leaves
    def config_for(group: str | int) -> Config:
        control = dataclasses.replace(daemon.config.control, path=stale, mode=0o660, group=group)
        return dataclasses.replace(daemon.config, control=control)

    with pytest.raises(OSError) as e:
        daemon.run(ControlServer(config_for("no-such-group"), daemon.registry,
                                 daemon.sink).start())
    assert str(e.value) == "[control] group 'no-such-group' does not exist"
    third = ControlServer(config_for("users"), daemon.registry, daemon.sink)
    daemon.run(third.start())
    try:
        st = os.stat(stale)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, grp.getgrnam("users").gr_gid)
        with ControlClient(stale) as c:
            assert c.status()["apps"] == []
    finally:
        daemon.run(third.close())
    assert not os.path.exists(stale)


def fork_as(
    fn: Callable[[Callable[[dict[str, object]], None]], object], extra_groups: list[int]
) -> tuple[int, int, int]:
    """Run ``fn(emit)`` in a forked child as nobody (with ``extra_groups``).

    Forking rather than exec'ing a new interpreter: the child needs the project's code and
    venv, which may sit in a directory only root can enter (CI clones into a private temp
    dir). Returns (pid, fd to read the child's JSON lines, fd whose closing tells it to go).
    """
    out_r, out_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(out_r)
            os.close(go_w)
            os.setgroups(extra_groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)

            def emit(obj: dict[str, object]) -> None:
                os.write(out_w, (json.dumps(obj) + "\n").encode())

            held = fn(emit)  # e.g. the control connection: alive until the parent says go
            os.read(go_r, 1)
            del held
            code = 0
        except BaseException as exc:
            with contextlib.suppress(Exception):
                os.write(out_w, (json.dumps({"error": f"{type(exc).__name__}: {exc}"})
                                 + "\n").encode())
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(go_r)
    return pid, out_r, go_w


def read_json_line(fd: int) -> dict[str, object]:
    with os.fdopen(os.dup(fd), "r") as f:
        return json.loads(f.readline())


def reap(pid: int, *fds: int) -> int:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_acl_as_another_uid(daemon: Daemon) -> None:
    def child(emit: Callable[[dict[str, object]], None]) -> object:
        out: dict[str, object] = {"uid": os.getuid(), "gid": os.getgid()}
        c = ControlClient(daemon.path)
        try:
            c.register("bad", ["h3"])
        except ControlError as e:
            out["refused"] = [e.reason, str(e)]
        try:
            c.register("nb", ["nb"])
        except ControlError as e:
            out["refused_all_names"] = [e.reason, str(e)]
        reg = c.register("nb", ["nb"], ["nobody.example"])
        out["generation"] = reg.generation
        out["sockets"] = [list(s.getsockname()[:2]) for s in reg.sockets]
        out["status_uid"] = c.status()["apps"][0]["generations"][0]["uid"]
        emit(out)
        return c, reg  # held until the test says go

    pid, out_fd, go_fd = fork_as(child, [])
    try:
        out = read_json_line(out_fd)
        assert "error" not in out, out
        assert (out["uid"], out["gid"]) == (NOBODY, NOBODY)
        assert out["refused"] == [
            "acl_denied", 'register: uid 65534 may not claim ALPN "h3" for all server names'
        ]
        assert out["refused_all_names"] == [
            "acl_denied", 'register: uid 65534 may not claim ALPN "nb" for all server names'
        ]
        assert out["generation"] == 1 and out["status_uid"] == NOBODY
        assert out["sockets"] == [["127.0.0.1", daemon.port], ["::1", daemon.port]]
        assert set(daemon.sink.workers) == {0}
        # the name is taken: even root must ask for a new generation explicitly
        with ControlClient(daemon.path) as c:
            with pytest.raises(ControlError) as e:
                c.register("nb", ["nb"], ["nobody.example"])
            assert e.value.reason == "exists"
    finally:
        assert reap(pid, go_fd, out_fd) == 0  # the app exits: its routes go
    daemon.sink.wait_for(lambda: not daemon.sink.workers)


def test_acl_by_supplementary_group_name(make_daemon: Callable[..., Daemon]) -> None:
    """SO_PEERGROUPS: a rule naming a group the peer has only as a supplementary group."""
    daemon = make_daemon()
    users_gid = grp.getgrnam("users").gr_gid
    rule = AclRule(groups=("users",), alpn=("grp",))
    daemon.registry.acl = (*daemon.registry.acl, rule)

    def child(emit: Callable[[dict[str, object]], None]) -> object:
        with ControlClient(daemon.path) as c:
            reg = c.register("grp", ["grp"])
            emit({"groups": os.getgroups(), "slots": [w["slot"] for w in reg.workers]})
        return None

    pid, out_fd, go_fd = fork_as(child, [users_gid])
    try:
        assert read_json_line(out_fd) == {"groups": [users_gid], "slots": [0]}
    finally:
        assert reap(pid, go_fd, out_fd) == 0
    daemon.sink.wait_for(lambda: daemon.sink.calls == [("add", 0), ("remove", 0)])
    # without the group, the same request is refused
    pid, out_fd, go_fd = fork_as(child, [])
    try:
        assert read_json_line(out_fd) == {
            "error": 'ControlError: register: uid 65534 may not claim ALPN "grp" for all '
                     "server names"
        }
    finally:
        assert reap(pid, go_fd, out_fd) == 1


def test_data_plane_refusal_rolls_back_to_the_old_generation(daemon: Daemon) -> None:
    with daemon.sink.cond:
        daemon.sink.workers[2] = []  # the data plane will refuse slot 2
    with ControlClient(daemon.path) as c:
        r1 = c.register("web", ["h3"], workers=1)
        # the daemon's copies of r1's sockets are closed (by its closer thread, off the loop)
        mine = [os.fstat(sock.fileno()).st_ino for sock in r1.sockets]
        daemon.wait_until(lambda: all(socket_inodes().get(ino) == 1 for ino in mine))
        before = socket_inodes()
        with pytest.raises(ControlError) as e:
            c.register("web", ["h3", "h2"], workers=2, replace=True)  # slots 1 and 2
        assert (e.value.reason, str(e.value)) == (
            "internal_error", "register: internal error: ValueError: slot 2 is already in use"
        )
        daemon.wait_until(lambda: socket_inodes() == before)  # the four made for it: closed
        assert daemon.sink.calls == [("add", 0), ("add", 1), ("remove", 1)]
        gens = c.status()["apps"][0]["generations"]
        assert [(g["generation"], g["state"]) for g in gens] == [(1, "active")]
        assert daemon.in_loop(lambda: daemon.registry.decide(None, ["h2"])) is None
        assert daemon.in_loop(lambda: daemon.registry.decide(None, ["h3"])).slot == 0
        r1.close()


def scrape(daemon: Daemon) -> str:
    if daemon.metrics._server is None:
        daemon.metrics.serve("127.0.0.1", 0)
    assert daemon.metrics._server is not None
    port = daemon.metrics._server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_metrics_scraped_over_http(daemon: Daemon) -> None:
    daemon.metrics.set_bpf_source(lambda: {"steer_short_header": 12, "xdp_drop_short": 3})
    with ControlClient(daemon.path) as a, ControlClient(daemon.path) as b:
        ra = a.register("web", ["h3"], workers=2)
        rb = b.register("web", ["h3"], workers=1, replace=True)
        raw_reply(a, b"nope")
        m = daemon.metrics
        m.first_flights.labels("routed", "web").inc(5)
        m.first_flights.labels("no_owner", "").inc()
        m.decision_seconds.observe(0.0004)
        m.reinjected_datagrams.inc(7)
        text = scrape(daemon)
        ra.close()
        rb.close()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert values[("steerd_apps", ())] == 1
    assert values[("steerd_generations", (("state", "active"),))] == 1
    assert values[("steerd_generations", (("state", "draining"),))] == 1
    assert values[("steerd_workers", ())] == 3
    assert values[("steerd_free_worker_slots", ())] == 5
    assert values[("steerd_control_connections", ())] == 2
    assert values[("steerd_control_messages_total", (("op", "register"),))] == 2
    assert values[("steerd_control_errors_total", (("reason", "bad_json"),))] == 1
    assert values[("steerd_first_flights_total", (("app", "web"), ("result", "routed")))] == 5
    assert values[("steerd_first_flights_total", (("app", ""), ("result", "no_owner")))] == 1
    assert values[("steerd_decision_seconds_bucket", (("le", "0.0005"),))] == 1
    assert values[("steerd_decision_seconds_bucket", (("le", "0.00025"),))] == 0
    assert values[("steerd_reinjected_datagrams_total", ())] == 7
    assert values[("steerd_bpf_events_total", (("counter", "steer_short_header"),))] == 12
    assert values[("steerd_bpf_events_total", (("counter", "xdp_drop_short"),))] == 3
    # after both apps are gone the gauges follow
    daemon.sink.wait_for(lambda: not daemon.sink.workers)
    daemon.wait_until(lambda: daemon.server.connections == 0)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(scrape(daemon)) for s in f.samples
    }
    assert values[("steerd_apps", ())] == 0 and values[("steerd_workers", ())] == 0


def test_metrics_bpf_source_failure_does_not_break_scrape(daemon: Daemon) -> None:
    def broken() -> dict[str, int]:
        raise OSError("map gone")

    daemon.metrics.set_bpf_source(broken)
    text = scrape(daemon)
    assert "steerd_apps 0.0" in text and "steerd_bpf_events_total{" not in text


def test_resume_takes_back_orphaned_slots_with_the_very_sockets(daemon: Daemon) -> None:
    """After a daemon restart an app presents the worker sockets it kept; only the sockets the
    data plane holds for those slots are accepted, and nothing new is handed out."""
    with ControlClient(daemon.path) as first:
        reg = first.register("web", ["h3"], workers=2)
        slots = [w["slot"] for w in reg.workers]
        # The app's control connection breaks (a daemon restart looks the same to the
        # registry): its slots are now orphans the data plane still holds.
        daemon.in_loop(lambda: daemon.registry.disconnect(next(iter(daemon.server._conns))))
        daemon.in_loop(lambda: daemon.registry.reserve_orphans(slots))
        with ControlClient(daemon.path) as again:
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                with pytest.raises(ControlError) as e:
                    again.call({"op": "register", "app": "web", "alpn": ["h3"],
                                "resume": slots[:1]}, [other.fileno(), other.fileno()])
                assert e.value.reason == "bad_resume"
                assert str(e.value) == ("register: the socket given for slot "
                                        f"{slots[0]} on 127.0.0.1 is not the one steering "
                                        "that slot")
                with pytest.raises(ControlError) as e:
                    again.call({"op": "register", "app": "web", "alpn": ["h3"],
                                "resume": slots}, [other.fileno()])
                assert e.value.reason == "bad_resume"
            finally:
                other.close()
            back = again.resume("web", ["h3"], [], reg)
            assert back.reply["resumed"] is True
            assert [w["slot"] for w in back.workers] == slots
            # the same slot keys: the reset tokens the workers advertised stay valid
            assert [back.reset_key_of(s) for s in slots] == [reg.reset_key_of(s) for s in slots]
            assert "reset_key" not in back.reply
            assert back.sockets == reg.sockets  # the app keeps serving on what it had
            assert again.status()["slots"]["awaiting_resume"] == []
        reg.close()


def test_received_worker_sockets_are_close_on_exec(daemon: Daemon) -> None:
    """A worker socket must not leak into programs an app runs (CGI, helpers)."""
    with ControlClient(daemon.path) as c:
        reg = c.register("web", ["h3"])
        try:
            assert reg.sockets and all(not s.get_inheritable() for s in reg.sockets)
        finally:
            reg.close()


@pytest.mark.parametrize("allow_unjailed", [False, True])
def test_no_sockets_for_another_uid_without_the_jail(daemon: Daemon,
                                                     allow_unjailed: bool) -> None:
    """Without the socket jail any holder of a worker socket can take the whole port, so the
    daemon (its real ``socket_refusal``, on a daemon whose jail failed to attach) hands
    sockets only to its own uid, unless the config accepts the risk."""
    from types import SimpleNamespace

    from steerd.daemon.config import SecurityConfig
    from steerd.daemon.service import Daemon as SteerdDaemon

    config = dataclasses.replace(daemon.config,
                                 security=SecurityConfig(allow_unjailed=allow_unjailed))
    state = SimpleNamespace(jail=None, config=config, _jail_error="no cgroup v2 here",
                            steering_attached=True)
    daemon.server.socket_refusal = lambda uid: SteerdDaemon.socket_refusal(state, uid)  # type: ignore[arg-type]

    def child(emit: Callable[[dict[str, object]], None]) -> object:
        c = ControlClient(daemon.path)
        try:
            reg = c.register("nb", ["nb"], ["nobody.example"])
            emit({"slots": [w["slot"] for w in reg.workers]})
            return c, reg
        except ControlError as e:
            emit({"refused": [e.reason, str(e)]})
            return c

    pid, out_fd, go_fd = fork_as(child, [])
    try:
        out = read_json_line(out_fd)
    finally:
        assert reap(pid, out_fd, go_fd) == 0
    if allow_unjailed:
        assert "slots" in out, out
    else:
        assert out["refused"] == [
            "unjailed",
            f"register: the socket jail is not attached (no cgroup v2 here), so worker sockets "
            f"go only to uid {os.geteuid()}; [security] allow_unjailed = true overrides this "
            "(unsafe: see docs/SECURITY.md)"]
        assert not daemon.sink.workers
    with ControlClient(daemon.path) as c:  # the daemon's own uid still gets sockets
        c.register("mine", ["h3"]).close()


def test_no_sockets_before_a_steering_program_is_attached(daemon: Daemon) -> None:
    """On a first start the programs compile for seconds after the control socket opens;
    a worker socket joining a group with no program would get datagrams by the kernel's
    hash, so even root is told to come back (the daemon's real ``socket_refusal``)."""
    from types import SimpleNamespace

    from steerd.daemon.service import Daemon as SteerdDaemon

    state = SimpleNamespace(jail=None, config=daemon.config, _jail_error="",
                            steering_attached=False)
    daemon.server.socket_refusal = lambda uid: SteerdDaemon.socket_refusal(state, uid)  # type: ignore[arg-type]
    with ControlClient(daemon.path) as c:
        with pytest.raises(ControlError) as e:
            c.register("early", ["h3"])
        assert (e.value.reason, str(e.value)) == (
            "not_ready", "register: no steering program is attached yet (the daemon is "
            "starting: it compiles its programs); retry in a moment")
        assert not daemon.sink.workers  # no socket was made or put in the data plane
        state.steering_attached = True
        c.register("early", ["h3"]).close()
        assert set(daemon.sink.workers) == {0}


def test_learned_mode_is_recorded_and_refused_with_retry_always(daemon: Daemon) -> None:
    """A learned-mode registration reaches the socket sink (which lists the sockets for the
    learner) and status; with [flood] retry = "always" it is refused: a server that did not
    send steerd's Retry cannot complete the retried handshake."""
    from steerd.app.protocol import Steering
    from steerd.daemon.config import FloodConfig

    with ControlClient(daemon.path) as c:
        reg = c.register("plain", ["h3"], steering=Steering("learned", 8))
        try:
            slot = reg.workers[0]["slot"]
            assert reg.steering == Steering("learned", 8)
            assert daemon.sink.steering[slot] == Steering("learned", 8)
            gen = c.status()["apps"][0]["generations"][0]
            assert (gen["cid_mode"], gen["cid_len"]) == ("learned", 8)
            assert gen["workers"][0]["steering"] == {}
        finally:
            reg.close()
    daemon.server.config = dataclasses.replace(daemon.config, flood=FloodConfig(retry="always"))
    with ControlClient(daemon.path) as c:
        with pytest.raises(ControlError) as e:
            c.register("plain2", ["h3x"], steering=Steering("learned", 8))
        assert (e.value.reason, str(e.value)) == (
            "bad_request", 'register: learned mode cannot work with [flood] retry = "always": '
            "a server that did not send the Retry cannot complete the retried handshake "
            "(docs/DATAPLANE.md, learned mode)")
        c.register("layout", ["h3y"]).close()  # layout mode is unaffected


# -- tenant limits (issue 18 item 6) ---------------------------------------------------------


def control_errors(daemon: Daemon) -> dict[str, float]:
    """``steerd_control_errors_total`` by reason, as scraped."""
    return {
        s.labels["reason"]: s.value
        for f in text_string_to_metric_families(scrape(daemon)) for s in f.samples
        if s.name == "steerd_control_errors_total"
    }


UID_CONNECTIONS = {
    "ok": False, "op": None, "reason": "uid_connections",
    "error": f"too many control connections for uid {NOBODY} (limit 2 per uid, [limits] "
             "uid_control_connections)",
}


def test_control_connections_per_uid(make_daemon: Callable[..., Daemon]) -> None:
    """One uid (nobody, SO_PEERCRED) may hold 2 of the 8 connections: its third is refused
    with the exact error and closed; it gets one again once one of its own goes; other uids
    (root, exempt) still connect meanwhile; each refusal is counted."""
    daemon = make_daemon(control_connections=8, uid_control_connections=2)

    def child(emit: Callable[[dict[str, object]], None]) -> object:
        held = [ControlClient(daemon.path), ControlClient(daemon.path)]
        out: dict[str, object] = {"served": [c.status()["control_connections"] for c in held]}
        with ControlClient(daemon.path) as third:
            out["third"], _ = third.receive()
            try:
                third.receive()
                out["third_closed"] = False
            except ConnectionError:
                out["third_closed"] = True
        held.pop(0).close()
        # the daemon learns of the close on its own loop: retry until it has (deadline)
        refusals = 1
        deadline = time.monotonic() + 10
        while True:
            again = ControlClient(daemon.path)
            try:
                again.status()
                break
            except (ControlError, OSError) as e:  # refused: the reply, or ours met its close
                again.close()
                assert getattr(e, "reason", "uid_connections") == "uid_connections", e
                assert time.monotonic() < deadline, "the daemon never saw the close"
                refusals += 1
        held.append(again)
        out["refusals"] = refusals
        emit(out)
        return held  # both held until the parent says go

    pid, out_fd, go_fd = fork_as(child, [])
    try:
        out = read_json_line(out_fd)
        assert "error" not in out, out
        assert out["served"] == [1, 2] or out["served"] == [2, 2]
        assert out["third"] == UID_CONNECTIONS and out["third_closed"] is True
        roots = [ControlClient(daemon.path) for _ in range(3)]  # root: 5 of 8, no per-uid cap
        try:
            assert [c.status()["control_connections"] for c in roots][-1] == 5
        finally:
            for c in roots:
                c.close()
        assert control_errors(daemon)["uid_connections"] == out["refusals"]
    finally:
        assert reap(pid, go_fd, out_fd) == 0
    daemon.wait_until(lambda: daemon.server.connections == 0)


def test_uid_slot_limit_over_the_socket(make_daemon: Callable[..., Daemon]) -> None:
    """nobody replaces its app and keeps the old generation draining until its slots reach
    the limit (3): the next replace is refused with the exact error, counted, and hands out
    nothing; root still registers in the slots left."""
    daemon = make_daemon(uid_worker_slots=3)

    def child(emit: Callable[[dict[str, object]], None]) -> object:
        c = ControlClient(daemon.path)
        regs = [c.register("nb", ["nb"], ["nobody.example"], workers=2),
                c.register("nb", ["nb"], ["nobody.example"], workers=1, replace=True)]
        try:
            c.register("nb", ["nb"], ["nobody.example"], workers=1, replace=True)
            emit({"third": "accepted"})
        except ControlError as e:
            emit({"third": [e.reason, str(e)],
                  "states": [g["state"] for g in c.status()["apps"][0]["generations"]]})
        return c, regs

    pid, out_fd, go_fd = fork_as(child, [])
    try:
        out = read_json_line(out_fd)
        assert out["third"] == [
            "uid_slots", f"register: uid {NOBODY} holds 3 worker slots (draining generations "
            "and slots awaiting a resume included) and asks for 1: the limit is 3 per uid "
            "([limits] uid_worker_slots)"], out
        assert out["states"] == ["draining", "active"]
        assert set(daemon.sink.workers) == {0, 1, 2}  # nothing made for the refused one
        assert control_errors(daemon) == {"uid_slots": 1.0}
        with ControlClient(daemon.path) as c:
            reg = c.register("web", ["h3"], workers=4)
            assert [w["slot"] for w in reg.workers] == [3, 4, 5, 6]
            reg.close()
    finally:
        assert reap(pid, go_fd, out_fd) == 0
    daemon.sink.wait_for(lambda: not daemon.sink.workers)


def test_generations_per_app_over_the_socket(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(app_generations=2)
    with ControlClient(daemon.path) as c:
        regs = [c.register("web", ["h3"]), c.register("web", ["h3"], replace=True)]
        with pytest.raises(ControlError) as e:
            c.register("web", ["h3"], replace=True)
        assert (e.value.reason, str(e.value)) == (
            "generations", 'register: app "web" has 2 generations (1 active, 1 draining): the '
            "limit is 2 per app ([limits] app_generations); a draining generation must exit "
            "(deregister or close its control connection) before another replace")
        assert control_errors(daemon) == {"generations": 1.0}
        assert set(daemon.sink.workers) == {0, 1}
        for r in regs:
            r.close()
