"""Server connection IDs in the QUIC-LB plaintext layout (draft-ietf-quic-load-balancers).

first octet: 3 config-rotation bits | 5 bits "length self-description" (CID length - 1)
then the server ID = host ID (``host_id_len`` bytes) || worker slot (``slot_len`` bytes,
big-endian), then a random nonce of ``nonce_len`` >= 4 bytes. The BPF programs use the same
numbers: bpf/steerd.h repeats the fixed constants below (a test checks they agree) and the
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

BALANCERS = ("none", "quic-lb", "katran-v2", "katran-v3")  # [cid] balancer
KATRAN_MIN_CID_LEN = 8  # Katran does not route by a shorter DCID
# Katran format (top two bits of the first octet) -> (host ID offset in bits, width in bits)
KATRAN_FORMATS = {0b01: (2, 16), 0b10: (8, 24), 0b11: (8, 32)}
# What each Katran profile needs of the layout: (format bits, host_id_len, config_ids)
_KATRAN_PROFILES = {"katran-v2": (0b10, 3, (4, 5)), "katran-v3": (0b11, 4, (6,))}


def balancer_problem(
    balancer: str, config_id: int, host_id_len: int, cid_len: int
) -> tuple[str, str] | None:
    """Why ``balancer`` cannot route CIDs of this layout, as (the [cid] key to blame,
    message), or None if it can. One function for ``CidLayout`` and the config file, so
    both refuse the same layouts with the same words."""
    if balancer not in BALANCERS:
        options = ", ".join(f'"{b}"' for b in BALANCERS)
        return "balancer", f"must be one of {options}, got \"{balancer}\""
    if balancer not in _KATRAN_PROFILES:
        return None  # "none" and "quic-lb": the base checks of CidLayout are the rules
    bits, need_len, need_ids = _KATRAN_PROFILES[balancer]
    width = 8 * need_len
    if host_id_len != need_len:
        return "host_id_len", (
            f'balancer "{balancer}" reads a {width}-bit host ID in bytes 1-{need_len}, '
            f"so host_id_len must be {need_len}, got {host_id_len}"
        )
    if config_id not in need_ids:
        ids = " or ".join(map(str, need_ids))
        return "config_id", (
            f'balancer "{balancer}" needs the first octet\'s top bits {bits:02b}, '
            f"so config_id must be {ids}, got {config_id}"
        )
    if cid_len < KATRAN_MIN_CID_LEN:  # cannot happen with a 3-byte host ID, slot and nonce
        return "nonce_len", (
            f'balancer "{balancer}" reads no CID shorter than {KATRAN_MIN_CID_LEN} bytes, '
            f"got {cid_len}"
        )
    return None


def katran_host_id(cid: bytes) -> tuple[int, int] | None:
    """(format bits, host ID) as Katran reads a DCID, or None if Katran would hash it
    instead (top bits 00, or shorter than 8 bytes)."""
    if len(cid) < KATRAN_MIN_CID_LEN or cid[0] >> 6 not in KATRAN_FORMATS:
        return None
    bits = cid[0] >> 6
    offset, width = KATRAN_FORMATS[bits]
    as_int = int.from_bytes(cid[:8], "big")
    return bits, (as_int >> (64 - offset - width)) & ((1 << width) - 1)


@dataclass(frozen=True, slots=True)
class CidLayout:
    """One deployment's CID layout; validated in ``__post_init__``."""

    config_id: int = 0
    host_id: int = 0
    host_id_len: int = 0
    slot_len: int = 2
    nonce_len: int = 6
    # Not part of a CID (apps never see it), so two layouts that make the same CIDs compare
    # equal whatever balancer the config names.
    balancer: str = field(default="none", compare=False)
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
        problem = balancer_problem(self.balancer, self.config_id, self.host_id_len, cid_len)
        if problem:
            raise QuicError("bad_cid_layout", f"{problem[0]}: {problem[1]}")
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

    def split(self, cid: bytes) -> "CidFields":
        """Every field of ``cid`` read in this layout's positions, whether or not the CID is
        ours: what an operator looking at a foreign or stale CID needs to see."""
        head = cid[:1]
        host_end = 1 + self.host_id_len
        slot_end = host_end + self.slot_len
        return CidFields(
            config_rotation=head[0] >> CONFIG_ROTATION_SHIFT if head else None,
            length_bits=head[0] & LENGTH_MASK if head else None,
            host_id=_int_at(cid, 1, self.host_id_len),
            slot=_int_at(cid, host_end, self.slot_len),
            nonce=cid[slot_end:] if len(cid) > slot_end else b"",
            owned=self.decode(cid) is not None,
        )

    def balancer_reading(self, cid: bytes) -> str:
        """What this layout's balancer routes ``cid`` by, in words."""
        if self.balancer == "none":
            return "none (no balancer profile)"
        if self.balancer == "quic-lb":
            sid_end = 1 + self.host_id_len + self.slot_len
            if not cid or cid[0] >> CONFIG_ROTATION_SHIFT == CR_UNROUTABLE:
                return "quic-lb: unroutable (4-tuple hash)"
            if cid[0] >> CONFIG_ROTATION_SHIFT != self.config_id or len(cid) < sid_end:
                return "quic-lb: unknown config rotation or too short (4-tuple hash)"
            return f"quic-lb: server ID {cid[1:sid_end].hex()}"
        read = katran_host_id(cid)
        if read is None:
            return f"{self.balancer}: no host ID (4-tuple hash)"
        return f"{self.balancer}: format {read[0]:02b}, host ID {read[1]}"

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


def _int_at(cid: bytes, at: int, size: int) -> int | None:
    """The big-endian integer of ``size`` bytes at ``at``, or None if the CID ends first (or
    the field is absent)."""
    if size == 0 or len(cid) < at + size:
        return None
    return int.from_bytes(cid[at : at + size], "big")


@dataclass(frozen=True, slots=True)
class CidFields:
    """A CID taken apart by ``CidLayout.split``; None where the CID is too short."""

    config_rotation: int | None
    length_bits: int | None
    host_id: int | None
    slot: int | None
    nonce: bytes
    owned: bool  # config rotation, length bits and host ID all this layout's
