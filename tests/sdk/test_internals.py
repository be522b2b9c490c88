"""The aioquic internals steerd.app.sdk relies on, checked against the pinned aioquic.

Why this file fails loudly: aioquic has no public hook to choose server CIDs or reset tokens,
so the SDK overwrites private attributes. If an aioquic upgrade renames one, or starts drawing
CIDs somewhere else, workers would silently issue CIDs the kernel cannot route (connections
break at the first migration) or tokens the daemon cannot recompute (dead workers' clients
hang until the idle timeout). Every check here names what changed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aioquic
import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId

from deploy.apps.certs import ensure_cert
from quic.cid import CONFIG_ROTATION_SHIFT, CR_UNROUTABLE, CidLayout
from quic.reset import reset_token
from quic.token import build_retry_token
from steerd.app.sdk import CidIssuer, SteerdQuicConnection, SteerdQuicServer

LAYOUT = CidLayout(config_id=1, host_id=0x2A, host_id_len=1, slot_len=2, nonce_len=6)
KEY = bytes(range(32))  # the slot's reset key
SLOT = 0x0107
CLIENT_ADDR, SERVER_ADDR = ("127.0.0.1", 1234), ("127.0.0.1", 443)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_cert(tmp_path_factory.mktemp("cert"), ["localhost", "127.0.0.1"])


def server_config(cert: tuple[Path, Path]) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3", "smb"])
    config.load_cert_chain(*cert)
    config.connection_id_length = LAYOUT.cid_len
    return config


def test_pinned_version() -> None:
    assert aioquic.__version__ == "1.7.2", (
        "aioquic changed: re-check steerd.app.sdk's use of QuicConnection/QuicServer internals "
        "(see its module docstring) before moving the pin"
    )


def test_private_attributes_exist(cert: tuple[Path, Path]) -> None:
    for name in ("cid", "sequence_number", "stateless_reset_token", "was_sent"):
        assert name in QuicConnectionId.__dataclass_fields__, f"QuicConnectionId.{name} gone"
    config = server_config(cert)
    conn = QuicConnection(configuration=config, original_destination_connection_id=b"\1" * 8)
    for name in ("_host_cids", "host_cid", "_local_initial_source_connection_id",
                 "_host_cid_seq", "_remote_active_connection_id_limit"):
        assert hasattr(conn, name), f"QuicConnection.{name} gone"
    assert callable(getattr(conn, "_replenish_connection_ids", None))
    assert "os.urandom" in inspect.getsource(QuicConnection._replenish_connection_ids), (
        "aioquic's _replenish_connection_ids no longer draws random CIDs: SteerdQuicConnection "
        "may be rewriting the wrong entries")
    for name in ("_connection_id_issued", "_connection_id_retired", "_connection_terminated",
                 "datagram_received"):
        assert callable(getattr(QuicServer, name, None)), f"QuicServer.{name} gone"
    init = inspect.signature(QuicServer.__init__).parameters
    for name in ("configuration", "create_protocol", "session_ticket_fetcher",
                 "session_ticket_handler", "retry", "stream_handler"):
        assert name in init, f"QuicServer(..., {name}=) gone"
    src = inspect.getsource(QuicServer)
    for name in ("self._protocols", "self._create_protocol", "self._stream_handler",
                 "self._transport", "self._retry", "self._configuration",
                 "self._session_ticket_fetcher", "self._session_ticket_handler", "self._loop"):
        assert name in src, f"QuicServer no longer has {name}"
    proto_src = inspect.getsource(QuicConnectionProtocol.__init__)
    for name in ("_connection_id_issued_handler", "_connection_id_retired_handler",
                 "_connection_terminated_handler"):
        assert name in proto_src, f"QuicConnectionProtocol.{name} gone"
    assert "_local_control_stream_id" in inspect.getsource(H3Connection.__init__)


def _pump(a: QuicConnection, b: QuicConnection, now: float) -> int:
    """Move every datagram a wants to send into b (and the other way round); returns the
    number moved."""
    moved = 0
    for src, dst, addr in ((a, b, CLIENT_ADDR), (b, a, SERVER_ADDR)):
        for data, _ in src.datagrams_to_send(now=now):
            dst.receive_datagram(data, addr, now=now)
            moved += 1
    return moved


def test_every_issued_cid_and_token(cert: tuple[Path, Path]) -> None:
    """A whole handshake in memory: every CID the server issues (sequence 0 and every
    NEW_CONNECTION_ID) names the slot, and the client holds reset_token(key, cid) for each."""
    issuer = CidIssuer(LAYOUT, SLOT, KEY)
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=["smb"], verify_mode=0, server_name="localhost"))
    now = time.time()
    client.connect(SERVER_ADDR, now=now)
    first = client.datagrams_to_send(now=now)
    server = SteerdQuicConnection(
        issuer=issuer, configuration=server_config(cert),
        original_destination_connection_id=client._peer_cid.cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=now)
    for _ in range(10):
        now += 0.01
        if not _pump(client, server, now):
            break
    assert server._handshake_complete and client._handshake_complete
    issued = [c for c in server._host_cids if c.was_sent]
    assert len(issued) >= 8, "the server should have issued NEW_CONNECTION_IDs by now"
    for c in server._host_cids:
        assert LAYOUT.decode(c.cid) == SLOT, f"CID seq {c.sequence_number} {c.cid.hex()}"
        assert c.stateless_reset_token == reset_token(KEY, c.cid)
    assert server.host_cid == server._host_cids[0].cid
    assert server._local_initial_source_connection_id == server._host_cids[0].cid
    known = [client._peer_cid, *client._peer_cid_available]
    assert len(known) >= 8
    for c in known:
        assert LAYOUT.decode(c.cid) == SLOT, c.cid.hex()
        assert c.stateless_reset_token == reset_token(KEY, c.cid), f"seq {c.sequence_number}"
    # CIDs are distinct and their nonces random
    assert len({c.cid for c in known}) == len(known)


@pytest.fixture
def loopback_server(cert: tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[
    tuple[socket.socket, bool]
]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock, bool(request.param)
    finally:
        sock.close()


@pytest.mark.parametrize("loopback_server", [False, True], ids=["no_retry", "retry"],
                         indirect=True)
def test_server_accept_path(cert: tuple[Path, Path],
                            loopback_server: tuple[socket.socket, bool]) -> None:
    """SteerdQuicServer on a real UDP socket, an aioquic client over loopback: the CIDs the
    client ends up with (including a Retry's SCID, when Retry is on) all name the slot."""
    sock, retry = loopback_server
    port = sock.getsockname()[1]

    async def scenario() -> tuple[list[QuicConnectionId], int, bytes | None]:
        loop = asyncio.get_running_loop()
        transport, server = await loop.create_datagram_endpoint(
            lambda: SteerdQuicServer(issuer=CidIssuer(LAYOUT, SLOT, KEY),
                                     configuration=server_config(cert), retry=retry),
            sock=sock,
        )
        try:
            config = QuicConfiguration(is_client=True, alpn_protocols=["smb"], verify_mode=0)
            async with connect("127.0.0.1", port, configuration=config) as client:
                await client.ping()
                conn = client._quic
                return ([conn._peer_cid, *conn._peer_cid_available],
                        len(server.connections()), conn._retry_source_connection_id)
        finally:
            server.close()
            transport.close()

    known, conns, retry_scid = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert conns == 1
    assert len(known) >= 2
    for c in known:
        assert LAYOUT.decode(c.cid) == SLOT, c.cid.hex()
        assert c.stateless_reset_token == reset_token(KEY, c.cid)
    if retry:
        assert retry_scid is not None and LAYOUT.decode(retry_scid) == SLOT
    else:
        assert retry_scid is None


def test_cert_key_is_private(tmp_path: Path) -> None:
    cert, key = ensure_cert(tmp_path / "c", ["www.example.test"])
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.stat().st_uid == os.getuid()
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert ensure_cert(tmp_path / "c", ["other"]) == (cert, key)  # kept, not regenerated
    key.chmod(0o644)
    with pytest.raises(PermissionError):
        ensure_cert(tmp_path / "c", ["www.example.test"])


class _Transport:
    """Records what a SteerdQuicServer sends (its datagram transport, without a socket)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def sendto(self, data: bytes, addr: object = None) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _client_initial(dcid: bytes | None = None, token: bytes = b"",
                    alpn: str = "smb") -> tuple[QuicConnection, list[bytes]]:
    """A real aioquic client's first flight; ``dcid`` replaces the DCID it picked (before
    connect, which derives the Initial keys from it), ``token`` is the token it echoes."""
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=[alpn], verify_mode=0, server_name="localhost"))
    if dcid is not None:
        client._peer_cid.cid = dcid
    client._peer_token = token
    now = time.time()
    client.connect(SERVER_ADDR, now=now)
    return client, [d for d, _ in client.datagrams_to_send(now=now)]


def _daemon_retry_cid() -> bytes:
    """A DCID like the daemon's Retry SCIDs: the unroutable codepoint, never in the layout."""
    return bytes(((CR_UNROUTABLE << CONFIG_ROTATION_SHIFT) | 15,)) + os.urandom(15)


@pytest.mark.parametrize("retry", [False, True], ids=["no_retry", "retry"])
def test_initials_naming_a_slot_create_no_connection(cert: tuple[Path, Path],
                                                     retry: bool) -> None:
    """New connections only through the classifier: the data plane steers an Initial whose
    DCID is in the layout straight to the slot's worker, so no ALPN/SNI/ACL decision was
    made for it. The worker refuses it (nothing sent, counted); the same Initial with a
    client-chosen DCID (what the classifier routes) makes a connection. Neither a token of
    the daemon's shape (unkeyed, so anyone can make one) nor another slot's CID helps."""

    async def scenario() -> None:
        transport = _Transport()
        server = SteerdQuicServer(issuer=CidIssuer(LAYOUT, SLOT, KEY),
                                  configuration=server_config(cert), retry=retry)
        server.connection_made(transport)  # type: ignore[arg-type]
        try:
            refused = 0
            ours, other_slot = (LAYOUT.encode(s, os.urandom(LAYOUT.nonce_len))
                                for s in (SLOT, SLOT + 1))
            forged = build_retry_token(os.urandom(16), CLIENT_ADDR[0], b"odcid", ours, 1.0)
            for dcid, token in ((ours, b""), (other_slot, b""), (ours, forged)):
                _, datagrams = _client_initial(dcid, token)
                for data in datagrams:
                    server.datagram_received(data, CLIENT_ADDR)
                refused += len(datagrams)
                assert server.refused_layout_initials == refused
            assert server.accepted == 0 and not server.connections()
            assert transport.sent == [], "nothing at all goes back (not even a Retry)"

            client, datagrams = _client_initial()  # the DCID the client picked
            assert LAYOUT.decode(client._peer_cid.cid) is None
            for data in datagrams:
                server.datagram_received(data, CLIENT_ADDR)
            if retry:  # our own Retry: its SCID names the slot, and its token lets the
                (packet, _), = transport.sent  # retried Initial through
                assert server.accepted == 0
                client.receive_datagram(packet, SERVER_ADDR, now=time.time())
                assert LAYOUT.decode(client._peer_cid.cid) == SLOT
                for data, _ in client.datagrams_to_send(now=time.time()):
                    server.datagram_received(data, CLIENT_ADDR)
            assert server.accepted == 1 and len(server.connections()) == 1
            assert server.refused_layout_initials == refused
            assert len(transport.sent) > int(retry), "the server answered the handshake"
        finally:
            server.close()

    asyncio.run(scenario())


def test_client_hello_for_none_of_our_alpns_gets_no_answer(cert: tuple[Path, Path]) -> None:
    """A ClientHello offering none of the worker's ALPNs can only be a misdelivery (the
    kernel hashing over the group while another tenant detached steerd's program): the
    worker sends nothing, so the client retransmits into the repaired data plane instead of
    failing its handshake; the connection is forgotten and counted. A ClientHello for one
    of our ALPNs from the same kind of client is answered as usual (positive control)."""

    async def scenario() -> None:
        transport = _Transport()
        server = SteerdQuicServer(issuer=CidIssuer(LAYOUT, SLOT, KEY),
                                  configuration=server_config(cert))
        server.connection_made(transport)  # type: ignore[arg-type]
        try:
            for n in (1, 2):  # its retransmission is dropped alike
                _, datagrams = _client_initial(alpn="doq")
                for data in datagrams:
                    server.datagram_received(data, CLIENT_ADDR)
                assert server.misdelivered_initials == n
                assert transport.sent == [] and not server.connections()
            _, datagrams = _client_initial(alpn="h3")
            for data in datagrams:
                server.datagram_received(data, CLIENT_ADDR)
            assert len(server.connections()) == 1 and transport.sent
            assert server.misdelivered_initials == 2
        finally:
            server.close()

    asyncio.run(scenario())


def test_daemon_retried_initial_is_accepted_from_its_token(cert: tuple[Path, Path]) -> None:
    """An Initial the daemon retried and routed (DCID: its Retry SCID, outside the layout)
    makes a connection whose original DCID is read from the token, with no key: the worker
    holds none, and only the classifier, having validated the token, routes such an
    Initial to a worker."""

    async def scenario() -> None:
        transport = _Transport()
        server = SteerdQuicServer(issuer=CidIssuer(LAYOUT, SLOT, KEY),
                                  configuration=server_config(cert))
        server.connection_made(transport)  # type: ignore[arg-type]
        try:
            dcid, odcid = _daemon_retry_cid(), os.urandom(8)
            token = build_retry_token(os.urandom(16), CLIENT_ADDR[0], odcid, dcid, 1.0)
            _, datagrams = _client_initial(dcid, token)
            for data in datagrams:
                server.datagram_received(data, CLIENT_ADDR)
            assert server.accepted == 1 and server.refused_layout_initials == 0
            (protocol,) = server.connections()
            conn = protocol._quic
            assert conn._original_destination_connection_id == odcid
            assert conn._retry_source_connection_id == dcid
        finally:
            server.close()

    asyncio.run(scenario())
