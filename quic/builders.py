"""The few packets the classifier itself sends: Version Negotiation, an Initial
CONNECTION_CLOSE, and Retry (with its integrity tag, v1 and v2).

No randomness here (quic/ is pure): whatever should be random on the wire (VN unused bits,
Retry unused bits, the server's SCID) is a parameter.
"""

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from quic.crypto import derive_initial_keys, seal_initial
from quic.errors import QuicError
from quic.frames import FRAME_CONNECTION_CLOSE
from quic.packet import MAX_CID_LEN, VERSION_1, VERSION_2, PacketType, encode_long_header_start
from quic.varint import encode_varint

CRYPTO_ERROR_BASE = 0x100
TLS_ALERT_NO_APPLICATION_PROTOCOL = 0x78
NO_APPLICATION_PROTOCOL = CRYPTO_ERROR_BASE + TLS_ALERT_NO_APPLICATION_PROTOCOL  # 0x178

# Fixed AEAD key and nonce of the Retry Integrity Tag: RFC 9001 §5.8 (v1), RFC 9369 §3.3.3 (v2).
_RETRY_AEAD = {
    VERSION_1: (
        AESGCM(bytes.fromhex("be0c690b9f66575a1d766b54e368c84e")),
        bytes.fromhex("461599d35d632bf2239825bb"),
    ),
    VERSION_2: (
        AESGCM(bytes.fromhex("8fb4b01b56ac48e260fbcbcead7ccc92")),
        bytes.fromhex("d86969bc2d7c6d9990efb04a"),
    ),
}


def build_version_negotiation(
    client_dcid: bytes, client_scid: bytes, versions: list[int], unused_bits: int
) -> bytes:
    """A Version Negotiation packet answering a client packet (RFC 9000 §17.2.1).

    Pass the DCID and SCID *of the client's packet*: the VN swaps them (its DCID is the
    client's SCID, its SCID the client's DCID) so the client can match it to its attempt.
    ``unused_bits`` supplies the 7 arbitrary bits of the first byte (the caller draws them at
    random); 0x40 is forced on so a VN still looks like QUIC to demultiplexers (RFC 9000
    §17.2.1 SHOULD, RFC 7983).
    """
    if not versions:
        raise QuicError("bad_versions", "a Version Negotiation must list at least one version")
    if len(client_dcid) > 255 or len(client_scid) > 255:
        raise QuicError("bad_cid_length", "connection IDs are at most 255 bytes (RFC 8999)")
    out = bytearray((0x80 | 0x40 | (unused_bits & 0x3F),))
    out += bytes(4)  # version 0 marks Version Negotiation
    out.append(len(client_scid))
    out += client_scid
    out.append(len(client_dcid))
    out += client_dcid
    for version in versions:
        if not 0 < version <= 0xFFFF_FFFF:
            raise QuicError("bad_versions", f"version {version:#x} cannot be advertised")
        out += version.to_bytes(4, "big")
    return bytes(out)


def connection_close_frame(error_code: int, frame_type: int = 0, reason: bytes = b"") -> bytes:
    """A transport CONNECTION_CLOSE frame (type 0x1c, RFC 9000 §19.19)."""
    return b"".join(
        (
            bytes((FRAME_CONNECTION_CLOSE,)),
            encode_varint(error_code),
            encode_varint(frame_type),
            encode_varint(len(reason)),
            reason,
        )
    )


def build_initial_close(
    version: int,
    client_dcid: bytes,
    client_scid: bytes,
    server_scid: bytes,
    *,
    error_code: int = NO_APPLICATION_PROTOCOL,
    reason: bytes = b"",
    packet_number: int = 0,
) -> bytes:
    """A server Initial carrying CONNECTION_CLOSE, refusing a connection no app can serve.

    It is sealed with the *server* Initial keys derived from the client's original DCID
    (RFC 9001 §5.2): the only keys both sides have at that point. The packet's DCID is the
    client's SCID and its SCID ``server_scid``. CONNECTION_CLOSE is not ack-eliciting, so no
    1200-byte padding is required (RFC 9000 §14.1); the default error is CRYPTO_ERROR with the
    TLS alert no_application_protocol (0x100 + 120 = 0x178).
    """
    keys = derive_initial_keys(client_dcid, version, server=True)
    payload = connection_close_frame(error_code, 0, reason)
    pn_len = 1 if packet_number < 0x100 else 2 if packet_number < 0x1_0000 else 4
    # Header protection samples 16 bytes starting 4 bytes after the packet number: pad short
    # payloads with PADDING frames (the tag supplies 16 of the needed bytes).
    if pn_len + len(payload) < 4:
        payload += bytes(4 - pn_len - len(payload))
    return seal_initial(
        keys, version, client_scid, server_scid, b"", packet_number, payload, pn_len=pn_len
    )


def _retry_tag(version: int, original_dcid: bytes, retry_without_tag: bytes) -> bytes:
    aead = _RETRY_AEAD.get(version)
    if aead is None:
        raise QuicError("unsupported_version", f"no Retry integrity key for 0x{version:08x}")
    cipher, nonce = aead
    pseudo = bytes((len(original_dcid),)) + original_dcid + retry_without_tag
    return cipher.encrypt(nonce, b"", pseudo)


def build_retry(
    version: int,
    dcid: bytes,
    scid: bytes,
    original_dcid: bytes,
    token: bytes,
    *,
    unused_bits: int = 0,
) -> bytes:
    """A Retry packet with its integrity tag (RFC 9000 §17.2.5, RFC 9001 §5.8, RFC 9369).

    ``dcid`` is the client's SCID, ``scid`` the new server-chosen CID the client must use next,
    ``original_dcid`` the DCID of the client's Initial (authenticated by the tag, not sent).
    """
    if max(len(dcid), len(scid), len(original_dcid)) > MAX_CID_LEN:
        raise QuicError("bad_cid_length", f"connection IDs are at most {MAX_CID_LEN} bytes")
    if not token:
        raise QuicError("bad_token", "a Retry must carry a non-empty token (RFC 9000 §17.2.5)")
    packet = encode_long_header_start(version, PacketType.RETRY, unused_bits, dcid, scid) + token
    return packet + _retry_tag(version, original_dcid, packet)

