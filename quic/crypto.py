"""Initial packet protection for QUIC v1 (RFC 9001 §5) and v2 (RFC 9369 §3.3).

This is the classifier's hot path: every new connection costs one key derivation, one header
protection mask and one AEAD open per Initial packet. So:

- HKDF is HMAC-SHA256 written on ``hashlib``: the salts' pad states are hashed once at import,
  and every other HMAC is two one-shot ``sha256(key ^ pad || msg)`` calls. That is about
  0.9 µs per HMAC against 1.8 µs for ``hmac.digest`` (which re-fetches and re-keys OpenSSL's
  HMAC every call) and 3.6 µs for cryptography's ``HKDFExpand``. Every output we need fits
  one SHA-256 block (<= 32 bytes), so each Expand-Label is a single HMAC.
- ``PacketKeys`` builds its AEAD and header-protection cipher contexts once, so the several
  Initial packets of one connection reuse them. Those two contexts (OpenSSL allocations) are
  about half of the per-connection cost; the rest is the five HMACs.
- cryptography (OpenSSL) does the AES work; its exceptions never escape: a failed open is
  ``QuicError("decrypt_failed")``.
"""

from collections.abc import Callable
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from quic.errors import QuicError
from quic.packet import (
    VERSION_1,
    VERSION_2,
    LongHeader,
    PacketType,
    ShortHeader,
    encode_long_header_start,
    encode_varint_fixed,
)
from quic.varint import encode_varint

AES_128_GCM = "aes-128-gcm"
CHACHA20_POLY1305 = "chacha20-poly1305"
SAMPLE_LEN = 16
TAG_LEN = 16
MAX_PN_LEN = 4

INITIAL_SALTS = {
    VERSION_1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    VERSION_2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
# Label prefix per version: "quic key" / "quicv2 key" etc. (RFC 9369 §3.3.2).
LABEL_PREFIXES = {VERSION_1: b"quic ", VERSION_2: b"quicv2 "}

_BLOCK = 64  # SHA-256 block size
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_ZERO5 = bytes(5)
_ZERO32 = bytes(32)
_sha256 = sha256
_ECB = modes.ECB()
_object_new = object.__new__
_INITIAL, _HANDSHAKE, _ZERO_RTT = PacketType.INITIAL, PacketType.HANDSHAKE, PacketType.ZERO_RTT


def _public_ecb_encryptor(hp: bytes) -> Callable[[bytes], bytes]:
    return Cipher(algorithms.AES(hp), _ECB).encryptor().update


def _pick_ecb_encryptor() -> Callable[[bytes], Callable[[bytes], bytes]]:
    """The cheapest way this cryptography offers to get an AES-ECB context for a new key.

    ``Cipher(...).encryptor()`` is the public API, but about a third of its cost per
    connection is Python-side ABC ``isinstance`` checks that can never fail here. The Rust
    function behind it is used directly when it exists and reproduces the public path's
    output (checked once, here); otherwise the public path is used.
    """
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        create = rust_openssl.ciphers.create_encryption_ctx

        aes_cls = algorithms.AES

        def fast(hp: bytes) -> Callable[[bytes], bytes]:
            # The AES object without its __init__ (a Python-level bytes and key-size check
            # that derive_initial_keys has made true by construction): just its ``key``.
            aes = _object_new(aes_cls)
            aes.key = hp
            return create(aes, _ECB).update  # type: ignore[no-any-return]

        probe_key, probe_block = bytes(range(16)), bytes(range(16, 32))
        if fast(probe_key)(probe_block) == _public_ecb_encryptor(probe_key)(probe_block):
            return fast
    except Exception:  # any internal-API drift: fall back to the public API
        pass
    return _public_ecb_encryptor


_ecb_encryptor = _pick_ecb_encryptor()


class _HmacKey:
    """HMAC-SHA256 with the key's inner and outer pad blocks already absorbed."""

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self.inner = sha256(key.translate(_IPAD))
        self.outer = sha256(key.translate(_OPAD))

    def digest(self, msg: bytes) -> bytes:
        inner = self.inner.copy()
        inner.update(msg)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def hkdf_label_info(label: bytes, length: int, context: bytes = b"") -> bytes:
    """The HkdfLabel structure of TLS 1.3 (RFC 8446 §7.1) followed by HKDF-Expand's counter 1."""
    full = b"tls13 " + label
    return (
        length.to_bytes(2, "big")
        + bytes((len(full),))
        + full
        + bytes((len(context),))
        + context
        + b"\x01"
    )


_INFO_CLIENT_IN = hkdf_label_info(b"client in", 32)
_INFO_SERVER_IN = hkdf_label_info(b"server in", 32)
# Per version: the salt's inner and outer pad states, then the HkdfLabel infos of the 16-byte
# AES-128-GCM key, the IV and the header-protection key.
_SALT_PADS = {
    version: (
        _HmacKey(INITIAL_SALTS[version]).inner,
        _HmacKey(INITIAL_SALTS[version]).outer,
        hkdf_label_info(prefix + b"key", 16),
        hkdf_label_info(prefix + b"iv", 12),
        hkdf_label_info(prefix + b"hp", 16),
    )
    for version, prefix in LABEL_PREFIXES.items()
}


class PacketKeys:
    """AEAD key, IV and header-protection key of one direction.

    The cipher contexts are built once here, not per packet: a connection's Initials (a
    2-datagram ClientHello, retransmissions) reuse them. A plain ``__slots__`` class rather
    than a frozen dataclass: ``derive_initial_keys`` makes one per new connection, and the
    frozen dataclass paid an ``object.__setattr__`` round per field (about 8k instructions).
    Treat it as immutable; equality and hashing cover ``key``, ``iv``, ``hp`` and ``suite``.
    """

    __slots__ = ("_aead", "_iv_int", "_mask", "hp", "iv", "key", "suite")

    key: bytes
    iv: bytes
    hp: bytes
    suite: str
    _aead: AESGCM | ChaCha20Poly1305
    _mask: Callable[[bytes], bytes]
    _iv_int: int

    def __init__(self, key: bytes, iv: bytes, hp: bytes, suite: str = AES_128_GCM) -> None:
        if len(iv) != 12:
            raise QuicError("bad_key", f"IV of {len(iv)} bytes")
        try:
            if suite == AES_128_GCM:
                if len(key) != 16 or len(hp) != 16:
                    raise QuicError("bad_key", "AES-128-GCM needs 16-byte key and hp")
                aead: AESGCM | ChaCha20Poly1305 = AESGCM(key)
                # ECB on single blocks keeps no state between calls: one context serves every
                # sample of this key.
                mask = Cipher(algorithms.AES(hp), _ECB).encryptor().update
            elif suite == CHACHA20_POLY1305:
                if len(key) != 32 or len(hp) != 32:
                    raise QuicError("bad_key", "ChaCha20-Poly1305 needs 32-byte key and hp")
                aead = ChaCha20Poly1305(key)
                mask = _chacha20_mask_fn(hp)
            else:
                raise QuicError("bad_key", f"unknown cipher suite {suite!r}")
        except ValueError as exc:
            raise QuicError("bad_key", str(exc)) from None
        self.key = key
        self.iv = iv
        self.hp = hp
        self.suite = suite
        self._aead = aead
        self._mask = mask
        self._iv_int = int.from_bytes(iv, "big")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PacketKeys):
            return NotImplemented
        return (self.key, self.iv, self.hp, self.suite) == (
            other.key,
            other.iv,
            other.hp,
            other.suite,
        )

    def __hash__(self) -> int:
        return hash((self.key, self.iv, self.hp, self.suite))

    def __repr__(self) -> str:
        return f"PacketKeys(key={self.key!r}, iv={self.iv!r}, hp={self.hp!r}, suite={self.suite!r})"

    def header_mask(self, sample: bytes) -> bytes:
        """The header-protection mask for a 16-byte sample (RFC 9001 §5.4.3 / §5.4.4)."""
        return self._mask(sample)[:5]

    def nonce(self, packet_number: int) -> bytes:
        """IV XOR the left-padded packet number (RFC 9001 §5.3)."""
        return (self._iv_int ^ packet_number).to_bytes(12, "big")


def _chacha20_mask_fn(hp: bytes) -> Callable[[bytes], bytes]:
    """ChaCha20 header protection: the sample is counter (4 bytes LE) || nonce (12 bytes),
    exactly the 16-byte nonce cryptography's ChaCha20 takes; mask = keystream over 5 zeros."""

    def mask(sample: bytes) -> bytes:
        return Cipher(algorithms.ChaCha20(hp, sample), mode=None).encryptor().update(_ZERO5)

    return mask


def derive_initial_keys(dcid: bytes, version: int, *, server: bool) -> PacketKeys:
    """Keys protecting client (``server=False``) or server Initial packets for this DCID.

    Anyone can compute these (RFC 9001 §5.2): that is what lets steerd read a ClientHello
    without holding any TLS key. The DCID is the one of the client's first Initial.

    The five HMACs (Extract, "client in"/"server in", key, iv, hp) are written out inline:
    every key is at most 32 bytes, so each HMAC is two one-shot SHA-256 calls over
    ``key ^ pad || message``, which is the cheapest form CPython offers.
    """
    pads = _SALT_PADS.get(version)
    if pads is None:
        raise QuicError("unsupported_version", f"no Initial salt for version 0x{version:08x}")
    salt_inner, salt_outer, key_info, iv_info, hp_info = pads
    inner = salt_inner.copy()
    inner.update(dcid)
    outer = salt_outer.copy()
    outer.update(inner.digest())
    k = outer.digest() + _ZERO32  # initial_secret, padded to the SHA-256 block
    info = _INFO_SERVER_IN if server else _INFO_CLIENT_IN
    k = _sha256(k.translate(_OPAD) + _sha256(k.translate(_IPAD) + info).digest()).digest() + _ZERO32
    ki = k.translate(_IPAD)
    ko = k.translate(_OPAD)
    return _aes_keys(
        _sha256(ko + _sha256(ki + key_info).digest()).digest()[:16],
        _sha256(ko + _sha256(ki + iv_info).digest()).digest()[:12],
        _sha256(ko + _sha256(ki + hp_info).digest()).digest()[:16],
    )


def _aes_keys(key: bytes, iv: bytes, hp: bytes) -> PacketKeys:
    """``PacketKeys(key, iv, hp)`` for lengths known to be right, without ``__init__``'s
    checks and suite dispatch (plain slot stores: the cheapest object CPython can fill)."""
    keys = _object_new(PacketKeys)
    keys.key = key
    keys.iv = iv
    keys.hp = hp
    keys.suite = AES_128_GCM
    keys._aead = AESGCM(key)
    keys._mask = _ecb_encryptor(hp)
    keys._iv_int = int.from_bytes(iv, "big")
    return keys


def decode_packet_number(truncated: int, pn_len: int, expected: int) -> int:
    """Recover a full packet number from its truncated encoding (RFC 9000 §A.3)."""
    win = 1 << (8 * pn_len)
    hwin = win >> 1
    mask = win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def _unprotect(
    datagram: bytes,
    start: int,
    pn_offset: int,
    end: int,
    keys: PacketKeys,
    first_mask: int,
    reserved_mask: int,
    expected_pn: int,
) -> tuple[int, bytes]:
    sample_at = pn_offset + 4
    if sample_at + 16 > end:
        raise QuicError("too_short", "packet too short to sample for header protection")
    mask = keys._mask(datagram[sample_at : sample_at + 16])
    first = datagram[start] ^ (mask[0] & first_mask)
    pn_len = (first & 0x03) + 1
    payload_at = pn_offset + pn_len
    truncated = int.from_bytes(datagram[pn_offset:payload_at], "big") ^ int.from_bytes(
        mask[1 : 1 + pn_len], "big"
    )
    aad = bytes((first,)) + datagram[start + 1 : pn_offset] + truncated.to_bytes(pn_len, "big")
    # Against expected 0 the decoding is the identity; skip the call on the hot path.
    pn = decode_packet_number(truncated, pn_len, expected_pn) if expected_pn else truncated
    try:
        payload = keys._aead.decrypt(
            (keys._iv_int ^ pn).to_bytes(12, "big"), datagram[payload_at:end], aad
        )
    except (InvalidTag, ValueError, OverflowError):
        raise QuicError("decrypt_failed", f"AEAD open failed for packet number {pn}") from None
    # RFC 9000 §17.2/§17.3.1: reserved bits are checked only after a successful open, so an
    # attacker cannot use them to probe header protection.
    if first & reserved_mask:
        raise QuicError("reserved_bits", f"reserved bits set in first byte 0x{first:02x}")
    return pn, payload


def open_packet(
    datagram: bytes, header: LongHeader, keys: PacketKeys, *, expected_pn: int = 0
) -> tuple[int, bytes]:
    """Remove header protection and decrypt; return ``(packet_number, plaintext_payload)``.

    Packet numbers are decoded against ``expected_pn`` (0 by default: a first flight has no
    largest acknowledged packet, so the truncated value is the packet number).
    """
    ptype = header.packet_type
    if ptype is not _INITIAL and ptype is not _HANDSHAKE and ptype is not _ZERO_RTT:
        raise QuicError("not_protected", "Retry, Version Negotiation and unknown versions")
    return _unprotect(
        datagram, header.start, header.pn_offset, header.end, keys, 0x0F, 0x0C, expected_pn
    )


def open_initial(datagram: bytes, start: int, pn_offset: int, end: int, keys: PacketKeys) -> bytes:
    """The decrypted payload of the long-header packet at ``datagram[start:end]`` whose packet
    number starts at ``pn_offset``: ``open_packet(...)[1]`` for a first flight (expected packet
    number 0), minus the header object and the generic unprotect's arguments.

    The classifier calls this once per Initial packet; it is ``_unprotect`` specialised to a
    long header (4 protected bits, reserved bits 0x0c) with the packet-number bytes read as
    one integer.
    """
    sample_at = pn_offset + 4
    if sample_at + 16 > end:
        raise QuicError("too_short", "packet too short to sample for header protection")
    mask = keys._mask(datagram[sample_at : sample_at + 16])
    first = datagram[start] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    payload_at = pn_offset + pn_len
    pn = int.from_bytes(datagram[pn_offset:payload_at], "big") ^ int.from_bytes(
        mask[1 : 1 + pn_len], "big"
    )
    aad = b"".join((bytes((first,)), datagram[start + 1 : pn_offset], pn.to_bytes(pn_len, "big")))
    try:
        payload: bytes = keys._aead.decrypt(
            (keys._iv_int ^ pn).to_bytes(12, "big"), datagram[payload_at:end], aad
        )
    except (InvalidTag, ValueError, OverflowError):
        raise QuicError("decrypt_failed", f"AEAD open failed for packet number {pn}") from None
    if first & 0x0C:  # reserved bits, checked only after a successful open (see _unprotect)
        raise QuicError("reserved_bits", f"reserved bits set in first byte 0x{first:02x}")
    return payload


def open_short_packet(
    datagram: bytes, header: ShortHeader, keys: PacketKeys, *, expected_pn: int = 0
) -> tuple[int, bytes]:
    """Open a 1-RTT packet (5 header bits protected instead of 4; key phase not handled)."""
    return _unprotect(
        datagram,
        header.pn_offset - len(header.dcid) - 1,
        header.pn_offset,
        header.end,
        keys,
        0x1F,
        0x18,
        expected_pn,
    )


def _protect(
    keys: PacketKeys,
    header: bytes,
    pn_len: int,
    packet_number: int,
    payload: bytes,
    first_mask: int,
) -> bytes:
    """AEAD-seal ``payload`` under ``header`` (which ends with the packet number) and apply
    header protection."""
    if pn_len + len(payload) + TAG_LEN < MAX_PN_LEN + SAMPLE_LEN:
        raise QuicError("too_short", "payload too short to sample: pad it")
    ciphertext = keys._aead.encrypt(keys.nonce(packet_number), payload, header)
    sample_at = MAX_PN_LEN - pn_len
    mask = keys._mask(ciphertext[sample_at : sample_at + SAMPLE_LEN])
    out = bytearray(header)
    out += ciphertext
    out[0] ^= mask[0] & first_mask
    pn_offset = len(header) - pn_len
    for i in range(pn_len):
        out[pn_offset + i] ^= mask[1 + i]
    return bytes(out)


def _check_pn_len(pn_len: int) -> None:
    if not 1 <= pn_len <= MAX_PN_LEN:
        raise QuicError("bad_pn_len", f"packet number length {pn_len}")


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
    length_len: int = 2,
) -> bytes:
    """Build one protected Initial packet (header, encrypted payload, header protection).

    The caller pads ``payload`` (client Initials must fill a 1200-byte datagram). The Length
    field is written on ``length_len`` bytes (2 fits any Initial; RFC 9001 A.3 uses 2 too).
    The packet number is sent as its low ``pn_len`` bytes.
    """
    _check_pn_len(pn_len)
    header = b"".join(
        (
            encode_long_header_start(version, PacketType.INITIAL, pn_len - 1, dcid, scid),
            encode_varint(len(token)),
            token,
            encode_varint_fixed(pn_len + len(payload) + TAG_LEN, length_len),
            (packet_number & ((1 << (8 * pn_len)) - 1)).to_bytes(pn_len, "big"),
        )
    )
    return _protect(keys, header, pn_len, packet_number, payload, 0x0F)


def seal_short(
    keys: PacketKeys,
    dcid: bytes,
    packet_number: int,
    payload: bytes,
    *,
    pn_len: int = 4,
    key_phase: int = 0,
    spin: int = 0,
) -> bytes:
    """Build one protected 1-RTT (short header) packet (RFC 9000 §17.3.1)."""
    _check_pn_len(pn_len)
    first = 0x40 | (spin & 1) << 5 | (key_phase & 1) << 2 | (pn_len - 1)
    header = b"".join(
        (
            bytes((first,)),
            dcid,
            (packet_number & ((1 << (8 * pn_len)) - 1)).to_bytes(pn_len, "big"),
        )
    )
    return _protect(keys, header, pn_len, packet_number, payload, 0x1F)
