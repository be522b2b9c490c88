"""QUIC varints (RFC 9000 §16 and its Appendix A.1 examples)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quic.errors import QuicError
from quic.packet import encode_varint_fixed
from quic.varint import MAX_VARINT, decode_varint, encode_varint

# RFC 9000 §A.1: sample encodings, including a non-minimal one (0x4025 is 37 on two bytes).
RFC_SAMPLES = [
    ("c2197c5eff14e88c", 151288809941952652),
    ("9d7f3e7d", 494878333),
    ("7bbd", 15293),
    ("25", 37),
    ("4025", 37),
]


@pytest.mark.parametrize(("hex_", "value"), RFC_SAMPLES)
def test_rfc_samples_decode(hex_: str, value: int) -> None:
    raw = bytes.fromhex(hex_)
    assert decode_varint(raw, 0) == (value, len(raw))


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (63, 1),
        (64, 2),
        (16383, 2),
        (16384, 4),
        ((1 << 30) - 1, 4),
        (1 << 30, 8),
        (MAX_VARINT, 8),
    ],
)
def test_shortest_encoding_at_boundaries(value: int, size: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == size
    assert decode_varint(encoded, 0) == (value, size)


@pytest.mark.parametrize("value", [-1, MAX_VARINT + 1, 1 << 64])
def test_out_of_range_is_rejected(value: int) -> None:
    with pytest.raises(QuicError) as info:
        encode_varint(value)
    assert info.value.reason == "varint_range"


@pytest.mark.parametrize(
    ("raw", "pos"),
    [(b"", 0), (b"\x25", 1), (b"\x40", 0), (b"\x80\x00\x00", 0), (b"\xc0" + bytes(6), 0)],
)
def test_truncated_input_raises_truncated(raw: bytes, pos: int) -> None:
    with pytest.raises(QuicError) as info:
        decode_varint(raw, pos)
    assert info.value.reason == "truncated"


def test_decode_at_offset_and_from_memoryview() -> None:
    raw = b"\xff\xff" + bytes.fromhex("9d7f3e7d") + b"\x01"
    assert decode_varint(memoryview(raw), 2) == (494878333, 6)
    assert decode_varint(raw, 6) == (1, 7)


@given(st.integers(min_value=0, max_value=MAX_VARINT), st.binary(max_size=4))
def test_round_trip(value: int, tail: bytes) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded + tail, 0) == (value, len(encoded))


@given(st.integers(min_value=0, max_value=MAX_VARINT), st.sampled_from([1, 2, 4, 8]))
def test_fixed_size_round_trip(value: int, size: int) -> None:
    if value >= 1 << (8 * size - 2):
        with pytest.raises(QuicError):
            encode_varint_fixed(value, size)
        return
    encoded = encode_varint_fixed(value, size)
    assert len(encoded) == size
    assert decode_varint(encoded, 0) == (value, size)


@pytest.mark.parametrize("size", [0, 3, 16])
def test_fixed_size_rejects_odd_sizes(size: int) -> None:
    with pytest.raises(QuicError):
        encode_varint_fixed(1, size)


@given(st.binary(max_size=9), st.integers(min_value=0, max_value=10))
def test_arbitrary_bytes_never_raise_anything_else(raw: bytes, pos: int) -> None:
    try:
        value, end = decode_varint(raw, pos)
    except QuicError as exc:
        assert exc.reason == "truncated"
    else:
        assert pos < end <= len(raw)
        assert 0 <= value <= MAX_VARINT
