"""Stateless resets (RFC 9000 §10.3) with tokens the daemon can recompute.

Why HMAC(key, CID): a worker that dies takes its connection state with it, so only something
that survives it can end its clients' connections promptly instead of letting them idle out.
Every worker derives the token it advertises for a CID from the daemon's per-run key, so the
daemon, seeing a short-header packet for a slot with no live worker, can compute the same token
and send the reset. The SDK and the daemon both call :func:`reset_token`: one definition.
"""

import hashlib
import hmac

from quic.errors import QuicError

TOKEN_LEN = 16
MIN_RESET_LEN = 21  # RFC 9000 §10.3: 5 unpredictable bytes + the 16-byte token at least


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless-reset token a worker advertises for ``cid``."""
    return hmac.digest(key, cid, hashlib.sha256)[:TOKEN_LEN]


def build_stateless_reset(token: bytes, unpredictable: bytes) -> bytes:
    """A stateless reset: short-header look-alike (0b01 first bits), random filler, token.

    ``unpredictable`` (at least 5 random bytes, from the caller: no randomness in quic/)
    decides the length; the caller keeps it shorter than the packet that triggered the reset so
    two endpoints can never bounce resets at each other forever (RFC 9000 §10.3.3).
    """
    if len(token) != TOKEN_LEN:
        raise QuicError("bad_token", f"a reset token is {TOKEN_LEN} bytes, got {len(token)}")
    if len(unpredictable) < MIN_RESET_LEN - TOKEN_LEN:
        raise QuicError("reset_too_short", "a stateless reset needs >= 5 unpredictable bytes")
    first = (unpredictable[0] & 0x3F) | 0x40
    return bytes((first,)) + unpredictable[1:] + token
