"""Server connection IDs in the QUIC-LB plaintext layout (draft-ietf-quic-load-balancers).

first octet: 3 config-rotation bits | 5 bits "length self-description" (CID length - 1)
then the server ID = host ID (``host_id_len`` bytes) || worker slot (``slot_len`` bytes,
big-endian), then a random nonce of ``nonce_len`` >= 4 bytes. The BPF programs use the same
numbers: steerd/bpf/steerd.h repeats the fixed constants below (a test checks they agree) and the
per-deployment ones are passed to the compiler as -D flags from a ``CidLayout``
(``CidLayout.defines()``).

Why plaintext: routing every packet after the first flight by the CID alone needs no
per-connection state in the kernel, survives NAT rebinding and migration, and the BPF side is
a few byte compares. The first octet and host ID form one fixed prefix, so decoding is a
length check, one ``startswith`` and one ``int.from_bytes``.
"""

from dataclasses import dataclass, field

from quic.errors import QuicError
from quic.packet import MAX_CID_LEN

CONFIG_ROTATION_SHIFT = 5  # first_octet >> 5 == config rotation codepoint
LENGTH_MASK = 0x1F
CR_UNROUTABLE = 0b111  # reserved codepoint: "not routable by server ID"
MIN_NONCE_LEN = 4
MAX_SLOT_LEN = 4


@dataclass(frozen=True, slots=True)
class CidLayout:
    """One deployment's CID layout; validated in ``__post_init__``."""

    config_id: int = 0
    host_id: int = 0
    host_id_len: int = 0
    slot_len: int = 2
    nonce_len: int = 6
    _prefix: bytes = field(init=False, repr=False, compare=False)
    _len: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.config_id < CR_UNROUTABLE:
            raise QuicError("bad_cid_layout", f"config_id {self.config_id} not in 0..6")
        if not 1 <= self.slot_len <= MAX_SLOT_LEN:
            raise QuicError("bad_cid_layout", f"slot_len {self.slot_len} not in 1..4")
        if self.nonce_len < MIN_NONCE_LEN:
            raise QuicError("bad_cid_layout", f"nonce_len {self.nonce_len} < {MIN_NONCE_LEN}")
        if self.host_id_len < 0:
            raise QuicError("bad_cid_layout", f"host_id_len {self.host_id_len} < 0")
        cid_len = 1 + self.host_id_len + self.slot_len + self.nonce_len
        if cid_len > MAX_CID_LEN:
            raise QuicError("bad_cid_layout", f"CID length {cid_len} > {MAX_CID_LEN}")
        if not 0 <= self.host_id < 1 << (8 * self.host_id_len):
            raise QuicError(
                "bad_cid_layout", f"host_id {self.host_id} does not fit {self.host_id_len} bytes"
            )
        first_octet = (self.config_id << CONFIG_ROTATION_SHIFT) | ((cid_len - 1) & LENGTH_MASK)
        prefix = bytes((first_octet,)) + self.host_id.to_bytes(self.host_id_len, "big")
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_len", cid_len)

    @property
    def cid_len(self) -> int:
        return self._len

    @property
    def first_octet(self) -> int:
        return self._prefix[0]

    @property
    def slot_offset(self) -> int:
        """Offset of the worker slot inside the CID (what the BPF program reads)."""
        return 1 + self.host_id_len

    @property
    def max_slot(self) -> int:
        return (1 << (8 * self.slot_len)) - 1

    def encode(self, slot: int, nonce: bytes) -> bytes:
        """A CID naming ``slot`` on this host; ``nonce`` must be ``nonce_len`` random bytes."""
        if not 0 <= slot <= self.max_slot:
            raise QuicError("bad_slot", f"slot {slot} does not fit {self.slot_len} bytes")
        if len(nonce) != self.nonce_len:
            raise QuicError("bad_nonce", f"nonce of {len(nonce)} bytes, need {self.nonce_len}")
        return self._prefix + slot.to_bytes(self.slot_len, "big") + nonce

    def decode(self, cid: bytes) -> int | None:
        """The worker slot a CID names, or None if it is not one of ours (wrong length,
        config rotation, length bits or host ID)."""
        if len(cid) != self._len or not cid.startswith(self._prefix):
            return None
        at = len(self._prefix)
        return int.from_bytes(cid[at : at + self.slot_len], "big")

    def defines(self) -> dict[str, int]:
        """The per-deployment numbers the BPF programs are compiled with (as -DNAME=VALUE)."""
        return {
            "STEERD_CID_LEN": self.cid_len,
            "STEERD_CID_FIRST_OCTET": self.first_octet,
            "STEERD_CID_HOST_ID_LEN": self.host_id_len,
            "STEERD_CID_HOST_ID": self.host_id,
            "STEERD_CID_SLOT_OFFSET": self.slot_offset,
            "STEERD_CID_SLOT_LEN": self.slot_len,
        }
