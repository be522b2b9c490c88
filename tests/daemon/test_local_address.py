"""Which datagrams the classifier treats as sent to one of our unicast addresses: the rest
(broadcasts, a subnet's directed broadcast, multicasts) are never classified or answered."""

from __future__ import annotations

import socket

import pytest

from steerd.daemon.service import _IN6_PKTINFO, _IN_PKTINFO, IP_PKTINFO, _local_address

FALLBACK = ("0.0.0.0", 443)


def v4(spec_dst: str, addr: str) -> list[tuple[int, int, bytes]]:
    data = _IN_PKTINFO.pack(2, socket.inet_aton(spec_dst), socket.inet_aton(addr))
    return [(socket.IPPROTO_IP, IP_PKTINFO, data)]


def v6(addr: str) -> list[tuple[int, int, bytes]]:
    data = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, addr), 2)
    return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, data)]


def test_unicast_to_a_local_address() -> None:
    assert _local_address(v4("198.18.0.2", "198.18.0.2"), FALLBACK) == "198.18.0.2"
    assert _local_address(v6("2001:db8::2"), FALLBACK) == "2001:db8::2"
    assert _local_address([], FALLBACK) == "0.0.0.0"  # no ancillary data: the bound address


@pytest.mark.parametrize("dst", ["198.18.0.255", "255.255.255.255", "239.1.2.3"])
def test_broadcast_and_multicast_are_not_ours(dst: str) -> None:
    # the kernel reports the route's local address apart from the header's destination
    assert _local_address(v4("198.18.0.2", dst), FALLBACK) is None


def test_ipv6_multicast_is_not_ours() -> None:
    assert _local_address(v6("ff02::1"), FALLBACK) is None
