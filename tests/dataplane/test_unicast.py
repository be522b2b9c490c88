"""The non-unicast filter (bpf/unicast.c) on this kernel, with real frames on a veth.

The threat, shown first without the filter: a datagram to a broadcast or multicast address
is handed to every wildcard-bound socket of the port, one clone each, with no reuseport
selection. Then, with the filter attached at the cgroup v2 root, the same frames reach no
socket and every clone is counted (so the hook really runs per delivered clone), while
unicast passes. No guard is attached here: the filter holds without one. Each kind is sent
in an L2 broadcast or multicast frame and in a unicast frame to the server's MAC (which the
kernel marks PACKET_HOST: only the destination address tells it apart).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from deploy.netns import NetnsPair
from steerd.daemon.control import IP_MULTICAST_ALL, IPV6_MULTICAST_ALL, bind_group_socket
from steerd.daemon.dataplane.counters import counter_names, possible_cpus, read_counters
from steerd.daemon.dataplane.maps import MAP_PERCPU_ARRAY, libbcc
from steerd.daemon.dataplane.unicast import UnicastFilter, remove_unicast_filter
from tests.dataplane.conftest import OTHER_PORT, PORT, find_tag, new_tag
from tests.linkframes import BROADCAST_MAC, LinkSender, mac_of, multicast_mac

pytestmark = pytest.mark.root

SOCKETS = 3  # per family: each non-unicast datagram becomes this many clones
DEADLINE = 20.0


@dataclass(frozen=True)
class Kind:
    name: str
    dst: str
    l2: str  # "group": the L2 broadcast/multicast address; "unicast": the server's MAC
    counter: str  # which counter its clones land in


def kinds(pair: NetnsPair) -> list[Kind]:
    directed = str(ipaddress.ip_network(f"{pair.server_v4}/24", strict=False).broadcast_address)
    return [
        Kind("224.0.0.1 (all hosts)", "224.0.0.1", "group", "unicast_drop_multicast"),
        Kind("224.0.0.1 in a unicast frame", "224.0.0.1", "unicast", "unicast_drop_multicast"),
        Kind("255.255.255.255", "255.255.255.255", "group", "unicast_drop_broadcast"),
        Kind("directed broadcast", directed, "group", "unicast_drop_broadcast"),
        Kind("directed broadcast in a unicast frame", directed, "unicast",
             "unicast_drop_broadcast"),
        Kind("ff02::1 (all nodes)", "ff02::1", "group", "unicast_drop_multicast"),
        Kind("ff02::1 in a unicast frame", "ff02::1", "unicast", "unicast_drop_multicast"),
    ]


@dataclass
class World:
    pair: NetnsPair
    sender: LinkSender
    server_mac: bytes
    v4: list[socket.socket]
    v6: list[socket.socket]

    def send(self, kind: Kind | None, tag: bytes, family: int = socket.AF_INET,
             port: int = PORT) -> None:
        """``kind``'s datagram (None: unicast to the server's address of ``family``)."""
        if kind is None:
            dst, mac = self.pair.server_addr(family), self.server_mac
        else:
            dst = kind.dst
            group = BROADCAST_MAC if "." in dst and not ipaddress.ip_address(
                dst).is_multicast else multicast_mac(dst)
            mac = group if kind.l2 == "group" else self.server_mac
        src = self.pair.client_v6 if ":" in dst else self.pair.client_v4
        self.sender.send(mac, (src, 40000), (dst, port), tag.ljust(64, b"\0"))

    def sockets(self, dst: str) -> list[socket.socket]:
        return self.v6 if ":" in dst else self.v4


def wildcard_socket(pair: NetnsPair, family: int, port: int = PORT) -> socket.socket:
    """A member of the port's wildcard reuseport group, with multicast "all" left on (the
    kernel's default, which an app may set again on a socket it holds)."""

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        return sock

    return pair.run_server(make)


@pytest.fixture
def world(pair: NetnsPair) -> Iterator[World]:
    made: list[socket.socket] = []
    sender = LinkSender(pair.client, pair.client_if)
    try:
        v4 = [wildcard_socket(pair, socket.AF_INET) for _ in range(SOCKETS)]
        made += v4
        v6 = [wildcard_socket(pair, socket.AF_INET6) for _ in range(SOCKETS)]
        made += v6
        yield World(pair, sender, mac_of(pair.server, pair.server_if), v4, v6)
    finally:
        sender.close()
        for sock in made:
            sock.close()


@dataclass
class Filter:
    flt: UnicastFilter
    counters_fd: int

    def counters(self) -> dict[str, int]:
        names = {i: n for i, n in counter_names().items() if n.startswith("unicast_")}
        return read_counters(self.counters_fd, possible_cpus(), names)


@pytest.fixture
def unicast_filter(pair: NetnsPair) -> Iterator[Filter]:
    """The filter for PORT in the server namespace, with its own counters map and pin dir;
    detached and removed afterwards."""
    pin_dir = f"/sys/fs/bpf/steerd-test-u{uuid.uuid4().hex[:8]}"
    counters = libbcc().bcc_create_map(MAP_PERCPU_ARRAY, b"unicast_test", 4, 8, 64, 0)
    assert counters >= 0
    flt = UnicastFilter(pin_dir, PORT, counters, netns=pair.server)
    try:
        flt.open()
        assert flt.sync_broadcasts() >= {"198.18.0.255"}
        flt.attach()
        assert flt.scope == "its network namespace only"
        yield Filter(flt, counters)
    finally:
        flt.close()
        remove_unicast_filter(pin_dir)
        os.rmdir(pin_dir)
        os.close(counters)
    assert not os.path.exists(pin_dir)


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            data = sock.recv(65535)
        except BlockingIOError:
            return out
        tag = find_tag(data)
        out.append(tag if tag is not None else data)


def await_condition(what: str, done: Callable[[], bool],
                    state: Callable[[], object] = lambda: "") -> None:
    """Poll ``done`` until it holds (a generous deadline: the machine may be loaded); on
    timeout, say what ``state()`` was then."""
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {state()}")
        time.sleep(0.01)


def await_tag(sock: socket.socket, tag: bytes, what: str) -> None:
    """Poll ``sock`` until the datagram tagged ``tag`` arrives."""
    got: list[bytes] = []

    def arrived() -> bool:
        got.extend(drain(sock))
        return tag in got

    await_condition(what, arrived, lambda: got)


def test_without_the_filter_every_wildcard_socket_gets_each_clone(world: World) -> None:
    """Positive control (the threat): each kind reaches all SOCKETS members of the group,
    bypassing reuseport selection."""
    for kind in kinds(world.pair):
        tag = new_tag()
        world.send(kind, tag)
        socks = world.sockets(kind.dst)
        got: dict[int, list[bytes]] = {i: [] for i in range(len(socks))}

        def everyone(socks: list[socket.socket] = socks, got: dict[int, list[bytes]] = got,
                     tag: bytes = tag) -> bool:
            for i, sock in enumerate(socks):
                got[i] += drain(sock)
            return all(tag in seen for seen in got.values())

        await_condition(f"{kind.name} at every socket", everyone, lambda g=got: g)


def test_filter_drops_and_counts_every_clone_and_passes_unicast(
        world: World, unicast_filter: Filter) -> None:
    every = kinds(world.pair)
    sent = {new_tag(): kind for kind in every}
    for tag, kind in sent.items():
        world.send(kind, tag)
    markers = {socket.AF_INET: new_tag(), socket.AF_INET6: new_tag()}
    for family, tag in markers.items():
        world.send(None, tag, family)
    want = {"unicast_drop_multicast": 0, "unicast_drop_broadcast": 0}
    for kind in every:
        want[kind.counter] += SOCKETS  # one per clone: the hook ran for each
    received: list[bytes] = []

    def settled() -> bool:
        for sock in world.v4 + world.v6:
            received.extend(drain(sock))
        return (unicast_filter.counters() == want
                and all(tag in received for tag in markers.values()))

    await_condition(f"drops {want} and the unicast markers", settled,
                    lambda: f"counted {unicast_filter.counters()}, received {received}")
    leaked = [sent[t].name for t in received if t in sent]
    assert leaked == [], f"non-unicast datagrams reached sockets: {leaked}"
    assert sorted(received) == sorted(markers.values())  # each unicast exactly once


def test_filter_leaves_other_ports_alone(world: World, unicast_filter: Filter) -> None:
    """A broadcast to another port is none of its business: delivered, not counted."""
    sock = wildcard_socket(world.pair, socket.AF_INET, OTHER_PORT)
    try:
        tag = new_tag()
        world.send(kinds(world.pair)[2], tag, port=OTHER_PORT)  # 255.255.255.255
        await_tag(sock, tag, "the broadcast on the other port")
        assert unicast_filter.counters() == {"unicast_drop_multicast": 0,
                                             "unicast_drop_broadcast": 0}
    finally:
        sock.close()


def test_group_sockets_take_no_multicast_even_without_the_filter(world: World) -> None:
    """bind_group_socket turns multicast "all" off, so the kernel itself skips its sockets
    for 224.0.0.1 and ff02::1; the same socket with it on again (the control, on a port of
    its own) gets them.

    Not two members of one group: when exactly one member of a reuseport group takes a
    multicast group, this kernel early-demuxes the datagram to that member and then
    reselects within the group (inet_steal_sock -> inet_lookup_reuseport), so any member may
    get it, even one with multicast "all" off. That path runs the group's steering program
    and, like every delivery, the ingress filter (test above)."""
    control_port = OTHER_PORT + 1
    for family, address, level, option in (
            (socket.AF_INET, "0.0.0.0", socket.IPPROTO_IP, IP_MULTICAST_ALL),
            (socket.AF_INET6, "::", socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL)):
        group_sock = world.pair.run_server(lambda a=address: bind_group_socket(  # type: ignore[misc]
            a, OTHER_PORT, classifier=True))
        control = world.pair.run_server(lambda a=address: bind_group_socket(  # type: ignore[misc]
            a, control_port, classifier=True))
        try:
            assert group_sock.getsockopt(level, option) == 0
            control.setsockopt(level, option, 1)
            kind = next(k for k in kinds(world.pair)
                        if k.l2 == "group" and ipaddress.ip_address(k.dst).is_multicast
                        and (":" in k.dst) == (family == socket.AF_INET6))
            missed, tag = new_tag(), new_tag()
            world.send(kind, missed, port=OTHER_PORT)
            world.send(kind, tag, port=control_port)
            await_tag(control, tag, f"{kind.name} at the control socket")
            assert drain(group_sock) == []
        finally:
            group_sock.close()
            control.close()
