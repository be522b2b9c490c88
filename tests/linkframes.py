"""Whole Ethernet frames sent and watched on a veth end in a test namespace (tests only).

Why frames: to send a datagram to a broadcast or multicast address the way an attacker on
the link would, the test must choose the link-layer destination as well as the IP one: an L2
broadcast or multicast frame (the kernel marks it PACKET_BROADCAST / PACKET_MULTICAST) and a
unicast frame to the server's MAC carrying a broadcast or multicast IP destination (marked
PACKET_HOST, which only the address tells apart), each with any source address. An
``AF_PACKET`` socket on the client's veth end sends exactly the bytes given, and a second one
sees every frame that reaches the client side, answers to spoofed sources included.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import threading
from dataclasses import dataclass, field

from deploy.netns import ip
from steerd.daemon.dataplane.netns import run_in_netns
from steerd.daemon.reinject import build_ipv4_udp, build_ipv6_udp

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6


def mac_of(netns: str, ifname: str) -> bytes:
    """The MAC address of ``ifname`` in ``netns``."""
    link = json.loads(ip("-j", "link", "show", "dev", ifname, netns=netns))[0]
    return bytes.fromhex(link["address"].replace(":", ""))


def multicast_mac(address: str) -> bytes:
    """The link-layer group an IP multicast address maps to (RFC 1112 §6.4, RFC 2464 §7)."""
    packed = ipaddress.ip_address(address).packed
    if len(packed) == 4:
        return b"\x01\x00\x5e" + bytes([packed[1] & 0x7F]) + packed[2:]
    return b"\x33\x33" + packed[12:]


def _ipv4_header_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def udp_frame(dst_mac: bytes, src_mac: bytes, src: tuple[str, int], dst: tuple[str, int],
              payload: bytes) -> bytes:
    """An Ethernet frame carrying one UDP datagram (IPv4 or IPv6 by ``dst``), checksums
    filled in: nothing between the socket and the wire completes it for AF_PACKET."""
    if ":" in dst[0]:
        return dst_mac + src_mac + struct.pack("!H", ETH_P_IPV6) + build_ipv6_udp(src, dst,
                                                                                   payload)
    packet = bytearray(build_ipv4_udp(src, dst, payload))  # header checksum left 0
    struct.pack_into("!H", packet, 10, _ipv4_header_checksum(bytes(packet[:20])))
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + bytes(packet)


class LinkSender:
    """Sends whole frames out of ``ifname`` in ``netns``."""

    def __init__(self, netns: str, ifname: str) -> None:
        self.mac = mac_of(netns, ifname)
        self.sock: socket.socket = run_in_netns(netns, lambda: socket.socket(
            socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0))
        self.sock.bind((ifname, 0))

    def send(self, dst_mac: bytes, src: tuple[str, int], dst: tuple[str, int],
             payload: bytes) -> None:
        self.sock.send(udp_frame(dst_mac, self.mac, src, dst, payload))

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True, slots=True)
class Seen:
    """One UDP datagram seen on the link."""

    src: tuple[str, int]
    dst: tuple[str, int]
    length: int


def parse_udp(frame: bytes) -> Seen | None:
    """The UDP datagram in an Ethernet frame (IPv4, or IPv6 without extension headers)."""
    if len(frame) < 14:
        return None
    kind = struct.unpack_from("!H", frame, 12)[0]
    if kind == ETH_P_IP and len(frame) >= 34 and frame[23] == socket.IPPROTO_UDP:
        at = 14 + (frame[14] & 0x0F) * 4
        src, dst = frame[26:30], frame[30:34]
        family = socket.AF_INET
    elif kind == ETH_P_IPV6 and len(frame) >= 62 and frame[20] == socket.IPPROTO_UDP:
        at = 54
        src, dst = frame[22:38], frame[38:54]
        family = socket.AF_INET6
    else:
        return None
    if len(frame) < at + 8:
        return None
    sport, dport, length = struct.unpack_from("!HHH", frame, at)
    return Seen((socket.inet_ntop(family, src), sport), (socket.inet_ntop(family, dst), dport),
                length)


@dataclass
class LinkCapture:
    """Every UDP datagram to one of ``ports`` that crosses ``ifname`` in ``netns``, in either
    direction, from start() to stop(); read ``seen`` (a thread drains the socket, so busy
    links do not overflow it)."""

    netns: str
    ifname: str
    ports: frozenset[int]
    seen: list[Seen] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LinkCapture:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.htons(ETH_P_ALL))
            sock.bind((self.ifname, ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.settimeout(0.2)
            return sock

        self._sock = run_in_netns(self.netns, make)
        self._thread = threading.Thread(target=self._run, name="link-capture", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while (sock := self._sock) is not None:
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            seen = parse_udp(frame)
            if seen is not None and seen.dst[1] in self.ports:
                with self._lock:
                    self.seen.append(seen)

    def to_ports(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if self._thread is not None:
            self._thread.join(5)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
