"""Reassemble the Initial CRYPTO stream of one connection (RFC 9000 §7.5, §19.6).

Real first flights arrive in any order (two datagrams swapped), with overlaps and duplicates
(Initial retransmissions, Chromium's deliberately scrambled and re-cut CRYPTO frames), and with
gaps that a later datagram fills. Hostile ones arrive as endless tiny fragments, huge offsets
or conflicting rewrites. The design keeps memory bounded no matter what arrives:

* Data is coalesced into one ``bytearray`` whose length is the highest end offset seen, and
  which can never exceed ``cap``: a fragment ending beyond ``cap`` raises
  ``QuicError("crypto_over_cap")`` before anything is allocated.
* Coverage is a sorted list of disjoint, non-adjacent ``[start, end)`` ranges: adjacent and
  overlapping ranges merge, so retransmissions add nothing. The number of ranges (the holes
  a client leaves open at once) is bounded by ``max_ranges``; exceeding it raises
  ``QuicError("crypto_fragmented")``. Legitimate clients leave a handful of holes at most.
* Conflicting bytes for an already-received offset raise ``QuicError("crypto_conflict")``.
  RFC 9000 §2.2 allows an endpoint to treat this as a PROTOCOL_VIOLATION; for a classifier it
  is the only safe choice, since accepting either version would let an attacker who can inject
  packets change the SNI/ALPN the connection is steered by after a partial look.
"""

from bisect import bisect_left, bisect_right

from quic.errors import QuicError

DEFAULT_CRYPTO_CAP = 16384
MIN_CRYPTO_CAP = 4096  # RFC 9000 §7.5: buffer at least 4096 bytes of out-of-order CRYPTO data
DEFAULT_MAX_RANGES = 64


class CryptoReassembler:
    """The CRYPTO stream of one connection's Initial packet number space."""

    __slots__ = ("_buf", "_ends", "_starts", "cap", "max_ranges")

    def __init__(self, cap: int = DEFAULT_CRYPTO_CAP, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        if cap < MIN_CRYPTO_CAP:
            raise ValueError(f"CRYPTO cap {cap} is below the {MIN_CRYPTO_CAP} RFC 9000 requires")
        if max_ranges < 1:
            raise ValueError("max_ranges must be at least 1")
        self.cap = cap
        self.max_ranges = max_ranges
        self._buf = bytearray()
        self._starts: list[int] = []
        self._ends: list[int] = []

    @property
    def contiguous(self) -> int:
        """Length of the gap-free prefix starting at offset 0 (what a parser may read)."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    @property
    def buffered(self) -> int:
        """Bytes of memory held for data (the highest end offset seen), always <= ``cap``."""
        return len(self._buf)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The received ``[start, end)`` ranges, sorted and disjoint."""
        return list(zip(self._starts, self._ends, strict=True))

    def data(self, end: int) -> bytes:
        """The stream bytes ``[0, end)``; ``end`` must not exceed :attr:`contiguous`."""
        if end > self.contiguous:
            raise QuicError("crypto_gap", f"bytes up to {end} requested, {self.contiguous} held")
        buf = self._buf
        # One copy, not two (a bytearray slice, then bytes of it), in the usual case where
        # the ClientHello is everything buffered.
        return bytes(buf) if end == len(buf) else bytes(buf[:end])

    def extend(self, frames: list[tuple[int, bytes]]) -> int:
        """``add`` each ``(offset, data)`` in order; return :attr:`contiguous` after them.

        One call per packet instead of one per frame plus a property read: the classifier's
        per-datagram path.
        """
        add = self.add
        for offset, data in frames:
            add(offset, data)
        starts = self._starts
        return self._ends[0] if starts and starts[0] == 0 else 0

    def add(self, offset: int, data: bytes) -> None:
        """Merge one CRYPTO frame's data at ``offset``."""
        length = len(data)
        if length == 0:
            return
        end = offset + length
        if offset < 0:
            raise QuicError("frame_encoding", "negative CRYPTO offset")
        if end > self.cap:
            raise QuicError("crypto_over_cap", f"CRYPTO data up to {end} > cap {self.cap}")
        starts, ends, buf = self._starts, self._ends, self._buf
        if ends and offset == len(buf) and ends[-1] == offset:
            # fast path: data continuing the last range at the end of the buffer (a
            # ClientHello split over two datagrams that arrive in order)
            buf += data
            ends[-1] = end
            return
        if not starts:  # fast path: the first fragment
            if offset:
                buf.extend(bytes(offset))
            buf += data
            starts.append(offset)
            ends.append(end)
            return
        # Ranges touching [offset, end] (adjacent ones too, so they merge): indexes lo..hi-1.
        lo = bisect_left(ends, offset)
        hi = bisect_right(starts, end)
        for i in range(lo, hi):
            a = starts[i] if starts[i] > offset else offset
            b = ends[i] if ends[i] < end else end
            if a < b and buf[a:b] != data[a - offset : b - offset]:
                raise QuicError("crypto_conflict", f"CRYPTO bytes {a}..{b} differ from before")
        if lo < hi and starts[lo] <= offset and ends[lo] >= end:
            return  # pure duplicate (retransmission)
        if lo == hi and len(starts) >= self.max_ranges:
            raise QuicError("crypto_fragmented", f"more than {self.max_ranges} CRYPTO holes")
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = data
        if lo < hi:
            new_start = starts[lo] if starts[lo] < offset else offset
            new_end = ends[hi - 1] if ends[hi - 1] > end else end
            starts[lo:hi] = [new_start]
            ends[lo:hi] = [new_end]
        else:
            starts.insert(lo, offset)
            ends.insert(lo, end)
