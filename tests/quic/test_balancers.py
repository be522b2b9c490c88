"""CIDs that load balancers read: the QUIC-LB plaintext test vector, Katran's host-ID formats,
the [cid] balancer profiles (exact refusals) and ``steerd cid decode``.

Oracles are external: the QUIC-LB draft's published vector, and Katran's formats as its
documentation states them (top two bits of the first octet choose the host ID's place),
computed here by bit arithmetic written independently of quic/cid.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quic.cid import CidLayout, katran_host_id
from quic.errors import QuicError
from steerd.daemon.config import ConfigError, parse_config

# draft-ietf-quic-load-balancers-21, plaintext CID: config 0, server ID c4605e, nonce 4504cc4f
QLB_SERVER_ID = bytes.fromhex("c4605e")
QLB_NONCE = bytes.fromhex("4504cc4f")
QLB_CID = bytes.fromhex("07c4605e4504cc4f")


@pytest.mark.parametrize("host_id_len", [0, 1, 2])
def test_quic_lb_plaintext_vector(host_id_len: int) -> None:
    """steerd's server ID is host ID || slot: every split of c4605e that leaves the slot at
    least one byte reproduces the vector, and decodes back to the same fields."""
    slot_len = len(QLB_SERVER_ID) - host_id_len
    host = int.from_bytes(QLB_SERVER_ID[:host_id_len], "big")
    slot = int.from_bytes(QLB_SERVER_ID[host_id_len:], "big")
    layout = CidLayout(config_id=0, host_id=host, host_id_len=host_id_len, slot_len=slot_len,
                       nonce_len=len(QLB_NONCE), balancer="quic-lb")
    assert layout.encode(slot, QLB_NONCE) == QLB_CID
    assert layout.decode(QLB_CID) == slot
    f = layout.split(QLB_CID)
    assert (f.config_rotation, f.length_bits, f.slot, f.nonce) == (0, 7, slot, QLB_NONCE)
    assert f.host_id == (host if host_id_len else None)
    assert f.owned
    assert layout.balancer_reading(QLB_CID) == "quic-lb: server ID c4605e"


def test_quic_lb_unroutable_and_other_config_are_hashed() -> None:
    layout = CidLayout(host_id=0xC4, host_id_len=1, slot_len=2, nonce_len=4, balancer="quic-lb")
    unroutable = bytes((0xE0 | 7,)) + QLB_CID[1:]
    assert layout.balancer_reading(unroutable) == "quic-lb: unroutable (4-tuple hash)"
    other = bytes((0x20 | 7,)) + QLB_CID[1:]
    assert layout.balancer_reading(other).endswith("(4-tuple hash)")
    assert layout.decode(other) is None


def _katran_reference(cid: bytes) -> tuple[int, int] | None:
    """Katran's reading, from its documented formats: 01 = 16 bits at bits 2-17, 10 = bytes
    1-3, 11 = bytes 1-4; 00 or a DCID under 8 bytes = no host ID."""
    if len(cid) < 8:
        return None
    bits = cid[0] >> 6
    if bits == 0b01:
        return bits, ((cid[0] & 0x3F) << 10) | (cid[1] << 2) | (cid[2] >> 6)
    if bits == 0b10:
        return bits, int.from_bytes(cid[1:4], "big")
    if bits == 0b11:
        return bits, int.from_bytes(cid[1:5], "big")
    return None


@pytest.mark.parametrize(
    ("balancer", "config_id", "host_id_len", "bits"),
    [("katran-v2", 4, 3, 0b10), ("katran-v2", 5, 3, 0b10), ("katran-v3", 6, 4, 0b11)],
)
def test_katran_reads_steerd_host_id(
    balancer: str, config_id: int, host_id_len: int, bits: int
) -> None:
    host = int.from_bytes(bytes(range(0xA1, 0xA1 + host_id_len)), "big")
    layout = CidLayout(config_id=config_id, host_id=host, host_id_len=host_id_len, slot_len=2,
                       nonce_len=4, balancer=balancer)
    cid = layout.encode(0x0102, b"\xff\xfe\xfd\xfc")
    assert len(cid) >= 8
    assert cid[0] >> 6 == bits
    assert katran_host_id(cid) == _katran_reference(cid) == (bits, host)
    assert layout.balancer_reading(cid) == f"{balancer}: format {bits:02b}, host ID {host}"
    assert layout.decode(cid) == 0x0102  # the slot after the host ID is steerd's alone


@given(st.binary(max_size=20))
def test_katran_reading_matches_reference(cid: bytes) -> None:
    assert katran_host_id(cid) == _katran_reference(cid)


def test_katran_v1_and_short_cids() -> None:
    v1 = bytes((0b01_101010, 0b11001100, 0b11_000000)) + bytes(5)
    assert katran_host_id(v1) == (0b01, 0b101010_11001100_11)
    assert katran_host_id(bytes((0x80,)) + bytes(6)) is None  # 7 bytes: Katran hashes it
    assert katran_host_id(bytes(8)) is None  # top bits 00: no CID routing


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"balancer": "katran-v2", "config_id": 4, "host_id_len": 2},
         'host_id_len: balancer "katran-v2" reads a 24-bit host ID in bytes 1-3, so '
         "host_id_len must be 3, got 2"),
        ({"balancer": "katran-v2", "config_id": 6, "host_id_len": 3},
         "config_id: balancer \"katran-v2\" needs the first octet's top bits 10, so config_id "
         "must be 4 or 5, got 6"),
        ({"balancer": "katran-v3", "config_id": 4, "host_id_len": 4},
         "config_id: balancer \"katran-v3\" needs the first octet's top bits 11, so config_id "
         "must be 6, got 4"),
        ({"balancer": "katran-v3", "config_id": 6, "host_id_len": 3},
         'host_id_len: balancer "katran-v3" reads a 32-bit host ID in bytes 1-4, so '
         "host_id_len must be 4, got 3"),
        ({"balancer": "f5"},
         'balancer: must be one of "none", "quic-lb", "katran-v2", "katran-v3", got "f5"'),
    ],
)
def test_layout_refuses_what_the_balancer_cannot_read(kwargs: dict, detail: str) -> None:
    with pytest.raises(QuicError) as e:
        CidLayout(**kwargs)
    assert e.value.detail == detail


def test_balancer_is_not_part_of_the_cid() -> None:
    """Apps get the layout without the profile; their layout must still equal the daemon's."""
    a = CidLayout(config_id=4, host_id=1, host_id_len=3, balancer="katran-v2")
    assert a == CidLayout(config_id=4, host_id=1, host_id_len=3)
    assert a.encode(1, bytes(6)) == CidLayout(config_id=4, host_id=1, host_id_len=3).encode(
        1, bytes(6))


def _config_error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(text), "steerd.toml")
    return str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[cid]\nbalancer = "katran-v2"',
         'steerd.toml: [cid] host_id_len: balancer "katran-v2" reads a 24-bit host ID in bytes '
         "1-3, so host_id_len must be 3, got 0"),
        ('[cid]\nbalancer = "katran-v2"\nhost_id_len = 3',
         "steerd.toml: [cid] config_id: balancer \"katran-v2\" needs the first octet's top bits "
         "10, so config_id must be 4 or 5, got 0"),
        ('[cid]\nbalancer = "katran-v3"\nhost_id_len = 4\nconfig_id = 5',
         "steerd.toml: [cid] config_id: balancer \"katran-v3\" needs the first octet's top bits "
         "11, so config_id must be 6, got 5"),
        ('[cid]\nbalancer = "katran"',
         'steerd.toml: [cid] balancer: must be one of "none", "quic-lb", "katran-v2", '
         '"katran-v3", got "katran"'),
        ('[cid]\nbalancer = "quic-lb"\nconfig_id = 7',
         "steerd.toml: [cid] config_id: must be an integer 0..6, got 7"),
        ('[cid]\nbalancer = "quic-lb"\nhost_id_len = 4\nslot_len = 4\nnonce_len = 12',
         "steerd.toml: [cid]: 1 + host_id_len + slot_len + nonce_len must be at most 20, got 21"),
    ],
)
def test_config_refuses_unreadable_layouts(text: str, message: str) -> None:
    assert _config_error(text) == message


def test_config_accepts_each_profile() -> None:
    for text, balancer in [
        ("", "none"),
        ('[cid]\nbalancer = "quic-lb"\nhost_id_len = 1\nhost_id = 7', "quic-lb"),
        ('[cid]\nbalancer = "katran-v2"\nhost_id_len = 3\nconfig_id = 5', "katran-v2"),
        ('[cid]\nbalancer = "katran-v3"\nhost_id_len = 4\nconfig_id = 6', "katran-v3"),
    ]:
        assert parse_config(tomllib.loads(text), "x").cid.balancer == balancer


# ---- steerd cid decode, run as an operator runs it -----------------------------------------


def cid_decode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "steerd.cli", "cid", "decode", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "steerd.toml"
    path.write_text(text)
    return str(path)


def test_cid_decode_quic_lb_vector(tmp_path: Path) -> None:
    config = _write(tmp_path, '[cid]\nbalancer = "quic-lb"\nhost_id_len = 1\nhost_id = 196\n'
                              "slot_len = 2\nnonce_len = 4\n")
    proc = cid_decode("07c4605e4504cc4f", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "cid: 07c4605e4504cc4f (8 bytes)",
        "config rotation: 0",
        "length bits: 7 (matches the length)",
        "host ID: 196 (0xc4)",
        "slot: 24670 (0x605e)",
        "nonce: 4504cc4f",
        "balancer: quic-lb: server ID c4605e",
        "this host: yes",
    ]


def test_cid_decode_another_hosts_katran_cid(tmp_path: Path) -> None:
    config = _write(tmp_path, '[cid]\nbalancer = "katran-v2"\nconfig_id = 4\nhost_id_len = 3\n'
                              "host_id = 1\nslot_len = 2\nnonce_len = 6\n")
    other = CidLayout(config_id=4, host_id=2, host_id_len=3, nonce_len=6).encode(9, bytes(6))
    proc = cid_decode("0x" + other.hex(), "-c", config, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "cid": other.hex(), "length": 12, "config_rotation": 4, "length_bits": 11,
        "length_bits_match": True, "host_id": 2, "slot": 9, "nonce": "000000000000",
        "balancer": "katran-v2: format 10, host ID 2", "owned": False,
        "verdict": "no: host ID 2, this host is 1",
    }


@pytest.mark.parametrize("text", ["zz", "07c", "", "00" * 21])
def test_cid_decode_refuses_malformed_hex(text: str) -> None:
    proc = cid_decode(text, "-c", "/dev/null")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        f"steerd cid decode: not a connection ID: {json.dumps(text)} (want 1..20 bytes as hex "
        "digits, e.g. 07c4605e4504cc4f)\n"
    )


def test_cid_decode_names_a_bad_config(tmp_path: Path) -> None:
    config = _write(tmp_path, '[cid]\nbalancer = "katran-v3"\n')
    proc = cid_decode("07c4605e4504cc4f", "-c", config)
    assert proc.returncode == 1
    assert proc.stderr == (
        f'steerd cid decode: {config}: [cid] host_id_len: balancer "katran-v3" reads a 32-bit '
        "host ID in bytes 1-4, so host_id_len must be 4, got 0\n"
    )
