"""Session tickets through the SDK (issue 12): an app given a ticket store lets clients resume
their TLS session and send 0-RTT data, through a real daemon; the store itself is bounded,
single-use and drops expired tickets. Also a client SNI with a trailing dot reaching the app
that claims the name without it."""

from __future__ import annotations

import datetime
import select
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted
from aioquic.tls import CipherSuite, SessionTicket

from deploy.netns import NetnsPair
from quic.packet import PacketType
from steerd.app import sdk
from tests.e2e.conftest import PORT, Daemon
from tests.quic.reference import split_datagram
from tests.sdk.harness import RunningApp, start_demo_app

# -- the store ------------------------------------------------------------------------------


def ticket(label: bytes, valid_for: float = 3600.0) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(
        age_add=0, cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(seconds=valid_for),
        not_valid_before=now - datetime.timedelta(seconds=1),
        resumption_secret=bytes(32), server_name="localhost", ticket=label,
    )


def test_memory_store_is_single_use_and_bounded() -> None:
    store = sdk.MemoryTicketStore(max_tickets=3)
    for i in range(5):
        store.add(ticket(bytes([i])))
    assert len(store) == 3
    assert store.pop(b"\x00") is None and store.pop(b"\x01") is None  # the oldest went
    t = store.pop(b"\x02")
    assert t is not None and t.ticket == b"\x02"
    assert store.pop(b"\x02") is None  # redeemable once: a replayed 0-RTT finds nothing
    assert len(store) == 2


def test_memory_store_drops_expired_tickets() -> None:
    store = sdk.MemoryTicketStore()
    store.add(ticket(b"old", valid_for=-1))
    store.add(ticket(b"new"))
    assert len(store) == 1 and store.pop(b"old") is None and store.pop(b"new") is not None
    with pytest.raises(ValueError):
        sdk.MemoryTicketStore(max_tickets=0)


def test_app_spec_has_no_store_by_default() -> None:
    assert sdk.AppSpec(app="a", alpn=["h3"]).ticket_store is None


# -- through the daemon ----------------------------------------------------------------------


class H3Client:
    """A sans-IO aioquic HTTP/3 client in the client namespace that can present a session
    ticket and send its first request as 0-RTT data (queued before the first datagram)."""

    def __init__(self, pair: NetnsPair, path: str, ticket: SessionTicket | None = None,
                 server_name: str = "localhost") -> None:
        self.sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((pair.client_v4, 0))
        self.server = (pair.server_v4, PORT)
        config = QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                                   server_name=server_name, verify_mode=ssl.CERT_NONE)
        config.session_ticket = ticket
        self.tickets: list[SessionTicket] = []
        self.conn = QuicConnection(configuration=config,
                                   session_ticket_handler=self.tickets.append)
        self.conn.connect(self.server, now=time.time())
        self.h3 = H3Connection(self.conn)
        self.handshake: HandshakeCompleted | None = None
        self.sid = self.conn.get_next_available_stream_id()
        self.h3.send_headers(self.sid, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"),
            (b":path", path.encode()),
        ], end_stream=True)
        self.first_flight_types: set[PacketType | None] = set()
        self.status, self.body, self.done = 0, bytearray(), False
        self._flush(first=True)

    def _flush(self, first: bool = False) -> None:
        for data, _ in self.conn.datagrams_to_send(now=time.time()):
            if first:
                self.first_flight_types |= packet_types(data)
            self.sock.sendto(data, self.server)

    def run(self, want_ticket: bool = True, timeout: float = 5.0) -> None:
        """Until the response is complete (and a new ticket arrived, if ``want_ticket``)."""
        deadline = time.time() + timeout
        while not (self.done and (self.tickets or not want_ticket)):
            if time.time() >= deadline:
                raise AssertionError(
                    f"timed out: handshake {self.handshake}, status {self.status}, "
                    f"done {self.done}, tickets {len(self.tickets)}")
            timer = self.conn.get_timer()
            wake = deadline if timer is None else min(deadline, timer)
            ready, _, _ = select.select([self.sock], [], [], max(0.0, wake - time.time()))
            if ready:
                data, addr = self.sock.recvfrom(65535)
                self.conn.receive_datagram(data, addr[:2], now=time.time())
            elif timer is not None and time.time() >= timer:
                self.conn.handle_timer(now=time.time())
            while (event := self.conn.next_event()) is not None:
                if isinstance(event, HandshakeCompleted):
                    self.handshake = event
                for h in self.h3.handle_event(event):
                    if getattr(h, "stream_id", None) != self.sid:
                        continue
                    if isinstance(h, HeadersReceived):
                        self.status = int(dict(h.headers)[b":status"])
                    elif isinstance(h, DataReceived):
                        self.body.extend(h.data)
                    self.done = self.done or bool(getattr(h, "stream_ended", False))
            self._flush()

    def close(self) -> None:
        self.conn.close()
        self._flush()
        self.sock.close()


def packet_types(datagram: bytes) -> set[PacketType | None]:
    """The long-header packet types coalesced in one datagram."""
    return {p.packet_type for p in split_datagram(datagram)}


def request(pair: NetnsPair, path: str = "/count", ticket: SessionTicket | None = None,
            server_name: str = "localhost", want_ticket: bool = True) -> H3Client:
    client = H3Client(pair, path, ticket, server_name)
    try:
        client.run(want_ticket)
    finally:
        client.close()
    return client


@pytest.fixture(scope="module")
def ticket_app(daemon: Daemon) -> Iterator[RunningApp]:
    app = start_demo_app(daemon, "h3", "--session-tickets", name="tickets", workers=1)
    try:
        yield app
    finally:
        assert app.stop() == 0


def test_session_resumes_with_0rtt_through_the_daemon(pair: NetnsPair,
                                                      ticket_app: RunningApp) -> None:
    first = request(pair)
    assert first.status == 200 and first.handshake is not None
    assert not first.handshake.session_resumed
    assert PacketType.ZERO_RTT not in first.first_flight_types  # nothing to resume yet
    issued = first.tickets[-1]
    assert issued.max_early_data_size is not None  # the worker offers 0-RTT

    second = request(pair, ticket=issued)
    assert second.status == 200 and second.handshake is not None
    assert second.handshake.session_resumed
    # the request left in the first flight, as 0-RTT, and the worker took it
    assert PacketType.ZERO_RTT in second.first_flight_types
    assert second.handshake.early_data_accepted
    assert b'"slot": %d' % ticket_app.slots[0] in bytes(second.body)

    # single use: the same ticket again gets a full handshake (0-RTT refused), still served
    third = request(pair, ticket=issued)
    assert third.status == 200 and third.handshake is not None
    assert not third.handshake.session_resumed and not third.handshake.early_data_accepted


def test_sni_with_trailing_dot_reaches_the_app_claiming_the_name(
    daemon: Daemon, pair: NetnsPair, ticket_app: RunningApp
) -> None:
    """A ClientHello for "www.example.com." used to be dropped by the classifier (bad_sni)
    and the client timed out; now it reaches the app claiming "www.example.com" (exact, so
    it wins over the ticket app's all-names claim)."""
    app = start_demo_app(daemon, "h3", "--server-name", "www.example.com", name="named")
    try:
        for name in ("www.example.com.", "WWW.Example.com.", "www.example.com"):
            client = request(pair, server_name=name, want_ticket=False)
            assert client.status == 200
            assert b'"app": "named"' in bytes(client.body), name
        assert b'"app": "tickets"' in bytes(request(pair, server_name="other.example.").body)
    finally:
        assert app.stop() == 0
