"""Frames of decrypted Initial payloads: the allowed set, bounds checks, forbidden types."""

import time

import pytest

from quic.errors import QuicError
from quic.frames import InitialFrames, parse_initial_frames
from quic.varint import MAX_VARINT, encode_varint


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + encode_varint(offset) + encode_varint(len(data)) + data


def ack(
    largest: int, first: int, ranges: tuple[tuple[int, int], ...] = (), ecn: bool = False
) -> bytes:
    out = b"\x03" if ecn else b"\x02"
    out += encode_varint(largest) + encode_varint(25) + encode_varint(len(ranges))
    out += encode_varint(first)
    for gap, length in ranges:
        out += encode_varint(gap) + encode_varint(length)
    if ecn:
        out += encode_varint(1) + encode_varint(2) + encode_varint(300)
    return out


def close(code: int = 0x0A, reason: bytes = b"bye") -> bytes:
    return b"\x1c" + encode_varint(code) + encode_varint(0x06) + encode_varint(len(reason)) + reason


def test_crypto_frames_in_packet_order() -> None:
    payload = crypto(100, b"world") + b"\x01" + bytes(30) + crypto(0, b"hello") + bytes(1000)
    assert parse_initial_frames(payload) == InitialFrames([(100, b"world"), (0, b"hello")], False)


def test_all_allowed_frames() -> None:
    payload = (
        b"\x00\x00\x01"
        + ack(10, 3, ((1, 2),))
        + ack(5, 5, ecn=True)
        + crypto(0, b"x" * 300)
        + b"\x01"
        + close()
        + bytes(5)
    )
    frames = parse_initial_frames(payload)
    assert frames.crypto == [(0, b"x" * 300)]
    assert frames.connection_close


def test_padding_only_and_ping_only() -> None:
    assert parse_initial_frames(bytes(1200)) == InitialFrames([], False)
    assert parse_initial_frames(b"\x01") == InitialFrames([], False)


def test_empty_payload_rejected() -> None:
    with pytest.raises(QuicError) as err:
        parse_initial_frames(b"")
    assert err.value.reason == "no_frames"


@pytest.mark.parametrize(
    "ftype",
    [0x04, 0x05, 0x07, 0x08, 0x0F, 0x10, 0x18, 0x19, 0x1A, 0x1B, 0x1D, 0x1E, 0x30, 0x3F],
)
def test_forbidden_frames(ftype: int) -> None:
    with pytest.raises(QuicError) as err:
        parse_initial_frames(crypto(0, b"ok") + bytes((ftype,)) + bytes(20))
    assert err.value.reason == "forbidden_frame"


def test_non_minimal_frame_type_rejected() -> None:
    """0x40 0x06 is CRYPTO in a 2-byte varint: RFC 9000 §12.4 requires the shortest form."""
    with pytest.raises(QuicError) as err:
        parse_initial_frames(b"\x40\x06\x00\x01x")
    assert err.value.reason == "forbidden_frame"


@pytest.mark.parametrize(
    "frame",
    [crypto(0, b"abcdef"), ack(10, 3, ((1, 2), (0, 1))), ack(7, 7, ecn=True), close()],
)
def test_every_truncation_rejected(frame: bytes) -> None:
    for cut in range(1, len(frame)):
        with pytest.raises(QuicError) as err:
            parse_initial_frames(frame[:cut])
        assert err.value.reason == "truncated"


def test_crypto_beyond_2_62_rejected() -> None:
    with pytest.raises(QuicError) as err:
        parse_initial_frames(crypto(MAX_VARINT - 1, b"ab"))
    assert err.value.reason == "frame_encoding"
    assert parse_initial_frames(crypto(MAX_VARINT - 2, b"ab")).crypto == [(MAX_VARINT - 2, b"ab")]


def test_crypto_length_past_packet_rejected() -> None:
    with pytest.raises(QuicError) as err:
        parse_initial_frames(b"\x06\x00" + encode_varint(MAX_VARINT) + b"abc")
    assert err.value.reason == "truncated"


def test_ack_first_range_below_zero_rejected() -> None:
    with pytest.raises(QuicError) as err:
        parse_initial_frames(ack(3, 4))
    assert err.value.reason == "frame_encoding"


def test_ack_huge_range_count_fails_fast() -> None:
    payload = b"\x02\x05\x00" + encode_varint(MAX_VARINT) + b"\x00" + bytes(100)
    start = time.perf_counter()
    with pytest.raises(QuicError) as err:
        parse_initial_frames(payload)
    assert err.value.reason == "truncated"
    assert time.perf_counter() - start < 0.1


def test_close_reason_past_packet_rejected() -> None:
    with pytest.raises(QuicError) as err:
        parse_initial_frames(b"\x1c\x00\x00\x10abc")
    assert err.value.reason == "truncated"


def test_long_padding_is_fast() -> None:
    """Padding is skipped by a C-level scan, not a Python loop per byte."""
    payload = bytes(4_000_000) + crypto(0, b"x")
    start = time.perf_counter()
    assert parse_initial_frames(payload).crypto == [(0, b"x")]
    assert time.perf_counter() - start < 0.1
