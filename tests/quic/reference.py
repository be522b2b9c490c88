"""QUIC functions only the tests need: what a client does (split a coalesced datagram, read a
Version Negotiation, check a Retry's integrity tag) and the textbook HKDF steps the RFC test
vectors show. The product (quic/) does none of it: the daemon never parses a server's
packets, and derives its Initial keys on a fast path of its own (quic.crypto).

Built on stdlib ``hmac`` and cryptography with the RFC constants written out here, so they
check quic/ rather than repeat it.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from quic.crypto import AES_128_GCM, CHACHA20_POLY1305, LABEL_PREFIXES, PacketKeys, hkdf_label_info
from quic.errors import QuicError
from quic.packet import (
    LONG_HEADER_BIT,
    RETRY_INTEGRITY_TAG_LEN,
    VERSION_1,
    VERSION_2,
    LongHeader,
    PacketType,
    parse_long_header,
)

# The Retry Integrity Tag's fixed AEAD key and nonce: RFC 9001 §5.8 (v1), RFC 9369 §3.3.3 (v2).
RETRY_INTEGRITY = {
    VERSION_1: ("be0c690b9f66575a1d766b54e368c84e", "461599d35d632bf2239825bb"),
    VERSION_2: ("8fb4b01b56ac48e260fbcbcead7ccc92", "d86969bc2d7c6d9990efb04a"),
}


def is_long_header(first_byte: int) -> bool:
    """RFC 8999 §5.1: the most significant bit alone tells long from short headers."""
    return bool(first_byte & LONG_HEADER_BIT)


def split_datagram(datagram: bytes) -> list[LongHeader]:
    """Every coalesced long-header packet of a datagram, in order (RFC 9000 §12.2).

    A short-header packet or trailing padding ends the walk: both start with a clear high bit
    (zero padding after the last packet is how many clients fill 1200 bytes). Packets without
    a Length field (Retry, Version Negotiation, unknown versions) run to the end of the datagram.
    """
    packets: list[LongHeader] = []
    pos = 0
    n = len(datagram)
    while pos < n and datagram[pos] & LONG_HEADER_BIT:
        header = parse_long_header(datagram, pos)
        packets.append(header)
        if header.end == n or header.packet_type is None or header.packet_type >= PacketType.RETRY:
            break
        pos = header.end
    return packets


def parse_version_negotiation(datagram: bytes) -> tuple[bytes, bytes, list[int]]:
    """``(dcid, scid, supported_versions)`` of a Version Negotiation packet (RFC 9000 §17.2.1).

    The version list must be whole 4-byte entries and non-empty; anything else is malformed.
    """
    header = parse_long_header(datagram)
    if header.packet_type is not PacketType.VERSION_NEGOTIATION:
        raise QuicError("not_version_negotiation", f"version 0x{header.version:08x}")
    body = datagram[header.pn_offset :]
    if not body or len(body) % 4:
        raise QuicError("bad_length", f"version list of {len(body)} bytes")
    versions = [int.from_bytes(body[i : i + 4], "big") for i in range(0, len(body), 4)]
    return header.dcid, header.scid, versions


def verify_retry_integrity(packet: bytes, original_dcid: bytes) -> bool:
    """Whether a Retry's integrity tag matches ``original_dcid`` (what a client checks);
    False for anything that is not a well-formed v1/v2 Retry."""
    try:
        header = parse_long_header(packet)
    except QuicError:
        return False
    if header.packet_type is not PacketType.RETRY or len(original_dcid) > 255:
        return False
    key, nonce = RETRY_INTEGRITY[header.version]
    body, tag = packet[:-RETRY_INTEGRITY_TAG_LEN], packet[-RETRY_INTEGRITY_TAG_LEN:]
    pseudo = bytes((len(original_dcid),)) + original_dcid + body
    try:
        AESGCM(bytes.fromhex(key)).decrypt(bytes.fromhex(nonce), tag, pseudo)
    except InvalidTag:
        return False
    return True


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 §2.2)."""
    return hmac.digest(salt, ikm, hashlib.sha256)


def hkdf_expand_label(secret: bytes, label: bytes, length: int, context: bytes = b"") -> bytes:
    """HKDF-Expand-Label with SHA-256 (RFC 8446 §7.1), for outputs of one hash block."""
    assert 0 < length <= 32
    return hmac.digest(secret, hkdf_label_info(label, length, context), hashlib.sha256)[:length]


def derive_packet_keys(secret: bytes, version: int, suite: str = AES_128_GCM) -> PacketKeys:
    """Keys of one direction from a TLS traffic secret (RFC 9001 §5.1), any suite: what the
    ChaCha20 vector of RFC 9001 A.5 / RFC 9369 A.5 starts from."""
    prefix = LABEL_PREFIXES[version]
    key_len = 32 if suite == CHACHA20_POLY1305 else 16
    return PacketKeys(
        hkdf_expand_label(secret, prefix + b"key", key_len),
        hkdf_expand_label(secret, prefix + b"iv", 12),
        hkdf_expand_label(secret, prefix + b"hp", key_len),
        suite,
    )
