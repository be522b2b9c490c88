"""The daemon end to end: real first flights from a client namespace reach the right app.

Issue 4 §7: two apps with different ALPNs; the client's true source address at the app; a
2-datagram ClientHello; the client's ALPN order decides (and server preference reverses it);
unknown version -> Version Negotiation; unknown ALPN -> the client reports
no_application_protocol; an app disconnect; malformed control messages; metrics over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode

from deploy.netns import NetnsPair
from quic.cid import CidLayout
from quic.packet import SUPPORTED_VERSIONS, VERSION_2, parse_long_header
from quic.reset import reset_token
from steerd.app.client import ControlClient
from steerd.daemon.dataplane.netns import run_in_netns
from tests.e2e.conftest import (
    App,
    Client,
    Daemon,
    quic_client,
    start_app,
    start_daemon,
)

pytestmark = pytest.mark.root

NO_APPLICATION_PROTOCOL = QuicErrorCode.CRYPTO_ERROR + 120  # 0x178


def _terminated(client: Client) -> ConnectionTerminated | None:
    """Run the client's timers until it reports the connection's end (aioquic emits
    ConnectionTerminated only after its draining period)."""
    conn = client.conn
    for _ in range(10):
        event = conn.next_event()
        while event is not None:
            if isinstance(event, ConnectionTerminated):
                return event
            event = conn.next_event()
        timer = conn.get_timer()
        if timer is None:
            return None
        conn.handle_timer(now=timer)
    return None


@pytest.fixture(scope="module")
def two_apps(daemon: Daemon) -> Iterator[tuple[App, App]]:
    web = start_app(daemon, "web", ["h3"])
    files = start_app(daemon, "files", ["smb"], workers=2)
    try:
        assert web.registered["event"] == "registered"
        assert files.registered["event"] == "registered"
        yield web, files
    finally:
        web.close()
        files.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("alpn,app_index", [("h3", 0), ("smb", 1)])
def test_first_flight_lands_on_owning_app_with_true_source(
    pair: NetnsPair, two_apps: tuple[App, App], clients: list[Client], family: int,
    alpn: str, app_index: int,
) -> None:
    client = quic_client(pair, family, [alpn], server_name="www.example.test")
    clients.append(client)
    owner, other = two_apps[app_index], two_apps[1 - app_index]
    got = owner.next_datagram()
    assert got is not None, f"{alpn} flight never reached its app"
    assert tuple(got["from"]) == client.address  # the client's own address and port
    assert got["len"] >= 1200
    assert got["slot"] in owner.registered["slots"]
    assert other.next_datagram(timeout=0.3) is None


def test_two_datagram_client_hello(
    pair: NetnsPair, two_apps: tuple[App, App], clients: list[Client]
) -> None:
    client = quic_client(pair, socket.AF_INET, ["smb"], two_datagrams=True)
    clients.append(client)
    assert client.sent == 2
    got = two_apps[1].datagrams(2)
    assert len(got) == 2
    assert {tuple(g["from"]) for g in got} == {client.address}
    assert len({g["slot"] for g in got}) == 1  # both datagrams to the same worker


@pytest.mark.parametrize("offered,app_index", [(["smb", "h3"], 1), (["h3", "smb"], 0)])
def test_client_alpn_order_decides(
    pair: NetnsPair, two_apps: tuple[App, App], clients: list[Client], offered: list[str],
    app_index: int,
) -> None:
    client = quic_client(pair, socket.AF_INET, offered)
    clients.append(client)
    assert two_apps[app_index].next_datagram() is not None
    assert two_apps[1 - app_index].next_datagram(timeout=0.3) is None


def test_quic_v2_first_flight(
    pair: NetnsPair, two_apps: tuple[App, App], clients: list[Client]
) -> None:
    client = quic_client(pair, socket.AF_INET6, ["h3"], versions=[VERSION_2])
    clients.append(client)
    got = two_apps[0].next_datagram()
    assert got is not None and tuple(got["from"]) == client.address


def test_unknown_alpn_gets_no_application_protocol(
    pair: NetnsPair, two_apps: tuple[App, App], clients: list[Client]
) -> None:
    client = quic_client(pair, socket.AF_INET, ["nobody-serves-this"])
    clients.append(client)
    assert client.receive() is not None, "no answer to an unowned ALPN"
    event = _terminated(client)
    assert event is not None
    assert event.error_code == NO_APPLICATION_PROTOCOL
    for app in two_apps:
        assert app.next_datagram(timeout=0.2) is None


def test_unknown_version_gets_version_negotiation(pair: NetnsPair, daemon: Daemon) -> None:
    dcid, scid = os.urandom(8), os.urandom(5)
    datagram = (bytes([0xC0]) + (0x1A2A3A4A).to_bytes(4, "big") + bytes([len(dcid)]) + dcid
                + bytes([len(scid)]) + scid)
    datagram += bytes(1200 - len(datagram))
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(5)
        sock.sendto(datagram, (pair.server_v4, 4433))
        reply, _ = sock.recvfrom(2048)
    finally:
        sock.close()
    header = parse_long_header(reply, 0)
    assert header.version == 0
    assert header.dcid == scid and header.scid == dcid  # swapped, RFC 9000 §17.2.1
    offset = 1 + 4 + 1 + len(scid) + 1 + len(dcid)
    versions = {int.from_bytes(reply[i:i + 4], "big") for i in range(offset, len(reply), 4)}
    assert versions == set(SUPPORTED_VERSIONS)


def test_app_disconnect_releases_its_alpn(
    pair: NetnsPair, daemon: Daemon, clients: list[Client]
) -> None:
    doq = start_app(daemon, "dns", ["doq"])
    try:
        client = quic_client(pair, socket.AF_INET, ["doq"])
        clients.append(client)
        assert doq.next_datagram() is not None
    finally:
        doq.close()
    client = quic_client(pair, socket.AF_INET, ["doq"])
    clients.append(client)
    assert client.receive() is not None
    event = _terminated(client)
    assert event is not None and event.error_code == NO_APPLICATION_PROTOCOL


def test_malformed_control_messages_get_errors_and_daemon_carries_on(
    pair: NetnsPair, daemon: Daemon
) -> None:
    def poke() -> list[dict[str, object]]:
        replies = []
        with ControlClient(daemon.control) as client:
            for raw in (b"not json", b'{"op": "fly"}', b"[]", b'{"op": "register"}'):
                client.send_raw(raw)
                reply, fds = client.receive()
                assert not fds
                replies.append(reply)
        return replies

    replies = run_in_netns(pair.server, poke)
    assert [r["ok"] for r in replies] == [False] * 4
    assert all(r["error"] for r in replies)
    assert daemon.proc.poll() is None
    assert daemon.status()["port"] == 4433


def test_metrics_match_what_happened(
    pair: NetnsPair, daemon: Daemon, clients: list[Client]
) -> None:
    def value(text: str, name: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # An app of its own, so its counters start at zero whatever earlier tests left in flight.
    app = start_app(daemon, "metered", ["metered"])
    try:
        routed = 'steerd_first_flights_total{app="metered",result="routed"}'
        reinjected = "steerd_reinjected_datagrams_total"
        before = daemon.metrics()
        assert value(before, routed) == 0
        client = quic_client(pair, socket.AF_INET, ["metered"])
        clients.append(client)
        assert app.next_datagram() is not None
        # Classifiers fold their tallies into the metrics on a 0.5 s timer: await the scrape
        # that shows the flight, then check that it shows exactly that.
        deadline = time.monotonic() + 5
        after = daemon.metrics()
        while value(after, routed) == 0 and time.monotonic() < deadline:
            after = daemon.metrics()
        assert value(after, routed) == 1
        assert value(after, reinjected) >= value(before, reinjected) + 1
        assert value(after, 'steerd_bpf_events_total{counter="steer_route_hit"}') >= 1
        assert value(after, "steerd_apps") >= 1
        assert value(after, "steerd_decision_seconds_count") >= 1
    finally:
        app.close()


def test_server_alpn_preference_reverses_the_choice(pair: NetnsPair, daemon: Daemon) -> None:
    # A second daemon on the same pair cannot share port 4433's control/metrics paths with the
    # module daemon, so this test stops nothing and uses its own netns pair instead.
    from deploy.netns import netns_pair

    with netns_pair("p") as other:
        gen = start_daemon(other, '[policy]\nalpn_preference = "server"\n'
                                  'alpn_order = ["h3", "smb"]\n')
        d = next(gen)
        try:
            web = start_app(d, "web", ["h3"])
            files = start_app(d, "files", ["smb"])
            client = quic_client(other, socket.AF_INET, ["smb", "h3"])
            try:
                assert web.next_datagram() is not None  # server order: h3 first
                assert files.next_datagram(timeout=0.3) is None
            finally:
                client.close()
                web.close()
                files.close()
        finally:
            gen.close()


def test_status_lists_apps(daemon: Daemon, two_apps: tuple[App, App]) -> None:
    status = daemon.status()
    names = {a["app"] for a in status["apps"]}
    assert {"web", "files"} <= names
    assert json.dumps(status)  # JSON all the way down


def test_dead_worker_clients_get_stateless_reset(pair: NetnsPair, daemon: Daemon) -> None:
    """A 1-RTT packet for a slot whose app is gone: the daemon answers with the reset token
    the worker advertised (HMAC with its slot's key, which the daemon derives again from its
    master key), so the client stops at once."""
    app = start_app(daemon, "gone", ["gone-proto"])
    slot = app.registered["slots"][0]
    key = bytes.fromhex(app.registered["reset_keys"][str(slot)])
    app.close()  # disconnect: the slot leaves the sockarray
    cid = CidLayout().encode(slot, os.urandom(CidLayout().nonce_len))
    packet = bytes([0x40 | 0x01]) + cid + os.urandom(60)
    sock = pair.client_socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.settimeout(5)
        sock.sendto(packet, (pair.server_v6, 4433))
        reply, _ = sock.recvfrom(2048)
    finally:
        sock.close()
    assert reply[-16:] == reset_token(key, cid)
    assert reply[0] & 0xC0 == 0x40
    assert 21 <= len(reply) < len(packet)


def test_many_flights_all_routed_whichever_classifier_process_gets_them(
    pair: NetnsPair, daemon: Daemon, two_apps: tuple[App, App], clients: list[Client]
) -> None:
    """16 flights with random DCIDs: with two classifier processes the BPF hash spreads them
    over both (all on one: p = 2^-15), and every one still lands on its app."""
    status = daemon.status()
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text()
    processes = status["classifier_processes"]
    assert len(children.split()) == (processes if processes > 1 else 0)
    for _ in range(16):
        client = quic_client(pair, socket.AF_INET, ["h3"])
        clients.append(client)
    got = two_apps[0].datagrams(16)
    assert sorted(tuple(g["from"]) for g in got) == sorted(c.address for c in clients)


def test_guard_drops_undersized_initial_and_counts_it(pair: NetnsPair, daemon: Daemon) -> None:
    """The guard the daemon attached to the server interface (XDP or TC) drops a client
    Initial in a datagram under 1200 bytes (RFC 9000 §14.1) before any socket sees it."""
    before = daemon.status()["counters"]
    dcid = os.urandom(8)
    runt = bytes([0xC0]) + (1).to_bytes(4, "big") + bytes([8]) + dcid + bytes([0]) + bytes(600)
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(runt, (pair.server_v4, 4433))
    finally:
        sock.close()
    deadline = time.monotonic() + 5
    after = daemon.status()["counters"]
    while (after["xdp_drop_small_initial"] == before["xdp_drop_small_initial"]
           and time.monotonic() < deadline):
        after = daemon.status()["counters"]
    assert after["xdp_drop_small_initial"] == before["xdp_drop_small_initial"] + 1
    assert after["steer_to_classifier"] == before["steer_to_classifier"]


def test_server_names_exact_wildcard_and_none(
    pair: NetnsPair, daemon: Daemon, clients: list[Client]
) -> None:
    """One ALPN, three apps: an exact name, a wildcard and all names. The exact claim beats
    the wildcard, the wildcard covers deeper names, and a client with another name or none
    goes to the all-names app."""
    apps = {
        "exact": start_app(daemon, "exact", ["site"], server_names=["www.example.test"]),
        "wild": start_app(daemon, "wild", ["site"], server_names=["*.example.test"]),
        "any": start_app(daemon, "any", ["site"]),
    }
    try:
        for sni, owner in (("www.example.test", "exact"), ("a.example.test", "wild"),
                           ("b.c.example.test", "wild"), ("other.test", "any"), (None, "any")):
            client = quic_client(pair, socket.AF_INET, ["site"], server_name=sni)
            clients.append(client)
            got = apps[owner].next_datagram()
            assert got is not None and tuple(got["from"]) == client.address, (sni, owner)
            for name, app in apps.items():
                if name != owner:
                    assert app.next_datagram(timeout=0.1) is None, (sni, name)
    finally:
        for app in apps.values():
            app.close()
