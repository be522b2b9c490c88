"""Reading a classifier socket: a batch of datagrams, each with its origin (client, the local
address it was sent to, the group), non-unicast ones counted and dropped."""

import logging
import socket
import struct
from collections.abc import Iterator, Sequence

from steerd.daemon.classifier import Address, Origin
from steerd.daemon.control import IP_PKTINFO
from steerd.daemon.metrics import bump

log = logging.getLogger("steerd")


_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr


_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex


_RECV_BUFFER = 65535


_ANC_SPACE = socket.CMSG_SPACE(64)


_BATCH = 64  # datagrams read per readiness event, so one busy socket cannot starve the loop


def _local_address(ancdata: Sequence[tuple[int, int, bytes]], fallback: tuple[str, int]
                   ) -> str | None:
    """The local address a datagram was sent to, or None if it was not one of ours as a
    unicast destination: IPv4 reports the header's destination and the local address the
    route chose apart, and they differ exactly for broadcasts (also a subnet's directed
    broadcast, which the steering program cannot tell) and multicasts."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, spec_dst, addr = _IN_PKTINFO.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, addr) if addr == spec_dst else None
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            addr = _IN6_PKTINFO.unpack_from(data)[0]
            return None if addr[0] == 0xFF else socket.inet_ntop(socket.AF_INET6, addr)
    return fallback[0]


def receive(
    sock: socket.socket, group: int, address: str, port: int, dropped: dict[str, int]
) -> Iterator[tuple[bytes, Origin]]:
    """Drain up to a batch of datagrams from a non-blocking classifier socket. Datagrams
    not sent to a local unicast address are counted in ``dropped`` and never answered."""
    for _ in range(_BATCH):
        try:
            data, anc, _flags, client = sock.recvmsg(_RECV_BUFFER, _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ICMP errors surfacing on the socket: not fatal
            log.debug("classifier recv: %s", exc)
            return
        local = _local_address(anc, (address, port))
        if local is None:
            bump(dropped, "not_unicast")
            continue
        # An IPv6 link-local client keeps its scope (the interface), or re-injection and
        # replies would go out the wrong one; everyone else is (host, port).
        if len(client) == 4 and client[3]:
            peer: Address = (client[0], client[1], 0, client[3])
        else:
            peer = (client[0], client[1])
        yield data, Origin(peer, (local, port), group)
