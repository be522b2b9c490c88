"""The QUIC-LB plaintext CID codec: layout validation, round trips, and foreign CIDs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quic.cid import CR_UNROUTABLE, CidLayout
from quic.errors import QuicError


def test_default_layout() -> None:
    layout = CidLayout()
    assert layout.cid_len == 9
    cid = layout.encode(0x1234, b"abcdef")
    assert cid == bytes((0x08,)) + b"\x12\x34" + b"abcdef"  # config 0, length bits 9 - 1
    assert layout.decode(cid) == 0x1234


def test_first_octet_carries_config_rotation_and_length() -> None:
    layout = CidLayout(config_id=5, host_id=0xBEEF, host_id_len=2, slot_len=1, nonce_len=8)
    cid = layout.encode(7, bytes(8))
    assert len(cid) == layout.cid_len == 12
    assert cid[0] >> 5 == 5
    assert cid[0] & 0x1F == 11
    assert cid[1:3] == b"\xbe\xef"
    assert cid[layout.slot_offset] == 7
    assert layout.decode(cid) == 7


layouts = st.builds(
    lambda config_id, host_id_len, slot_len, nonce_len, host_frac: CidLayout(
        config_id=config_id,
        host_id=int(host_frac * ((1 << (8 * host_id_len)) - 1)),
        host_id_len=host_id_len,
        slot_len=slot_len,
        nonce_len=nonce_len,
    ),
    st.integers(0, 6),
    st.integers(0, 3),
    st.integers(1, 4),
    st.integers(4, 12),
    st.floats(0, 1),
)


@given(layouts, st.data())
def test_round_trip(layout: CidLayout, data: st.DataObject) -> None:
    slot = data.draw(st.integers(0, layout.max_slot))
    nonce = data.draw(st.binary(min_size=layout.nonce_len, max_size=layout.nonce_len))
    cid = layout.encode(slot, nonce)
    assert len(cid) == layout.cid_len
    assert layout.decode(cid) == slot
    assert cid.endswith(nonce)


@given(layouts, st.binary(max_size=21))
def test_arbitrary_cids_decode_or_return_none(layout: CidLayout, cid: bytes) -> None:
    slot = layout.decode(cid)
    assert slot is None or (len(cid) == layout.cid_len and 0 <= slot <= layout.max_slot)


def test_foreign_cids_are_none() -> None:
    layout = CidLayout(config_id=1, host_id=0x42, host_id_len=1, slot_len=2, nonce_len=5)
    cid = layout.encode(3, b"nonce")
    assert layout.decode(cid) == 3
    assert layout.decode(cid[:-1]) is None  # wrong length
    assert layout.decode(cid + b"x") is None
    other_config = bytes((cid[0] ^ 0x20,)) + cid[1:]
    assert layout.decode(other_config) is None  # config rotation bits
    unroutable = bytes(((CR_UNROUTABLE << 5) | (cid[0] & 0x1F),)) + cid[1:]
    assert layout.decode(unroutable) is None
    other_length_bits = bytes((cid[0] ^ 0x01,)) + cid[1:]
    assert layout.decode(other_length_bits) is None  # length self-description
    other_host = cid[:1] + b"\x43" + cid[2:]
    assert layout.decode(other_host) is None  # host ID
    assert layout.decode(b"") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"config_id": 7},
        {"config_id": -1},
        {"slot_len": 0},
        {"slot_len": 5},
        {"nonce_len": 3},
        {"host_id_len": -1},
        {"host_id_len": 10, "slot_len": 4, "nonce_len": 6},  # 21 bytes
        {"host_id": 256, "host_id_len": 1},
        {"host_id": 1, "host_id_len": 0},
        {"host_id": -1, "host_id_len": 1},
    ],
)
def test_invalid_layouts(kwargs: dict[str, int]) -> None:
    with pytest.raises(QuicError) as info:
        CidLayout(**kwargs)
    assert info.value.reason == "bad_cid_layout"


def test_longest_layout_is_20_bytes() -> None:
    layout = CidLayout(host_id_len=9, slot_len=4, nonce_len=6)
    assert layout.cid_len == 20
    assert layout.decode(layout.encode(layout.max_slot, bytes(6))) == 0xFFFF_FFFF


def test_encode_rejects_bad_slot_and_nonce() -> None:
    layout = CidLayout(slot_len=1)
    with pytest.raises(QuicError) as info:
        layout.encode(256, bytes(6))
    assert info.value.reason == "bad_slot"
    with pytest.raises(QuicError) as info:
        layout.encode(-1, bytes(6))
    assert info.value.reason == "bad_slot"
    with pytest.raises(QuicError) as info:
        layout.encode(1, bytes(5))
    assert info.value.reason == "bad_nonce"


def test_defines_match_layout() -> None:
    layout = CidLayout(config_id=2, host_id=9, host_id_len=1, slot_len=2, nonce_len=6)
    defines = layout.defines()
    cid = layout.encode(0x0102, bytes(6))
    assert defines["STEERD_CID_LEN"] == len(cid)
    assert defines["STEERD_CID_FIRST_OCTET"] == cid[0]
    offset = defines["STEERD_CID_SLOT_OFFSET"]
    assert cid[offset : offset + defines["STEERD_CID_SLOT_LEN"]] == b"\x01\x02"
