"""QUIC variable-length integers (RFC 9000 §16)."""

from quic.errors import QuicError

MAX_VARINT = (1 << 62) - 1


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read one varint at ``pos``; return ``(value, next_pos)``.

    Raises ``QuicError("truncated")`` rather than ``IndexError`` so hostile lengths never leak
    a different exception type.
    """
    if pos >= len(buf):
        raise QuicError("truncated", "varint past end of buffer")
    first = buf[pos]
    length = 1 << (first >> 6)
    end = pos + length
    if end > len(buf):
        raise QuicError("truncated", f"{length}-byte varint past end of buffer")
    value = first & 0x3F
    for i in range(pos + 1, end):
        value = (value << 8) | buf[i]
    return value, end


def encode_varint(value: int) -> bytes:
    """Encode ``value`` in the shortest form."""
    if value < 0 or value > MAX_VARINT:
        raise QuicError("varint_range", f"{value} does not fit a QUIC varint")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
