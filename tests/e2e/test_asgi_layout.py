"""An unmodified ASGI app on hypercorn (``python -m steerd.app.asgi``) behind a real daemon.

Why: steerd.app.asgi is the supported way to serve an ASGI app behind steerd without the SDK;
what it must prove is that hypercorn's connections follow steerd's rules. The Starlette
site (deploy/apps/asgi_site.py) runs under ``steerd exec --workers 2`` (one hypercorn
process per slot) beside the SDK's file service (ALPN smb) on one port. aioquic and qh3
(IPv4 and IPv6, switching to server-issued CIDs), ngtcp2's gtlsclient and headless Chromium
fetch from it; a capture on the server's veth, read by tshark, shows every server CID of
every connection naming one slot of the app that served it, and the daemon's counters show
every first flight routed to the app that owns its ALPN. A killed worker's clients get the
daemon's stateless reset with the token hypercorn advertised (steerd's HMAC rule), and an
Initial whose DCID names the app's slot makes no connection. In-process tests check the
accept rule (shared with the SDK: ``CidIssuer.admit_initial``) without a daemon.

Fixtures come from tests/sdk/harness.py (namespace pair, daemon, client sessions) and
tests/sdk/test_wire.py (the capture); every app is stopped, and its process group killed,
even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypercorn.protocol.quic as hypercorn_quic
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.udp_server import UDPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.typing import ConnectionState

from deploy.apps.asgi_site import NAME, PAGE_MARK, pattern
from deploy.apps.certs import ensure_cert
from deploy.netns import NetnsPair, netns_pair
from quic.packet import PacketType, parse_long_header
from quic.reset import reset_token
from quic.token import build_retry_token
from steerd.app.asgi import SteerdQuicProtocol
from steerd.app.sdk import CidIssuer
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, PYTHON, ROOT, STEERD, Daemon, _read_line, start_daemon
from tests.sdk.harness import (  # noqa: F401 - daemon, pair, sessions: fixtures
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
from tests.sdk.test_internals import KEY, LAYOUT, SLOT, _daemon_retry_cid, cert  # noqa: F401
from tests.sdk.test_wire import Capture, _clients_seen, _packets, capture  # noqa: F401

pytestmark = pytest.mark.root

HOST = "www.asgi.test"
RESET_HOST = "reset.asgi.test"
SITE, FILES = "asgi", "files"
BIG = 300_000  # /bytes?n= for the CLI clients: a body over many packets


def start_asgi_site(daemon: Daemon, name: str, names: list[str], workers: int) -> RunningApp:  # noqa: F811
    """``steerd exec ... -- python -m steerd.app.asgi deploy.apps.asgi_site:app`` in the server
    namespace, with a demo certificate for ``names``; returns once its ready line came."""
    workdir = Path(tempfile.mkdtemp(prefix="steerd-asgi-"))
    cert_file, key_file = ensure_cert(workdir / "cert", names)
    err = workdir / "stderr.log"
    with open(err, "w") as errf:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "exec",
             "--control", daemon.control, "--app", name, "--alpn", "h3",
             *[arg for n in names for arg in ("--server-name", n)],
             "--workers", str(workers), "--",
             PYTHON, "-m", "steerd.app.asgi", "deploy.apps.asgi_site:app",
             "--certfile", str(cert_file), "--keyfile", str(key_file), "--graceful-timeout", "1"],
            stdout=subprocess.PIPE, stderr=errf, text=True, cwd=ROOT, start_new_session=True,
        )
    line = _read_line(proc, 30)
    if line is None or '"ready"' not in line:
        kill_group(proc.pid)
        proc.wait(5)
        log = err.read_text()
        shutil.rmtree(workdir, ignore_errors=True)
        raise AssertionError(f"steerd.app.asgi did not become ready: {line!r}\n{log}")
    return RunningApp(name, proc, json.loads(line), workdir, extra={"stderr": err})


@pytest.fixture(scope="module")
def apps(daemon: Daemon) -> Iterator[tuple[RunningApp, RunningApp]]:  # noqa: F811
    """The ASGI site (two hypercorn workers) and the SDK's file service (ALPN smb)."""
    site = start_asgi_site(daemon, SITE, [HOST, "localhost"], workers=2)
    try:
        files = start_demo_app(daemon, "file", workers=1, name=FILES)
    except BaseException:
        site.stop()
        raise
    try:
        yield site, files
    finally:
        log = site.extra["stderr"].read_text()
        codes = (site.stop(), files.stop())
        assert codes == (0, 0), f"apps exited {codes} after SIGTERM (drain)\n{log[-3000:]}"


def _routed(of: Daemon) -> dict[str, float]:
    """steerd_first_flights_total{result="routed"} by app."""
    got: dict[str, float] = {}
    for m in re.finditer(r'^steerd_first_flights_total\{app="([^"]*)",result="routed"\} (\S+)$',
                         of.metrics(), re.M):
        got[m[1]] = float(m[2])
    return got


def _whoami(site: RunningApp, body: bytes) -> int:
    """The slot that answered a /whoami, checked to be one of ``site``'s workers."""
    info = json.loads(body)
    assert info["app"] == NAME and info["steerd_app"] == site.name, info
    assert info["http_version"] == "3", info
    slots = [slot for slot, pid in site.pids.items() if pid == info["pid"]]
    assert slots, f"pid {info['pid']} is no worker of {site.name}: {site.pids}"
    return slots[0]


def _gtlsclient(net: NetnsPair, paths: list[str]) -> dict[str, bytes]:
    """ngtcp2's gtlsclient GETs ``paths`` on one connection; the files it saved by name."""
    out, saved = gtlsclient_get(net, HOST, paths)
    assert out.returncode == 0, out.stderr[-2000:]
    return saved


def _hex(v: str) -> bytes:
    return bytes.fromhex(v.replace(":", ""))


def _slots_by_client(packets: list[dict[str, list[str]]], cid_len: int,
                     decode: Any) -> dict[tuple[str, int], dict[str, Any]]:
    """Per client (address, port): the slot every server CID on the wire decodes to — the
    SCIDs of the server's long headers, the client's long-header DCIDs but its first
    (client-chosen) one, and short-header DCIDs (read at the layout's CID length, as the
    steering program reads them) — and how many of each were seen."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for layers in packets:
        src = (layers.get("ip.src") or layers["ipv6.src"])[0]
        dst = (layers.get("ip.dst") or layers["ipv6.dst"])[0]
        sport, dport = int(layers["udp.srcport"][0]), int(layers["udp.dstport"][0])
        from_client = dport == PORT
        client = (src, sport) if from_client else (dst, dport)
        payload = _hex(layers["udp.payload"][0])
        dcids = [_hex(d) for d in layers.get("quic.dcid", [])]
        scids = [_hex(d) for d in layers.get("quic.scid", [])]
        c = seen.setdefault(client, {"slots": set(), "original": None, "server_scid": 0,
                                     "client_dcid": 0, "short_dcid": 0})
        if from_client and c["original"] is None:
            assert payload[0] & 0x80, f"{client}: a connection starts with an Initial"
            c["original"] = dcids[0]
        if not from_client:
            for scid in scids:
                c["slots"].add(decode(scid))
                c["server_scid"] += 1
        elif payload[0] & 0x80:
            for dcid in dcids:
                if dcid != c["original"]:
                    c["slots"].add(decode(dcid))
                    c["client_dcid"] += 1
        else:
            c["slots"].add(decode(payload[1:1 + cid_len]))
            c["short_dcid"] += 1
    return seen


def test_real_clients_get_the_asgi_site_with_layout_cids(
    pair: NetnsPair, daemon: Daemon, apps: tuple[RunningApp, RunningApp],  # noqa: F811
    capture: Capture, sessions: list[Session],  # noqa: F811
) -> None:
    site, files = apps
    layout = site.layout
    assert len(site.slots) == 2 and len(set(site.pids.values())) == 2, "a process per slot"
    before = _routed(daemon)

    # Chromium (headless, HTTP/3 forced): JSON of /whoami, shown by --dump-dom
    out = chromium_get(pair, HOST, site, "/whoami")
    found = re.search(r"\{[^<]*\}", out.stdout)
    assert found is not None, out.stderr[-2000:]
    _whoami(site, found[0].replace("&quot;", '"').encode())

    # ngtcp2's gtlsclient: the page and a large body
    saved = _gtlsclient(pair, ["/", f"/bytes?n={BIG}"])
    assert saved.get("index.html") == (PAGE_MARK + "\n").encode(), sorted(saved)
    assert pattern(BIG) in saved.values(), {k: len(v) for k, v in saved.items()}

    # aioquic and qh3, IPv4 and IPv6, beside the SDK app: requests on fresh server CIDs
    expected: dict[tuple[str, int], int] = {}  # client -> the slot that served it
    smb: set[tuple[str, int]] = set()
    for stack in ("aioquic", "qh3"):
        for family in (socket.AF_INET, socket.AF_INET6):
            h3 = session(pair, "h3", stack, family)
            sessions.append(h3)
            fs = session(pair, "smb", stack, family)
            sessions.append(fs)
            status, page = h3.get("/")
            assert (status, page) == (200, (PAGE_MARK + "\n").encode())
            slots = set()
            for n in (0, 1, 65_536, BIG):
                status, body = h3.get(f"/bytes?n={n}")
                assert status == 200 and body == pattern(n), (n, len(body))
                status, body = h3.get("/whoami")
                assert status == 200
                slots.add(_whoami(site, body))
                h3.conn.change_connection_id()
            assert len(slots) == 1, "one connection, one worker"
            if stack == "aioquic":  # the client's own view agrees (qh3 keeps CIDs in Rust)
                assert layout.decode(h3.conn._peer_cid.cid) in slots
                assert {layout.decode(c.cid) for c in h3.conn._peer_cid_available} <= slots
            finfo = json.loads(fs.fetch("INFO"))
            assert finfo["app"] == FILES and finfo["slot"] in files.slots
            for s, slot in ((h3, slots.pop()), (fs, finfo["slot"])):
                host, port = s.sock.getsockname()[:2]
                expected[(host, port)] = slot
                if s is fs:
                    smb.add((host, port))
            h3.close()
            fs.close()

    # dumpcap writes in batches: one more connection after all the others, as a marker; once
    # the capture shows it, every packet of the connections before it is in the file (the
    # marker's own may not all be yet: it is left out of the checks)
    marker = session(pair, "smb")
    sessions.append(marker)
    assert json.loads(marker.fetch("INFO"))["app"] == FILES
    marker_client = marker.sock.getsockname()[:2]
    marker.close()
    deadline = time.monotonic() + 15
    while marker_client not in _clients_seen(capture.path):
        assert time.monotonic() < deadline, "the capture never showed the marker connection"
        time.sleep(0.1)
    seen = _slots_by_client(_packets(capture.stop()), layout.cid_len, layout.decode)
    seen.pop(marker_client, None)
    assert set(expected) <= set(seen)
    h3_clients = set(seen) - smb
    assert len(h3_clients) >= len(expected) - len(smb) + 2, "Chromium's and ngtcp2's too"
    for client, c in seen.items():
        owner = files if client in smb else site
        assert len(c["slots"]) == 1, f"{client}: server CIDs of slots {c['slots']}"
        (slot,) = c["slots"]
        assert slot in owner.slots, f"{client}: slot {slot} is not {owner.name}'s"
        if client in expected:
            assert slot == expected[client], f"{client}: CIDs of {slot}, served by another"
        assert c["server_scid"] >= 1 and c["short_dcid"] >= 1, (client, c)
    for client in set(expected) - smb:  # change_connection_id: NEW_CONNECTION_ID CIDs used
        assert seen[client]["short_dcid"] >= 4, (client, seen[client])

    # the daemon routed every first flight to the app owning its ALPN, none elsewhere
    want = {SITE: len(h3_clients), FILES: len(smb) + 1}  # + the marker
    deadline = time.monotonic() + 5  # the daemon folds its counts in every 0.5 s
    while True:
        after = _routed(daemon)
        routed = {app: after[app] - before.get(app, 0.0) for app in after
                  if after[app] != before.get(app, 0.0)}
        if routed == want or time.monotonic() > deadline:
            break
    assert routed == want


def _await_exit(pid: int, timeout: float) -> bool:
    """Whether ``pid`` (not our child) exits within ``timeout``: a pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_killed_asgi_worker_clients_get_the_advertised_reset(
    pair: NetnsPair, daemon: Daemon, apps: tuple[RunningApp, RunningApp],  # noqa: F811
    sessions: list[Session],  # noqa: F811
) -> None:
    """A hypercorn worker's reset tokens follow steerd's rule: when the worker dies, the
    daemon (which computes HMAC(slot key, CID)) resets its clients with the very token the
    worker advertised. The dead worker's sockets close with it, so the daemon sees the slot
    die; steerd.app.asgi then exits 1 (a worker failed)."""
    reset_app = start_asgi_site(daemon, "asgi-reset", [RESET_HOST], workers=1)
    try:
        sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((pair.client_v4, 0))
        s = Session("aioquic", sock, (pair.server_v4, PORT), "h3", server_name=RESET_HOST)
        sessions.append(s)
        status, body = s.get("/whoami")
        assert status == 200
        slot = _whoami(reset_app, body)
        cid = s.conn._peer_cid.cid
        assert reset_app.layout.decode(cid) == slot
        token = s.conn._peer_cid.stateless_reset_token
        pid = reset_app.pids[slot]
        os.kill(pid, signal.SIGKILL)
        assert _await_exit(pid, 5)
        assert reset_app.proc.wait(10) == 1, "steerd exec passes on steerd.app.asgi's status 1"
        s.sock.setblocking(False)  # take in what the worker sent before it died
        while select.select([s.sock], [], [], 0)[0]:
            s.conn.receive_datagram(s.sock.recv(65535), s.server, now=time.time())
        s.sock.setblocking(True)
        s.conn.send_stream_data(s.conn.get_next_available_stream_id(), b"x", end_stream=True)
        s.flush()
        s.sock.settimeout(2.0)
        reset = s.sock.recv(65535)
        assert reset[0] & 0xC0 == 0x40, "a stateless reset looks like a short header"
        assert reset[-16:] == token, "not the token the hypercorn worker advertised"
    finally:
        reset_app.stop()


def test_initial_naming_the_slot_makes_no_connection(
    pair: NetnsPair, apps: tuple[RunningApp, RunningApp], sessions: list[Session],  # noqa: F811
) -> None:
    """The data plane steers an Initial whose DCID is in the layout straight to that
    slot's worker, past every ALPN/name/ACL decision: the hypercorn worker must not answer
    it. The same client with a DCID of its own choosing is served."""
    site, _ = apps
    slot = site.slots[0]
    forged = site.layout.encode(slot, os.urandom(site.layout.nonce_len))
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["h3"], verify_mode=0, server_name=HOST))
    client._peer_cid.cid = forged  # before connect, which derives the Initial keys from it
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((pair.client_v4, 0))
        client.connect((pair.server_v4, PORT), now=time.time())
        for data, _ in client.datagrams_to_send(now=time.time()):
            sock.sendto(data, (pair.server_v4, PORT))
        # a silence can only be awaited by a timeout; meanwhile the slot serves others
        good = session(pair, "h3")
        sessions.append(good)
        assert good.get("/")[0] == 200
        assert not select.select([sock], [], [], 2.0)[0], "the worker answered a forged DCID"
    finally:
        sock.close()


def test_daemon_retried_clients_complete_the_handshake() -> None:
    """With the daemon's Retry on (``retry = "always"``), every connection reaches the
    hypercorn worker with the daemon's token: the worker must take the original DCID from
    it and name the Retry's SCID in its transport parameters, or aioquic and qh3 abort the
    handshake (RFC 9000 §7.3). A daemon of its own, in namespaces of its own."""
    with netns_pair("q") as net, contextlib.contextmanager(start_daemon)(
        net, '[flood]\nretry = "always"\n'
    ) as retrying:
        site = start_asgi_site(retrying, SITE, ["localhost"], workers=1)
        try:
            for stack in ("aioquic", "qh3"):
                s = session(net, "h3", stack)
                try:
                    status, body = s.get("/whoami")
                finally:
                    s.close()
                assert status == 200, (stack, body)
                _whoami(site, body)
                assert any(d[0] & 0x80 and parse_long_header(d).packet_type is PacketType.RETRY
                           for d in s.received), f"{stack}: the daemon sent no Retry"
        finally:
            log = site.extra["stderr"].read_text()
            assert site.stop() == 0, log[-3000:]


# --- the accept rule in-process (no daemon): hypercorn's protocol fed datagrams directly


def _client_initial(dcid: bytes | None = None, token: bytes = b"") -> tuple[
    QuicConnection, list[bytes]
]:
    """An aioquic h3 client's first flight; ``dcid`` replaces the DCID it picked (before
    connect derives the Initial keys from it), ``token`` is the token it echoes."""
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["h3"], verify_mode=0, server_name="localhost"))
    if dcid is not None:
        client._peer_cid.cid = dcid
    client._peer_token = token
    client.connect(("127.0.0.1", 443), now=time.time())
    return client, [d for d, _ in client.datagrams_to_send(now=time.time())]


def _connections(protocol: SteerdQuicProtocol) -> list[Any]:
    """hypercorn's connections, each once (it files one under each of its CIDs)."""
    return list({id(c): c for c in protocol.connections.values()}.values())


def _feed(tls: tuple[Path, Path], initials: list[list[bytes]]) -> tuple[
    SteerdQuicProtocol, list[Event]
]:
    """A SteerdQuicProtocol (hypercorn's objects around it) given each client's first
    flight; what it sent back."""
    sent: list[Event] = []

    async def send(event: Event) -> None:
        sent.append(event)

    async def scenario() -> SteerdQuicProtocol:
        config = Config()
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
        async with TaskGroup(asyncio.get_running_loop()) as group:
            protocol = SteerdQuicProtocol(
                None, config, WorkerContext(None), group, ConnectionState({}),
                ("127.0.0.1", 443), send, issuer=CidIssuer(LAYOUT, SLOT, KEY))
            for datagrams in initials:
                for data in datagrams:
                    await protocol.handle(RawData(data=data, address=("127.0.0.2", 5555)))
            for connection in _connections(protocol):
                await connection.task.stop()  # its timer: the group must end
        return protocol

    return asyncio.run(scenario()), sent


def test_protocol_refuses_initials_naming_a_slot(cert: tuple[Path, Path]) -> None:  # noqa: F811
    """Initials whose DCID is in the layout (ours, another slot's, with a token of the
    daemon's shape or none) make nothing and send nothing: hypercorn has no Retry of its
    own that could justify one. A client-chosen DCID makes a connection whose every CID
    names the slot."""
    ours, other = (LAYOUT.encode(s, os.urandom(LAYOUT.nonce_len)) for s in (SLOT, SLOT + 1))
    forged = build_retry_token(os.urandom(16), "127.0.0.2", b"odcid", ours, 1.0)
    refused = [_client_initial(dcid, token)[1]
               for dcid, token in ((ours, b""), (other, b""), (ours, forged))]
    protocol, sent = _feed(cert, refused)
    assert protocol.refused_layout_initials == sum(len(d) for d in refused)
    assert protocol.accepted == 0 and not protocol.connections and not sent

    client, datagrams = _client_initial()
    protocol, sent = _feed(cert, [datagrams])
    assert protocol.accepted == 1 and protocol.refused_layout_initials == 0
    assert sent, "the server answered the handshake"
    (connection,) = _connections(protocol)
    host_cids = connection.quic._host_cids
    assert connection.quic.host_cid in [c.cid for c in host_cids]
    assert {LAYOUT.decode(c.cid) for c in host_cids} == {SLOT}
    assert all(c.stateless_reset_token == reset_token(KEY, c.cid) for c in host_cids)
    assert LAYOUT.decode(client._peer_cid.cid) is None


def test_protocol_accepts_a_daemon_retried_initial(cert: tuple[Path, Path]) -> None:  # noqa: F811
    """An Initial the daemon retried (DCID: its Retry SCID, outside the layout) makes a
    connection with the original DCID from the token and the Retry SCID set, as RFC 9000
    §7.3 requires of the server's transport parameters."""
    dcid, odcid = _daemon_retry_cid(), os.urandom(8)
    token = build_retry_token(os.urandom(16), "127.0.0.2", odcid, dcid, 1.0)
    protocol, _ = _feed(cert, [_client_initial(dcid, token)[1]])
    assert protocol.accepted == 1 and protocol.refused_layout_initials == 0
    (connection,) = _connections(protocol)
    assert connection.quic._original_destination_connection_id == odcid
    assert connection.quic._retry_source_connection_id == dcid


def test_hypercorn_hook_is_where_steerd_asgi_sets_it() -> None:
    """steerd.app.asgi replaces one name, ``hypercorn.protocol.quic.QuicProtocol``, which
    ``UDPServer.run`` imports when it runs, and builds hypercorn's ``_Connection``s: if a
    hypercorn upgrade moves either, its connections would silently get hypercorn's own
    8-byte random CIDs (unroutable after the first flight). Fail loudly instead."""
    assert importlib.metadata.version("hypercorn") == "0.18.0", (
        "hypercorn changed: re-check steerd.app.asgi's hook (see its docstring) before moving "
        "the pin")
    assert "from ..protocol.quic import QuicProtocol" in inspect.getsource(UDPServer.run)
    assert set(hypercorn_quic._Connection.__dataclass_fields__) >= {"cids", "quic", "task"}
    for name in ("_handle_events", "send_all"):
        assert callable(getattr(hypercorn_quic.QuicProtocol, name, None)), name


def test_refuses_to_run_outside_steerd_exec(cert: tuple[Path, Path]) -> None:  # noqa: F811
    """Without ``steerd exec``'s sockets (or with them, in learned mode) there is nothing it
    could serve correctly: a usage error, said plainly."""
    cmd = [PYTHON, "-m", "steerd.app.asgi", "deploy.apps.asgi_site:app",
           "--certfile", str(cert[0]), "--keyfile", str(cert[1])]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "STEERD_"))}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)
    assert out.returncode == 2 and "no sockets from steerd exec" in out.stderr, out.stderr
