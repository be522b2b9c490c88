"""Stateless Retry tokens (RFC 9000 §8.1.2-8.1.4) the daemon issues and validates, and the
worker SDK reads back.

Why stateless: under a flood of spoofed Initials the daemon must not remember anything per
Initial (that is the memory the attacker wants). A Retry carries a token that says everything
needed later, authenticated so nobody else can mint one: the client's IP address (a spoofer
never receives the Retry, so it cannot echo a token bound to an address it does not own), the
original DCID (the worker must echo it in ``original_destination_connection_id``, RFC 9000
§7.3), the Retry's SCID (which becomes the retried Initial's DCID, so it is checked rather than
carried), and the issue time (tokens expire). The port is not bound: a NAT may rebind between
the Retry and the retried Initial (§8.1.4 recommends the address).

Layout (opaque to clients, who only echo it)::

    magic 0x5e (1) | issued_ms, u64 big-endian (8) | len(odcid) (1) | odcid (<= 20) | MAC (8)

MAC: SipHash-2-4 (64-bit output, written as its 8 little-endian bytes) under a 128-bit key,
over one canonical input that the kernel builds byte for byte the same way (the XDP/TC guard
mints and checks these tokens too: bpf/siphash.h, STEERD_TOKEN_* in bpf/steerd.h)::

    issued_ms u64 BE | odcid_len u8 | odcid | addr_len u8 (4 or 16) | client address |
    scid_len u8 | Retry SCID

that is the token's bytes after the magic, then the binding: at most 67 bytes. Why SipHash
and not HMAC-SHA256: it is a keyed PRF cheap enough for a BPF program (a few hundred
instructions, no SHA-256 in BPF), and 64 bits of MAC are plenty for a token that lives
seconds and whose forgery only buys a spoofer one classifier pass per guess. Python computes
it with the ``siphash24`` package (a maintained C extension; the reference vectors and the
kernel's copy are checked against it in the tests). ``issued_ms`` counts CLOCK_MONOTONIC
milliseconds: ``time.monotonic() * 1000`` here, ``bpf_ktime_get_ns() / 1000000`` in the
kernel, the same clock on Linux (checked in tests/dataplane/test_retry_crypto.py).

The key is derived from the daemon's secret (:func:`derive_token_key`) and never leaves the
daemon (and the guard's map): an app holding it could mint tokens for any address, and so
bypass Retry and get connections the daemon would take as address-validated. Only the
classifier (:func:`validate_retry_token`: MAC, binding, expiry) and the guard in the kernel
validate; a worker merely reads the original
DCID back (:func:`read_retry_token`). That is safe because of where the token-bearing
Initial can come from: the daemon's Retry SCID is outside the CID layout, so the retried
Initial reaches a classifier, and only the classifier, after validating its token, routes it
to a worker. Pure: callers pass ``now`` in seconds (steerd uses ``time.monotonic``); the
secret (in /run) does not outlive the boot that clock counts.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from siphash24 import siphash24

from quic.errors import QuicError
from quic.packet import MAX_CID_LEN

TOKEN_MAGIC = 0x5E  # first byte of a steerd Retry token (other tokens, e.g. NEW_TOKEN, differ)
MAC_LEN = 8  # the SipHash-2-4 value, little-endian
KEY_LEN = 16  # SipHash's 128-bit key
DEFAULT_LIFETIME = 10.0  # seconds: a Retry round trip plus the client's retransmissions
CLOCK_SKEW = 1.0  # seconds a token may appear to come from the future (other process' clock)
_ISSUED = struct.Struct("!Q")
MIN_TOKEN_LEN = 1 + _ISSUED.size + 1 + MAC_LEN
MAX_MAC_INPUT = _ISSUED.size + 1 + MAX_CID_LEN + 1 + 16 + 1 + MAX_CID_LEN  # 67
# Its own info, not the HMAC key's of v1: a key is never used by two MACs.
_KEY_INFO = b"steerd retry token siphash-2-4 v2"


def derive_token_key(secret: bytes) -> bytes:
    """The token MAC key (:data:`KEY_LEN` bytes) from the daemon's secret: HKDF-SHA256 with
    the token's own ``info``, so it is independent of every other key taken from that
    secret."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=_KEY_INFO).derive(
        secret
    )


def token_key_words(key: bytes) -> tuple[int, int]:
    """The key as SipHash's (k0, k1): its two halves as little-endian u64s, what the guard's
    map takes (steerd_siphash24(k0, k1, ...))."""
    if len(key) != KEY_LEN:
        raise QuicError("bad_key", f"a token key is {KEY_LEN} bytes, not {len(key)}")
    return int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")


def _packed_ip(client_ip: str) -> bytes:
    try:
        return ipaddress.ip_address(client_ip).packed
    except ValueError:
        raise QuicError("bad_address", f"not an IP address: {client_ip!r}") from None


def mac_input(issued_ms: int, original_dcid: bytes, client_ip: str, retry_scid: bytes) -> bytes:
    """The canonical MAC input (module docstring; STEERD_TOKEN_* in bpf/steerd.h)."""
    ip = _packed_ip(client_ip)
    return b"".join((
        _ISSUED.pack(issued_ms), bytes((len(original_dcid),)), original_dcid,
        bytes((len(ip),)), ip, bytes((len(retry_scid),)), retry_scid,
    ))


def token_mac(key: bytes, message: bytes) -> bytes:
    """SipHash-2-4 of ``message`` under ``key``: the reference's 8 output bytes (the 64-bit
    value little-endian), as the kernel writes it."""
    if len(key) != KEY_LEN:
        raise QuicError("bad_key", f"a token key is {KEY_LEN} bytes, not {len(key)}")
    return siphash24(message, key=key).digest()


def build_retry_token(
    key: bytes, client_ip: str, original_dcid: bytes, retry_scid: bytes, now: float
) -> bytes:
    """A token for a Retry sent to ``client_ip`` whose SCID is ``retry_scid``."""
    if len(original_dcid) > MAX_CID_LEN or len(retry_scid) > MAX_CID_LEN:
        raise QuicError("bad_cid_length", "connection IDs are at most 20 bytes")
    issued_ms = int(now * 1000)
    message = mac_input(issued_ms, original_dcid, client_ip, retry_scid)
    # The token is the magic, the MAC input's first 1 + 8 + len(odcid) bytes, the MAC.
    body = bytes((TOKEN_MAGIC,)) + message[: _ISSUED.size + 1 + len(original_dcid)]
    return body + token_mac(key, message)


def is_retry_token(token: bytes) -> bool:
    """Whether ``token`` is shaped like one of ours (not whether it is valid): an Initial
    may carry someone else's token, e.g. a NEW_TOKEN one an app issued."""
    return (
        len(token) >= MIN_TOKEN_LEN
        and token[0] == TOKEN_MAGIC
        and len(token) == MIN_TOKEN_LEN + token[1 + _ISSUED.size]
        and token[1 + _ISSUED.size] <= MAX_CID_LEN
    )


def validate_retry_token(
    key: bytes,
    token: bytes,
    client_ip: str,
    retry_scid: bytes,
    now: float,
    lifetime: float = DEFAULT_LIFETIME,
) -> bytes:
    """The original DCID a valid token carries. Raises QuicError ``token_malformed`` (not
    ours), ``token_invalid`` (MAC: forged, another address, another Retry SCID) or
    ``token_expired`` (older than ``lifetime`` seconds, or from the future)."""
    if not is_retry_token(token):
        raise QuicError("token_malformed", "not a steerd Retry token")
    issued_ms = _ISSUED.unpack_from(token, 1)[0]
    odcid = bytes(token[2 + _ISSUED.size : -MAC_LEN])
    expected = token_mac(key, mac_input(issued_ms, odcid, client_ip, retry_scid))
    if not hmac.compare_digest(token[-MAC_LEN:], expected):
        raise QuicError("token_invalid", "the token's MAC does not match this client and CID")
    issued = issued_ms / 1000
    if not issued - CLOCK_SKEW <= now <= issued + lifetime:
        raise QuicError("token_expired", f"issued {now - issued:.3f} s ago, lifetime {lifetime:g}")
    return odcid


def read_retry_token(token: bytes) -> bytes:
    """The original DCID a steerd token carries, read without any key (for workers).

    No MAC, binding or expiry check: workers do not hold the token key. They may trust the
    token because only the classifier, which runs :func:`validate_retry_token` on every
    Initial carrying a token of ours, routes a token-bearing Initial with a DCID outside the
    CID layout to a worker. Raises QuicError ``token_malformed`` if ``token`` is not shaped
    like ours (check :func:`is_retry_token` first to tell other tokens apart)."""
    if not is_retry_token(token):
        raise QuicError("token_malformed", "not a steerd Retry token")
    return bytes(token[2 + _ISSUED.size : -MAC_LEN])
