"""Property-based tests (hypothesis): hostile input of every kind gets an answer, never an
exception other than QuicError, never a hang, and never more memory than the limits allow.

The hostile Initials here are *validly encrypted* (sealed with the real Initial keys of their
DCID, as any attacker can), so their contents reach the frame walker, the reassembler and the
ClientHello parser instead of stopping at the AEAD.
"""

import os
import tracemalloc
from itertools import pairwise
from random import Random

import pytest
from aioquic import tls as aioquic_tls
from aioquic.buffer import Buffer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_flight import aioquic_flight, crypto, initial_datagram, zero_rtt_packet
from test_tls import (
    aioquic_hello,
    alpn_ext,
    build_client_hello,
    key_share_ext,
    quic_hello,
    sni_ext,
    versions_ext,
)

from quic.errors import QuicError
from quic.flight import (
    REJECT_REASONS,
    AssemblerConfig,
    FirstFlightAssembler,
    NeedMore,
    Ready,
    Rejected,
    VersionNegotiationNeeded,
)
from quic.frames import parse_initial_frames
from quic.packet import VERSION_1, VERSION_2
from quic.reassembly import CryptoReassembler
from quic.tls import parse_client_hello
from quic.varint import MAX_VARINT, encode_varint

RESULTS = (NeedMore, Ready, Rejected, VersionNegotiationNeeded)
ADDR = ("203.0.113.9", 40000)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Valid first-flight datagrams to truncate and flip: real aioquic flights (v1 and v2, one and
# two datagrams) plus a hand-built one carrying 0-RTT.
_DCID = bytes.fromhex("0123456789abcdef")
VALID = [
    *aioquic_flight(["h3"], "example.com"),
    *aioquic_flight(["smb", "h3"], None, VERSION_2),
    *aioquic_flight(["doq"], "x.example", two=True),
    initial_datagram(_DCID, crypto(0, quic_hello())),
    zero_rtt_packet(_DCID),
]


def check_bounds(asm: FirstFlightAssembler) -> None:
    """The limits hold after every feed, whatever was fed."""
    cfg = asm.config
    entries = list(asm._pending.values())
    assert len(entries) <= cfg.max_pending
    assert asm.pending_bytes == sum(e.bytes for e in entries)
    assert asm.pending_bytes <= cfg.max_bytes_total
    for e in entries:
        assert e.reasm.buffered <= cfg.crypto_cap
        assert e.bytes <= cfg.max_bytes_per_connection
        assert len(e.reasm.ranges) <= cfg.max_crypto_ranges
    early = list(asm._early.values())
    assert asm.early_count == len(early) <= cfg.max_early
    assert asm.early_bytes == sum(e.bytes for e in early) <= cfg.max_early_bytes
    assert all(e.bytes <= cfg.max_bytes_per_connection for e in early)
    assert not asm._early.keys() & asm._pending.keys()  # a key lives in one table at most


def feed_all(asm: FirstFlightAssembler, datagrams: list[bytes]) -> list[object]:
    results = []
    for i, d in enumerate(datagrams):
        r = asm.feed(d, ADDR, i * 0.01)
        assert isinstance(r, RESULTS)
        event(type(r).__name__ + (f" {r.reason}" if isinstance(r, Rejected) else ""))
        if isinstance(r, Rejected):
            assert r.reason in REJECT_REASONS
        check_bounds(asm)
        results.append(r)
    return results


# --- arbitrary bytes, truncations, bit flips --------------------------------------------------


@PROPS
@given(st.lists(st.binary(max_size=1600), max_size=5))
def test_arbitrary_datagrams(datagrams: list[bytes]) -> None:
    feed_all(FirstFlightAssembler(), datagrams)


@PROPS
@given(
    st.sampled_from([b"\xc0\x00\x00\x00\x01", b"\xd0\x00\x00\x00\x01", b"\xd0\x6b\x33\x43\xcf"]),
    st.integers(0, 21),
    st.binary(min_size=0, max_size=1400),
)
def test_arbitrary_long_headers(prefix: bytes, dcid_len: int, rest: bytes) -> None:
    """Bytes that pass the first checks (long header, known version, plausible DCID)."""
    feed_all(FirstFlightAssembler(), [prefix + bytes((dcid_len,)) + rest])


@PROPS
@given(st.sampled_from(VALID), st.integers(0, 1500))
def test_truncated_datagrams(datagram: bytes, cut: int) -> None:
    results = feed_all(FirstFlightAssembler(), [datagram[:cut]])
    if cut < len(datagram):
        assert not isinstance(results[0], Ready)


@PROPS
@given(st.sampled_from(VALID), st.lists(st.integers(0, 1200 * 8 - 1), min_size=1, max_size=8))
def test_bit_flips(datagram: bytes, bits: list[int]) -> None:
    flipped = bytearray(datagram)
    for bit in bits:
        if bit // 8 < len(flipped):
            flipped[bit // 8] ^= 1 << (bit % 8)
    feed_all(FirstFlightAssembler(), [bytes(flipped)])


@PROPS
@given(st.permutations(VALID), st.integers(1, 5))
def test_valid_datagrams_any_order_any_repetition(datagrams: list[bytes], times: int) -> None:
    asm = FirstFlightAssembler()
    feed_all(asm, datagrams * times)


# --- validly encrypted, hostile contents ------------------------------------------------------

offsets = st.one_of(
    st.integers(0, 2000),
    st.integers(0, 20000),
    st.integers(MAX_VARINT - 2000, MAX_VARINT),
)


@st.composite
def hostile_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 7))
    if kind <= 2:  # honest-looking CRYPTO frame at any offset
        offset = draw(offsets)
        data = draw(st.binary(max_size=200))
        return b"\x06" + encode_varint(offset) + encode_varint(len(data)) + data
    if kind == 3:  # CRYPTO frame lying about its length
        length = draw(st.integers(0, MAX_VARINT))
        return b"\x06" + encode_varint(draw(offsets)) + encode_varint(length) + b"abc"
    if kind == 4:  # ClientHello header announcing any length, at offset 0
        return crypto(0, b"\x01" + draw(st.integers(0, (1 << 24) - 1)).to_bytes(3, "big"))
    if kind == 5:  # ACK with arbitrary values
        values = draw(st.lists(st.integers(0, MAX_VARINT), min_size=4, max_size=8))
        return bytes((draw(st.sampled_from([2, 3])),)) + b"".join(map(encode_varint, values))
    if kind == 6:
        return draw(st.sampled_from([b"\x00", b"\x01", b"\x00" * 50]))
    return draw(st.binary(min_size=1, max_size=20))  # anything at all


@PROPS
@given(
    st.lists(st.lists(hostile_frame(), min_size=1, max_size=10), min_size=1, max_size=6),
    st.sampled_from([VERSION_1, VERSION_2]),
)
def test_valid_encryption_hostile_frames(packets: list[list[bytes]], version: int) -> None:
    dcid = os.urandom(8)
    datagrams = []
    for frames in packets:
        payload = b"".join(frames)[:1100]
        datagrams.append(initial_datagram(dcid, payload, version=version))
    feed_all(FirstFlightAssembler(), datagrams)


@PROPS
@given(
    st.lists(st.tuples(st.integers(0, 1800), st.integers(1, 300)), max_size=30),
    st.lists(st.tuples(st.integers(0, 700), st.integers(1, 255)), max_size=4),
)
def test_valid_encryption_mutated_client_hello(
    cuts: list[tuple[int, int]], flips: list[tuple[int, int]]
) -> None:
    """A real ClientHello cut into overlapping frames, some of its bytes (the first 700 hold
    all the structure) changed: whatever the outcome, it is one of the four answers and the
    limits hold."""
    hello = bytearray(quic_hello(pad=1500))
    for at, xor in flips:
        hello[at] ^= xor
    dcid = os.urandom(8)
    datagrams = []
    sweep = [(start, 1000) for start in range(0, len(hello), 1000)]
    for start, length in cuts + sweep:
        datagrams.append(
            initial_datagram(dcid, crypto(start, bytes(hello[start : start + length])))
        )
    feed_all(FirstFlightAssembler(), datagrams)


REAL_HELLO = aioquic_hello(["smb", "h3"], "files.example.net")


@PROPS
@given(
    st.lists(st.integers(1, len(REAL_HELLO) - 1), max_size=12, unique=True),
    st.randoms(use_true_random=False),
    st.integers(1, 3),
    st.sampled_from([VERSION_1, VERSION_2]),
)
def test_any_cutting_any_order_classifies(
    cuts: list[int], rng: Random, per_packet: int, version: int
) -> None:
    """A real ClientHello cut anywhere into CRYPTO frames, packed a few per Initial, the
    Initials shuffled and some repeated: the answer is Ready, with the right SNI and ALPN,
    exactly when the last missing byte arrives, never before."""
    bounds = [0, *sorted(cuts), len(REAL_HELLO)]
    pieces = [(a, REAL_HELLO[a:b]) for a, b in pairwise(bounds)]
    pieces += rng.sample(pieces, k=len(pieces) // 3)  # retransmitted pieces
    rng.shuffle(pieces)
    dcid = rng.randbytes(8)
    asm = FirstFlightAssembler()
    covered: set[int] = set()
    for i in range(0, len(pieces), per_packet):
        group = pieces[i : i + per_packet]
        frames = b"".join(crypto(offset, data) for offset, data in group)
        result = asm.feed(initial_datagram(dcid, frames, version=version), ADDR, 0.0)
        covered.update(o for offset, data in group for o in range(offset, offset + len(data)))
        if len(covered) < len(REAL_HELLO):
            assert isinstance(result, NeedMore)
            continue
        assert isinstance(result, Ready)
        assert result.sni == "files.example.net" and result.alpn == ("smb", "h3")
        assert result.version == version and len(result.datagrams) == i // per_packet + 1
        return
    raise AssertionError("the ClientHello never completed")


# A real two-datagram flight, and what a sender who knows its DCID can send from elsewhere.
_PAIR = aioquic_flight(["smb", "h3"], "files.example", two=True)
_PAIR_DCID = _PAIR[0][6 : 6 + _PAIR[0][5]]
_SPOOFS = [
    zero_rtt_packet(_PAIR_DCID),
    initial_datagram(_PAIR_DCID, crypto(0, b"\x01\x00\x3f\x00" + bytes(300))),  # conflicts
    initial_datagram(_PAIR_DCID, crypto(0, quic_hello(sni="evil.example"))),  # a whole hello
    initial_datagram(_PAIR_DCID, b"\x08\x00\x00"),  # forbidden frame: drops its connection
    *_PAIR,  # the client's own datagrams, replayed
]


@PROPS
@given(
    st.lists(st.tuples(st.sampled_from(range(len(_SPOOFS))), st.integers(0, 3)), max_size=12),
    st.integers(0, 12),
    st.integers(0, 12),
    st.booleans(),
)
def test_same_dcid_from_other_addresses_never_disturbs_the_flight(
    spoofs: list[tuple[int, int]], first_at: int, second_at: int, reverse: bool
) -> None:
    """Whatever other addresses send under the client's DCID, and whenever, the client's own
    two datagrams complete its flight, which holds exactly them (issue 11 item 4)."""
    asm = FirstFlightAssembler(AssemblerConfig(max_pending=8, max_early=2))
    own = _PAIR[::-1] if reverse else _PAIR
    plan = [(_SPOOFS[i], ("198.51.100.1", 1000 + port)) for i, port in spoofs]
    a, b = sorted((min(first_at, len(plan)), min(second_at, len(plan))))
    plan.insert(b, (own[1], ADDR))
    plan.insert(a, (own[0], ADDR))
    ours = []
    for i, (datagram, addr) in enumerate(plan):
        result = asm.feed(datagram, addr, i * 0.01)
        assert isinstance(result, RESULTS)
        check_bounds(asm)
        if addr == ADDR:
            ours.append(result)
    assert isinstance(ours[0], NeedMore)
    assert isinstance(ours[1], Ready) and ours[1].sni == "files.example"
    assert ours[1].datagrams == tuple((d, ADDR) for d in own)


@pytest.mark.timeout(60)
def test_endless_scattered_fragments_bounded() -> None:
    """Thousands of one-byte fragments leaving holes: refused once the hole limit is hit,
    memory stays bounded throughout, and each later wave is refused just as fast."""
    asm = FirstFlightAssembler()
    tracemalloc.start()
    try:
        rejected = 0
        for wave in range(40):
            dcid = wave.to_bytes(8, "big")
            for p in range(25):
                frames = b"".join(crypto((p * 20 + i) * 7, b"z") for i in range(20))
                r = asm.feed(initial_datagram(dcid, frames), ADDR, 0.0)
                check_bounds(asm)
                if isinstance(r, Rejected):
                    assert r.reason == "crypto_fragmented"
                    rejected += 1
                    break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rejected == 40
    assert peak < 2_000_000


def test_endless_adjacent_fragments_hit_the_cap() -> None:
    """Fragments that merge never create holes; they run into the cap instead."""
    asm = FirstFlightAssembler(AssemblerConfig(max_bytes_per_connection=200_000))
    dcid = os.urandom(8)
    first = crypto(0, b"\x01\x00\x40\x00")  # 16 KiB + its 4-byte header: over the cap
    result = asm.feed(initial_datagram(dcid, first), ADDR, 0.0)
    assert isinstance(result, Rejected) and result.reason == "crypto_over_cap"
    offset = 4
    result = asm.feed(initial_datagram(dcid, crypto(0, b"\x01\x00\x3f\xfb")), ADDR, 0.0)
    while isinstance(result, NeedMore):
        frames = b"".join(crypto(i, b"\x00") for i in range(offset, min(offset + 200, 16383)))
        offset += 200
        result = asm.feed(initial_datagram(dcid, frames, size=1400), ADDR, 0.0)
        check_bounds(asm)
    # a 16383-byte ClientHello of zeros: complete at last, and malformed
    assert isinstance(result, Rejected) and result.reason == "bad_client_hello"
    assert offset >= 16383


def test_many_connections_bounded() -> None:
    cfg = AssemblerConfig(max_pending=50, max_bytes_total=200_000)
    asm = FirstFlightAssembler(cfg)
    for i in range(500):
        r = asm.feed(initial_datagram(os.urandom(8), crypto(15000, b"x" * 100)), ADDR, i * 1e-3)
        assert isinstance(r, NeedMore)
        check_bounds(asm)
    assert asm.stats.evicted == 500 - asm.pending_count


# --- the parts on their own -------------------------------------------------------------------


@PROPS
@given(st.binary(max_size=3000))
def test_frames_arbitrary(payload: bytes) -> None:
    try:
        frames = parse_initial_frames(payload)
    except QuicError:
        return
    for offset, data in frames.crypto:
        assert 0 <= offset and offset + len(data) <= MAX_VARINT and data in payload


@PROPS
@given(st.binary(max_size=3000))
def test_client_hello_arbitrary(body: bytes) -> None:
    for msg in (body, b"\x01" + len(body).to_bytes(3, "big") + body):
        try:
            parse_client_hello(msg)
        except QuicError:
            pass


@PROPS
@given(st.integers(0, 500), st.binary(min_size=1, max_size=8))
def test_client_hello_mutated(at: int, patch: bytes) -> None:
    raw = bytearray(quic_hello(pad=100))
    raw[4 + at : 4 + at + len(patch)] = patch
    try:
        parse_client_hello(bytes(raw))
    except QuicError:
        pass


@PROPS
@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 600)), max_size=80),
    st.integers(4096, 6000),
)
def test_reassembly_matches_a_model(fragments: list[tuple[int, int]], cap: int) -> None:
    stream = bytes((i * 31 + 7) & 0xFF for i in range(7000))
    r = CryptoReassembler(cap=cap, max_ranges=16)
    covered: set[int] = set()
    for offset, length in fragments:
        before = r.ranges
        try:
            r.add(offset, stream[offset : offset + length])
        except QuicError as e:
            assert e.reason in ("crypto_over_cap", "crypto_fragmented")
            assert r.ranges == before
            continue
        covered.update(range(offset, offset + length))
    ranges = r.ranges
    assert sum(b - a for a, b in ranges) == len(covered)
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert r.buffered <= cap
    if r.contiguous:
        assert r.data(r.contiguous) == stream[: r.contiguous]


hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)
alpns = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-/.", min_size=1, max_size=20),
    min_size=1,
    max_size=6,
)


@PROPS
@given(hostnames, alpns, st.lists(st.sampled_from([0x1D, 0x17, 0x11EC, 0x0A0A]), max_size=3))
def test_client_hello_agrees_with_aioquic(sni: str, alpn: list[str], groups: list[int]) -> None:
    raw = build_client_hello(
        [
            versions_ext(0x0304),
            sni_ext(sni.encode()),
            alpn_ext(*(a.encode() for a in alpn)),
            key_share_ext(*dict.fromkeys(groups)),
        ]
    )
    ours = parse_client_hello(raw)
    theirs = aioquic_tls.pull_client_hello(Buffer(data=raw))
    assert ours.sni == theirs.server_name
    assert list(ours.alpn) == theirs.alpn_protocols
    assert list(ours.key_share_groups) == [g for g, _ in theirs.key_share]
