"""bpf/steerd.h and quic/ must agree on every shared number; the C must compile as the
header describes it. These run without root."""

from __future__ import annotations

import quic.cid as cid
import quic.packet as packet
from steerd.daemon.dataplane import DataplaneConfig
from steerd.daemon.dataplane.counters import counter_names
from steerd.daemon.dataplane.header import HEADER, header_constants


def test_cid_constants_match_quic_cid() -> None:
    h = header_constants()
    assert h["STEERD_CONFIG_ROTATION_SHIFT"] == cid.CONFIG_ROTATION_SHIFT
    assert h["STEERD_LENGTH_MASK"] == cid.LENGTH_MASK
    assert h["STEERD_CR_UNROUTABLE"] == cid.CR_UNROUTABLE
    assert h["STEERD_MIN_NONCE_LEN"] == cid.MIN_NONCE_LEN
    assert h["STEERD_MAX_CID_LEN"] == cid.MAX_CID_LEN == packet.MAX_CID_LEN
    assert h["STEERD_MAX_SLOT_LEN"] == cid.MAX_SLOT_LEN


def test_quic_version_constants_match_quic_packet() -> None:
    h = header_constants()
    assert h["STEERD_QUIC_V1"] == packet.VERSION_1
    assert h["STEERD_QUIC_V2"] == packet.VERSION_2
    assert h["STEERD_LONG_HEADER_BIT"] == packet.LONG_HEADER_BIT


def test_counters_are_unique_and_in_range() -> None:
    h = header_constants()
    names = counter_names()
    values = [v for k, v in h.items() if k.startswith("STEERD_CNT_") and k != "STEERD_CNT_MAX"]
    assert len(values) == len(set(values)) == len(names)
    assert all(0 <= v < h["STEERD_CNT_MAX"] for v in values)
    assert names[h["STEERD_CNT_XDP_DROP_SMALL_INITIAL"]] == "xdp_drop_small_initial"


def test_learned_mode_constants_match_python() -> None:
    """steerd/daemon/dataplane/learn.py and the registry name the header's learned-mode numbers
    without reading it at import (apps import them): they must be the header's."""
    from steerd.app.protocol import LEARNED_CID_LEN
    from steerd.daemon.dataplane.learn import MODE_LAYOUT, MODE_LEARNED
    from steerd.daemon.registry import MAX_LEARNED_LENGTHS

    h = header_constants()
    assert (MODE_LAYOUT, MODE_LEARNED) == (h["STEERD_MODE_LAYOUT"], h["STEERD_MODE_LEARNED"])
    assert MAX_LEARNED_LENGTHS == h["STEERD_MAX_LEARN_LENGTHS"]
    assert LEARNED_CID_LEN[1] == h["STEERD_MAX_CID_LEN"]


def test_config_bounds_are_the_headers() -> None:
    from steerd.daemon.config import MAX_WORKER_SLOTS

    assert MAX_WORKER_SLOTS == header_constants()["STEERD_MAX_WORKER_SLOTS"]


def test_cid_layout_defines_are_what_the_programs_use() -> None:
    """Every STEERD_CID_* macro the C uses comes from CidLayout.defines(), and vice versa."""
    import re

    used = set()
    for source in ("steer.c", "guard.c", "learn.c"):
        used |= set(re.findall(r"\bSTEERD_CID_\w+", (HEADER.parent / source).read_text()))
    given = set(cid.CidLayout().defines())
    assert used <= given, f"C uses CID macros nobody passes: {used - given}"
    flags = DataplaneConfig().effective_worker_slots()
    assert flags == 65536  # slot_len 2: every slot a CID can name


def test_route_key_layout() -> None:
    h = header_constants()
    assert h["STEERD_ROUTE_KEY_SIZE"] == 1 + h["STEERD_MAX_CID_LEN"] + 3
    assert h["STEERD_ROUTE_VALUE_SIZE"] == 16
