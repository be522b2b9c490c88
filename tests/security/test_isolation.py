"""Tenant isolation, shown by attacking for real (issue 10).

Two tenants serve through the daemon as their own uids (the demo's HTTP/3 site and file
service, with real aioquic clients loading them from the client namespace), and an intruder
registers for real as uid nobody (and, where the difference matters, as root: apps may run
as root) and attacks with what the daemon handed it: its worker socket, its slot's key, the
control socket. Each attack must fail — checked by the errno, the daemon's own counters or
the client's view — while the other tenants' clients are served with 0 failures during and
after it. Each defence also has its positive control, so a test that cannot fail would show.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted

from deploy.netns import NetnsPair
from quic.packet import parse_long_header
from quic.reset import build_stateless_reset, reset_token, slot_reset_key
from tests.e2e.conftest import PORT, await_resumed, spawn_daemon
from tests.sdk.harness import Loader, session
from tests.security.players import Intruder, start_intruder
from tests.security.tenants import (
    ACL,
    NOBODY,
    Tenants,
    assert_served,
    counters,
    delta,
    served_fixture,
    start_tenants,
)

pytestmark = pytest.mark.root


@dataclass
class World(Tenants):
    intruder: Intruder


@pytest.fixture(scope="module")
def world(pair: NetnsPair) -> Iterator[World]:
    with start_tenants(pair, ACL) as tenants:
        intruder = start_intruder(tenants.daemon, NOBODY, "intruder", "doq")
        try:
            yield World(pair, tenants.daemon, tenants.web, tenants.files, intruder)
        finally:
            intruder.stop()


served = served_fixture(ipv6=False)  # the test's last step is assert_served(served)


# -- 1. the socket jail ------------------------------------------------------------------------


CALLS = ("attach_cbpf", "attach_ebpf", "detach", "bindtodevice", "bindtoifindex", "connect",
         "bind_new")


def test_held_worker_socket_cannot_take_the_port(world: World, served: list[Loader]) -> None:
    """As nobody and as root: replacing or removing the group's program, clearing SO_REUSEPORT
    or SO_REUSEADDR (IPv4 and IPv6 sockets), binding the socket to a device, connecting it,
    or binding a new socket to the port are all refused (EPERM, the jail's answer); every
    refusal is counted; the other tenants' clients never notice."""
    root = start_intruder(world.daemon, 0, "root-intruder", "x-root")
    try:
        before = counters(world.daemon)
        target = {"service": [world.pair.server_v4, PORT], "client": [world.pair.client_v4, 443]}
        for who in (world.intruder, root):
            got = who.ask(op="socket_calls", **target)
            assert got == dict.fromkeys(CALLS, errno.EPERM), (who.registered["uid"], got)
            flags = who.ask(op="flags_off")
            assert flags == {**{f"{flag}_off_{family}": errno.EPERM
                                for flag in ("reuseport", "reuseaddr") for family in ("v4", "v6")},
                             "reuseport_v4": 1, "reuseport_v6": 1}, (who.registered["uid"], flags)
        after = counters(world.daemon)
        assert delta(before, after, "jail_refused_setsockopt") == 2 * (5 + 4)
        assert delta(before, after, "jail_refused_connect") == 2
        assert delta(before, after, "jail_refused_bind") == 2
    finally:
        root.stop()
    assert_served(served)


# -- 2. new connections only through the classifier --------------------------------------------


def first_flight(pair: NetnsPair, dcid: bytes, token: bytes = b"",
                 wait: float = 2.0) -> tuple[int, bool]:
    """A real aioquic client's first flight with a chosen DCID (and token) from the client
    namespace: how many datagrams came back within ``wait`` s, and whether the handshake
    completed."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], verify_mode=0,
                               server_name="localhost", token=token)
    conn = QuicConnection(configuration=config)
    conn._peer_cid.cid = dcid  # before connect(): nothing was derived from it yet
    conn._original_destination_connection_id = dcid
    server = (pair.server_v4, PORT)
    conn.connect(server, now=time.time())
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    received, done = 0, False
    try:
        sock.bind((pair.client_v4, 0))
        sock.settimeout(0.1)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not done:
            for data, _ in conn.datagrams_to_send(now=time.time()):
                sock.sendto(data, server)
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            received += 1
            conn.receive_datagram(data, addr[:2], now=time.time())
            while (event := conn.next_event()) is not None:
                done = done or isinstance(event, HandshakeCompleted)
    finally:
        sock.close()
    return received, done


def test_initial_naming_a_slot_gets_no_connection(world: World, served: list[Loader]) -> None:
    """An Initial whose DCID is in steerd's layout is steered straight to the slot it names
    (no ALPN, name or ACL decision): the worker must not build a connection from it."""
    layout = world.web.layout
    slot = world.web.slots[0]
    before = counters(world.daemon)
    received, done = first_flight(world.pair, layout.encode(slot, os.urandom(layout.nonce_len)))
    after = counters(world.daemon)
    assert delta(before, after, "steer_long_ours_worker") >= 1  # it did reach the worker
    assert (received, done) == (0, False)
    # positive control: the same client with a DCID of its own choosing is served
    assert first_flight(world.pair, os.urandom(8))[1]
    assert_served(served)


# -- 3. secrets per tenant ---------------------------------------------------------------------


def test_forged_reset_for_another_tenants_connection_is_ignored(
    world: World, served: list[Loader]
) -> None:
    """The intruder computes a stateless reset for a web client's CID with the only key it
    has and sends it from the service port: the token is not the one web advertised, so the
    client carries on. A reset keyed with web's real slot key (derived here, as root, from the
    daemon's master) does end the connection: the check can fail. The client is qh3, which
    acts on stateless resets (aioquic ignores them)."""
    s = session(world.pair, "h3", "qh3")
    try:
        assert s.get("/count")[0] == 200
        # the CID web's worker chose: the SCID of its first Initial (its reset token went out
        # in the transport parameters)
        cid = parse_long_header(s.received[0], 0).scid
        client = [world.pair.client_v4, s.sock.getsockname()[1]]
        forged = bytes.fromhex(world.intruder.ask(op="reset", cid=cid.hex(), to=client)["token"])
        master = (world.daemon.workdir / "reset.key").read_bytes()
        slot = world.web.layout.decode(cid)
        assert slot in world.web.slots
        real = reset_token(slot_reset_key(master, slot), cid)
        assert forged != real
        assert s.get("/count")[0] == 200 and s.terminated is None  # the forged one: nothing
        world.intruder.ask(op="send", data=build_stateless_reset(real, os.urandom(40)).hex(),
                           to=client)
        assert s.wait_closed() is not None  # the genuine reset, same path, ends it
    finally:
        s.close()
    assert_served(served)


def test_self_minted_retry_token_is_refused(world: World, served: list[Loader]) -> None:
    """A Retry token minted with the key an app holds (the way every app could before keys
    were per tenant) gets no connection: the daemon alone holds the token key."""
    scid = bytes([0xEF]) + os.urandom(15)  # unroutable first octet: goes to the classifier
    token = world.intruder.ask(op="mint", client_ip=world.pair.client_v4,
                               odcid=os.urandom(8).hex(), scid=scid.hex())["token"]
    before = world.daemon.status()["classifier_drops"]
    assert first_flight(world.pair, scid, bytes.fromhex(token)) == (0, False)
    after = world.daemon.status()["classifier_drops"]
    assert after.get("token_invalid", 0) > before.get("token_invalid", 0)
    assert first_flight(world.pair, os.urandom(8))[1]  # without the token: served
    assert_served(served)


# -- 4. claims -----------------------------------------------------------------------------------


def test_exact_name_cannot_shadow_another_uids_claim(world: World, served: list[Loader]) -> None:
    """web (another uid) holds h3 for all names; the ACL lets nobody claim h3 for all names
    too, which must not let it carve victim.example out of web's claim. A name the ACL grants
    nobody explicitly is its to take (positive control)."""
    refused = world.intruder.ask(op="register", message={
        "op": "register", "app": "shadow", "alpn": ["h3"], "server_names": ["victim.example"]})
    assert refused["ok"] is False and refused["reason"] == "conflict", refused
    assert "web" in refused["message"]
    granted = world.intruder.ask(op="register", message={
        "op": "register", "app": "granted", "alpn": ["h3"], "server_names": ["granted.example"]})
    assert granted["ok"] is True, granted  # (its connection closed: the claim went with it)
    s = session(world.pair, "h3")
    s.server_name = "victim.example"
    try:
        assert json.loads(s.get("/count")[1])["app"] == "web"
    finally:
        s.close()
    assert_served(served)


# -- 5. the smaller holes ------------------------------------------------------------------------


def test_status_shows_a_tenant_only_its_own_apps(world: World) -> None:
    assert world.intruder.ask(op="status")["apps"] == ["intruder"]
    everyone = {a["app"] for a in world.daemon.status()["apps"]}  # root sees all
    assert {"web", "files", "intruder"} <= everyone


# -- 4b. claims survive a daemon restart (last: the intruder's own registration dies here) -------


def test_claims_survive_a_daemon_restart(world: World, served: list[Loader]) -> None:
    """The daemon is killed while web's registering process is stopped (so it cannot resume
    at once, as a slow app would not); the restarted daemon reserves web's claim for whoever
    presents web's slot sockets, so the intruder — whom the ACL would let claim h3 for all
    names — is refused, under web's name and its own. web then resumes; its clients were
    served throughout."""
    daemon = world.daemon
    parent = world.web.proc.pid  # the SDK's registering process (nsenter and setpriv exec)
    os.kill(parent, signal.SIGSTOP)
    try:
        daemon.proc.kill()
        daemon.proc.wait(10)
        spawn_daemon(daemon, until="classifying")
        os.chmod(daemon.control, 0o666)  # a new socket file: open it to the tenants again
        for app in ("web", "imposter"):
            got = world.intruder.ask(op="register", message={
                "op": "register", "app": app, "alpn": ["h3"]})
            assert got["ok"] is False and got["reason"] == "reserved", got
            assert "web" in got["message"]
    finally:
        os.kill(parent, signal.SIGCONT)
    status = await_resumed(daemon)
    assert "web" in {a["app"] for a in status["apps"]}
    assert_served(served)
