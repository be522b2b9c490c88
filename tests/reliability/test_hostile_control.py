"""Issue 7 item 4: hostile control clients against the real daemon (``steerd run`` in a
namespace). Each abuse gets a clear error (a documented reason token and a sentence), the
daemon process holds no more FDs, worker slots or control connections afterwards than before,
its RSS stays put, and a real QUIC first flight is still routed at the end.

tests/daemon/test_control.py covers the protocol's error sentences one by one against the
in-process harness; here the same kinds of abuse come in bulk, against the real process, with
its /proc as the witness."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import threading
import time
from typing import Any

import pytest

from deploy.netns import NetnsPair
from steerd.app.client import ControlClient
from steerd.app.protocol import ControlError
from tests.daemon.test_control import fork_as, read_json_line, reap
from tests.e2e.conftest import Client, Daemon, quic_client, start_app
from tests.reliability.conftest import (
    CONTROL_BURST,
    CONTROL_CONNECTIONS,
    CONTROL_MESSAGE_BYTES,
    Usage,
    no_leak,
    settle,
    usage,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

FIGURES: dict[str, Any] = {}  # printed at the end (pytest -s) for docs/RELIABILITY.md


def raw(client: ControlClient, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> dict:
    client.send_raw(data, fds)
    reply, sockets = client.receive()
    for s in sockets:
        s.close()
    return reply


@pytest.fixture(scope="module")
def baseline(pair: NetnsPair, steerd: Daemon) -> Usage:
    """The daemon at rest after one register/deregister and one routed first flight (the
    daemon opens one socket lazily at its first re-injection: not a leak, so not counted)."""
    app = start_app(steerd, "warmup", ["warmup"])
    try:
        client = quic_client(pair, socket.AF_INET, ["warmup"])
        try:
            assert app.next_datagram() is not None
        finally:
            client.close()
    finally:
        app.close()
    return settle(steerd, lambda u: u.connections == 1)


@pytest.fixture
def before(steerd: Daemon, baseline: Usage) -> Usage:
    """The daemon at the start of one test: what the test must give back."""
    return settle(steerd, lambda u: u.connections == 1)


def test_unauthorized_uid_cannot_claim_or_touch_an_alpn(steerd: Daemon, before: Usage) -> None:
    """uid nobody (no ACL rule) may not claim a fresh ALPN, nor one root's app holds, nor
    deregister or drain root's app; root's app keeps its slot throughout."""
    with ControlClient(steerd.control) as owner:
        reg = owner.register("web", ["h3"])
        holding = usage(steerd)

        def child(emit: Any) -> object:
            out: dict[str, object] = {"uid": os.getuid()}
            with ControlClient(steerd.control) as c:
                for name, call in (
                    ("fresh", lambda: c.register("evil", ["evil"])),
                    ("taken", lambda: c.register("web", ["h3"], replace=True)),
                    ("deregister", lambda: c.deregister("web")),
                    ("drain", lambda: c.drain("web")),
                ):
                    try:
                        call()
                        out[name] = "accepted"
                    except ControlError as e:
                        out[name] = [e.reason, str(e)]
            emit(out)
            return None

        pid, out_fd, go_fd = fork_as(child, [])
        try:
            out = read_json_line(out_fd)
        finally:
            assert reap(pid, go_fd, out_fd) == 0
        assert "error" not in out, out
        assert out["uid"] == 65534
        assert out["fresh"] == [
            "acl_denied", 'register: uid 65534 may not claim ALPN "evil" for all server names'
        ]
        assert out["taken"][0] == "acl_denied", out["taken"]  # type: ignore[index]
        assert out["deregister"][0] == "not_registered", out["deregister"]  # type: ignore[index]
        assert out["drain"][0] == "not_registered", out["drain"]  # type: ignore[index]
        apps = {a["app"]: a for a in owner.status()["apps"]}
        assert set(apps) == {"web"} and apps["web"]["generations"][0]["state"] == "active"
        no_leak(steerd, holding)
        for s in reg.sockets:
            s.close()
    no_leak(steerd, before)


# (message, reason): one connection gets them all, in a row, and must stay usable.
_BIG = b'{"op": "status", "pad": "' + b"x" * (CONTROL_MESSAGE_BYTES * 4) + b'"}'
HOSTILE: list[tuple[str, bytes, str]] = [
    ("oversized", _BIG, "too_large"),
    ("just over the limit", b" " * (CONTROL_MESSAGE_BYTES - 14) + b'{"op":"status"}', "too_large"),
    ("truncated JSON", b'{"op": "register", "app": "web", "alp', "bad_json"),
    ("truncated UTF-8", b'{"op": "status", "id": "\xe2\x82"}', "bad_json"),
    ("not UTF-8", b"\xff\xfe\x00{", "bad_json"),
    ("two objects", b'{"op":"status"}{"op":"status"}', "bad_json"),
    ("NUL bytes", b"\x00" * 64, "bad_json"),
    ("array", b'[{"op": "status"}]', "bad_message"),
    ("string", b'"status"', "bad_message"),
    ("no op", b'{"app": "web"}', "unknown_op"),
    ("op of wrong type", b'{"op": ["status"]}', "unknown_op"),
    ("id of wrong type", b'{"op": "status", "id": {"a": 1}}', "bad_message"),
    ("unknown field", b'{"op": "deregister", "app": "x", "force": true}', "bad_message"),
    ("workers NaN", b'{"op": "register", "app": "a", "alpn": ["a"], "workers": NaN}',
     "bad_request"),
    ("workers 1e400", b'{"op": "register", "app": "a", "alpn": ["a"], "workers": 1e400}',
     "bad_request"),
    ("workers huge", b'{"op": "register", "app": "a", "alpn": ["a"], "workers": 99999999}',
     "bad_request"),
    ("workers true", b'{"op": "register", "app": "a", "alpn": ["a"], "workers": true}',
     "bad_request"),
    ("empty ALPN", b'{"op": "register", "app": "a", "alpn": [""]}', "bad_request"),
    ("ALPN > 255 bytes", b'{"op": "register", "app": "a", "alpn": ["' + b"a" * 256 + b'"]}',
     "bad_request"),
    ("app with NUL", b'{"op": "register", "app": "a\\u0000", "alpn": ["a"]}', "bad_request"),
    ("lone surrogate", b'{"op": "register", "app": "\\ud800", "alpn": ["a"]}', "bad_request"),
    ("resume not a list", b'{"op": "register", "app": "a", "alpn": ["a"], "resume": 3}',
     "bad_request"),
    ("load not a list", b'{"op": "load", "app": "a", "workers": {"0": 1}}', "bad_request"),
    ("load negative", b'{"op": "load", "app": "a", "workers": [{"slot": 0, "load": -1}]}',
     "bad_request"),
    ("deregister a stranger", b'{"op": "deregister", "app": "nobody-has-this"}',
     "not_registered"),
]


def test_oversized_truncated_and_malformed_messages(steerd: Daemon, before: Usage) -> None:
    replies = []
    with ControlClient(steerd.control) as c:
        for i, (name, data, reason) in enumerate(HOSTILE):
            reply = raw(c, data)
            replies.append((name, reply))
            assert reply["ok"] is False, name
            assert reply["reason"] == reason, (name, reply)
            assert reply["error"] and isinstance(reply["error"], str), name
            if i % 8 == 7:  # the connection keeps working between abuses
                assert c.status()["port"] == 4433
        assert c.status()["apps"] == []
    FIGURES["malformed_kinds"] = len(HOSTILE)
    no_leak(steerd, before)


@pytest.mark.parametrize(
    "data",
    [b"[" * 5000, b'{"op": "status", "id": ' + b"9" * 5000 + b"}"],
    ids=["nested-5000", "int-5000-digits"],
)
def test_json_bombs_are_bad_json(steerd: Daemon, data: bytes) -> None:
    with ControlClient(steerd.control) as c:
        reply = raw(c, data)
        assert reply["ok"] is False
        assert c.status()["apps"] == []  # the daemon survives either way
    assert reply["reason"] == "bad_json", reply


def test_infinite_load_is_refused(steerd: Daemon) -> None:
    with ControlClient(steerd.control) as c:
        reg = c.register("inf", ["inf"])
        try:
            slot = reg.workers[0]["slot"]
            reply = raw(
                c, b'{"op": "load", "app": "inf", "workers": [{"slot": %d, "load": Infinity}]}'
                % slot,
            )
            assert reply["reason"] == "bad_request", reply
        finally:
            for s in reg.sockets:
                s.close()


def test_wrong_numbers_of_fds_are_refused_and_closed(steerd: Daemon, before: Usage) -> None:
    """FDs attached where none belong, too few or the wrong sockets for a resume, the
    kernel's maximum (253) with a status, FDs with garbage: each refused, and the daemon's
    copies of every FD are closed (its FD count is back where it was). A resume presenting a
    non-socket is test_resume_with_a_pipe_leaks_no_fd."""
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with ControlClient(steerd.control) as c:
            cases = [
                ("status + 1 FD", b'{"op": "status"}', [r], "unexpected_fds"),
                ("status + 253 FDs", b'{"op": "status"}', [w] * 253, "unexpected_fds"),
                ("garbage + 3 FDs", b"\x01garbage", [r, w, udp.fileno()], "bad_json"),
                ("FDs alone", b"", [r, w], "bad_json"),
                ("register (no resume) + FD",
                 b'{"op": "register", "app": "f", "alpn": ["f"]}', [udp.fileno()],
                 "unexpected_fds"),
                ("resume, no FD",
                 b'{"op": "register", "app": "f", "alpn": ["f"], "resume": [0]}', [],
                 "bad_resume"),
                ("resume, too few FDs",
                 b'{"op": "register", "app": "f", "alpn": ["f"], "resume": [0, 1]}',
                 [udp.fileno()], "bad_resume"),
                ("resume, someone else's socket",
                 b'{"op": "register", "app": "f", "alpn": ["f"], "resume": [0]}',
                 [udp.fileno(), c.sock.fileno()], "bad_resume"),
            ]
            for name, data, fds, reason in cases:
                reply = raw(c, data, fds)
                assert (reply["ok"], reply["reason"]) == (False, reason), (name, reply)
                assert reply["error"], name
                FIGURES["fds_sent"] = FIGURES.get("fds_sent", 0) + len(fds)
            assert c.status()["apps"] == []
    finally:
        os.close(r)
        os.close(w)
        udp.close()
    after = no_leak(steerd, before)
    FIGURES["fds_after_fd_abuse"] = after.fds


def test_zero_length_message_ends_the_connection(steerd: Daemon, before: Usage) -> None:
    """Documented: on SEQPACKET an empty message reads as end of connection; the app's
    routes go with it (no half-open state)."""
    c = ControlClient(steerd.control)
    try:
        reg = c.register("empty", ["empty"])
        c.send_raw(b"")
        with pytest.raises(ConnectionError):
            c.receive()
        for s in reg.sockets:
            s.close()
    finally:
        c.close()
    no_leak(steerd, before)


def test_connection_flood_past_the_limit(steerd: Daemon, before: Usage) -> None:
    """Three times the connection limit at once: exactly the limit is served, every other
    connection gets too_many_connections and is closed (or, past the listen backlog, its
    connect() is refused by the kernel: EAGAIN); all of it is returned afterwards."""
    attempts = CONTROL_CONNECTIONS * 3
    held: list[ControlClient] = []
    backlog_full = served = refused = 0
    try:
        for _ in range(attempts):
            try:
                held.append(ControlClient(steerd.control, timeout=5))
            except BlockingIOError:
                backlog_full += 1
        # The refused become readable (reply, then end of connection); the served never
        # speak first. Await exactly that split (no send before: a request the daemon never
        # read would turn its close into ECONNRESET and lose the refusal).
        want = len(held) - CONTROL_CONNECTIONS
        deadline = time.monotonic() + 10
        readable: list[ControlClient] = []
        while len(readable) < want and time.monotonic() < deadline:
            ready, _, _ = select.select([c.sock for c in held], [], [], 0.5)
            readable = [c for c in held if c.sock in ready]
        assert len(readable) == want
        for c in held:
            if c in readable:
                reply, _ = c.receive()
                assert reply == {
                    "ok": False, "op": None, "reason": "too_many_connections",
                    "error": f"too many control connections (limit {CONTROL_CONNECTIONS})",
                }
                refused += 1
            else:
                assert c.status()["control_connections"] == CONTROL_CONNECTIONS
                served += 1
    finally:
        for c in held:
            c.close()
    assert served == CONTROL_CONNECTIONS
    assert served + refused + backlog_full == attempts
    FIGURES["connection_flood"] = {
        "attempts": attempts, "served": served, "refused_by_daemon": refused,
        "refused_by_backlog": backlog_full,
    }
    no_leak(steerd, before)


def _limit_refusal(e: Exception) -> bool:
    """Refused for the connection limit: the daemon's reply, or the kernel's (a full listen
    backlog: EAGAIN at connect; the daemon closing a refused connection we had already
    written to: ECONNRESET, its reply lost)."""
    if isinstance(e, ControlError):
        return e.reason == "too_many_connections"
    return isinstance(e, BlockingIOError | ConnectionError)


@pytest.mark.parametrize("threads", [4, 12], ids=["within-limit", "past-limit"])
def test_registration_churn(
    steerd: Daemon, baseline: Usage, before: Usage, threads: int
) -> None:
    """Many clients registering (two workers each, i.e. four sockets handed over) and going
    away — by deregister, by disconnect, or after a refused duplicate — as fast as they can.
    4 threads (two connections each) stay within the limit of 16 and must all succeed; 12
    threads want 24 connections: some are refused for the limit, the others succeed. Either
    way every slot is free and every FD closed afterwards."""
    rounds = 60 if threads == 4 else 20
    errors: list[str] = []
    counts = {"registered": 0, "duplicate_refused": 0, "limit_refused": 0}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            counts[key] += 1

    def worker(t: int) -> None:
        app = f"churn{t}"
        for i in range(rounds):
            try:
                with ControlClient(steerd.control) as c:
                    reg = c.register(app, [app], workers=2)
                    try:
                        try:
                            with ControlClient(steerd.control) as dup:
                                dup.register(app, [app])
                        except ControlError as e:
                            if e.reason != "exists" and not _limit_refusal(e):
                                raise
                            count("duplicate_refused")
                        except (BlockingIOError, ConnectionError):
                            count("duplicate_refused")
                        if i % 2:
                            freed = c.deregister(app)
                            assert sorted(freed) == sorted(w["slot"] for w in reg.workers)
                    finally:
                        for s in reg.sockets:
                            s.close()
                    count("registered")
            except Exception as e:
                if _limit_refusal(e):
                    count("limit_refused")
                else:  # reported by the main thread
                    errors.append(f"{type(e).__name__}: {e}")
                    return

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(90)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:3]
    total = rounds * threads
    assert counts["registered"] + counts["limit_refused"] == total
    assert counts["duplicate_refused"] == counts["registered"]
    if threads == 4:
        assert counts["registered"] == total
    else:
        assert counts["registered"] > 0
    after = no_leak(steerd, before)
    FIGURES[f"churn_{threads}_threads"] = {
        **counts, "seconds": round(elapsed, 2),
        "rss_growth_kib_since_start": after.rss_kib - baseline.rss_kib,
    }


def test_request_flood_is_rate_limited(steerd: Daemon, before: Usage) -> None:
    """100 requests back to back on one connection (small replies, so they all fit the
    daemon's send buffer): the burst is served, the rest get rate_limited (not parsed: no id
    echoed), and the connection stays usable."""
    n = 100
    with ControlClient(steerd.control) as c:
        t0 = time.monotonic()
        for i in range(n):
            c.send_raw(json.dumps({"op": "deregister", "app": "x", "id": i}).encode())
        replies = [c.receive()[0] for _ in range(n)]
        elapsed = time.monotonic() - t0
        limited = [r for r in replies if r.get("reason") == "rate_limited"]
        served = [r for r in replies if r.get("reason") == "not_registered"]
        assert len(served) + len(limited) == n
        assert CONTROL_BURST <= len(served) <= CONTROL_BURST + 20 * elapsed + 1
        assert "id" not in limited[0] and limited[0]["error"].startswith("rate limit")
        assert [r["id"] for r in served[:3]] == [0, 1, 2]
    FIGURES["rate_limit"] = {"sent": n, "served": len(served), "rate_limited": len(limited)}
    no_leak(steerd, before)


def test_client_that_never_reads_is_disconnected(steerd: Daemon, before: Usage) -> None:
    """A registered app that floods requests and never reads a reply: the daemon does not
    block on it, disconnects it, and frees its worker slots."""
    c = ControlClient(steerd.control)
    try:
        reg = c.register("deaf", ["deaf"], workers=2)
        for s in reg.sockets:
            s.close()
        c.sock.setblocking(False)
        sent, cut = 0, False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not cut:
            try:
                c.sock.send(b'{"op": "status"}')
                sent += 1
            except BlockingIOError:
                select.select([], [c.sock], [], 1.0)  # our send buffer: the daemon reads
            except OSError as e:
                assert e.errno in (errno.EPIPE, errno.ECONNRESET), e
                cut = True
        assert cut, f"still connected after {sent} unread requests"
    finally:
        c.close()
    after = no_leak(steerd, before)
    FIGURES["never_reads"] = {"requests_before_disconnect": sent, "fds_after": after.fds}


def test_idle_connections_exhaust_the_limit_with_a_clear_error(
    steerd: Daemon, before: Usage
) -> None:
    """Known limit of the design (reported): the connection limit is global, so a local
    client allowed on the socket can hold every connection idle; a new app then gets a
    clear too_many_connections (not a hang) and registers as soon as they go."""
    idle = [ControlClient(steerd.control) for _ in range(CONTROL_CONNECTIONS)]
    try:
        for c in idle:  # every one accepted (no `steerd status` now: it would be refused)
            assert c.status()["control_connections"] <= CONTROL_CONNECTIONS
        late = ControlClient(steerd.control)
        try:
            reply, _ = late.receive()
            assert reply["reason"] == "too_many_connections"
        finally:
            late.close()
    finally:
        for c in idle:
            c.close()
    settle(steerd, lambda u: u.connections == 1)
    with ControlClient(steerd.control) as c:
        reg = c.register("late", ["late"])
        for s in reg.sockets:
            s.close()
    no_leak(steerd, before)


def test_daemon_still_routes_after_the_abuse(
    pair: NetnsPair, steerd: Daemon, baseline: Usage, before: Usage
) -> None:
    """After all the abuse above: a real app registers and a real aioquic first flight
    reaches it; the daemon's FDs are where they were before the first abuse and its RSS grew
    by little."""
    app = start_app(steerd, "survivor", ["survivor"])
    client: Client | None = None
    try:
        client = quic_client(pair, socket.AF_INET, ["survivor"])
        got = app.next_datagram()
        assert got is not None and tuple(got["from"]) == client.address
    finally:
        if client is not None:
            client.close()
        app.close()
    after = no_leak(steerd, before)
    FIGURES["end"] = {
        "fds_before": baseline.fds, "fds_after": after.fds,
        "rss_before_kib": baseline.rss_kib, "rss_after_kib": after.rss_kib,
        "free_slots_before": baseline.free_slots, "free_slots_after": after.free_slots,
    }
    print("hostile control figures:", json.dumps(FIGURES))
    assert (after.fds, after.free_slots) == (baseline.fds, baseline.free_slots)
    assert after.rss_kib - baseline.rss_kib < 16 * 1024


def test_resume_with_a_pipe_leaks_no_fd(steerd: Daemon, before: Usage) -> None:
    r, w = os.pipe()
    try:
        with ControlClient(steerd.control) as c:
            for _ in range(5):
                reply = raw(c, b'{"op": "register", "app": "f", "alpn": ["f"], "resume": [0]}',
                            [r, w])
                assert reply["reason"] == "unexpected_fds"  # sockets only (issue 18)
    finally:
        os.close(r)
        os.close(w)
    no_leak(steerd, before)
