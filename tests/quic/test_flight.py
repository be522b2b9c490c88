"""The first-flight assembler: real aioquic first flights (v1, v2, 1 and 2 datagrams, any
order) and hand-built Initials sealed with the real Initial keys, for every rule and limit.

``initial_datagram`` and ``zero_rtt_packet`` are reused by the property tests.
"""

import os

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from test_tls import build_client_hello, quic_hello

import quic.flight
from quic.crypto import derive_initial_keys, seal_initial
from quic.flight import (
    AssemblerConfig,
    FirstFlightAssembler,
    NeedMore,
    Ready,
    Rejected,
    VersionNegotiationNeeded,
)
from quic.packet import VERSION_1, VERSION_2, PacketType, long_header_type_bits
from quic.varint import encode_varint

ADDR = ("192.0.2.7", 51234)
SCID = bytes.fromhex("c0ffee0011223344")


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + encode_varint(offset) + encode_varint(len(data)) + data


def initial_packet(
    dcid: bytes,
    frames: bytes,
    *,
    version: int = VERSION_1,
    scid: bytes = SCID,
    pn: int = 0,
    size: int = 1200,
    token: bytes = b"",
) -> bytes:
    """One client Initial sealed with the real keys, its payload padded so the packet is
    ``size`` bytes (or as small as the frames allow)."""
    length_len = 2 if size + len(frames) < 16000 else 4
    header_len = 1 + 4 + 1 + len(dcid) + 1 + len(scid) + len(encode_varint(len(token)))
    header_len += len(token) + length_len + 4
    pad = max(0, size - header_len - 16 - len(frames))
    keys = derive_initial_keys(dcid, version, server=False)
    payload = frames + bytes(pad)
    return seal_initial(keys, version, dcid, scid, token, pn, payload, length_len=length_len)


def initial_datagram(dcid: bytes, frames: bytes, **kw: object) -> bytes:
    return initial_packet(dcid, frames, **kw)  # type: ignore[arg-type]


def zero_rtt_packet(dcid: bytes, size: int = 300, version: int = VERSION_1) -> bytes:
    """A 0-RTT long-header packet (its payload is opaque to the classifier: random bytes)."""
    first = 0xC0 | (long_header_type_bits(version, PacketType.ZERO_RTT) << 4) | 0x03
    body_len = size - (1 + 4 + 1 + len(dcid) + 1 + len(SCID) + 2)
    return (
        bytes((first,))
        + version.to_bytes(4, "big")
        + bytes((len(dcid),))
        + dcid
        + bytes((len(SCID),))
        + SCID
        + (0x4000 | body_len).to_bytes(2, "big")
        + os.urandom(body_len)
    )


def long_packet(ptype: PacketType, dcid: bytes, version: int = VERSION_1) -> bytes:
    first = 0xC0 | (long_header_type_bits(version, ptype) << 4)
    body = bytes(1200)
    return (
        bytes((first,))
        + version.to_bytes(4, "big")
        + bytes((len(dcid),))
        + dcid
        + bytes((len(SCID),))
        + SCID
        + (b"\x00" if ptype is PacketType.INITIAL else b"")  # token length
        + (0x4000 | len(body)).to_bytes(2, "big")
        + body
    )


def aioquic_flight(
    alpn: list[str], server_name: str | None, version: int = VERSION_1, two: bool = False
) -> list[bytes]:
    cfg = QuicConfiguration(
        is_client=True,
        alpn_protocols=alpn,
        server_name=server_name,
        original_version=version,
        quantum_readiness_test=two,
    )
    conn = QuicConnection(configuration=cfg)
    conn.connect(("127.0.0.1", 443), now=0.0)
    datagrams = [d for d, _ in conn.datagrams_to_send(now=0.0)]
    assert len(datagrams) == (2 if two else 1)
    return datagrams


def dcid_of(n: int) -> bytes:
    return n.to_bytes(8, "big")


# --- real client ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2])
@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    ("alpn", "sni"),
    [(["h3"], "www.example.com"), (["smb", "h3", "doq"], None), (["hq-interop"], "a.b.example")],
)
def test_aioquic_first_flights(
    version: int, two: bool, reverse: bool, alpn: list[str], sni: str | None
) -> None:
    datagrams = aioquic_flight(alpn, sni, version, two)
    order = datagrams[::-1] if reverse else datagrams
    asm = FirstFlightAssembler()
    results = [asm.feed(d, ADDR, 1.0) for d in order]
    assert all(isinstance(r, NeedMore) for r in results[:-1])
    ready = results[-1]
    assert isinstance(ready, Ready)
    assert ready.version == version
    assert ready.sni == sni and ready.alpn == tuple(alpn)
    assert len(ready.dcid) == 8 and len(ready.scid) == 8
    assert ready.datagrams == tuple((d, ADDR) for d in order)
    assert ready.client_hello.has_transport_parameters
    assert asm.pending_count == 0 and asm.pending_bytes == 0
    assert asm.stats.ready == 1


def test_interleaved_connections() -> None:
    a = aioquic_flight(["h3"], "a.example", two=True)
    b = aioquic_flight(["smb"], "b.example", version=VERSION_2, two=True)
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(a[1], ADDR, 0.0), NeedMore)
    assert isinstance(asm.feed(b[0], ("198.51.100.1", 4444), 0.0), NeedMore)
    assert asm.pending_count == 2
    ra = asm.feed(a[0], ADDR, 0.1)
    rb = asm.feed(b[1], ("198.51.100.1", 4444), 0.1)
    assert isinstance(ra, Ready) and ra.sni == "a.example" and ra.alpn == ("h3",)
    assert isinstance(rb, Ready) and rb.sni == "b.example" and rb.version == VERSION_2


# --- hand-built flights ----------------------------------------------------------------------


def test_scrambled_crypto_frames_and_0rtt_kept_in_order() -> None:
    dcid = os.urandom(12)
    hello = quic_hello(pad=1500)
    cut = [0, 300, 700, 1100, 1400, len(hello)]
    parts = [crypto(cut[i], hello[cut[i] : cut[i + 1]]) for i in range(5)]
    early = zero_rtt_packet(dcid)
    d1 = initial_datagram(dcid, parts[3] + b"\x01" + parts[0])
    d2 = initial_datagram(dcid, parts[4] + parts[1] + parts[2])
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(early, ADDR, 0.0), NeedMore)  # 0-RTT before any Initial
    assert isinstance(asm.feed(d1, ADDR, 0.0), NeedMore)
    assert isinstance(asm.feed(d1, ADDR, 0.2), NeedMore)  # retransmission: kept, harmless
    late = zero_rtt_packet(dcid, 500)
    assert isinstance(asm.feed(late, ADDR, 0.3), NeedMore)
    ready = asm.feed(d2, ADDR, 0.4)
    assert isinstance(ready, Ready)
    assert ready.dcid == dcid and ready.scid == SCID and ready.sni == "example.com"
    assert [d for d, _ in ready.datagrams] == [early, d1, d1, late, d2]


def test_coalesced_initial_and_0rtt() -> None:
    dcid = os.urandom(8)
    initial = initial_packet(dcid, crypto(0, quic_hello()), size=900)
    datagram = initial + zero_rtt_packet(dcid, 400)
    ready = FirstFlightAssembler().feed(datagram, ADDR, 0.0)
    assert isinstance(ready, Ready) and ready.datagrams == ((datagram, ADDR),)


def test_coalesced_packet_with_other_dcid_ignored() -> None:
    dcid = os.urandom(8)
    initial = initial_packet(dcid, crypto(0, quic_hello()), size=900)
    # A Handshake packet would be rejected, but it belongs to another DCID: ignored (§12.2).
    datagram = initial + long_packet(PacketType.HANDSHAKE, os.urandom(8))
    assert isinstance(FirstFlightAssembler().feed(datagram, ADDR, 0.0), Ready)


def test_trailing_zero_padding_after_initial() -> None:
    dcid = os.urandom(8)
    datagram = initial_packet(dcid, crypto(0, quic_hello()), size=600) + bytes(600)
    assert isinstance(FirstFlightAssembler().feed(datagram, ADDR, 0.0), Ready)


def test_version_negotiation_needed() -> None:
    dcid, datagram = os.urandom(8), bytearray(long_packet(PacketType.INITIAL, os.urandom(8)))
    datagram[1:5] = (0x1A2A3A4A).to_bytes(4, "big")
    datagram[6:14] = dcid
    result = FirstFlightAssembler().feed(bytes(datagram), ADDR, 0.0)
    assert result == VersionNegotiationNeeded(0x1A2A3A4A, dcid, SCID)
    short = FirstFlightAssembler().feed(bytes(datagram[:1199]), ADDR, 0.0)
    assert isinstance(short, Rejected) and short.reason == "short_unknown_version"
    datagram[1:5] = bytes(4)
    vn = FirstFlightAssembler().feed(bytes(datagram), ADDR, 0.0)
    assert isinstance(vn, Rejected) and vn.reason == "unexpected_version_negotiation"


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "not_long_header"),
        (b"\x40" + bytes(1300), "not_long_header"),
        (b"\xc0\x00\x00", "truncated"),
        (initial_packet(os.urandom(8), crypto(0, quic_hello()), size=1199), "short_initial"),
        (initial_packet(os.urandom(7), crypto(0, quic_hello())), "short_dcid"),
        (long_packet(PacketType.HANDSHAKE, os.urandom(8)), "unexpected_packet_type"),
        (long_packet(PacketType.INITIAL, os.urandom(8)), "decrypt_failed"),
        (initial_packet(os.urandom(8), crypto(0, quic_hello()) + b"\x1d" + bytes(8)), None),
        (initial_packet(os.urandom(8), crypto(0, quic_hello()) + b"\x1c\x00\x00\x00"), None),
    ],
)
def test_rejected_datagrams(datagram: bytes, reason: str | None) -> None:
    asm = FirstFlightAssembler()
    result = asm.feed(datagram, ADDR, 0.0)
    assert isinstance(result, Rejected)
    if reason is not None:
        assert result.reason == reason
    else:
        assert result.reason in ("forbidden_frame", "client_closed")
    assert asm.pending_count == 0 and asm.pending_bytes == 0
    assert asm.stats.rejected == 1


def test_protocol_violation_drops_pending_connection() -> None:
    dcid = os.urandom(8)
    hello = quic_hello(pad=2000)
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(initial_datagram(dcid, crypto(0, hello[:900])), ADDR, 0), NeedMore)
    bad = initial_datagram(dcid, crypto(900, hello[900:1000]) + b"\x08\x00\x00")
    result = asm.feed(bad, ADDR, 0.0)
    assert result == Rejected("forbidden_frame", dcid, result.detail, True)  # type: ignore[union-attr]
    assert asm.pending_count == 0 and asm.pending_bytes == 0


def test_undecryptable_initial_does_not_hurt_pending_connection() -> None:
    dcid = os.urandom(8)
    hello = quic_hello(pad=2000)
    asm = FirstFlightAssembler()
    first = initial_datagram(dcid, crypto(0, hello[:1000]))
    assert isinstance(asm.feed(first, ADDR, 0.0), NeedMore)
    forged = bytearray(initial_datagram(dcid, crypto(1000, b"evil.example")))
    forged[-1] ^= 1  # breaks the AEAD tag
    result = asm.feed(bytes(forged), ADDR, 0.0)
    assert isinstance(result, Rejected) and result.reason == "decrypt_failed"
    assert not result.connection_dropped and asm.pending_count == 1
    ready = asm.feed(initial_datagram(dcid, crypto(1000, hello[1000:])), ADDR, 0.0)
    assert isinstance(ready, Ready) and len(ready.datagrams) == 2


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        (crypto(0, b"\x02\x00\x00\x10" + bytes(16)), "not_client_hello"),
        (crypto(0, b"\x01\x00\x50\x00"), "crypto_over_cap"),  # announces 20 KiB > 16 KiB
        (crypto(16000, bytes(400)), "crypto_over_cap"),
        (crypto(0, build_client_hello([b"\x00\x10\x00"])), "bad_client_hello"),
        (crypto(0, b"\x01\x00\x00\x10abc") + crypto(1, b"XY"), "crypto_conflict"),
    ],
)
def test_hostile_crypto_rejected(frames: bytes, reason: str) -> None:
    asm = FirstFlightAssembler()
    result = asm.feed(initial_datagram(os.urandom(8), frames), ADDR, 0.0)
    assert isinstance(result, Rejected) and result.reason == reason
    assert asm.pending_count == 0


def test_single_frame_beyond_cap_in_a_jumbo_datagram() -> None:
    hello = quic_hello(pad=17000)
    for cap in (16384, 32768):
        asm = FirstFlightAssembler(AssemblerConfig(crypto_cap=cap))
        result = asm.feed(initial_datagram(os.urandom(8), crypto(0, hello)), ADDR, 0.0)
        if cap < len(hello):
            assert isinstance(result, Rejected) and result.reason == "crypto_over_cap"
        else:
            assert isinstance(result, Ready) and result.client_hello.length == len(hello)


def test_version_mismatch_within_a_connection() -> None:
    dcid = os.urandom(8)
    hello = quic_hello(pad=2000)
    asm = FirstFlightAssembler()
    asm.feed(initial_datagram(dcid, crypto(0, hello[:1000])), ADDR, 0.0)
    other = initial_datagram(dcid, crypto(1000, hello[1000:]), version=VERSION_2)
    result = asm.feed(other, ADDR, 0.0)
    assert isinstance(result, Rejected) and result.reason == "version_mismatch"
    assert asm.pending_count == 1


def test_decided_dcid_fed_again_does_not_crash() -> None:
    datagram = initial_datagram(os.urandom(8), crypto(0, quic_hello()))
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(datagram, ADDR, 0.0), Ready)
    assert isinstance(asm.feed(datagram, ADDR, 0.1), Ready)  # a retransmission: new answer
    assert isinstance(asm.feed(zero_rtt_packet(datagram[6:14]), ADDR, 0.2), NeedMore)


def test_keys_derived_once_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = quic.flight.derive_initial_keys

    def counting(dcid: bytes, version: int, *, server: bool) -> object:
        calls.append(dcid)
        return real(dcid, version, server=server)

    monkeypatch.setattr(quic.flight, "derive_initial_keys", counting)
    dcid = os.urandom(8)
    hello = quic_hello(pad=3000)
    asm = FirstFlightAssembler()
    for start in (2000, 1000, 0):
        end = min(start + 1000, len(hello))
        rest = start + 1000 if start == 2000 else end
        asm.feed(initial_datagram(dcid, crypto(start, hello[start:rest])), ADDR, 0.0)
    result = asm.feed(initial_datagram(dcid, crypto(3000, hello[3000:])), ADDR, 0.0)
    assert isinstance(result, Ready)
    assert calls == [dcid]


# --- limits ----------------------------------------------------------------------------------


def partial(dcid: bytes) -> bytes:
    return initial_datagram(dcid, crypto(0, quic_hello(pad=3000)[:500]))


def test_max_pending_evicts_oldest_first() -> None:
    asm = FirstFlightAssembler(AssemblerConfig(max_pending=3))
    for i in range(5):
        assert isinstance(asm.feed(partial(dcid_of(i)), ADDR, float(i)), NeedMore)
    assert asm.pending_count == 3 and asm.stats.evicted == 2
    assert list(asm._pending) == [(dcid_of(i), ADDR) for i in (2, 3, 4)]


def test_total_bytes_evicts_oldest_first() -> None:
    cfg = AssemblerConfig(max_bytes_per_connection=20000, max_bytes_total=20000)
    asm = FirstFlightAssembler(cfg)
    for i in range(20):
        asm.feed(partial(dcid_of(i)), ADDR, 0.0)
        assert asm.pending_bytes <= 20000
    # each partial costs 1200 datagram bytes + 500 reassembly bytes
    assert asm.pending_count == 20000 // 1700
    assert list(asm._pending)[-1] == (dcid_of(19), ADDR)
    assert asm.pending_bytes == 1700 * asm.pending_count


def test_per_connection_budget() -> None:
    cfg = AssemblerConfig(max_bytes_per_connection=1200 + 16384)
    asm = FirstFlightAssembler(cfg)
    dcid = dcid_of(1)
    asm.feed(partial(dcid), ADDR, 0.0)
    results = [asm.feed(zero_rtt_packet(dcid, 1200), ADDR, 0.0) for _ in range(20)]
    assert isinstance(results[0], NeedMore)
    over = [r for r in results if isinstance(r, Rejected)]
    assert over and all(r.reason == "connection_over_budget" for r in over)
    assert not any(r.connection_dropped for r in over)
    assert asm.pending_bytes <= cfg.max_bytes_per_connection


def test_sparse_crypto_charged_for_its_buffer() -> None:
    """A tiny fragment at a high offset costs the buffer it creates, not its own size."""
    asm = FirstFlightAssembler()
    asm.feed(initial_datagram(dcid_of(1), crypto(15000, b"x")), ADDR, 0.0)
    assert asm.pending_bytes == 1200 + 15001


def test_ttl_expiry() -> None:
    asm = FirstFlightAssembler(AssemblerConfig(ttl=5.0))
    asm.feed(partial(dcid_of(1)), ADDR, 0.0)
    asm.feed(partial(dcid_of(2)), ADDR, 3.0)
    assert asm.expire(4.9) == 0
    assert asm.expire(5.0) == 1 and asm.pending_count == 1
    asm.feed(partial(dcid_of(3)), ADDR, 8.5)  # lazy expiry on feed drops dcid 2
    assert list(asm._pending) == [(dcid_of(3), ADDR)]
    assert asm.stats.expired == 2
    assert asm.pending_bytes == 1700


def test_expired_connection_starts_over() -> None:
    dcid = os.urandom(8)
    hello = quic_hello(pad=2000)
    asm = FirstFlightAssembler(AssemblerConfig(ttl=1.0))
    asm.feed(initial_datagram(dcid, crypto(0, hello[:1000])), ADDR, 0.0)
    result = asm.feed(initial_datagram(dcid, crypto(1000, hello[1000:])), ADDR, 2.0)
    assert isinstance(result, NeedMore)  # the first half is gone with its entry


# --- keys: DCID and client address (issue 11 item 4) ---------------------------------------

SPOOF = ("198.51.100.66", 4433)


def test_spoofed_dcid_from_another_address_cannot_disturb_a_pending_flight() -> None:
    d0, d1 = aioquic_flight(["h3"], "www.example.com", two=True)
    dcid = d0[6 : 6 + d0[5]]
    # CRYPTO bytes at offset 0 that conflict with the real ClientHello (its bytes 4-5 are
    # 0x0303, the legacy version), and a 0-RTT datagram: both carry the client's DCID.
    conflict = initial_datagram(dcid, crypto(0, b"\x01\x00\x3f\x00" + bytes(300)))
    early = zero_rtt_packet(dcid)
    # From the client's own address, the conflicting datagram drops the flight (as it must) ...
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(d0, ADDR, 0.0), NeedMore)
    poisoned = asm.feed(conflict, ADDR, 0.1)
    assert isinstance(poisoned, Rejected) and poisoned.reason == "crypto_conflict"
    assert poisoned.connection_dropped and asm.pending_count == 0
    # ... from another address, it and the 0-RTT datagram are a connection of their own.
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(d0, ADDR, 0.0), NeedMore)
    assert asm.feed(early, SPOOF, 0.1) == NeedMore(dcid)
    assert (asm.pending_count, asm.early_count) == (1, 1)
    assert asm.feed(conflict, SPOOF, 0.2) == NeedMore(dcid)  # promotes the spoofer's entry
    assert (asm.pending_count, asm.early_count) == (2, 0)
    ready = asm.feed(d1, ADDR, 0.3)
    assert isinstance(ready, Ready) and ready.sni == "www.example.com"
    assert ready.datagrams == ((d0, ADDR), (d1, ADDR)) and ready.started == 0.0
    assert asm.pending_count == 1 and asm.is_pending(dcid, SPOOF)
    assert not asm.is_pending(dcid, ADDR)
    spoofer = asm._pending[(dcid, SPOOF)]
    assert spoofer.datagrams == [(early, SPOOF), (conflict, SPOOF)]
    assert asm.pending_bytes == spoofer.bytes
    assert asm.stats.rejected == 0 and asm.stats.evicted == 0


def test_peer_argument_keys_instead_of_addr() -> None:
    """``peer`` is the key's address (the daemon's Origin also names the service): datagrams
    with different ``addr`` but the same ``peer`` are one connection, and ``addr`` is handed
    back untouched."""
    d0, d1 = aioquic_flight(["h3"], "a.example", two=True)
    asm = FirstFlightAssembler()
    assert isinstance(asm.feed(d0, ("origin", 1), 0.0, ADDR), NeedMore)
    assert isinstance(asm.feed(d1, ("origin", 2), 0.0, SPOOF), NeedMore)  # another client
    ready = asm.feed(d1, ("origin", 3), 0.0, ADDR)
    assert isinstance(ready, Ready)
    assert ready.datagrams == ((d0, ("origin", 1)), (d1, ("origin", 3)))


# --- the early table: 0-RTT before any Initial (issue 11 item 2) --------------------------------


def test_zero_rtt_flood_cannot_evict_a_half_flight() -> None:
    """Chromium's and qh3's ClientHellos span two datagrams: with the first one pending, a
    flood of random-DCID 0-RTT datagrams (more than the whole main table) evicts only other
    early entries, and the second datagram still completes the flight."""
    d0, d1 = aioquic_flight(["smb", "h3"], "files.example", two=True)
    cfg = AssemblerConfig()
    asm = FirstFlightAssembler(cfg)
    assert isinstance(asm.feed(d0, ADDR, 0.0), NeedMore)
    n = cfg.max_pending + cfg.max_early + 1
    for i in range(n):
        assert isinstance(asm.feed(zero_rtt_packet(os.urandom(8), 200), ADDR, i * 1e-6), NeedMore)
    assert asm.pending_count == 1 and asm.early_count == cfg.max_early
    assert asm.stats.evicted == 0 and asm.stats.evicted_early == n - cfg.max_early
    ready = asm.feed(d1, ADDR, 0.5)
    assert isinstance(ready, Ready) and ready.alpn == ("smb", "h3")
    assert ready.datagrams == ((d0, ADDR), (d1, ADDR))
    assert asm.pending_count == 0 and asm.pending_bytes == 0
    assert asm.early_bytes == 200 * cfg.max_early


def test_initial_flood_cannot_evict_early_entries() -> None:
    """The other direction: half-flights filling the main table never push out an early
    entry (each table evicts only its own)."""
    asm = FirstFlightAssembler(AssemblerConfig(max_pending=3))
    dcid = os.urandom(8)
    early = zero_rtt_packet(dcid)
    assert isinstance(asm.feed(early, ADDR, 0.0), NeedMore)
    for i in range(10):
        assert isinstance(asm.feed(partial(dcid_of(i)), ADDR, 0.1), NeedMore)
    assert asm.pending_count == 3 and asm.stats.evicted == 7
    assert list(asm._early) == [(dcid, ADDR)] and asm.stats.evicted_early == 0
    ready = asm.feed(initial_datagram(dcid, crypto(0, quic_hello())), ADDR, 0.2)
    assert isinstance(ready, Ready) and ready.datagrams[0] == (early, ADDR)


@pytest.mark.parametrize("two", [False, True])
def test_zero_rtt_before_initial_forwarded_with_the_flight_in_arrival_order(two: bool) -> None:
    """0-RTT that overtook its Initial waits in the early table, then leads the flight: on the
    fast path (one-datagram ClientHello) as on the assembled one, and the flight's start is
    its first 0-RTT datagram."""
    flight = aioquic_flight(["h3"], "www.example.com", two=two)
    dcid = flight[0][6 : 6 + flight[0][5]]
    z0, z1, z2 = (zero_rtt_packet(dcid, 300 + i) for i in range(3))
    asm = FirstFlightAssembler()
    assert asm.feed(z0, ADDR, 1.0) == NeedMore(dcid)
    assert asm.feed(z1, ADDR, 1.1) == NeedMore(dcid)
    assert asm.early_count == 1 and asm.early_bytes == len(z0) + len(z1)
    assert asm.pending_count == 0
    if two:
        assert asm.feed(flight[0], ADDR, 1.2) == NeedMore(dcid)
        assert asm.early_count == 0 and asm.early_bytes == 0 and asm.pending_count == 1
        assert asm.pending_bytes >= len(z0) + len(z1) + len(flight[0])
        assert asm.feed(z2, ADDR, 1.3) == NeedMore(dcid)  # 0-RTT after an Initial: main table
        ready = asm.feed(flight[1], ADDR, 1.4)
        expected = [z0, z1, flight[0], z2, flight[1]]
    else:
        ready = asm.feed(flight[0], ADDR, 1.2)
        expected = [z0, z1, flight[0]]
    assert isinstance(ready, Ready) and ready.sni == "www.example.com"
    assert ready.datagrams == tuple((d, ADDR) for d in expected)
    assert ready.started == 1.0
    assert asm.pending_count == asm.pending_bytes == asm.early_count == asm.early_bytes == 0


def test_early_table_bounded_under_flood() -> None:
    """Under a flood of random-DCID 0-RTT the early table never holds more than its count or
    its bytes; the oldest entries go first; the main table stays empty."""
    cfg = AssemblerConfig(max_pending=64)
    assert cfg.max_early == 64 and cfg.max_early_bytes == 4 * 1024 * 1024  # derived defaults
    asm = FirstFlightAssembler(cfg)
    dcids = [os.urandom(8) for _ in range(500)]
    for i, dcid in enumerate(dcids):
        asm.feed(zero_rtt_packet(dcid, 100 + i % 50), ADDR, i * 1e-3)
        assert asm.early_count <= cfg.max_early
        assert asm.early_bytes == sum(e.bytes for e in asm._early.values())
        assert asm.pending_count == 0 and asm.pending_bytes == 0
    assert list(asm._early) == [(d, ADDR) for d in dcids[-cfg.max_early :]]
    assert asm.stats.evicted_early == 500 - cfg.max_early and asm.stats.evicted == 0
    # By bytes: big 0-RTT datagrams, a budget of a few of them.
    tight = AssemblerConfig(max_bytes_per_connection=20000, max_early_bytes=20000)
    asm = FirstFlightAssembler(tight)
    for _ in range(100):
        asm.feed(zero_rtt_packet(os.urandom(8), 1400), ADDR, 0.0)
        assert asm.early_bytes <= tight.max_early_bytes
    assert asm.early_count == 20000 // 1400 and asm.stats.evicted_early == 100 - 14
    # One key growing past the budget evicts the others, never itself.
    dcid = os.urandom(8)
    for _ in range(14):
        assert isinstance(asm.feed(zero_rtt_packet(dcid, 1400), ADDR, 0.0), NeedMore)
    assert list(asm._early) == [(dcid, ADDR)] and asm.early_bytes == 14 * 1400
    over = asm.feed(zero_rtt_packet(dcid, 1400), ADDR, 0.0)
    assert isinstance(over, Rejected) and over.reason == "connection_over_budget"
    assert not over.connection_dropped and asm.early_count == 1


def test_early_entries_expire_on_their_own_count() -> None:
    asm = FirstFlightAssembler(AssemblerConfig(ttl=5.0))
    dcid = os.urandom(8)
    asm.feed(zero_rtt_packet(os.urandom(8)), ADDR, 0.0)
    asm.feed(zero_rtt_packet(dcid), ADDR, 4.0)
    asm.feed(partial(dcid), ADDR, 8.0)  # promoted: its TTL counts from here
    assert asm.stats.expired_early == 1 and asm.early_count == 0 and asm.pending_count == 1
    assert asm.expire(12.9) == 0
    assert asm.expire(13.0) == 1 and asm.stats.expired == 1
    assert asm.pending_bytes == asm.early_bytes == 0


def test_protocol_violation_drops_early_datagrams_too() -> None:
    dcid = os.urandom(8)
    asm = FirstFlightAssembler()
    asm.feed(zero_rtt_packet(dcid), ADDR, 0.0)
    bad = initial_datagram(dcid, crypto(0, quic_hello()) + b"\x08\x00\x00")
    result = asm.feed(bad, ADDR, 0.1)
    assert isinstance(result, Rejected) and result.reason == "forbidden_frame"
    assert result.connection_dropped and asm.early_count == asm.early_bytes == 0
    # an Initial that does not decrypt leaves the early entry alone
    asm.feed(zero_rtt_packet(dcid), ADDR, 0.2)
    forged = bytearray(initial_datagram(dcid, crypto(0, quic_hello())))
    forged[-1] ^= 1
    result = asm.feed(bytes(forged), ADDR, 0.3)
    assert isinstance(result, Rejected) and result.reason == "decrypt_failed"
    assert asm.early_count == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crypto_cap": 4095},
        {"max_pending": 0},
        {"ttl": 0},
        {"max_bytes_per_connection": 1000},
        {"max_bytes_total": 1000},
        {"max_early": -1},
        {"max_early_bytes": 1000},
    ],
)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AssemblerConfig(**kwargs)  # type: ignore[arg-type]
