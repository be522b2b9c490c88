"""quic/token.py: Retry tokens bind the client's address and CIDs, are HMAC-keyed, expire."""

from __future__ import annotations

import os

import pytest

from quic.errors import QuicError
from quic.token import (
    CLOCK_SKEW,
    MIN_TOKEN_LEN,
    build_retry_token,
    derive_token_key,
    is_retry_token,
    read_retry_token,
    validate_retry_token,
)

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
