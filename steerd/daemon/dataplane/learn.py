"""Learned mode: steering servers that pick their own random CIDs (bpf/learn.c).

Why: only servers that write every CID in steerd's layout can be steered without state.
A plain aioquic, qh3 or hypercorn server picks random CIDs; the egress program learns them
(and the client addresses it serves) from the server's own long-header packets as they
leave, into ``learned_cids`` and ``learned_peers``, and the steering program looks them up.
This module is the Python side of one group's learning: which worker sockets are steered
how (``learn_sockets``), the quotas, TTLs and CID lengths (``learn_config``), the sweep that
expires entries and recounts the quotas, the per-slot statistics, and the egress program's
attachment at the cgroup v2 root.

Proof of address: every entry the egress program writes is *unproven* (the server answered
a datagram whose source anyone can forge): it lives ``unproven_ttl`` and counts against the
slot's small ``unproven_quota``, not its quota, until the steering program sees a client
datagram carrying the learned CID and promotes it. So spoofed Initials that make a server
answer cannot fill the tables nor spend its quota (docs/SECURITY.md §2.4).

Life cycle: like the socket jail, the egress program is pinned (``PIN_DIR/prog_learn``) and
stays attached while the daemon is down, so apps keep learning through a restart; a new run
attaches its own before detaching the old one. ``steerd purge`` detaches it
(:func:`remove_learner`).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from steerd.daemon.dataplane import Dataplane, DataplaneError, compiled
from steerd.daemon.dataplane.cgroup import (
    RootProgram,
    attach_at_root,
    cgroup2_root,
    detach_from_root,
)
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.dataplane.maps import libbcc

PROG_CGROUP_SKB = 8
BPF_CGROUP_INET_EGRESS = 1
LEARN = compiled.Entry("steerd_learn", PROG_CGROUP_SKB, BPF_CGROUP_INET_EGRESS)
PIN_NAME = "prog_learn"

MODE_LAYOUT = 1  # bpf/steerd.h STEERD_MODE_LAYOUT (tests/dataplane/test_learn.py checks)
MODE_LEARNED = 2  # STEERD_MODE_LEARNED


def _h() -> dict[str, int]:
    """bpf/steerd.h's numbers, read when first needed (not at import: ``steerd exec`` and
    ``steerd status`` import this module and never touch the data plane)."""
    return header_constants()


def slot_stat_names() -> dict[int, str]:
    """slot_stats columns, named as steerd status shows them (STEERD_SLOT_*)."""
    return {value: name.removeprefix("STEERD_SLOT_").lower()
            for name, value in _h().items()
            if name.startswith("STEERD_SLOT_") and name != "STEERD_SLOT_STATS"}


_ROUTE = struct.Struct("=IIQ")  # struct steerd_route: slot, flags, expires_ns
# struct steerd_learn_config: cid_quota, peer_quota, ttl_ns, lengths[4], unproven_quota,
# unproven_ttl_ns
_CONFIG = struct.Struct("=IIQ4sIQ")


@dataclass(frozen=True, slots=True)
class LearnLimits:
    """How much each slot may learn and how long an unused entry lives: proven entries
    (``cid_quota``, ``peer_quota``, ``ttl`` after the last use) and unproven ones (at most
    ``unproven_quota`` CIDs and as many addresses per slot, each ``unproven_ttl`` after it
    was learned)."""

    cid_quota: int = 4096
    peer_quota: int = 4096
    ttl: float = 300.0
    unproven_quota: int = 1024
    unproven_ttl: float = 3.0


class Learner:
    """Learned-mode state of one group's data plane (its maps must be open)."""

    def __init__(self, dp: Dataplane) -> None:
        self.dp = dp
        self._prog_fd: int | None = None
        self._slots = dp.config.effective_worker_slots()
        # learn_counts: proven CIDs, proven peers, unproven CIDs, unproven peers (per slot)
        self._columns = _h()["STEERD_LEARN_COUNT_COLUMNS"]
        self.unproven: dict[int, tuple[int, int]] = {}  # slot -> (CIDs, peers), last sweep

    # -- configuration ----------------------------------------------------------------------

    def configure(self, limits: LearnLimits, lengths: Iterable[int]) -> None:
        """Quotas, TTLs and the CID lengths learned-mode apps registered (at most
        STEERD_MAX_LEARN_LENGTHS distinct ones: each costs the steering program a lookup
        for every short header that is not in the layout)."""
        # Longest first: the steering program takes the first hit, and a shorter learned CID
        # may be the prefix of a longer one (CIDs travel in clear, so an app with short CIDs
        # could learn another's prefix on purpose); the longer, exact entry must win.
        lens = sorted({int(n) for n in lengths}, reverse=True)
        most = _h()["STEERD_MAX_LEARN_LENGTHS"]
        if len(lens) > most or any(not 1 <= n <= 20 for n in lens):
            raise DataplaneError(f"learned CID lengths {lens}: at most {most}, each 1..20")
        raw = _CONFIG.pack(limits.cid_quota, limits.peer_quota, int(limits.ttl * 1e9),
                           bytes(lens).ljust(most, b"\0"), limits.unproven_quota,
                           int(limits.unproven_ttl * 1e9))
        key = ct.c_uint32(0)
        value = ct.create_string_buffer(raw, len(raw))
        if libbcc().bpf_update_elem(self.dp.map_fd("learn_config"), ct.byref(key), value, 0):
            raise DataplaneError(f"writing learn_config failed: {os.strerror(ct.get_errno())}")

    def set_socket(self, cookie: int, slot: int, mode: int, cid_len: int = 0) -> None:
        """The worker socket with SO_COOKIE ``cookie`` serves ``slot`` in ``mode``."""
        key = ct.c_uint64(cookie)
        raw = struct.pack("=IBBH", slot, mode, cid_len, 0)
        value = ct.create_string_buffer(raw, len(raw))
        if libbcc().bpf_update_elem(self.dp.map_fd("learn_sockets"), ct.byref(key), value, 0):
            raise DataplaneError(f"learn_sockets: cannot add the socket of slot {slot}: "
                                 f"{os.strerror(ct.get_errno())}")

    def sockets(self) -> dict[int, tuple[int, int, int]]:
        """cookie -> (slot, mode, cid_len) for every listed socket."""
        out: dict[int, tuple[int, int, int]] = {}
        for key, value in self._items("learn_sockets", 8, 8):
            slot, mode, cid_len, _ = struct.unpack("=IBBH", value)
            out[int.from_bytes(key, "little")] = (slot, mode, cid_len)
        return out

    def forget_slot(self, slot: int) -> None:
        """The slot's worker left: its sockets, everything learned for it and its quota
        counts go (a freed slot is quarantined before another app gets it, and must start
        clean, with its whole quota)."""
        for cookie, (owner, _, _) in self.sockets().items():
            if owner == slot:
                self._delete("learn_sockets", ct.c_uint64(cookie))
        for name, size in self._tables():
            for key, value in self._items(name, size, _ROUTE.size):
                if _ROUTE.unpack(value)[0] == slot:
                    self._delete(name, ct.create_string_buffer(key, size))
        self._write_counts({column * self._slots + slot: 0 for column in range(self._columns)})

    # -- upkeep ---------------------------------------------------------------------------

    def sweep(self, now_ns: int | None = None) -> dict[int, tuple[int, int]]:
        """Delete expired entries, proven and unproven, and recount each slot's (the BPF side
        only adds, or moves one from unproven to proven on promotion: this is where the
        quotas and the unproven budgets come back). Returns slot -> (proven CIDs, proven
        peers), what counts against the quota; :attr:`unproven` holds slot -> (unproven
        CIDs, unproven peers) as this sweep found them.

        The BPF side goes on adding while the tables are read, so a slot's new count is
        what was found alive plus what the BPF side added during the sweep: an entry added
        then may be counted twice (the quota refuses a little early, until the next sweep),
        never not at all (which would let a slot exceed its quota)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        unproven_flag = _h()["STEERD_LEARNED_UNPROVEN"]
        before = self._read_counts()
        live = [0] * (self._columns * self._slots)
        for table, (name, size) in enumerate(self._tables()):
            for key, value in self._items(name, size, _ROUTE.size):
                slot, flags, expires = _ROUTE.unpack(value)
                if expires < now:
                    self._delete(name, ct.create_string_buffer(key, size))
                elif slot < self._slots:
                    column = table + (2 if flags & unproven_flag else 0)
                    live[column * self._slots + slot] += 1
        after = self._read_counts()
        self._write_counts({i: live[i] + max(0, after[i] - before[i]) for i in range(len(live))})
        n = self._slots
        self.unproven = {slot: (live[2 * n + slot], live[3 * n + slot]) for slot in range(n)
                         if live[2 * n + slot] or live[3 * n + slot]}
        return {slot: (live[slot], live[n + slot]) for slot in range(n)
                if live[slot] or live[n + slot]}

    def _tables(self) -> tuple[tuple[str, int], tuple[str, int]]:
        h = _h()
        return (("learned_cids", h["STEERD_ROUTE_KEY_SIZE"]),
                ("learned_peers", h["STEERD_PEER_KEY_SIZE"]))

    def _read_counts(self) -> list[int]:
        lib, fd = libbcc(), self.dp.map_fd("learn_counts")
        out, value = [], ct.c_uint32()
        for index in range(self._columns * self._slots):
            ok = lib.bpf_lookup_elem(fd, ct.byref(ct.c_uint32(index)), ct.byref(value)) == 0
            out.append(value.value if ok else 0)
        return out

    def _write_counts(self, counts: dict[int, int]) -> None:
        lib, fd = libbcc(), self.dp.map_fd("learn_counts")
        for index, n in counts.items():
            lib.bpf_update_elem(fd, ct.byref(ct.c_uint32(index)), ct.byref(ct.c_uint32(n)), 0)

    def learned_cids(self, unproven: bool | None = None) -> dict[bytes, tuple[int, int]]:
        """server CID -> (slot, expires_ns); only the unproven (True) or proven (False) ones
        if asked."""
        h = _h()
        out: dict[bytes, tuple[int, int]] = {}
        for key, value in self._items("learned_cids", h["STEERD_ROUTE_KEY_SIZE"], _ROUTE.size):
            slot, flags, expires = _ROUTE.unpack(value)
            if unproven is None or unproven == bool(flags & h["STEERD_LEARNED_UNPROVEN"]):
                out[key[1 : 1 + key[0]]] = (slot, expires)
        return out

    def learned_peers(self, unproven: bool | None = None
                      ) -> dict[tuple[int, bytes, int, int], tuple[int, int]]:
        """(family, address bytes, client port, service port) -> (slot, expires_ns); only
        the unproven (True) or proven (False) ones if asked."""
        h = _h()
        out: dict[tuple[int, bytes, int, int], tuple[int, int]] = {}
        for key, value in self._items("learned_peers", h["STEERD_PEER_KEY_SIZE"], _ROUTE.size):
            family, _, pport, lport, _, addr = struct.unpack("=BBHHH16s", key)
            slot, flags, expires = _ROUTE.unpack(value)
            if unproven is None or unproven == bool(flags & h["STEERD_LEARNED_UNPROVEN"]):
                out[(family, addr[: 4 if family == 4 else 16], socket_port(pport),
                     socket_port(lport))] = (slot, expires)
        return out

    def slot_stats(self, slots: Iterable[int] | None = None) -> dict[int, dict[str, int]]:
        """slot -> {statistic: value} for each of ``slots`` (default: all) with a nonzero
        one, summed over CPUs. Ask for the slots you need: each costs 8 map reads."""
        lib, fd = libbcc(), self.dp.map_fd("slot_stats")
        values = (ct.c_uint64 * self.dp.ncpus)()
        width = _h()["STEERD_SLOT_STATS"]
        names = slot_stat_names()
        out: dict[int, dict[str, int]] = {}
        for slot in range(self._slots) if slots is None else slots:
            row: dict[str, int] = {}
            for column, name in names.items():
                key = ct.c_uint32(slot * width + column)
                if lib.bpf_lookup_elem(fd, ct.byref(key), values) == 0 and sum(values):
                    row[name] = sum(values)
            if row:
                out[slot] = row
        return out

    def clear_slot_stats(self, slot: int) -> None:
        """A slot handed to a new app starts from zero (the app sees only its own)."""
        lib, fd = libbcc(), self.dp.map_fd("slot_stats")
        zeros = (ct.c_uint64 * self.dp.ncpus)()
        width = _h()["STEERD_SLOT_STATS"]
        for column in slot_stat_names():
            key = ct.c_uint32(slot * width + column)
            lib.bpf_update_elem(fd, ct.byref(key), zeros, 0)

    # -- the egress program ---------------------------------------------------------------

    def attach(self) -> None:
        """Compile bpf/learn.c against this group's maps and attach it at the cgroup v2
        root, then retire a previous run's (attached first: no packet goes unwatched)."""
        root = cgroup2_root()
        if root is None:
            raise DataplaneError("no cgroup v2 hierarchy is mounted: learned mode needs one")
        prog_fd = compiled.load("learn.c", self.dp.cflags(), [LEARN], self.dp.fd_macros())[
            LEARN.name]
        self.close()
        self._prog_fd = prog_fd
        attach_at_root(root, [RootProgram("bpf/learn.c", prog_fd, BPF_CGROUP_INET_EGRESS,
                                          os.path.join(self.dp.config.pin_dir, PIN_NAME))])

    def close(self) -> None:
        """Release this process's handle; the pinned program stays attached."""
        fd, self._prog_fd = self._prog_fd, None
        if fd is not None:
            os.close(fd)

    # -- map helpers ----------------------------------------------------------------------

    def _items(self, name: str, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map, read before anything is deleted."""
        lib, fd = libbcc(), self.dp.map_fd(name)
        key = ct.create_string_buffer(key_size)
        nxt = ct.create_string_buffer(key_size)
        value = ct.create_string_buffer(value_size)
        out: list[tuple[bytes, bytes]] = []
        first = True
        while lib.bpf_get_next_key(fd, None if first else key, nxt) == 0:
            first = False
            ct.memmove(key, nxt, key_size)
            if lib.bpf_lookup_elem(fd, key, value) == 0:
                out.append((key.raw, value.raw))
        return out

    def _delete(self, name: str, key: object) -> None:
        arg = ct.byref(key) if isinstance(key, ct.c_uint64) else key  # type: ignore[arg-type]
        if libbcc().bpf_delete_elem(self.dp.map_fd(name), arg) != 0:
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise DataplaneError(f"deleting from {name} failed: {os.strerror(err)}")


def socket_port(wire: int) -> int:
    """A port as the BPF side stored it (network order in a host-order u16)."""
    return int.from_bytes(wire.to_bytes(2, "little"), "big")


def remove_learner(pin_dir: str) -> bool:
    """Detach and unpin a group's egress program (``steerd purge``); True if one was."""
    path = os.path.join(pin_dir, PIN_NAME)
    _, detached = detach_from_root({path: BPF_CGROUP_INET_EGRESS})
    if os.path.exists(path):
        os.unlink(path)
    return path in detached
