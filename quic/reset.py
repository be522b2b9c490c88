"""Stateless resets (RFC 9000 §10.3) with tokens the daemon can recompute.

Why HMAC(key, CID): a worker that dies takes its connection state with it, so only something
that survives it can end its clients' connections promptly instead of letting them idle out.
Every worker derives the token it advertises for a CID from its slot's key, which the daemon
derives from its master secret (:func:`slot_reset_key`; the secret outlives daemon restarts,
not a reboot), so the daemon, seeing a short-header packet for a slot with no live worker,
can compute the same token and send the reset. The SDK and the daemon both call
:func:`reset_token`: one definition.
"""

import hashlib
import hmac

from quic.errors import QuicError

TOKEN_LEN = 16
MIN_RESET_LEN = 21  # RFC 9000 §10.3: 5 unpredictable bytes + the 16-byte token at least
MAX_SLOT = (1 << 32) - 1  # quic/cid.py: a slot is at most 4 bytes
_SLOT_KEY_LABEL = b"steerd slot reset key v1\x00"


def slot_reset_key(master: bytes, slot: int) -> bytes:
    """The stateless-reset key of worker ``slot``: HMAC-SHA256(master, label || slot).

    Why one key per slot: whoever holds a reset key can forge stateless resets for every CID
    it covers, and a reset kills the connection at once. With the daemon's master key in
    every app's hands, any app could reset any other app's connections; with per-slot keys
    an app can only reset connections of its own workers. HMAC is a PRF, so one slot's key
    tells nothing about the master or another slot's key, and the daemon recomputes any
    slot's key from the slot number the CID carries (a dead worker needs no stored state).
    The fixed label (longer than any 20-byte CID) keeps this input apart from the CIDs that
    :func:`reset_token` MACs, should anyone ever use the master there too.
    """
    if not 0 <= slot <= MAX_SLOT:
        raise QuicError("bad_slot", f"slot {slot} not in 0..{MAX_SLOT}")
    return hmac.digest(master, _SLOT_KEY_LABEL + slot.to_bytes(4, "big"), hashlib.sha256)


def reset_token(key: bytes, cid: bytes) -> bytes:
    """The stateless-reset token a worker advertises for ``cid``; ``key`` is the key of the
    slot ``cid`` names (:func:`slot_reset_key`)."""
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
