"""Re-inject a client's buffered datagrams with the client's own source address.

Why a raw socket: once the classifier has written ``initial_routes[DCID]``, the datagrams it
already holds must reach the chosen worker as if they had just arrived from the client, so the
worker's QUIC stack sees the client's true address and answers it directly. Sending them from
an ``IPPROTO_RAW`` socket with a hand-built IP header (source = client, destination = the
service address the client used) makes the kernel deliver them locally through the normal UDP
socket lookup, where the reuseport program runs again and now finds the route.

The header building is pure (``build_ipv4_udp``, ``build_ipv6_udp``); only ``Reinjector``
touches sockets.
"""

import socket
import struct
from collections.abc import Sequence

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")
_UDP_HEADER = struct.Struct("!HHHH")

Address = tuple[str, int]  # (ip, port): what the packet headers carry
# What callers may pass: (ip, port), or an IPv6 sockaddr as recvmsg() gives it,
# (ip, port, flowinfo, scope_id); a scope may also be written "fe80::1%eth0" / "fe80::1%2".
SockAddr = tuple[str, int] | tuple[str, int, int, int]


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ones_complement_sum(data: bytes) -> int:
    """RFC 1071 sum of ``data`` (zero-padded to even length), in 1..0xFFFF (0 only for all
    zeros): computed on one big integer, since 2**16 == 1 (mod 0xFFFF) makes the sum of the
    16-bit words equal the number modulo 0xFFFF — far faster in CPython than a loop."""
    value = int.from_bytes(data, "big")
    if len(data) % 2:
        value <<= 8
    total = value % 0xFFFF
    if total == 0 and value:
        return 0xFFFF
    return total


def udp_checksum(src: bytes, dst: bytes, udp_header: bytes, payload: bytes = b"") -> int:
    """UDP checksum over the pseudo-header (RFC 768, RFC 8200 §8.1); never 0 on the wire.

    The 8-byte header and the payload are summed apart (both start on even offsets), so the
    payload is never copied.
    """
    length = len(udp_header) + len(payload)
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    else:
        pseudo = src + dst + struct.pack("!IxxxB", length, socket.IPPROTO_UDP)
    total = (_ones_complement_sum(pseudo + udp_header) + _ones_complement_sum(payload))
    csum = 0xFFFF - _fold(total)
    return csum or 0xFFFF


def build_ipv4_udp(src: Address, dst: Address, payload: bytes) -> bytes:
    """An IPv4 packet carrying one UDP datagram from ``src`` to ``dst``.

    The UDP checksum is 0 ("none", RFC 768): legal over IPv4, and the packet never leaves the
    host, so computing it would only cost time on the classifier's hot path.
    """
    s = socket.inet_pton(socket.AF_INET, src[0])
    d = socket.inet_pton(socket.AF_INET, dst[0])
    udp = _UDP_HEADER.pack(src[1], dst[1], _UDP_HEADER.size + len(payload), 0) + payload
    total = 20 + len(udp)
    # The kernel fills the IPv4 header checksum and, with id 0, the identification (raw(7)).
    header = _IPV4_HEADER.pack(0x45, 0, total, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, s, d)
    return header + udp


def build_ipv6_udp(src: Address, dst: Address, payload: bytes) -> bytes:
    """An IPv6 packet carrying one UDP datagram from ``src`` to ``dst``."""
    s = socket.inet_pton(socket.AF_INET6, src[0])
    d = socket.inet_pton(socket.AF_INET6, dst[0])
    length = _UDP_HEADER.size + len(payload)
    # IPv6 has no "no checksum" (RFC 8200 §8.1): compute it.
    csum = udp_checksum(s, d, _UDP_HEADER.pack(src[1], dst[1], length, 0), payload)
    udp = _UDP_HEADER.pack(src[1], dst[1], length, csum) + payload
    header = _IPV6_HEADER.pack(6 << 28, len(udp), socket.IPPROTO_UDP, 64, s, d)
    return header + udp


def _plain(addr: SockAddr) -> Address:
    """IPv4-mapped IPv6 addresses become IPv4 (a dual-stack socket's peers re-inject right),
    and a scope suffix is dropped. String checks, not ``ipaddress``: this runs per datagram,
    and the kernel always prints a mapped address as ``::ffff:a.b.c.d``."""
    host = addr[0]
    if ":" not in host:
        return host, addr[1]
    if "%" in host:
        host = host.split("%", 1)[0]
    if "." in host and host[:7].lower() == "::ffff:":
        host = host[7:]
    return host, addr[1]


def scope_of(addr: SockAddr) -> int:
    """The IPv6 scope (interface index) of a socket address, 0 for none: the sockaddr's
    ``scope_id``, else a ``%index`` or ``%name`` suffix (a name this namespace does not know
    counts as none)."""
    if len(addr) >= 4 and addr[3]:
        return int(addr[3])
    host = addr[0]
    if "%" not in host:
        return 0
    zone = host.split("%", 1)[1]
    if zone.isdigit():
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except OSError:
        return 0


def destination(client: SockAddr, service: SockAddr
                ) -> tuple[int, Address, Address, SockAddr]:
    """Family, header source and destination, and the raw socket's destination sockaddr for
    one re-injection.

    For IPv6 the sockaddr carries the scope: a link-local service address (fe80::/10) names
    no interface by itself, and the kernel resolves it to some interface holding it -- when
    several do (the same fe80::1 on many links is common), perhaps not the one the client is
    on. The datagram then arrives on the wrong interface, the worker sees the client at
    fe80::x%wrong and its answers are lost. The scope is the client's (a link-local peer is
    on the link the datagram came in on), else the service's. The kernel ignores it for
    addresses that need none."""
    src, dst = _plain(client), _plain(service)
    if ":" not in dst[0]:
        return socket.AF_INET, src, dst, (dst[0], 0)
    return socket.AF_INET6, src, dst, (dst[0], 0, 0, scope_of(client) or scope_of(service))


class Reinjector:
    """Raw sockets (one per address family, opened lazily) that send client datagrams to a
    local service address. Needs CAP_NET_RAW; create it in the network namespace the service
    lives in."""

    def __init__(self) -> None:
        self._socks: dict[int, socket.socket] = {}

    def _sock(self, family: int) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            # IPPROTO_RAW implies a caller-built IP header, for IPv4 and (Linux >= 4.5) IPv6.
            sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
            self._socks[family] = sock
        return sock

    def send(self, client: SockAddr, service: SockAddr, datagrams: Sequence[bytes]) -> int:
        """Send ``datagrams`` as if from ``client`` to ``service``; returns how many went.

        Pass IPv6 addresses as recvmsg() gives them, (host, port, flowinfo, scope_id): a
        link-local client must be re-injected on its own interface (see :func:`destination`)."""
        family, src, dst, sockaddr = destination(client, service)
        build = build_ipv6_udp if family == socket.AF_INET6 else build_ipv4_udp
        sock = self._sock(family)
        sent = 0
        for payload in datagrams:
            sock.sendto(build(src, dst, payload), sockaddr)
            sent += 1
        return sent

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
