"""Header building for re-injection: checksums against a plain RFC 1071 reference, and the
packets decoded back by dpkt (an independent parser)."""

import os
import struct

import dpkt
from hypothesis import given
from hypothesis import strategies as st

from steerd.reinject import _plain, build_ipv4_udp, build_ipv6_udp, udp_checksum


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
