"""Header building for re-injection: checksums against a plain RFC 1071 reference, and the
packets decoded back by dpkt (an independent parser)."""

import os
import socket
import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.netns import ip, netns_pair
from steerd.daemon.reinject import (
    Reinjector,
    _plain,
    build_ipv4_udp,
    build_ipv6_udp,
    destination,
    scope_of,
    udp_checksum,
)


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=1500), st.booleans())
def test_udp_checksum_matches_reference(payload: bytes, v6: bool) -> None:
    src, dst = (os.urandom(16), os.urandom(16)) if v6 else (os.urandom(4), os.urandom(4))
    header = struct.pack("!HHHH", 1234, 443, 8 + len(payload), 0)
    ours = udp_checksum(src, dst, header + payload)
    length = 8 + len(payload)
    pseudo = (src + dst + struct.pack("!BBH", 0, 17, length) if not v6
              else src + dst + struct.pack("!IxxxB", length, 17))
    want = 0xFFFF - reference_checksum(pseudo + header + payload)
    assert ours == (want or 0xFFFF)
    # A receiver sums everything including the checksum and must get 0xFFFF.
    filled = struct.pack("!HHHH", 1234, 443, length, ours)
    assert reference_checksum(pseudo + filled + payload) == 0xFFFF


def test_ipv4_packet_decodes() -> None:
    payload = os.urandom(1200)
    raw = build_ipv4_udp(("198.18.0.1", 50000), ("198.18.0.2", 443), payload)
    ip = dpkt.ip.IP(raw)
    assert ip.p == 17 and ip.len == 20 + 8 + 1200 and ip.ttl == 64
    assert ip.data.sport == 50000 and ip.data.dport == 443 and ip.data.data == payload
    assert ip.data.sum == 0  # "no checksum": legal over IPv4, never leaves the host


def test_ipv6_packet_decodes() -> None:
    payload = os.urandom(1300)
    raw = build_ipv6_udp(("fd00::1", 50000), ("fd00::2", 443), payload)
    ip6 = dpkt.ip6.IP6(raw)
    assert ip6.nxt == 17 and ip6.plen == 8 + 1300 and ip6.hlim == 64
    assert ip6.data.sport == 50000 and ip6.data.data == payload
    assert ip6.data.sum != 0


def test_ipv4_mapped_addresses_become_ipv4() -> None:
    assert _plain(("::ffff:198.18.0.1", 5, 0, 0)) == ("198.18.0.1", 5)
    assert _plain(("fe80::1%eth0", 5)) == ("fe80::1", 5)


def test_scope_of() -> None:
    assert scope_of(("fe80::1", 5, 0, 7)) == 7
    assert scope_of(("fe80::1", 5, 0, 0)) == 0
    assert scope_of(("fe80::1", 5)) == 0
    assert scope_of(("fe80::1%3", 5)) == 3
    assert scope_of(("fe80::1%lo", 5)) == socket.if_nametoindex("lo")
    assert scope_of(("fe80::1%no-such-if", 5)) == 0
    assert scope_of(("198.18.0.1", 5)) == 0


def test_destination_keeps_the_ipv6_scope() -> None:
    """Issue 12: the raw socket's destination was (service, 0): a link-local client's scope
    was lost, and the kernel picked whichever interface holds the service address."""
    family, src, dst, sockaddr = destination(("fe80::c", 5555, 0, 4), ("fe80::5", 443))
    assert (family, src, dst, sockaddr) == (
        socket.AF_INET6, ("fe80::c", 5555), ("fe80::5", 443), ("fe80::5", 0, 0, 4))
    # the service's scope when the client has none
    assert destination(("fe80::c", 1), ("fe80::5%9", 443))[3] == ("fe80::5", 0, 0, 9)
    assert destination(("fd00::c", 1), ("fd00::5", 443))[3] == ("fd00::5", 0, 0, 0)
    assert destination(("::ffff:198.18.0.1", 1, 0, 0), ("::ffff:198.18.0.2", 443)) == (
        socket.AF_INET, ("198.18.0.1", 1), ("198.18.0.2", 443), ("198.18.0.2", 0))


def _ifindex(netns: str, dev: str) -> int:
    return int(ip("-o", "link", "show", dev, netns=netns).split(":", 1)[0])


@pytest.mark.parametrize("with_scope", [True, False])
def test_link_local_client_reinjected_on_its_own_interface(with_scope: bool) -> None:
    """A real re-injection in a namespace whose second interface holds the same link-local
    service address (as routers with fe80::1 on every link do). With the client's scope the
    worker sees the client on the veth it came from and its answer reaches the client;
    without it (the old behaviour) the kernel picks the other interface and the answer is
    lost."""
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces, raw sockets)")
    with netns_pair("ll") as p:
        # the decoy interface first: the unscoped route lookup then finds it
        ip("link", "add", "ll0", "type", "veth", "peer", "name", "ll1", netns=p.server)
        for dev in ("ll1", "ll0"):
            ip("link", "set", dev, "up", netns=p.server)
        ip("addr", "add", "fe80::5/64", "dev", "ll0", "nodad", netns=p.server)
        ip("addr", "add", "fe80::5/64", "dev", p.server_if, "nodad", netns=p.server)
        ip("addr", "add", "fe80::c/64", "dev", p.client_if, "nodad", netns=p.client)
        scope = _ifindex(p.server, p.server_if)
        worker = p.server_socket(socket.AF_INET6, socket.SOCK_DGRAM)
        client = p.client_socket(socket.AF_INET6, socket.SOCK_DGRAM)
        reinjector = Reinjector()
        try:
            worker.bind(("::", 4433))
            worker.settimeout(2)
            client.bind(("fe80::c", 5555, 0, _ifindex(p.client, p.client_if)))
            client.settimeout(1)
            # the client as the daemon's recvmsg() sees it: (host, port, flowinfo, scope_id)
            origin = ("fe80::c", 5555, 0, scope) if with_scope else ("fe80::c", 5555)
            # its raw socket opens on first use: in the server namespace
            assert p.run_server(
                lambda: reinjector.send(origin, ("fe80::5", 4433), [b"initial"])) == 1
            data, peer = worker.recvfrom(64)
            assert data == b"initial"
            worker.sendto(b"handshake", peer)
            if with_scope:
                assert peer == ("fe80::c", 5555, 0, scope)
                assert client.recvfrom(64)[0] == b"handshake"
            else:
                assert peer[3] != scope  # arrived "on" the decoy: the answer goes nowhere
                with pytest.raises(TimeoutError):
                    client.recvfrom(64)
        finally:
            reinjector.close()
            worker.close()
            client.close()
