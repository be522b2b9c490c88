"""CRYPTO stream reassembly: any order, overlaps, duplicates, gaps, and hard bounds."""

import random

import pytest

from quic.errors import QuicError
from quic.reassembly import CryptoReassembler

STREAM = bytes(random.Random(7).randrange(256) for _ in range(3000))


def test_in_order() -> None:
    r = CryptoReassembler()
    r.add(0, STREAM[:1000])
    r.add(1000, STREAM[1000:])
    assert r.contiguous == len(STREAM)
    assert r.ranges == [(0, len(STREAM))]
    assert r.data(len(STREAM)) == STREAM


def test_reverse_with_gap_filled_later() -> None:
    r = CryptoReassembler()
    r.add(2000, STREAM[2000:])
    assert r.contiguous == 0
    r.add(500, STREAM[500:1000])
    assert r.ranges == [(500, 1000), (2000, 3000)]
    r.add(0, STREAM[:500])
    assert r.contiguous == 1000
    r.add(1000, STREAM[1000:2000])
    assert r.ranges == [(0, 3000)]
    assert r.data(3000) == STREAM


def test_overlaps_and_duplicates() -> None:
    r = CryptoReassembler()
    r.add(100, STREAM[100:300])
    r.add(100, STREAM[100:300])  # retransmission
    r.add(200, STREAM[200:400])  # overlaps the end
    r.add(50, STREAM[50:150])  # overlaps the start
    r.add(0, STREAM[0:1000])  # covers everything
    r.add(10, STREAM[10:20])  # inside
    assert r.ranges == [(0, 1000)]
    assert r.data(1000) == STREAM[:1000]


def test_spanning_several_ranges_merges_them() -> None:
    r = CryptoReassembler()
    for start in range(0, 1000, 100):
        r.add(start, STREAM[start : start + 50])
    assert len(r.ranges) == 10
    r.add(25, STREAM[25:925])
    assert r.ranges == [(0, 950)]
    assert r.data(950) == STREAM[:950]


def test_adjacent_ranges_merge() -> None:
    r = CryptoReassembler()
    r.add(10, b"b")
    r.add(11, b"c")
    r.add(9, b"a")
    assert r.ranges == [(9, 12)]


def test_conflicting_bytes_rejected() -> None:
    r = CryptoReassembler()
    r.add(0, b"hello world")
    with pytest.raises(QuicError) as err:
        r.add(6, b"WORLD")
    assert err.value.reason == "crypto_conflict"
    with pytest.raises(QuicError):
        r.add(8, b"rlD!!!")  # the overlapping part differs in its last byte
    r.add(6, b"world!!")  # consistent overlap plus new data is fine
    assert r.data(13) == b"hello world!!"


def test_conflict_in_a_later_overlapped_range() -> None:
    r = CryptoReassembler()
    r.add(0, b"aaaa")
    r.add(10, b"bbbb")
    with pytest.raises(QuicError) as err:
        r.add(0, b"aaaa" + b"x" * 6 + b"bbbX")
    assert err.value.reason == "crypto_conflict"
    assert r.ranges == [(0, 4), (10, 14)]  # nothing written on failure


def test_cap_is_enforced_before_allocating() -> None:
    r = CryptoReassembler(cap=4096)
    r.add(4095, b"x")
    with pytest.raises(QuicError) as err:
        r.add(4096, b"x")
    assert err.value.reason == "crypto_over_cap"
    with pytest.raises(QuicError):
        r.add((1 << 62) - 10, b"x" * 5)
    assert r.buffered == 4096


def test_cap_below_rfc_minimum_refused() -> None:
    with pytest.raises(ValueError):
        CryptoReassembler(cap=4095)


def test_endless_adjacent_tiny_fragments_coalesce() -> None:
    r = CryptoReassembler()
    for i in range(16384):
        r.add(i, STREAM[i % 3000 : i % 3000 + 1])
    assert len(r.ranges) == 1
    assert r.buffered == 16384


def test_hole_count_bounded() -> None:
    r = CryptoReassembler(max_ranges=8)
    for i in range(8):
        r.add(10 * i, b"x")
    with pytest.raises(QuicError) as err:
        r.add(1000, b"x")
    assert err.value.reason == "crypto_fragmented"
    r.add(1, b"x")  # extends an existing range: no new hole, still fine
    assert len(r.ranges) == 8


def test_data_beyond_contiguous_refused() -> None:
    r = CryptoReassembler()
    r.add(0, b"abc")
    r.add(5, b"fgh")
    assert r.data(3) == b"abc"
    with pytest.raises(QuicError) as err:
        r.data(4)
    assert err.value.reason == "crypto_gap"


def test_empty_fragment_ignored() -> None:
    r = CryptoReassembler(cap=4096)
    r.add(1 << 40, b"")
    assert r.ranges == [] and r.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_cuts_any_order(seed: int) -> None:
    rng = random.Random(seed)
    pieces = []
    for _ in range(60):
        a = rng.randrange(len(STREAM))
        b = min(len(STREAM), a + rng.randrange(1, 400))
        pieces.append((a, STREAM[a:b]))
    pieces += [(i, STREAM[i : i + 300]) for i in range(0, len(STREAM), 300)]
    rng.shuffle(pieces)
    r = CryptoReassembler()
    for offset, data in pieces:
        r.add(offset, data)
    assert r.ranges == [(0, len(STREAM))]
    assert r.data(len(STREAM)) == STREAM
