"""quic/ghash.py: the Retry Integrity Tag by GHASH alone, and the kernel's tables, checked
against AES-128-GCM (``cryptography``), the RFC vectors and quic.builders' AESGCM Retry.

Why these oracles: the kernel (bpf/ghash.h) reads exactly these tables, so a wrong
entry means Retries every client drops. The constants H and E_K(J0) are recomputed here with
AES itself from the published key and nonce; every table entry is recomputed with the slow
bit-by-bit multiplication; and the tag is compared with AESGCM at every length the kernel
accepts.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from quic.builders import build_retry
from quic.errors import QuicError
from quic.ghash import (
    TABLE_VALUE_SIZE,
    VERSION_INDEX,
    gf_mul,
    ghash_table_value,
    retry_ghash_tables,
    retry_tag_ghash,
)
from quic.packet import VERSION_1, VERSION_2
from steerd.daemon.dataplane.header import BPF_DIR, header_constants
from tests.quic.reference import RETRY_INTEGRITY
from tests.quic.test_crypto_vectors import V1_RETRY, V2_RETRY

VERSIONS = (VERSION_1, VERSION_2)
RFC_ODCID = bytes.fromhex("8394c8f03e515708")  # RFC 9001 A.4, RFC 9369 A.4
ONE = 1 << 127  # the GCM field's 1: the first bit of the block


def aes_block(version: int, block: bytes) -> bytes:
    key = bytes.fromhex(RETRY_INTEGRITY[version][0])
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def aesgcm_tag(pseudo: bytes, version: int) -> bytes:
    key, nonce = (bytes.fromhex(x) for x in RETRY_INTEGRITY[version])
    return AESGCM(key).encrypt(nonce, b"", pseudo)


@pytest.mark.parametrize("version", VERSIONS)
def test_constants_are_aes_of_the_published_key(version: int) -> None:
    """The value's tail is E_K(J0), J0 = nonce || 00000001 (GCM with a 96-bit nonce), and its
    entry T[0][0x80] (the field's 1, times H) is H = E_K(0^128): both recomputed with AES."""
    value = ghash_table_value(version)
    nonce = bytes.fromhex(RETRY_INTEGRITY[version][1])
    assert value[-16:] == aes_block(version, nonce + b"\0\0\0\1")
    h = aes_block(version, bytes(16))
    assert value[0x80 * 16 : 0x81 * 16] == h  # T[0][0x80]: the block "1"


def test_gf_mul_is_the_gcm_field() -> None:
    """The reference multiplication: 1 is neutral, the product commutes and distributes, and
    NIST's GCM test case 2 (K = 0, P = 0^128) gives its published tag."""
    rng = random.Random(1)
    for _ in range(50):
        a, b, c = (rng.getrandbits(128) for _ in range(3))
        assert gf_mul(a, ONE) == a == gf_mul(ONE, a)
        assert gf_mul(a, b) == gf_mul(b, a)
        assert gf_mul(a, b ^ c) == gf_mul(a, b) ^ gf_mul(a, c)
    h = 0x66E94BD4EF8A2C3B884CFA59CA342B2E
    ciphertext = 0x0388DACE60B6A392F328C2B971B2FE78
    ghash = gf_mul(gf_mul(ciphertext, h) ^ 128, h)  # C, then len(A) = 0 || len(C) = 128
    assert ghash ^ 0x58E2FCCEFA7E3061367F1D57A4E7455A == 0xAB6E47D42CEC13BDF53A67B21257BDDF


@pytest.mark.parametrize("version", VERSIONS)
def test_every_table_entry_is_the_product(version: int) -> None:
    """T[i][b] = (the block with byte i = b) * H, bit by bit, for all 4096 entries."""
    value = ghash_table_value(version)
    h = int.from_bytes(aes_block(version, bytes(16)), "big")
    for i in range(16):
        for b in range(256):
            entry = value[(i * 256 + b) * 16 : (i * 256 + b + 1) * 16]
            assert entry == gf_mul(b << (8 * (15 - i)), h).to_bytes(16, "big"), (i, b)


def test_map_value_layout_matches_the_header() -> None:
    """retry_ghash_tables() gives one value per version index, sized and keyed as ghash.h's
    struct steerd_ghash_tables and steerd.h say."""
    ghash_h = (BPF_DIR / "ghash.h").read_text()
    size = int(re.search(r"#define STEERD_GHASH_VALUE_SIZE (\d+)", ghash_h).group(1))
    versions = int(re.search(r"#define STEERD_GHASH_VERSIONS (\d+)", ghash_h).group(1))
    assert "__u64 t[16][256][2];" in ghash_h and "__u8 ekj0[16];" in ghash_h
    assert size == TABLE_VALUE_SIZE == 16 * 256 * 16 + 16
    tables = retry_ghash_tables()
    assert sorted(tables) == list(range(versions)) == sorted(VERSION_INDEX.values())
    assert VERSION_INDEX == {VERSION_1: 0, VERSION_2: 1}
    for version, index in VERSION_INDEX.items():
        assert tables[index] == ghash_table_value(version)
        assert len(tables[index]) == size
    assert tables[0] != tables[1]
    pseudo_max = int(re.search(r"#define STEERD_RETRY_PSEUDO_MAX (\d+)", ghash_h).group(1))
    assert pseudo_max == header_constants()["STEERD_RETRY_PSEUDO_MAX"] == 192


@pytest.mark.parametrize(("version", "retry"), [(VERSION_1, V1_RETRY), (VERSION_2, V2_RETRY)])
def test_rfc_retry_vectors(version: int, retry: bytes) -> None:
    pseudo = bytes((len(RFC_ODCID),)) + RFC_ODCID + retry[:-16]
    assert retry_tag_ghash(pseudo, version) == retry[-16:]


@pytest.mark.parametrize("version", VERSIONS)
def test_random_pseudo_packets_equal_aesgcm(version: int) -> None:
    """Every length 0..192 (the kernel's bound), three random pseudo-packets each."""
    rng = random.Random(version)
    for length in range(193):
        for _ in range(3):
            pseudo = rng.randbytes(length)
            assert retry_tag_ghash(pseudo, version) == aesgcm_tag(pseudo, version), length


@pytest.mark.parametrize("version", VERSIONS)
def test_equals_the_builders_retry(version: int) -> None:
    """quic.builders.build_retry (AESGCM) and the GHASH tag agree on real Retry packets."""
    rng = random.Random(5)
    for _ in range(100):
        odcid = rng.randbytes(rng.randint(0, 20))
        retry = build_retry(version, rng.randbytes(rng.randint(0, 20)),
                            rng.randbytes(rng.randint(0, 20)), odcid,
                            rng.randbytes(rng.randint(1, 60)), unused_bits=rng.getrandbits(4))
        pseudo = bytes((len(odcid),)) + odcid + retry[:-16]
        assert retry_tag_ghash(pseudo, version) == retry[-16:]


def test_unknown_version_is_refused() -> None:
    for call in (lambda: retry_tag_ghash(b"", 0x1A2A3A4A), lambda: ghash_table_value(0)):
        with pytest.raises(QuicError) as e:
            call()
        assert e.value.reason == "unsupported_version"


def test_no_io() -> None:
    """quic/ is pure: the module imports nothing that reads files or the network."""
    source = Path(__file__).parents[2].joinpath("quic", "ghash.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(os|socket|subprocess|pathlib)\b", source, re.M)
