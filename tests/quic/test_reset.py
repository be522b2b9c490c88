"""Stateless-reset tokens and packets (RFC 9000 §10.3)."""

import hashlib
import hmac
import os

import pytest

from quic.errors import QuicError
from quic.reset import (
    MAX_SLOT,
    MIN_RESET_LEN,
    TOKEN_LEN,
    build_stateless_reset,
    reset_token,
    slot_reset_key,
)


def test_token_is_hmac_sha256_truncated() -> None:
    key, cid = os.urandom(32), os.urandom(9)
    assert reset_token(key, cid) == hmac.new(key, cid, hashlib.sha256).digest()[:16]
    assert reset_token(key, cid) != reset_token(key, cid[:-1] + bytes([cid[-1] ^ 1]))
    assert reset_token(key, cid) != reset_token(os.urandom(32), cid)


def test_reset_packet_layout() -> None:
    token = os.urandom(TOKEN_LEN)
    for size in (MIN_RESET_LEN, 40, 1200):
        packet = build_stateless_reset(token, os.urandom(size - TOKEN_LEN))
        assert len(packet) == size
        assert packet[0] & 0xC0 == 0x40  # looks like a short header
        assert packet[-TOKEN_LEN:] == token


def test_reset_refuses_bad_input() -> None:
    with pytest.raises(QuicError, match="bad_token"):
        build_stateless_reset(b"short", os.urandom(10))
    with pytest.raises(QuicError, match="reset_too_short"):
        build_stateless_reset(os.urandom(16), os.urandom(4))


def test_slot_keys_are_per_slot_and_reveal_no_master() -> None:
    """Each slot's key is fixed by (master, slot) — so the daemon recomputes a dead worker's —
    and differs from every other slot's, another master's and the master itself, so an app
    holding its slots' keys cannot compute other slots' reset tokens."""
    master = os.urandom(32)
    keys = {slot: slot_reset_key(master, slot) for slot in (0, 1, 2, 255, 256, MAX_SLOT)}
    assert all(len(k) == 32 for k in keys.values())
    assert len(set(keys.values())) == len(keys)
    assert master not in keys.values()
    assert slot_reset_key(master, 1) == keys[1]
    assert slot_reset_key(os.urandom(32), 1) != keys[1]
    cid = os.urandom(9)
    assert reset_token(keys[0], cid) != reset_token(keys[1], cid)
    assert reset_token(keys[0], cid) != reset_token(master, cid)
    for bad in (-1, MAX_SLOT + 1):
        with pytest.raises(QuicError, match="bad_slot"):
            slot_reset_key(master, bad)
