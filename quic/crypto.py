"""Initial packet protection for QUIC v1 (RFC 9001 §5) and v2 (RFC 9369 §3.3).

CONTRACT (stub written first so parallel work can code against it; fill in, keep signatures).
"""

from dataclasses import dataclass

from quic.packet import LongHeader


@dataclass(frozen=True, slots=True)
class PacketKeys:
    """AEAD key, IV and header-protection key of one direction."""

    key: bytes
    iv: bytes
    hp: bytes


def derive_initial_keys(dcid: bytes, version: int, *, server: bool) -> PacketKeys:
    """Keys protecting client (``server=False``) or server Initial packets for this DCID."""
    raise NotImplementedError


def open_packet(datagram: bytes, header: LongHeader, keys: PacketKeys) -> tuple[int, bytes]:
    """Remove header protection and decrypt; return ``(packet_number, plaintext_payload)``.

    Packet numbers are returned truncated-decoded against 0 (first flight: no largest acked).
    """
    raise NotImplementedError


def seal_initial(
    keys: PacketKeys,
    version: int,
    dcid: bytes,
    scid: bytes,
    token: bytes,
    packet_number: int,
    payload: bytes,
    *,
    pn_len: int = 4,
) -> bytes:
    """Build one protected Initial packet (header, encrypted payload, header protection).

    The caller pads ``payload`` (client Initials must fill a 1200-byte datagram).
    """
    raise NotImplementedError
