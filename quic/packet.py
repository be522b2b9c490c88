"""QUIC packet headers: RFC 8999 invariants, RFC 9000 v1 and RFC 9369 v2 long headers.

The classifier sees hostile bytes first, so every parser here checks each length against the
buffer before slicing and reports failures only as ``QuicError`` with a stable reason
(``truncated``, ``bad_length``, ``bad_cid_length``, ``fixed_bit_clear``, ``not_long_header``).
Offsets in the results are datagram offsets so the crypto layer can work in place without
copying packets out of coalesced datagrams.
"""

from dataclasses import dataclass
from enum import IntEnum
from struct import Struct
from typing import NamedTuple

from quic.errors import QuicError
from quic.varint import decode_varint

VERSION_NEGOTIATION_VERSION = 0x0000_0000
VERSION_1 = 0x0000_0001
VERSION_2 = 0x6B33_43CF
SUPPORTED_VERSIONS = (VERSION_1, VERSION_2)
MAX_CID_LEN = 20  # RFC 9000 §17.2; RFC 8999 allows 255 for unknown versions
RETRY_INTEGRITY_TAG_LEN = 16

LONG_HEADER_BIT = 0x80
FIXED_BIT = 0x40


class PacketType(IntEnum):
    """Long-header packet types, independent of the version's bit encoding."""

    INITIAL = 0
    ZERO_RTT = 1
    HANDSHAKE = 2
    RETRY = 3
    VERSION_NEGOTIATION = 4


# The two "Long Packet Type" bits (0x30 of the first byte) per version. v2 permutes them
# (RFC 9369 §3.2) precisely so middleboxes cannot ossify on v1's encoding.
_TYPES_BY_BITS: dict[int, tuple[PacketType, PacketType, PacketType, PacketType]] = {
    VERSION_1: (PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE, PacketType.RETRY),
    VERSION_2: (PacketType.RETRY, PacketType.INITIAL, PacketType.ZERO_RTT, PacketType.HANDSHAKE),
}
_BITS_BY_TYPE: dict[int, dict[PacketType, int]] = {
    version: {ptype: bits for bits, ptype in enumerate(types)}
    for version, types in _TYPES_BY_BITS.items()
}


_INITIAL = PacketType.INITIAL
_RETRY = PacketType.RETRY


def long_header_type_bits(version: int, packet_type: PacketType) -> int:
    """The 2-bit type code of ``packet_type`` in ``version`` (builders need the reverse map)."""
    try:
        return _BITS_BY_TYPE[version][packet_type]
    except KeyError:
        raise QuicError(
            "unsupported_version", f"no {packet_type.name} encoding for version 0x{version:08x}"
        ) from None


def encode_long_header_start(
    version: int, packet_type: PacketType, low_bits: int, dcid: bytes, scid: bytes
) -> bytes:
    """The part every long header of a known version shares: first byte (form and fixed bits,
    the version's type bits, ``low_bits`` in the low nibble), version, DCID and SCID.
    The builders add what follows (token, length, packet number; or a Retry's token)."""
    if len(dcid) > MAX_CID_LEN or len(scid) > MAX_CID_LEN:
        raise QuicError("bad_cid_length", f"DCID {len(dcid)} / SCID {len(scid)} bytes, "
                        f"at most {MAX_CID_LEN}")
    first = 0xC0 | (long_header_type_bits(version, packet_type) << 4) | (low_bits & 0x0F)
    return b"".join((bytes((first,)), version.to_bytes(4, "big"), bytes((len(dcid),)), dcid,
                     bytes((len(scid),)), scid))


class LongHeader(NamedTuple):
    """One long-header packet located inside a datagram (offsets are datagram offsets).

    A NamedTuple rather than a frozen dataclass because it is made once per packet on the
    classifier's hot path: ``tuple.__new__`` builds it in one C call, where a frozen
    dataclass pays an ``object.__setattr__`` round per field (about 10k of the 22k
    instructions this parse used to cost). It is just as immutable.

    For a Version Negotiation or unknown-version packet, ``pn_offset`` is the offset just past
    the SCID (where the version list or the version-specific part begins) and ``end`` is the
    end of the datagram. For a Retry, ``token`` is the Retry token, ``pn_offset`` is the offset
    of the 16-byte integrity tag and ``end`` the end of the datagram.
    """

    version: int
    packet_type: PacketType | None  # None for an unknown version (only invariants parsed)
    dcid: bytes
    scid: bytes
    token: bytes  # Initial and Retry only, else b""
    start: int  # offset of the first byte of this packet in the datagram
    pn_offset: int  # offset of the (protected) packet number field
    end: int  # offset one past this packet (coalesced packets follow)


_new_header = tuple.__new__
_INVARIANTS = Struct(">BIB")  # first byte, version, DCID length (RFC 8999 §5.1)


def parse_long_header(datagram: bytes, pos: int = 0) -> LongHeader:
    """Parse the long header at ``pos``; unknown versions parse only RFC 8999 invariants.

    Known versions (v1, v2) get full RFC 9000 §17.2 validation: CIDs of at most 20 bytes, the
    fixed bit set (a client cannot have negotiated grease_quic_bit in its first flight), and a
    Length field that stays inside the datagram. Unknown versions must still yield their DCID
    and SCID because Version Negotiation echoes them back (CIDs up to 255 bytes, RFC 8999 §5.1).
    """
    n = len(datagram)
    if pos + 7 > n:
        raise QuicError("truncated", "long header shorter than its invariant fields")
    # first byte, version and DCID length in one C call (this runs once per packet)
    first, version, dcid_len = _INVARIANTS.unpack_from(datagram, pos)
    if not first & LONG_HEADER_BIT:
        raise QuicError("not_long_header", f"first byte 0x{first:02x} at offset {pos}")
    types = _TYPES_BY_BITS.get(version)
    max_cid = MAX_CID_LEN if types is not None else 255
    if dcid_len > max_cid:
        raise QuicError("bad_cid_length", f"DCID length {dcid_len} for version 0x{version:08x}")
    p = pos + 6 + dcid_len
    if p >= n:
        raise QuicError("truncated", "packet ends inside the DCID")
    dcid = datagram[pos + 6 : p]
    scid_len = datagram[p]
    if scid_len > max_cid:
        raise QuicError("bad_cid_length", f"SCID length {scid_len} for version 0x{version:08x}")
    p += 1 + scid_len
    if p > n:
        raise QuicError("truncated", "packet ends inside the SCID")
    scid = datagram[p - scid_len : p]

    if types is None:
        ptype = PacketType.VERSION_NEGOTIATION if version == VERSION_NEGOTIATION_VERSION else None
        return _new_header(LongHeader, (version, ptype, dcid, scid, b"", pos, p, n))

    if not first & FIXED_BIT:
        raise QuicError("fixed_bit_clear", f"first byte 0x{first:02x}")
    ptype = types[(first >> 4) & 0x03]
    token = b""
    if ptype is _RETRY:
        tag_at = n - RETRY_INTEGRITY_TAG_LEN
        if tag_at < p:
            raise QuicError("truncated", "Retry shorter than its integrity tag")
        token = datagram[p:tag_at]
        return _new_header(LongHeader, (version, ptype, dcid, scid, token, pos, tag_at, n))
    if ptype is _INITIAL:
        # Varints inlined for their usual sizes (1-byte token length, 2-byte Length): this is
        # the per-datagram hot path of the classifier.
        if p < n and datagram[p] < 0x40:
            token_len = datagram[p]
            p += 1
        else:
            token_len, p = decode_varint(datagram, p)
        if p + token_len > n:
            raise QuicError("bad_length", f"token length {token_len} exceeds the datagram")
        token = datagram[p : p + token_len]
        p += token_len
    if p + 1 < n and datagram[p] >> 6 == 1:
        length = ((datagram[p] & 0x3F) << 8) | datagram[p + 1]
        p += 2
    else:
        length, p = decode_varint(datagram, p)
    end = p + length
    if end > n:
        raise QuicError("bad_length", f"Length {length} exceeds the datagram by {end - n}")
    return _new_header(LongHeader, (version, ptype, dcid, scid, token, pos, p, end))


@dataclass(frozen=True, slots=True)
class ShortHeader:
    """A 1-RTT packet: its DCID and where its protected packet number starts."""

    dcid: bytes
    pn_offset: int
    end: int


def parse_short_header(datagram: bytes, dcid_len: int, pos: int = 0) -> ShortHeader:
    """Parse a short header whose DCID length the receiver knows (it chose the CID).

    A short-header packet always runs to the end of the datagram (RFC 9000 §12.2).
    """
    n = len(datagram)
    if pos >= n:
        raise QuicError("truncated", "empty packet")
    first = datagram[pos]
    if first & LONG_HEADER_BIT:
        raise QuicError("not_short_header", f"first byte 0x{first:02x}")
    if not 0 <= dcid_len <= MAX_CID_LEN:
        raise QuicError("bad_cid_length", f"DCID length {dcid_len}")
    pn_offset = pos + 1 + dcid_len
    if pn_offset >= n:
        raise QuicError("truncated", "packet ends inside the DCID")
    return ShortHeader(datagram[pos + 1 : pn_offset], pn_offset, n)


def encode_varint_fixed(value: int, size: int) -> bytes:
    """A varint in exactly ``size`` bytes (1, 2, 4 or 8), not the shortest form.

    Builders want a fixed-size Length field so the header can be laid out before the payload
    length is final; RFC 9001 A.3 itself encodes 117 on two bytes.
    """
    prefix = {1: 0x00, 2: 0x40, 4: 0x80, 8: 0xC0}.get(size)
    if prefix is None:
        raise QuicError("varint_range", f"varint size {size}")
    if value < 0 or value >= 1 << (8 * size - 2):
        raise QuicError("varint_range", f"{value} does not fit a {size}-byte varint")
    return (value | (prefix << (8 * size - 8))).to_bytes(size, "big")
