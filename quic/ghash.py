"""The Retry Integrity Tag (RFC 9001 §5.8, RFC 9369 §3.3.3) computed with GHASH alone, and
the multiplication tables the kernel's copy of it (bpf/ghash.h) reads from a map.

Why no AES: the tag is AES-128-GCM under a key and nonce the RFCs publish, over an empty
plaintext with the Retry pseudo-packet as associated data. With nothing to encrypt, GCM
reduces to ``tag = E_K(J0) XOR GHASH_H(A, C = empty)``, where ``H = E_K(0^128)`` and
``E_K(J0)`` (J0 = nonce || 0x00000001) are fixed per version. So a BPF program, which cannot
run AES, can still answer with a valid Retry: it needs only multiplications by the constant
H in GF(2^128), which are linear over GF(2) and so table-driven. Both constants are checked
against ``cryptography``'s AES in tests/quic/test_ghash.py.

Table layout (byte-wise, "Shoup-style" 8-bit tables): for a 16-byte GHASH block X with bytes
X[0..15], ``X * H = XOR over i of T[i][X[i]]`` where ``T[i][b]`` is the product with H of the
block whose only non-zero byte is byte i = b. 16 x 256 entries of 16 bytes = 64 KiB per
version, then E_K(J0) (16 bytes): :data:`TABLE_VALUE_SIZE` bytes, one value of the BPF
ARRAY map ``struct steerd_ghash_tables`` (bpf/ghash.h) per version, keyed by
:data:`VERSION_INDEX`. Every entry is stored in GHASH byte order (the big-endian block as on
the wire); the kernel XORs them as two native 64-bit words, which is byte-wise XOR.

Pure: no I/O, no randomness; the tables are computed once and cached.
"""

from __future__ import annotations

import functools

from quic.errors import QuicError
from quic.packet import VERSION_1, VERSION_2

BLOCK = 16
# H = E_K(0^128) and E_K(J0) under the published Retry key and nonce of each version.
_CONSTANTS = {
    VERSION_1: (
        bytes.fromhex("72956a454ffaff5485a13a1244d01d47"),
        bytes.fromhex("555e4b7493556eeaaf75d35bd7fba5d8"),
    ),
    VERSION_2: (
        bytes.fromhex("65f6bee10d700eda919c5c6978e47a5d"),
        bytes.fromhex("4e901396e3a9359f4535b65e5ad6ae51"),
    ),
}
# The map key of each version's tables: must equal the version_index steerd_retry_tag takes.
VERSION_INDEX = {VERSION_1: 0, VERSION_2: 1}
TABLE_ENTRIES = 16 * 256
TABLE_VALUE_SIZE = TABLE_ENTRIES * BLOCK + BLOCK  # 65552: the tables, then E_K(J0)
# GCM's reduction constant: x^128 = x^7 + x^2 + x + 1, in GCM's reflected bit order.
_R = 0xE1 << 120


def gf_mul(x: int, y: int) -> int:
    """The GCM product of two blocks given as big-endian 128-bit integers, bit by bit
    (NIST SP 800-38D, Algorithm 1). Slow and obviously right: the tables and the tests are
    checked against it."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    return z


def _constants(version: int) -> tuple[bytes, bytes]:
    try:
        return _CONSTANTS[version]
    except KeyError:
        raise QuicError(
            "unsupported_version", f"no Retry integrity key for 0x{version:08x}"
        ) from None


@functools.cache
def _tables(version: int) -> tuple[tuple[int, ...], ...]:
    """T[i][b] as integers. Built from the 128 products H * x^p (one cheap shift each) and
    linearity: T[i][b] = T[i][b without its lowest bit] XOR T[i][its lowest bit]."""
    h = int.from_bytes(_constants(version)[0], "big")
    powers = []  # powers[p] = the block with only GCM bit p set (bit 0 = MSB of byte 0) * H
    v = h
    for _ in range(128):
        powers.append(v)
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    tables = []
    for i in range(16):
        row = [0] * 256
        for b in range(1, 256):
            low = b & -b
            row[b] = row[b ^ low] ^ powers[8 * i + 7 - (low.bit_length() - 1)]
        tables.append(tuple(row))
    return tuple(tables)


def ghash_table_value(version: int) -> bytes:
    """The map value for one version: T[0][0..255], ..., T[15][0..255] (16 bytes each, GHASH
    byte order), then E_K(J0); :data:`TABLE_VALUE_SIZE` bytes."""
    out = bytearray()
    for row in _tables(version):
        for entry in row:
            out += entry.to_bytes(BLOCK, "big")
    out += _constants(version)[1]
    return bytes(out)


def retry_ghash_tables() -> dict[int, bytes]:
    """What to write into the ``steerd_ghash_tables`` map: key (version index, 0 = QUIC v1,
    1 = QUIC v2) -> value (:func:`ghash_table_value`)."""
    return {index: ghash_table_value(version) for version, index in VERSION_INDEX.items()}


def _mul_h(tables: tuple[tuple[int, ...], ...], x: int) -> int:
    """x * H through the tables, byte by byte, as the kernel does it."""
    y = 0
    for i in range(16):
        y ^= tables[i][(x >> (8 * (15 - i))) & 0xFF]
    return y


def retry_tag_ghash(pseudo: bytes, version: int) -> bytes:
    """The Retry Integrity Tag of a Retry pseudo-packet (ODCID length, ODCID, the Retry
    without its tag) for QUIC ``version``, computed like steerd_retry_tag: GHASH over the
    pseudo-packet (zero-padded to whole blocks) and the length block (bit length of A, 64
    bits big-endian, then 0 for the empty ciphertext), XOR E_K(J0)."""
    tables = _tables(version)
    x = 0
    for at in range(0, len(pseudo), BLOCK):
        block = pseudo[at : at + BLOCK].ljust(BLOCK, b"\0")
        x = _mul_h(tables, x ^ int.from_bytes(block, "big"))
    x = _mul_h(tables, x ^ ((len(pseudo) * 8) << 64))
    return (x ^ int.from_bytes(_constants(version)[1], "big")).to_bytes(BLOCK, "big")
