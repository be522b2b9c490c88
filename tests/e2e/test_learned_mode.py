"""Learned mode end to end: unmodified aioquic and qh3 servers (their own random CIDs) behind
``steerd exec --cid-mode learned``, beside an SDK app, reached by real clients.

One daemon and three apps for the whole module (started once, each on its own server names
so their claims do not collide): ``plain-aioquic`` and ``plain-qh3`` (tests/e2e/
plain_h3_server.py in learned mode, two worker slots each, served by one process: every
socket answers with the library's own random 8-byte CIDs) and ``sdk-web`` (the SDK demo site,
layout mode). Clients: aioquic and qh3 (deploy.quicclient.Session), ngtcp2's gtlsclient and
headless Chromium (plain-aioquic only: the qh3 server never answers Chromium's ClientHello,
with or without steerd). The mismatch tests register servers of their own and read what
``steerd exec`` says on stderr.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deploy.netns import NetnsPair
from deploy.proclines import Lines
from quic.cid import CidLayout
from quic.packet import parse_long_header
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, PYTHON, ROOT, STEERD, Daemon, _read_line
from tests.quic.reference import is_long_header
from tests.sdk.harness import (  # noqa: F401 - fixtures
    RequestFailed,
    RunningApp,
    Session,
    chromium_get,
    daemon,
    gtlsclient_get,
    kill_group,
    pair,
    session,
    sessions,
    start_demo_app,
)

pytestmark = pytest.mark.root

PLAIN = str(Path(__file__).with_name("plain_h3_server.py"))
CID_LEN = 8  # aioquic's and qh3's own CIDs
# The daemon runs without a [cid] section: the default layout (9-byte CIDs).
LAYOUT = CidLayout()

# Server names: each app claims its own (h3, name) pairs. gtlsclient (ngtcp2 0.12) always
# sends SNI "localhost", and harness.session() asks for "localhost" too: plain-aioquic's.
AIOQUIC_NAME = "aioquic.learned.test"
QH3_NAME = "qh3.learned.test"
SDK_NAME = "sdk.layout.test"
NAMES = {"aioquic": AIOQUIC_NAME, "qh3": QH3_NAME}
APPS = {"aioquic": "plain-aioquic", "qh3": "plain-qh3"}
WARNING_KINDS = ("off_layout", "wrong_length", "refused", "quota")


@dataclass
class Plain:
    """A plain server under ``steerd exec`` (its own process group); exec's stderr is read
    by a thread all the time (so the pipe never fills) and kept in ``stderr``."""

    name: str
    proc: subprocess.Popen[str]
    workdir: Path  # its certificate is workdir/cert/cert.pem (what chromium_get reads)
    errors: Lines
    stderr: list[str] = field(default_factory=list)

    def stderr_line(self, pred: Callable[[str], bool], timeout: float) -> str | None:
        """The first stderr line (seen before or arriving within ``timeout``) satisfying
        ``pred``; None on timeout or end of stream."""
        for line in self.stderr:
            if pred(line):
                return line
        deadline = time.monotonic() + timeout
        while (line := self.errors.get(deadline - time.monotonic())) is not None:
            self.stderr.append(line)
            if pred(line):
                return line
        return None

    def stderr_now(self) -> str:
        """Everything exec (and the server) wrote to stderr so far."""
        while (line := self.errors.get(0)) is not None:
            self.stderr.append(line)
        return "".join(self.stderr)

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_plain(daemon: Daemon, stack: str, name: str, *exec_args: str) -> Plain:  # noqa: F811
    workdir = Path(tempfile.mkdtemp(prefix=f"steerd-plain-{stack}-"))
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "exec",
         "--control", daemon.control, "--app", name, *exec_args, "--",
         PYTHON, PLAIN, "--stack", stack, "--cert-dir", str(workdir / "cert"), "--name", name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)
    # proclines.Lines reads a process's stdout; this one reads exec's stderr the same way.
    plain = Plain(name, proc, workdir, Lines(SimpleNamespace(stdout=proc.stderr)))  # type: ignore[arg-type]
    line = _read_line(proc, 30)
    if line is None or "ready" not in line:
        plain.stop()
        raise AssertionError(f"{name} did not start: {line!r} {plain.stderr_now()!r}")
    return plain


def learned(daemon: Daemon, stack: str, name: str, *names: str) -> Iterator[Plain]:  # noqa: F811
    app = start_plain(daemon, stack, name, "--alpn", "h3", "--cid-mode", "learned",
                      "--cid-len", str(CID_LEN), "--workers", "2",
                      *[a for n in names for a in ("--server-name", n)])
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def plain_aioquic(daemon: Daemon) -> Iterator[Plain]:  # noqa: F811
    yield from learned(daemon, "aioquic", APPS["aioquic"], AIOQUIC_NAME, "localhost")


@pytest.fixture(scope="module")
def plain_qh3(daemon: Daemon) -> Iterator[Plain]:  # noqa: F811
    yield from learned(daemon, "qh3", APPS["qh3"], QH3_NAME)


@pytest.fixture(scope="module")
def sdk_web(daemon: Daemon) -> Iterator[RunningApp]:  # noqa: F811
    app = start_demo_app(daemon, "h3", "--server-name", SDK_NAME, workers=2, name="sdk-web")
    try:
        yield app
    finally:
        assert app.stop() == 0, "the SDK app did not exit 0 after SIGTERM (drain)"


def plain_server(request: pytest.FixtureRequest, stack: str) -> Plain:
    return request.getfixturevalue(f"plain_{stack}")  # type: ignore[no-any-return]


class Recording:
    """A client socket that keeps every datagram sent through it (Session only calls
    sendto, recvfrom, fileno, getsockname and close)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, address: Any) -> int:
        self.sent.append(bytes(data))
        return self.sock.sendto(data, address)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def client_socket(pair: NetnsPair, family: int = socket.AF_INET) -> Recording:  # noqa: F811
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    sock.bind((pair.client_addr(family), 0))
    return Recording(sock)


def connect(pair: NetnsPair, stack: str, server_name: str,  # noqa: F811
            family: int = socket.AF_INET, timeout: float = 5.0) -> Session:
    """A Session from the client namespace asking for ``server_name`` (harness.session()
    always asks for "localhost")."""
    return Session(stack, client_socket(pair, family),  # type: ignore[arg-type]
                   (pair.server_addr(family), PORT), "h3", server_name=server_name,
                   timeout=timeout)


def last_dcid(s: Session) -> bytes:
    """The DCID (CID_LEN bytes: the server's CIDs) of the last short-header packet the
    client sent on its current socket."""
    for data in reversed(s.sock.sent):  # type: ignore[attr-defined]
        if not is_long_header(data[0]):
            return data[1 : 1 + CID_LEN]
    raise AssertionError("the client sent no short-header packet")


def server_cid(s: Session) -> bytes:
    """The server's first CID: the SCID of the first long-header packet it sent."""
    for data in s.received:
        if is_long_header(data[0]):
            return parse_long_header(data).scid
    raise AssertionError("no long-header packet received")


def counters(daemon: Daemon) -> dict[str, int]:  # noqa: F811
    return dict(daemon.status()["counters"])


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after[name] - before[name]


def generation(status: dict[str, Any], app: str) -> dict[str, Any]:
    """The app's active generation in a ``steerd status --json``."""
    (record,) = [a for a in status["apps"] if a["app"] == app]
    (gen,) = [g for g in record["generations"] if g["state"] == "active"]
    return dict(gen)


def steering(status: dict[str, Any], app: str) -> dict[int, dict[str, int]]:
    """slot -> the per-worker steering statistics (only nonzero ones are listed)."""
    return {w["slot"]: dict(w["steering"]) for w in generation(status, app)["workers"]}


# -- 1. plain servers, Python clients ------------------------------------------------------

def stacks() -> list[Any]:
    """(server, client) pairs, every combination."""
    return [pytest.param(server, client, id=f"{server}-server-{client}-client")
            for server in ("qh3", "aioquic") for client in ("qh3", "aioquic")]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize(("server", "client"), stacks())
def test_plain_server_serves_in_learned_mode(
    request: pytest.FixtureRequest, daemon: Daemon, sessions: list[Session],  # noqa: F811
    server: str, client: str, family: int,
) -> None:
    """Each plain server answers each client stack over IPv4 and IPv6, a small and a 100 KB
    response on one connection: every packet after the client's first flight reaches the
    server by the CID the kernel learned from the server's own Initial."""
    app = plain_server(request, server)
    before = counters(daemon)
    s = connect(daemon.pair, client, NAMES[server], family)
    sessions.append(s)
    assert s.get("/hello") == (200, f"{app.name} /hello".encode())
    status, body = s.get("/bytes/100000")
    assert (status, len(body)) == (200, 100000)
    cid = server_cid(s)
    assert len(cid) == CID_LEN and LAYOUT.decode(cid) is None  # the library's own CID
    after = counters(daemon)
    assert delta(before, after, "learn_cid") >= 1
    assert delta(before, after, "steer_learned_cid") >= 5  # ACKs of a 100 KB response (9+ seen)
    for name in ("learn_conflict", "learn_refused", "learn_full", "steer_learned_dead_slot",
                 "steer_drop_short_not_ours"):
        assert delta(before, after, name) == 0, name


def test_plain_aioquic_serves_in_learned_mode(
    daemon: Daemon, plain_aioquic: Plain, sessions: list[Session]  # noqa: F811
) -> None:
    """harness.session() (SNI "localhost", claimed by plain-aioquic) reaches it too."""
    s = session(daemon.pair, "h3")
    sessions.append(s)
    assert s.get("/hello") == (200, b"plain-aioquic /hello")


# -- 2. non-Python clients ------------------------------------------------------------------

def test_ngtcp2_client_gets_the_plain_page(
    pair: NetnsPair, daemon: Daemon, plain_aioquic: Plain  # noqa: F811
) -> None:
    """gtlsclient (18-byte client DCID, SNI "localhost") gets plain-aioquic's answer."""
    before = counters(daemon)
    out, saved = gtlsclient_get(pair, "localhost", ["/"])
    page = saved.get("index.html", b"").decode()
    assert out.returncode == 0, out.stderr[-2000:]
    assert page == "plain-aioquic /", out.stderr[-2000:]
    after = counters(daemon)
    assert delta(before, after, "learn_cid") >= 1
    assert delta(before, after, "steer_learned_cid") + delta(before, after,
                                                             "steer_learned_peer") >= 1


def test_chromium_loads_from_a_plain_server(
    daemon: Daemon, plain_aioquic: Plain, sdk_web: RunningApp,  # noqa: F811
) -> None:
    """Headless Chromium (ClientHello over two datagrams, scrambled CRYPTO) forced onto
    HTTP/3 for plain-aioquic's name, with the SDK site on the same ALPN beside it.
    (Not the qh3 server: it never answers Chromium's ClientHello, with or without steerd.)"""
    out = chromium_get(daemon.pair, AIOQUIC_NAME, plain_aioquic, "/from-chromium")  # type: ignore[arg-type]
    assert "plain-aioquic /from-chromium" in out.stdout, out.stderr[-2000:]


# -- 3. NAT rebinding -------------------------------------------------------------------------

@pytest.mark.parametrize(("server", "client"), stacks())
def test_nat_rebinding_in_learned_mode(
    request: pytest.FixtureRequest, pair: NetnsPair, daemon: Daemon,  # noqa: F811
    sessions: list[Session], server: str, client: str,  # noqa: F811
) -> None:
    """After a request the client continues from a new source port: its first packet from
    there carries the learned server CID (nothing knows the new address yet), so only the
    learned CID can steer it; the server's answers to the new port teach the new address."""
    app = plain_server(request, server)
    s = connect(pair, client, NAMES[server])
    sessions.append(s)
    assert s.get("/before") == (200, f"{app.name} /before".encode())
    cid = server_cid(s)
    assert len(cid) == CID_LEN and LAYOUT.decode(cid) is None
    old_port = s.sock.getsockname()[1]
    before = counters(daemon)
    fresh = client_socket(pair)
    s.swap_socket(fresh)  # type: ignore[arg-type]
    assert fresh.getsockname()[1] != old_port
    assert s.get("/after") == (200, f"{app.name} /after".encode())
    assert last_dcid(s) == cid  # still the learned CID, not a NEW_CONNECTION_ID one
    after = counters(daemon)
    assert delta(before, after, "steer_learned_cid") >= 1
    assert delta(before, after, "learn_peer") >= 1  # the new address:port
    assert delta(before, after, "steer_drop_short_not_ours") == 0


@pytest.mark.parametrize(("server", "client"), stacks())
def test_new_connection_id_on_the_same_address_in_learned_mode(
    request: pytest.FixtureRequest, daemon: Daemon, sessions: list[Session],  # noqa: F811
    server: str, client: str,
) -> None:
    """The client moves to a CID the server gave it in NEW_CONNECTION_ID (encrypted, so
    never learned) from the same address: the learned client address steers it."""
    app = plain_server(request, server)
    s = connect(daemon.pair, client, NAMES[server])
    sessions.append(s)
    assert s.get("/before") == (200, f"{app.name} /before".encode())
    cid = server_cid(s)
    assert last_dcid(s) == cid
    before = counters(daemon)
    # the switch needs a spare CID from the server's NEW_CONNECTION_ID frames, which may
    # arrive after the first answer: switch (a no-op without one) until the client has moved
    deadline = time.monotonic() + 5
    n = 0
    while last_dcid(s) == cid:
        assert time.monotonic() < deadline, "the client never got a spare CID"
        n += 1
        s.conn.change_connection_id()
        assert s.get(f"/after-{n}") == (200, f"{app.name} /after-{n}".encode())
    after = counters(daemon)
    assert delta(before, after, "steer_learned_peer") >= 1
    assert delta(before, after, "steer_drop_short_not_ours") == 0


# -- 4. mixed load ------------------------------------------------------------------------------

PER_APP = 40
TARGETS = {"plain-aioquic": AIOQUIC_NAME, "plain-qh3": QH3_NAME, "sdk-web": SDK_NAME}
LEARNED_APPS = ("plain-aioquic", "plain-qh3")


def grown(old: dict[int, dict[str, int]], new: dict[int, dict[str, int]], slot: int,
          name: str) -> int:
    return new[slot].get(name, 0) - old.get(slot, {}).get(name, 0)


# Ports no earlier test of the module drew: the kernel's ephemeral range is 32768-60999.
FRESH_PORTS = "61000 64999"


@pytest.fixture
def fresh_client_ports(daemon: Daemon) -> Iterator[None]:  # noqa: F811
    """Client sockets bound from ports no earlier connection of the module used. A learned
    client address lives learned_ttl (300 s) and the first writer keeps it: a new
    connection to the other learned app from a port an earlier one drew would meet that
    entry (counted as learn_conflict, rightly), which is port reuse, not what this test is
    about. net.ipv4.ip_local_port_range is per network namespace."""
    path = "/proc/sys/net/ipv4/ip_local_port_range"

    def sysctl(value: str | None = None) -> str:
        args = ["nsenter", f"--net={netns_path(daemon.pair.client)}", "sh", "-c",
                f"echo '{value}' > {path}" if value else f"cat {path}"]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()

    old = " ".join(sysctl().split())
    sysctl(FRESH_PORTS)
    try:
        yield
    finally:
        sysctl(old)


@pytest.mark.usefixtures("fresh_client_ports")
def test_mixed_load_across_learned_and_layout_apps(
    daemon: Daemon, plain_aioquic: Plain, plain_qh3: Plain, sdk_web: RunningApp,  # noqa: F811
    sessions: list[Session],  # noqa: F811
) -> None:
    """PER_APP connections to each of the three apps, all open at once, client stacks
    alternating, two requests each: every answer comes from the app the connection asked
    for, the learned apps' workers are reached by learned CIDs, the SDK app's by its layout."""
    before_status = daemon.status()
    before = before_status["counters"]
    conns: list[tuple[str, Session]] = []
    for i in range(PER_APP):
        for j, (app, name) in enumerate(TARGETS.items()):
            s = connect(daemon.pair, ("aioquic", "qh3")[(i + j) % 2], name, timeout=10)
            sessions.append(s)
            conns.append((app, s))  # every first flight is out before any handshake ends

    failures: list[str] = []
    misroutes: list[str] = []

    def served_by(app: str, body: bytes) -> str:
        return str(json.loads(body)["app"]) if app == "sdk-web" else body.decode().split()[0]

    for round_ in (1, 2):
        pending: list[tuple[str, Session, str, int]] = []
        for i, (app, s) in enumerate(conns):
            path = "/count" if app == "sdk-web" else f"/r{round_}-{i}"
            try:
                pending.append((app, s, path, s.send_get(path)))
            except (RequestFailed, OSError) as exc:
                failures.append(f"{app} ({s.stack}) #{i}: {exc}")
        for app, s, path, sid in pending:
            try:
                status, body = s.response(sid, path)
            except (RequestFailed, OSError) as exc:
                failures.append(f"{app} ({s.stack}) {path}: {exc}")
                continue
            if status != 200:
                failures.append(f"{app} ({s.stack}) {path}: status {status}")
            elif (who := served_by(app, body)) != app:
                misroutes.append(f"{app} ({s.stack}) {path}: served by {who}")
    assert (len(failures), len(misroutes)) == (0, 0), (failures[:5], misroutes[:5])

    status = daemon.status()
    after = status["counters"]
    for name in ("steer_learned_dead_slot", "learn_conflict", "learn_refused", "learn_full",
                 "steer_drop_short_not_ours"):
        assert delta(before, after, name) == 0, name
    assert delta(before, after, "learn_cid") >= len(LEARNED_APPS) * PER_APP
    for app in TARGETS:
        gen = generation(status, app)
        old, new = steering(before_status, app), steering(status, app)
        assert len(new) == 2
        for slot, stats in new.items():
            assert stats.get("egress_off_mode", 0) == 0, (app, slot, stats)
            assert stats.get("egress_refused", 0) == 0, (app, slot, stats)
        steered = {slot: grown(old, new, slot, "steered_learned_cid") for slot in new}
        learned_here = {slot: grown(old, new, slot, "egress_learned") for slot in new}
        if app == "sdk-web":
            assert (gen["cid_mode"], "cid_len" in gen) == ("layout", False)
            assert set(steered.values()) == set(learned_here.values()) == {0}, new
        else:
            assert (gen["cid_mode"], gen["cid_len"]) == ("learned", CID_LEN)
            # both workers (served by one process) got connections, each learned its own
            # CIDs and was reached by them: at least once per connection
            assert all(n >= 1 for n in learned_here.values()), (app, new)
            assert sum(learned_here.values()) >= PER_APP, (app, new)
            assert all(n >= 1 for n in steered.values()), (app, new)
            assert sum(steered.values()) >= PER_APP, (app, new)
    for plain in (plain_aioquic, plain_qh3):
        text = plain.stderr_now()
        assert not any(f": {kind}: " in text for kind in WARNING_KINDS), text

    # The sweep (every 5 s) counts what each worker holds: the learned apps' workers now
    # hold a CID and a client address more per connection (nothing expires within the
    # 300 s TTL), the SDK app's nothing.
    def held(st: dict[str, Any], app: str, name: str) -> int:
        return sum(w.get(name, 0) for w in steering(st, app).values())

    want = {(app, name): held(before_status, app, name) + PER_APP for app in LEARNED_APPS
            for name in ("learned_cids", "learned_peers")}
    deadline = time.monotonic() + 15
    while not all(held(status, app, name) >= n for (app, name), n in want.items()):
        assert time.monotonic() < deadline, {app: steering(status, app) for app in TARGETS}
        status = daemon.status()
    assert held(status, "sdk-web", "learned_cids") == held(status, "sdk-web", "learned_peers") == 0


# -- 5. steerd exec reports a mode mismatch -------------------------------------------------

@pytest.mark.parametrize(("exec_args", "kind", "cid_len"), [
    ((), "off_layout", None),
    (("--cid-mode", "learned", "--cid-len", "12"), "wrong_length", 12),
], ids=["layout-mode", "wrong-cid-len"])
def test_exec_reports_a_cid_mode_mismatch(
    daemon: Daemon, sessions: list[Session],  # noqa: F811
    exec_args: tuple[str, ...], kind: str, cid_len: int | None,
) -> None:
    """A plain aioquic server registered in a mode its CIDs do not follow: its clients'
    packets after the first flight find no worker, so the request fails; ``steerd exec``
    sees the off-mode egress in the status and says so once, on stderr."""
    name = f"mismatch-{kind.replace('_', '-')}"
    server_name = f"{kind.replace('_', '-')}.mismatch.test"
    app = start_plain(daemon, "aioquic", name, "--alpn", "h3", "--server-name", server_name,
                      *exec_args)
    try:
        s = connect(daemon.pair, "aioquic", server_name, timeout=2)
        sessions.append(s)
        with pytest.raises(RequestFailed):
            s.get("/never")
        assert len(server_cid(s)) == CID_LEN  # the server did answer the first flight
        prefix = f"steerd exec: {name}: {kind}: "
        line = app.stderr_line(lambda text: text.startswith(prefix), 10)
        assert line is not None, app.stderr_now()
        status = daemon.status()
        gen = generation(status, name)
        assert gen["cid_mode"] == ("learned" if cid_len else "layout")
        assert gen.get("cid_len") == cid_len
        (stats,) = steering(status, name).values()
        assert stats.get("egress_off_mode", 0) >= 1 and "egress_learned" not in stats, stats
        # said once, though every poll since (one a second, for the seconds the request
        # spent failing) found the same problem
        text = app.stderr_now()
        assert text.count(prefix) == 1, text
        assert not any(f": {other}: " in text for other in WARNING_KINDS if other != kind), text
    finally:
        app.stop()
