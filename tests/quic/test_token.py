"""quic/token.py: Retry tokens bind the client's address and CIDs, are SipHash-keyed, expire,
and have the one layout the kernel guard mints and checks too (bpf/steerd.h)."""

from __future__ import annotations

import os
import random
import struct

import pytest

from quic.errors import QuicError
from quic.token import (
    CLOCK_SKEW,
    KEY_LEN,
    MAC_LEN,
    MAX_MAC_INPUT,
    MIN_TOKEN_LEN,
    TOKEN_MAGIC,
    build_retry_token,
    derive_token_key,
    is_retry_token,
    mac_input,
    read_retry_token,
    token_key_words,
    token_mac,
    validate_retry_token,
)
from steerd.daemon.dataplane.header import BPF_DIR, header_constants

KEY = derive_token_key(os.urandom(32))
ODCID = bytes(range(8))
SCID = b"\xef" + bytes(15)


def test_round_trip_gives_the_original_dcid() -> None:
    for ip in ("198.18.0.1", "2001:db8::1"):
        token = build_retry_token(KEY, ip, ODCID, SCID, 100.0)
        assert is_retry_token(token) and len(token) == MIN_TOKEN_LEN + len(ODCID)
        assert validate_retry_token(KEY, token, ip, SCID, 100.5, 10.0) == ODCID
    empty = build_retry_token(KEY, "198.18.0.1", b"", SCID, 1.0)
    assert validate_retry_token(KEY, empty, "198.18.0.1", SCID, 1.0) == b""


@pytest.mark.parametrize(
    ("key", "ip", "scid", "reason"),
    [
        (derive_token_key(b"another daemon"), "198.18.0.1", SCID, "token_invalid"),
        (KEY, "198.18.0.2", SCID, "token_invalid"),  # another client address
        (KEY, "::ffff:198.18.0.1", SCID, "token_invalid"),  # another family is another address
        (KEY, "198.18.0.1", SCID[:-1] + b"\x01", "token_invalid"),  # another Retry SCID
    ],
    ids=["another-key", "another-address", "another-family", "another-scid"],  # KEY is random
)
def test_binding_is_checked(key: bytes, ip: str, scid: bytes, reason: str) -> None:
    token = build_retry_token(KEY, "198.18.0.1", ODCID, SCID, 100.0)
    with pytest.raises(QuicError) as e:
        validate_retry_token(key, token, ip, scid, 100.0)
    assert e.value.reason == reason


def test_tampering_is_detected() -> None:
    token = build_retry_token(KEY, "198.18.0.1", ODCID, SCID, 100.0)
    for i in range(len(token)):
        bad = bytearray(token)
        bad[i] ^= 0x01
        with pytest.raises(QuicError) as e:
            validate_retry_token(KEY, bytes(bad), "198.18.0.1", SCID, 100.0)
        assert e.value.reason in ("token_invalid", "token_malformed")


def test_expiry_and_clock_skew() -> None:
    token = build_retry_token(KEY, "198.18.0.1", ODCID, SCID, 100.0)
    assert validate_retry_token(KEY, token, "198.18.0.1", SCID, 110.0, 10.0) == ODCID
    assert validate_retry_token(KEY, token, "198.18.0.1", SCID, 100.0 - CLOCK_SKEW, 10.0)
    for now in (110.01, 100.0 - CLOCK_SKEW - 0.01):
        with pytest.raises(QuicError) as e:
            validate_retry_token(KEY, token, "198.18.0.1", SCID, now, 10.0)
        assert e.value.reason == "token_expired"


def test_other_tokens_are_not_ours() -> None:
    token = build_retry_token(KEY, "198.18.0.1", ODCID, SCID, 100.0)
    for other in (b"", b"\x5e", token[:-1], token + b"x", b"\x00" + token[1:], b"\x5e" * 40):
        assert not is_retry_token(other) or other[1:9] == b"\x5e" * 8
        with pytest.raises(QuicError) as e:
            validate_retry_token(KEY, other, "198.18.0.1", SCID, 100.0)
        assert e.value.reason in ("token_malformed", "token_invalid")
    with pytest.raises(QuicError) as e:
        build_retry_token(KEY, "198.18.0.1", bytes(21), SCID, 1.0)
    assert e.value.reason == "bad_cid_length"
    with pytest.raises(QuicError) as e:
        validate_retry_token(KEY, token, "not an address", SCID, 100.0)
    assert e.value.reason == "bad_address"


def test_workers_read_the_original_dcid_without_a_key() -> None:
    """read_retry_token gives what validate_retry_token gives, with no key and no check (the
    classifier validated the token before a worker sees it); it refuses only the shape."""
    for odcid in (ODCID, b"", bytes(20)):
        token = build_retry_token(KEY, "198.18.0.1", odcid, SCID, 100.0)
        assert read_retry_token(token) == odcid
        assert read_retry_token(token) == validate_retry_token(KEY, token, "198.18.0.1",
                                                                SCID, 100.0)
    forged = build_retry_token(derive_token_key(b"an app"), "198.18.0.9", ODCID, SCID, 1.0)
    assert read_retry_token(forged) == ODCID  # why only the classifier may pass tokens on
    for other in (b"", b"\x5e", forged[:-1], forged + b"x", b"\x00" + forged[1:]):
        with pytest.raises(QuicError) as e:
            read_retry_token(other)
        assert e.value.reason == "token_malformed"


def siphash24_reference(key: bytes, message: bytes) -> int:
    """SipHash-2-4 written from the paper (Aumasson & Bernstein 2012, §2), independent of the
    ``siphash24`` package quic/token.py uses: the oracle for it."""
    mask = (1 << 64) - 1

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & mask
            v[1] = rotl(v[1], 13) ^ v[0]
            v[0] = rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & mask
            v[3] = rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & mask
            v[3] = rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & mask
            v[1] = rotl(v[1], 17) ^ v[2]
            v[2] = rotl(v[2], 32)

    end = len(message) - len(message) % 8
    tail = message[end:] + bytes(7 - len(message) % 8) + bytes(((len(message) & 0xFF),))
    for at in [*range(0, end, 8), None]:
        m = struct.unpack("<Q", message[at : at + 8] if at is not None else tail)[0]
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def test_mac_is_siphash_2_4() -> None:
    """The paper's vector (Appendix A: key 00..0f, message 00..0e) and the reference
    implementation's first two (0 and 1 bytes), then random keys and every length up to the
    kernel's bound against the reference written above."""
    key = bytes(range(16))
    for message, want in ((bytes(range(15)), 0xA129CA6149BE45E5), (b"", 0x726FDB47DD0E0E31),
                          (b"\0", 0x74F839C593DC67FD)):
        assert siphash24_reference(key, message) == want
        assert token_mac(key, message) == want.to_bytes(MAC_LEN, "little")
    rng = random.Random(24)
    for length in range(97):
        key, message = rng.randbytes(KEY_LEN), rng.randbytes(length)
        assert token_mac(key, message) == siphash24_reference(key, message).to_bytes(8, "little")
    with pytest.raises(QuicError) as e:
        token_mac(bytes(32), b"x")
    assert e.value.reason == "bad_key"


def test_key_is_16_bytes_and_its_words_are_little_endian() -> None:
    assert len(KEY) == KEY_LEN == 16
    assert derive_token_key(b"s") == derive_token_key(b"s") != derive_token_key(b"t")
    assert token_key_words(bytes(range(16))) == (0x0706050403020100, 0x0F0E0D0C0B0A0908)
    with pytest.raises(QuicError):
        token_key_words(bytes(15))


def test_canonical_mac_input_layout() -> None:
    """Byte for byte what steerd.h documents: issued_ms u64 BE | odcid_len | odcid |
    addr_len | address | scid_len | scid; the token carries its first part."""
    message = mac_input(0x0102030405060708, b"\xaa\xbb", "198.18.0.1", b"\xcc")
    assert message == bytes.fromhex("0102030405060708" "02aabb" "04c6120001" "01cc")
    v6 = mac_input(1, b"", "2001:db8::1", b"")
    assert v6 == bytes(7) + b"\x01" + b"\x00" + b"\x10" + bytes.fromhex(
        "20010db8000000000000000000000001") + b"\x00"
    longest = mac_input(2**64 - 1, bytes(20), "::1", bytes(20))
    assert len(longest) == MAX_MAC_INPUT == 67
    token = build_retry_token(KEY, "198.18.0.1", ODCID, SCID, 12.3456)
    message = mac_input(12345, ODCID, "198.18.0.1", SCID)
    assert token == bytes((TOKEN_MAGIC,)) + message[: 9 + len(ODCID)] + token_mac(KEY, message)


def test_known_token() -> None:
    """A fixed key and inputs give fixed bytes: a change of format or MAC shows here (and a
    kernel built from steerd.h would disagree with it)."""
    key = bytes(range(16))
    token = build_retry_token(key, "198.18.0.1", bytes.fromhex("8394c8f03e515708"),
                              bytes.fromhex("f067a5502a4262b5"), 1.5)
    want_mac = siphash24_reference(key, bytes.fromhex(
        "00000000000005dc" "08" "8394c8f03e515708" "04" "c6120001" "08" "f067a5502a4262b5"))
    assert token == bytes.fromhex("5e" "00000000000005dc" "08" "8394c8f03e515708") + (
        want_mac.to_bytes(8, "little"))


def test_shared_defines_agree() -> None:
    """steerd.h's STEERD_TOKEN_* (what the guard builds) equal this module's numbers."""
    k = header_constants()
    assert k["STEERD_TOKEN_MAGIC"] == TOKEN_MAGIC
    assert k["STEERD_TOKEN_MAC_LEN"] == MAC_LEN
    assert k["STEERD_TOKEN_MIN_LEN"] == MIN_TOKEN_LEN == 18
    assert k["STEERD_TOKEN_MAX_LEN"] == MIN_TOKEN_LEN + 20
    assert k["STEERD_TOKEN_MAC_INPUT_MAX"] == MAX_MAC_INPUT <= k["STEERD_SIPHASH_MAX_LEN"]
    assert "#define STEERD_SIPHASH_MAX_LEN 96" in (BPF_DIR / "siphash.h").read_text()
