"""Broadcast and multicast Initials get no answer (issue 18, item 4), shown by attacking for real.

The daemon listens on the wildcard addresses (0.0.0.0 and ::), where the kernel hands a
datagram to a broadcast or multicast address to every member socket of the group, one clone
each, without running the steering program: every worker of every app would answer one
spoofed Initial (amplification, and the ACL and name rules bypassed). Two tenants serve real
clients (the demo's HTTP/3 site and file service, each as its own uid). An attacker on the
client's link sends real client Initials in whole Ethernet frames, from a spoofed source
port nobody listens on, to 224.0.0.1 and ff02::1 (the all-hosts / all-nodes groups every
interface is in), 255.255.255.255 and the server subnet's directed broadcast, each in an L2
group frame and in a unicast frame to the server's MAC. A capture on the client side of the
veth must see no answer at all; the filter's counters must show the broadcast clones it
dropped; the tenants' clients must see 0 failures. The positive control sends the same
Initial unicast from another spoofed port and sees it answered, so the capture would have
seen an answer.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from tests.e2e.conftest import PORT
from tests.linkframes import BROADCAST_MAC, LinkCapture, LinkSender, mac_of, multicast_mac
from tests.sdk.harness import Loader
from tests.security.tenants import (
    ACL,
    Tenants,
    assert_served,
    counters,
    delta,
    served_fixture,
    tenants_world,
)

pytestmark = pytest.mark.root

VICTIM_PORT = 7  # the spoofed source of the attack: nothing listens there
CONTROL_PORT = 9  # the spoofed source of the positive control
DEADLINE = 30.0
ROUNDS = 3  # Initials per kind (each its own connection)


# The daemon listens on the wildcard addresses instead of the server's own: the case where the
# kernel clones non-unicast datagrams to every socket.
world = tenants_world(ACL, listen=["0.0.0.0", "::"])
served = served_fixture()


def client_initial(alpn: str, server: tuple[str, int]) -> bytes:
    """A real aioquic client's first datagram (an Initial with the whole ClientHello)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], verify_mode=0,
                               server_name="localhost")
    conn = QuicConnection(configuration=config)
    conn.connect(server, now=time.time())
    return conn.datagrams_to_send(now=time.time())[0][0]


def await_condition(what: str, done: Callable[[], bool], state: Callable[[], object]) -> None:
    """Poll ``done`` until it holds (a generous deadline: the machine may be loaded)."""
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {state()}")
        time.sleep(0.05)


def test_broadcast_and_multicast_initials_get_no_answer(world: Tenants,
                                                        served: list[Loader]) -> None:
    pair = world.pair
    status = world.daemon.status()
    assert status["listen"] == ["0.0.0.0", "::"]
    assert status["unicast_filter"] == "attached"
    server_mac = mac_of(pair.server, pair.server_if)
    directed = str(ipaddress.ip_network(f"{pair.server_v4}/24", strict=False).broadcast_address)
    attacks = [  # (destination, link-layer destination)
        ("224.0.0.1", multicast_mac("224.0.0.1")), ("224.0.0.1", server_mac),
        ("255.255.255.255", BROADCAST_MAC),
        (directed, BROADCAST_MAC), (directed, server_mac),
        ("ff02::1", multicast_mac("ff02::1")), ("ff02::1", server_mac),
    ]
    sender = LinkSender(pair.client, pair.client_if)
    capture = LinkCapture(pair.client, pair.client_if,
                          frozenset({VICTIM_PORT, CONTROL_PORT})).start()
    try:
        before = counters(world.daemon)
        broadcasts = 0
        for round_ in range(ROUNDS):
            for dst, mac in attacks:
                v6 = ":" in dst
                spoofed = (pair.client_v6 if v6 else pair.client_v4, VICTIM_PORT)
                alpn = "h3" if round_ % 2 == 0 else "smb"
                sender.send(mac, spoofed, (dst, PORT), client_initial(alpn, (dst, PORT)))
                broadcasts += not v6 and not ipaddress.ip_address(dst).is_multicast
        # Every wildcard IPv4 socket (the classifier's and at least the 3 workers) had
        # each broadcast clone dropped before it was queued.
        want = 4 * broadcasts
        await_condition(
            f">= {want} broadcast clones dropped",
            lambda: delta(before, counters(world.daemon), "unicast_drop_broadcast") >= want,
            lambda: ({k: v - before.get(k, 0) for k, v in counters(world.daemon).items()
                      if k.startswith("unicast_")},
                     f"{sum(s.dst[1] == VICTIM_PORT for s in capture.to_ports())} answers"))
        # Positive control: the same Initial, unicast from a spoofed port, is answered, and
        # the capture sees that answer (IPv4 and IPv6).
        for family in (socket.AF_INET, socket.AF_INET6):
            server = (pair.server_addr(family), PORT)
            sender.send(server_mac, (pair.client_addr(family), CONTROL_PORT), server,
                        client_initial("h3", server))
        await_condition(
            "answers to the unicast controls",
            lambda: {":" in s.dst[0] for s in capture.to_ports()
                     if s.dst[1] == CONTROL_PORT and s.src[1] == PORT} == {False, True},
            capture.to_ports)
        # Everything sent to the attack's spoofed port came before the controls, which were
        # answered: nothing answered the attack.
        answers = [s for s in capture.to_ports() if s.dst[1] == VICTIM_PORT]
        assert answers == []
    finally:
        capture.stop()
        sender.close()
    assert_served(served)
