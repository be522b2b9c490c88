"""Long and short header parsing: v1, v2 (permuted type bits), unknown versions (RFC 8999
invariants only), Version Negotiation, coalesced packets, and hostile input."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quic.builders import build_version_negotiation
from quic.crypto import derive_initial_keys, open_packet
from quic.errors import QuicError
from quic.packet import (
    VERSION_1,
    VERSION_2,
    PacketType,
    long_header_type_bits,
    parse_long_header,
    parse_short_header,
)
from quic.varint import encode_varint
from steerd.tools.pcap import read_datagrams
from tests.quic.reference import parse_version_negotiation, split_datagram

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DCID = bytes.fromhex("0102030405060708")
SCID = bytes.fromhex("a1a2a3a4")


def long_packet(
    version: int,
    type_bits: int,
    payload: bytes,
    *,
    dcid: bytes = DCID,
    scid: bytes = SCID,
    token: bytes | None = None,
    first_low: int = 0x03,
) -> bytes:
    """A long-header packet with a 4-byte (unprotected, arbitrary) packet number + payload."""
    head = bytes((0xC0 | type_bits << 4 | first_low,)) + version.to_bytes(4, "big")
    head += bytes((len(dcid),)) + dcid + bytes((len(scid),)) + scid
    if token is not None:
        head += encode_varint(len(token)) + token
    body = b"\x00\x00\x00\x07" + payload
    return head + encode_varint(len(body)) + body


@pytest.mark.parametrize(
    ("version", "bits", "expected"),
    [
        (VERSION_1, 0b00, PacketType.INITIAL),
        (VERSION_1, 0b01, PacketType.ZERO_RTT),
        (VERSION_1, 0b10, PacketType.HANDSHAKE),
        (VERSION_2, 0b01, PacketType.INITIAL),
        (VERSION_2, 0b10, PacketType.ZERO_RTT),
        (VERSION_2, 0b11, PacketType.HANDSHAKE),
    ],
)
def test_type_bits_per_version(version: int, bits: int, expected: PacketType) -> None:
    token = b"tok" if expected is PacketType.INITIAL else None
    packet = long_packet(version, bits, b"x" * 30, token=token)
    header = parse_long_header(packet)
    assert header.packet_type is expected
    assert (header.version, header.dcid, header.scid) == (version, DCID, SCID)
    assert header.token == (b"tok" if token else b"")
    assert header.end == len(packet)
    assert packet[header.pn_offset : header.pn_offset + 4] == b"\x00\x00\x00\x07"
    assert long_header_type_bits(version, expected) == bits


@pytest.mark.parametrize(("version", "bits"), [(VERSION_1, 0b11), (VERSION_2, 0b00)])
def test_retry_type_bits(version: int, bits: int) -> None:
    tag = bytes(range(16))
    packet = bytes((0xC0 | bits << 4,)) + version.to_bytes(4, "big") + b"\x00\x04" + SCID
    header = parse_long_header(packet + b"retry-token" + tag)
    assert header.packet_type is PacketType.RETRY
    assert (header.dcid, header.scid, header.token) == (b"", SCID, b"retry-token")
    assert header.pn_offset == len(packet) + len(b"retry-token")
    with pytest.raises(QuicError) as info:
        parse_long_header(packet + tag[:15])
    assert info.value.reason == "truncated"


def test_same_type_bits_mean_different_types_in_v1_and_v2() -> None:
    """The same first byte is a different packet type in v1 and v2: no v1 assumptions."""
    v1 = parse_long_header(long_packet(VERSION_1, 0b01, b"z" * 20))
    v2 = parse_long_header(long_packet(VERSION_2, 0b01, b"z" * 20, token=b""))
    assert (v1.packet_type, v2.packet_type) == (PacketType.ZERO_RTT, PacketType.INITIAL)


def test_unknown_version_parses_only_invariants() -> None:
    dcid, scid = bytes(range(200)), bytes(255)
    packet = b"\xc5" + bytes.fromhex("1a2a3a4a") + bytes((200,)) + dcid + bytes((255,)) + scid
    packet += b"whatever the version defines"
    header = parse_long_header(packet)
    assert header.packet_type is None
    assert (header.version, header.dcid, header.scid) == (0x1A2A3A4A, dcid, scid)
    assert header.end == len(packet)
    assert split_datagram(packet) == [header]


def test_unknown_version_even_with_fixed_bit_clear() -> None:
    """RFC 8999 defines no fixed bit: only v1/v2 require it."""
    packet = b"\x80" + bytes.fromhex("0a0a0a0a") + b"\x01\xaa\x00"
    assert parse_long_header(packet).dcid == b"\xaa"


@pytest.mark.parametrize("version", [VERSION_1, VERSION_2])
def test_known_version_rejects_long_cids(version: int) -> None:
    packet = long_packet(version, 0b10, b"p" * 20, dcid=bytes(21))
    with pytest.raises(QuicError) as info:
        parse_long_header(packet)
    assert info.value.reason == "bad_cid_length"
    packet = long_packet(version, 0b10, b"p" * 20, scid=bytes(21))
    with pytest.raises(QuicError) as info:
        parse_long_header(packet)
    assert info.value.reason == "bad_cid_length"


def test_fixed_bit_clear_is_rejected_for_v1() -> None:
    packet = bytearray(long_packet(VERSION_1, 0b10, b"p" * 20))
    packet[0] &= ~0x40
    with pytest.raises(QuicError) as info:
        parse_long_header(bytes(packet))
    assert info.value.reason == "fixed_bit_clear"


def test_short_header_is_not_a_long_header() -> None:
    with pytest.raises(QuicError) as info:
        parse_long_header(b"\x40" + bytes(30))
    assert info.value.reason == "not_long_header"


def test_length_beyond_datagram_is_bad_length() -> None:
    packet = long_packet(VERSION_1, 0b10, b"p" * 20)
    with pytest.raises(QuicError) as info:
        parse_long_header(packet[:-1])
    assert info.value.reason == "bad_length"
    initial = long_packet(VERSION_1, 0b00, b"", token=b"")
    # token length 0x3f claims 63 bytes that are not there
    forged = initial.replace(SCID + b"\x00", SCID + b"\x3f", 1)
    with pytest.raises(QuicError) as info:
        parse_long_header(forged)
    assert info.value.reason == "bad_length"


def test_version_negotiation_round_trip() -> None:
    client_dcid, client_scid = bytes(range(18)), b"\x77" * 5
    vn = build_version_negotiation(client_dcid, client_scid, [VERSION_1, VERSION_2], 0x2A)
    header = parse_long_header(vn)
    assert header.packet_type is PacketType.VERSION_NEGOTIATION
    assert header.version == 0
    assert parse_version_negotiation(vn) == (client_scid, client_dcid, [VERSION_1, VERSION_2])
    with pytest.raises(QuicError):
        parse_version_negotiation(vn[:-1])
    with pytest.raises(QuicError):
        parse_version_negotiation(long_packet(VERSION_1, 0b10, b"p" * 20))


def test_coalesced_packets_and_trailing_padding() -> None:
    initial = long_packet(VERSION_1, 0b00, b"i" * 40, token=b"")
    handshake = long_packet(VERSION_1, 0b10, b"h" * 30)
    zero_rtt = long_packet(VERSION_1, 0b01, b"z" * 25)
    datagram = initial + handshake + zero_rtt + bytes(100)
    packets = split_datagram(datagram)
    assert [p.packet_type for p in packets] == [
        PacketType.INITIAL,
        PacketType.HANDSHAKE,
        PacketType.ZERO_RTT,
    ]
    assert [(p.start, p.end) for p in packets] == [
        (0, len(initial)),
        (len(initial), len(initial) + len(handshake)),
        (len(initial) + len(handshake), len(datagram) - 100),
    ]


def test_coalesced_then_short_header_stops() -> None:
    initial = long_packet(VERSION_2, 0b01, b"i" * 40, token=b"")
    datagram = initial + b"\x41" + DCID + bytes(30)
    assert [p.end for p in split_datagram(datagram)] == [len(initial)]
    assert split_datagram(b"\x41" + DCID + bytes(30)) == []
    assert split_datagram(b"") == []


def test_short_header() -> None:
    packet = b"\x43" + DCID + bytes(25)
    header = parse_short_header(packet, len(DCID))
    assert (header.dcid, header.pn_offset, header.end) == (DCID, 9, len(packet))
    with pytest.raises(QuicError):
        parse_short_header(packet[:8], len(DCID))
    with pytest.raises(QuicError):
        parse_short_header(b"\xc3" + bytes(30), 8)


def test_every_truncation_raises_only_quic_error() -> None:
    datagram = long_packet(VERSION_1, 0b00, b"i" * 40, token=b"t") + long_packet(
        VERSION_1, 0b10, b"h" * 30
    )
    for cut in range(len(datagram)):
        try:
            split_datagram(datagram[:cut])
        except QuicError as exc:
            assert exc.reason in ("truncated", "bad_length")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_quic_error(raw: bytes) -> None:
    try:
        packets = split_datagram(raw)
    except QuicError:
        return
    for p in packets:
        assert 0 <= p.start < p.pn_offset <= p.end <= len(raw)


@given(st.binary(min_size=1, max_size=60), st.sampled_from([VERSION_1, VERSION_2, 0x1A2A3A4A]))
def test_hostile_bytes_after_a_valid_version(tail: bytes, version: int) -> None:
    raw = bytes((0xC0 | (tail[0] & 0x3F),)) + version.to_bytes(4, "big") + tail[1:]
    try:
        split_datagram(raw)
    except QuicError:
        pass


def _fixture_initials(name: str) -> list[tuple[bytes, int]]:
    """(datagram, number of Initial packets opened) for every datagram of a fixture."""
    opened = []
    for d in read_datagrams(FIXTURES / name):
        count = 0
        for header in split_datagram(d.payload):
            if header.packet_type is PacketType.INITIAL:
                keys = derive_initial_keys(header.dcid, header.version, server=False)
                _pn, payload = open_packet(d.payload, header, keys)
                assert payload
                count += 1
        opened.append((d.payload, count))
    return opened


@pytest.mark.parametrize(
    "name",
    [
        "chromium-h3.pcapng",
        "qh3-h3.pcapng",
        "aioquic-v1-smb.pcapng",
        "aioquic-v1-doq-h3.pcapng",
        "aioquic-v2-h3-smb.pcapng",
        "aioquic-v1-pq-retrans.pcapng",
        "ngtcp2-h3.pcapng",
    ],
)
def test_real_client_initials_parse_and_open(name: str) -> None:
    """Every datagram of every real first flight holds at least one Initial that opens."""
    opened = _fixture_initials(name)
    assert opened
    assert all(count >= 1 for _, count in opened)


def test_real_unknown_version_initial_yields_cids() -> None:
    (d,) = list(read_datagrams(FIXTURES / "ngtcp2-version-1a2a3a4a.pcapng"))
    header = parse_long_header(d.payload)
    assert (header.version, header.packet_type) == (0x1A2A3A4A, None)
    assert len(header.dcid) == 18
