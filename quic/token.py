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

    magic (1) | issued, ms on the daemon's clock (8) | len(odcid) (1) | odcid | HMAC-SHA256[:16]

The MAC covers everything before it plus the client's packed IP address and the Retry SCID.
The key is derived from the daemon's secret (:func:`derive_token_key`) and never leaves the
daemon: an app holding it could mint tokens for any address, and so bypass Retry and get
connections the daemon would take as address-validated. Only the classifier validates
(:func:`validate_retry_token`: MAC, binding, expiry); a worker merely reads the original
DCID back (:func:`read_retry_token`). That is safe because of where the token-bearing
Initial can come from: the daemon's Retry SCID is outside the CID layout, so the retried
Initial reaches a classifier, and only the classifier, after validating its token, routes it
to a worker. Pure: callers pass ``now`` in seconds (steerd uses ``time.monotonic``); the
secret (in /run) does not outlive the boot that clock counts.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from quic.errors import QuicError
from quic.packet import MAX_CID_LEN

TOKEN_MAGIC = 0x5E  # first byte of a steerd Retry token (other tokens, e.g. NEW_TOKEN, differ)
MAC_LEN = 16
DEFAULT_LIFETIME = 10.0  # seconds: a Retry round trip plus the client's retransmissions
CLOCK_SKEW = 1.0  # seconds a token may appear to come from the future (other process' clock)
_ISSUED = struct.Struct("!Q")
MIN_TOKEN_LEN = 1 + _ISSUED.size + 1 + MAC_LEN
_KEY_INFO = b"steerd retry token v1"


def derive_token_key(secret: bytes) -> bytes:
    """The token MAC key from the daemon's secret (HKDF-SHA256, its own ``info``)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(secret)


def _packed_ip(client_ip: str) -> bytes:
    try:
        return ipaddress.ip_address(client_ip).packed
    except ValueError:
        raise QuicError("bad_address", f"not an IP address: {client_ip!r}") from None


def _mac(key: bytes, body: bytes, client_ip: str, retry_scid: bytes) -> bytes:
    ip = _packed_ip(client_ip)
    message = b"".join((body, bytes((len(ip),)), ip, bytes((len(retry_scid),)), retry_scid))
    return hmac.digest(key, message, hashlib.sha256)[:MAC_LEN]


def build_retry_token(
    key: bytes, client_ip: str, original_dcid: bytes, retry_scid: bytes, now: float
) -> bytes:
    """A token for a Retry sent to ``client_ip`` whose SCID is ``retry_scid``."""
    if len(original_dcid) > MAX_CID_LEN or len(retry_scid) > MAX_CID_LEN:
        raise QuicError("bad_cid_length", "connection IDs are at most 20 bytes")
    body = b"".join((
        bytes((TOKEN_MAGIC,)), _ISSUED.pack(int(now * 1000)), bytes((len(original_dcid),)),
        original_dcid,
    ))
    return body + _mac(key, body, client_ip, retry_scid)


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
    body, mac = token[:-MAC_LEN], token[-MAC_LEN:]
    if not hmac.compare_digest(mac, _mac(key, body, client_ip, retry_scid)):
        raise QuicError("token_invalid", "the token's MAC does not match this client and CID")
    issued = _ISSUED.unpack_from(token, 1)[0] / 1000
    if not issued - CLOCK_SKEW <= now <= issued + lifetime:
        raise QuicError("token_expired", f"issued {now - issued:.3f} s ago, lifetime {lifetime:g}")
    return bytes(body[2 + _ISSUED.size :])


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
