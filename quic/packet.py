"""QUIC packet headers: RFC 8999 invariants, RFC 9000 v1 and RFC 9369 v2 long headers.

CONTRACT (stub written first so parallel work can code against it; fill in, keep signatures).
"""

from dataclasses import dataclass
from enum import IntEnum

VERSION_1 = 0x0000_0001
VERSION_2 = 0x6B33_43CF
SUPPORTED_VERSIONS = (VERSION_1, VERSION_2)
MAX_CID_LEN = 20  # RFC 9000 §17.2; RFC 8999 allows 255 for unknown versions


class PacketType(IntEnum):
    """Long-header packet types, independent of the version's bit encoding."""

    INITIAL = 0
    ZERO_RTT = 1
    HANDSHAKE = 2
    RETRY = 3
    VERSION_NEGOTIATION = 4


@dataclass(frozen=True, slots=True)
class LongHeader:
    """One long-header packet located inside a datagram (offsets are datagram offsets)."""

    version: int
    packet_type: PacketType | None  # None for an unknown version (only invariants parsed)
    dcid: bytes
    scid: bytes
    token: bytes  # Initial only, else b""
    start: int  # offset of the first byte of this packet in the datagram
    pn_offset: int  # offset of the (protected) packet number field
    end: int  # offset one past this packet (coalesced packets follow)


def parse_long_header(datagram: bytes, pos: int = 0) -> LongHeader:
    """Parse the long header at ``pos``; unknown versions parse only RFC 8999 invariants."""
    raise NotImplementedError


def split_datagram(datagram: bytes) -> list[LongHeader]:
    """Every coalesced long-header packet of a datagram, in order (RFC 9000 §12.2).

    A short-header packet or trailing padding ends the walk.
    """
    raise NotImplementedError
