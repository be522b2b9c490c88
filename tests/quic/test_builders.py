"""Version Negotiation, Initial CONNECTION_CLOSE and Retry builders, read back with the
parsers and the server's Initial keys (the RFC vectors for Retry are in
test_crypto_vectors.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quic.builders import (
    NO_APPLICATION_PROTOCOL,
    build_initial_close,
    build_retry,
    build_version_negotiation,
)
from quic.crypto import derive_initial_keys, open_packet
from quic.errors import QuicError
from quic.packet import (
    VERSION_1,
    VERSION_2,
    PacketType,
    parse_long_header,
)
from quic.varint import decode_varint
from tests.quic.reference import parse_version_negotiation, verify_retry_integrity

CLIENT_DCID = bytes.fromhex("c0ffee0011223344")
CLIENT_SCID = bytes.fromhex("5c1d5c1d")
SERVER_SCID = bytes.fromhex("0a0b0c0d0e0f1011")
VERSIONS = pytest.mark.parametrize("version", [VERSION_1, VERSION_2], ids=["v1", "v2"])


@given(
    st.binary(max_size=255),
    st.binary(max_size=255),
    st.lists(st.integers(min_value=1, max_value=0xFFFF_FFFF), min_size=1, max_size=10),
    st.integers(min_value=0, max_value=0xFF),
)
def test_version_negotiation_parses_back(
    dcid: bytes, scid: bytes, versions: list[int], unused: int
) -> None:
    vn = build_version_negotiation(dcid, scid, versions, unused)
    assert vn[0] & 0xC0 == 0xC0  # long header, and 0x40 set so it looks like QUIC
    assert vn[0] & 0x3F == unused & 0x3F  # the caller's random bits are used
    # the VN swaps the client's CIDs
    assert parse_version_negotiation(vn) == (scid, dcid, versions)


def test_version_negotiation_rejects_bad_input() -> None:
    with pytest.raises(QuicError):
        build_version_negotiation(CLIENT_DCID, CLIENT_SCID, [], 0)
    with pytest.raises(QuicError):
        build_version_negotiation(CLIENT_DCID, CLIENT_SCID, [0], 0)
    with pytest.raises(QuicError):
        build_version_negotiation(bytes(256), CLIENT_SCID, [VERSION_1], 0)


def _read_close(payload: bytes) -> tuple[int, int, bytes, bytes]:
    """(error code, frame type, reason, what follows) of a CONNECTION_CLOSE 0x1c payload."""
    assert payload[0] == 0x1C
    code, p = decode_varint(payload, 1)
    frame_type, p = decode_varint(payload, p)
    length, p = decode_varint(payload, p)
    return code, frame_type, payload[p : p + length], payload[p + length :]


@VERSIONS
@pytest.mark.parametrize("packet_number", [0, 1, 300, 70000])
def test_initial_close_opens_with_server_keys(version: int, packet_number: int) -> None:
    packet = build_initial_close(
        version, CLIENT_DCID, CLIENT_SCID, SERVER_SCID, packet_number=packet_number
    )
    header = parse_long_header(packet)
    assert header.packet_type is PacketType.INITIAL
    assert (header.version, header.dcid, header.scid, header.token) == (
        version,
        CLIENT_SCID,
        SERVER_SCID,
        b"",
    )
    assert header.end == len(packet)
    pn, payload = open_packet(
        packet, header, derive_initial_keys(CLIENT_DCID, version, server=True)
    )
    assert pn == packet_number
    code, frame_type, reason, rest = _read_close(payload)
    assert (code, frame_type, reason) == (NO_APPLICATION_PROTOCOL, 0, b"")
    assert NO_APPLICATION_PROTOCOL == 0x178
    assert rest.strip(b"\x00") == b""  # only PADDING may follow
    # The client keys (what an on-path copy of the client would use) do not open it.
    with pytest.raises(QuicError):
        open_packet(packet, header, derive_initial_keys(CLIENT_DCID, version, server=False))


def test_initial_close_custom_error_and_reason() -> None:
    packet = build_initial_close(
        VERSION_1, CLIENT_DCID, b"", SERVER_SCID, error_code=0x0A, reason=b"no app"
    )
    header = parse_long_header(packet)
    _, payload = open_packet(packet, header, derive_initial_keys(CLIENT_DCID, 1, server=True))
    assert _read_close(payload)[:3] == (0x0A, 0, b"no app")


def test_initial_close_unknown_version_is_refused() -> None:
    with pytest.raises(QuicError) as info:
        build_initial_close(0x1A2A3A4A, CLIENT_DCID, CLIENT_SCID, SERVER_SCID)
    assert info.value.reason == "unsupported_version"


@VERSIONS
def test_retry_round_trip(version: int) -> None:
    retry = build_retry(version, CLIENT_SCID, SERVER_SCID, CLIENT_DCID, b"opaque", unused_bits=5)
    header = parse_long_header(retry)
    assert header.packet_type is PacketType.RETRY
    assert (header.dcid, header.scid, header.token) == (CLIENT_SCID, SERVER_SCID, b"opaque")
    assert retry[0] & 0x0F == 5
    assert verify_retry_integrity(retry, CLIENT_DCID)
    assert not verify_retry_integrity(retry, SERVER_SCID)
    other = VERSION_2 if version == VERSION_1 else VERSION_1
    relabelled = retry[:1] + other.to_bytes(4, "big") + retry[5:]
    assert not verify_retry_integrity(relabelled, CLIENT_DCID)


def test_retry_rejects_bad_input() -> None:
    with pytest.raises(QuicError):
        build_retry(VERSION_1, CLIENT_SCID, SERVER_SCID, CLIENT_DCID, b"")
    with pytest.raises(QuicError):
        build_retry(VERSION_1, bytes(21), SERVER_SCID, CLIENT_DCID, b"t")
    with pytest.raises(QuicError):
        build_retry(0x1A2A3A4A, CLIENT_SCID, SERVER_SCID, CLIENT_DCID, b"t")


@given(st.binary(max_size=80))
def test_verify_retry_integrity_never_raises(raw: bytes) -> None:
    assert verify_retry_integrity(raw, CLIENT_DCID) in (True, False)
