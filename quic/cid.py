"""Server connection IDs in the QUIC-LB plaintext layout (draft-ietf-quic-load-balancers).

CONTRACT (stub written first so parallel work can code against it; fill in, keep names).

first octet: 3 config-rotation bits | 5 bits "length self-description" (CID length - 1)
then the server ID = host ID (``host_id_len`` bytes) || worker slot (``slot_len`` bytes,
big-endian), then a random nonce of ``nonce_len`` >= 4 bytes. The BPF programs use the same
numbers: bpf/steerd.h repeats the fixed constants below (a test checks they agree) and the
per-deployment ones are passed to the compiler as -D flags from a ``CidLayout``.
"""

from dataclasses import dataclass

CONFIG_ROTATION_BITS = 3
LENGTH_BITS = 5
CONFIG_ROTATION_SHIFT = 5  # first_octet >> 5 == config rotation codepoint
LENGTH_MASK = 0x1F
CR_UNROUTABLE = 0b111  # reserved codepoint: "not routable by server ID"
MIN_NONCE_LEN = 4
MAX_CID_LEN = 20


@dataclass(frozen=True, slots=True)
class CidLayout:
    """One deployment's CID layout; validated in ``__post_init__``."""

    config_id: int = 0
    host_id: int = 0
    host_id_len: int = 0
    slot_len: int = 2
    nonce_len: int = 6

    @property
    def cid_len(self) -> int:
        return 1 + self.host_id_len + self.slot_len + self.nonce_len

    def encode(self, slot: int, nonce: bytes) -> bytes:
        """A CID naming ``slot`` on this host; ``nonce`` must be ``nonce_len`` random bytes."""
        raise NotImplementedError

    def decode(self, cid: bytes) -> int | None:
        """The worker slot a CID names, or None if it is not one of ours (wrong length,
        config rotation or host ID)."""
        raise NotImplementedError
