"""Walk the frames of a decrypted Initial packet payload (RFC 9000 §12.4, §19).

Only the frames RFC 9000 Table 3 allows in Initial packets are accepted: PADDING, PING, ACK,
ACK_ECN, CRYPTO and CONNECTION_CLOSE of the transport kind (0x1c). Anything else — including
0x1d, the application CONNECTION_CLOSE, and any frame type in a non-minimal varint encoding —
is a protocol violation that the classifier must not paper over: ``QuicError("forbidden_frame")``.

This runs once per Initial packet on the classifier's hot path, so it only *locates* frames:
CRYPTO payloads are sliced out for the reassembler, ACKs are skipped with bounds checks, and
the ~1000 bytes of PADDING a client adds are skipped in C rather than a Python loop per byte:
trailing padding (the usual case) by one ``rstrip`` length, a run inside the packet by one
``\x00+`` regex match (sre counts a repeated literal in a tight loop; searching for
``[^\x00]`` instead costs about 66 instructions per byte). CRYPTO's offset and length
varints are decoded inline for their 1- and 2-byte forms.
"""

import re
from typing import NamedTuple

from quic.errors import QuicError
from quic.varint import MAX_VARINT, decode_varint

FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C

_PADDING_RUN = re.compile(rb"\x00+")


class InitialFrames(NamedTuple):
    """What the classifier needs from one Initial payload.

    ``crypto`` holds ``(offset, data)`` per CRYPTO frame in packet order (not offset order:
    Chromium scrambles them on purpose); ``connection_close`` says the client gave up.
    """

    crypto: list[tuple[int, bytes]]
    connection_close: bool


def _skip_ack(payload: bytes, pos: int, ecn: bool) -> int:
    """Skip an ACK body; the values are irrelevant to classification but must be well-formed,
    and the range count is checked against the bytes left so a hostile count of 2^62 fails at
    once instead of looping."""
    largest, pos = decode_varint(payload, pos)
    _delay, pos = decode_varint(payload, pos)
    count, pos = decode_varint(payload, pos)
    first, pos = decode_varint(payload, pos)
    if first > largest:
        raise QuicError("frame_encoding", "ACK first range below packet number 0")
    if count > (len(payload) - pos) // 2:
        raise QuicError("truncated", f"ACK claims {count} ranges, packet too short")
    for _ in range(count):
        _gap, pos = decode_varint(payload, pos)
        _len, pos = decode_varint(payload, pos)
    if ecn:
        for _ in range(3):
            _ecn_count, pos = decode_varint(payload, pos)
    return pos


def parse_initial_frames(payload: bytes) -> InitialFrames:
    """Check every frame of a decrypted Initial payload and collect its CRYPTO data.

    An empty payload is a protocol violation (RFC 9000 §12.4: a packet must carry a frame).
    """
    n = len(payload)
    if n == 0:
        raise QuicError("no_frames", "Initial packet payload carries no frame")
    crypto: list[tuple[int, bytes]] = []
    closed = False
    pos = 0
    tail = -1  # where the trailing run of zero bytes starts; computed at the first PADDING
    while pos < n:
        ftype = payload[pos]
        if ftype == FRAME_PADDING:
            if tail < 0:
                tail = len(payload.rstrip(b"\x00"))
            if pos >= tail:
                break  # only PADDING frames follow
            pos = _PADDING_RUN.match(payload, pos).end()  # type: ignore[union-attr]
            continue
        pos += 1
        if ftype == FRAME_CRYPTO:
            # offset and length inline for their 1- and 2-byte forms (decode_varint otherwise)
            if pos + 4 <= n and payload[pos] < 0x80:
                b = payload[pos]
                if b < 0x40:
                    offset = b
                    pos += 1
                else:
                    offset = ((b & 0x3F) << 8) | payload[pos + 1]
                    pos += 2
                b = payload[pos]
                if b < 0x40:
                    length = b
                    pos += 1
                elif b < 0x80:
                    length = ((b & 0x3F) << 8) | payload[pos + 1]
                    pos += 2
                else:
                    length, pos = decode_varint(payload, pos)
            else:
                offset, pos = decode_varint(payload, pos)
                length, pos = decode_varint(payload, pos)
            end = pos + length
            if end > n:
                raise QuicError("truncated", f"CRYPTO frame of {length} bytes past end of packet")
            if offset + length > MAX_VARINT:
                raise QuicError("frame_encoding", "CRYPTO frame ends beyond 2^62-1")
            crypto.append((offset, payload[pos:end]))
            pos = end
        elif ftype == FRAME_PING:
            continue
        elif ftype == FRAME_ACK or ftype == FRAME_ACK_ECN:
            pos = _skip_ack(payload, pos, ftype == FRAME_ACK_ECN)
        elif ftype == FRAME_CONNECTION_CLOSE:
            _code, pos = decode_varint(payload, pos)
            _frame_type, pos = decode_varint(payload, pos)
            reason_len, pos = decode_varint(payload, pos)
            pos += reason_len
            if pos > n:
                raise QuicError("truncated", "CONNECTION_CLOSE reason past end of packet")
            closed = True
        else:
            raise QuicError("forbidden_frame", f"frame type 0x{ftype:02x} not allowed in Initial")
    return InitialFrames(crypto, closed)
