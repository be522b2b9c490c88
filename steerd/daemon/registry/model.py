"""The registry's records and the name rules they share: requests refused, peers, workers,
generations, decisions, reservations, free slots; CID server IDs and claim-pattern matching.

Plain data (no state of the registry's own): every part of the registry imports it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from quic.cid import CidLayout
from steerd.app.protocol import LAYOUT, Steering
from steerd.daemon.config import (
    render,
)

ANY_NAME = "*"


MAX_LEARNED_LENGTHS = 4  # bpf/steerd.h STEERD_MAX_LEARN_LENGTHS: a lookup per length


MAX_NAME_LEN = 253  # a DNS name; claims are never longer


class RegistryError(Exception):
    """A refused request; ``reason`` is a stable token (metrics label), ``str()`` the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a control connection, as the ACL sees them.

    The control server fills this from SO_PEERCRED/SO_PEERGROUPS and resolves the names, so
    that matching here needs no system calls.
    """

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary gids
    user: str | None = None
    group_names: frozenset[str] = frozenset()

    @property
    def all_gids(self) -> frozenset[int]:
        return self.groups | {self.gid}


@dataclass(slots=True)
class Worker:
    """One worker of a generation: its slot, its server ID, and what we know of its load."""

    slot: int
    server_id: bytes
    load: float | None = None  # last reported (e.g. open connections); None: never reported
    assigned: int = 0  # connections decided for it since its last load report

    def snapshot(self) -> dict[str, Any]:
        return {
            "slot": self.slot, "server_id": self.server_id.hex(), "load": self.load,
            "assigned": self.assigned,
        }


@dataclass(slots=True)
class Generation:
    """One registration of an app: its claims and its workers."""

    app: str
    number: int
    owner: Hashable
    uid: int
    alpns: tuple[str, ...]
    server_names: tuple[str, ...]  # normalised; ("*",) = all names
    workers: list[Worker]
    draining: bool = False
    cursor: int = 0  # round-robin position
    # For undo() only: the generation this one replaced, while this one is its app's newest.
    # Never a chain: a newer replace, or the removal of either end, drops the link, so a
    # generation never links to one that itself links on (see Registry._unlink).
    replaced: Generation | None = field(default=None, repr=False)
    steering: Steering = LAYOUT

    @property
    def state(self) -> str:
        return "draining" if self.draining else "active"

    def snapshot(self) -> dict[str, Any]:
        return {
            "generation": self.number, "state": self.state, "uid": self.uid,
            "alpn": list(self.alpns), "server_names": list(self.server_names),
            "cid_mode": self.steering.mode,
            **({"cid_len": self.steering.cid_len} if self.steering.learned else {}),
            "workers": [w.snapshot() for w in self.workers],
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a new connection goes: ``alpn`` is None when the policy's default app took it."""

    app: str
    generation: int
    slot: int
    alpn: str | None


@dataclass(frozen=True, slots=True)
class Counts:
    """Sizes for the metrics gauges."""

    apps: int
    active_generations: int
    draining_generations: int
    workers: int
    free_slots: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """The claims of a generation that served before a daemon restart, held for its resume.

    ``slots`` are those of its slots that were orphans when reserved; the reservation lasts
    until ``until`` (clock time), the app resumes, or none of these slots is an orphan any
    more (the app exited, or someone else resumed them).
    """

    app: str
    uid: int
    alpns: tuple[str, ...]
    server_names: tuple[str, ...]  # normalised, like Generation.server_names
    slots: frozenset[int]
    until: float

    def pairs(self) -> Iterator[tuple[str, str]]:
        for alpn in self.alpns:
            for name in self.server_names:
                yield alpn, name

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "app": self.app, "uid": self.uid, "alpn": list(self.alpns),
            "server_names": list(self.server_names), "slots": sorted(self.slots),
            "expires_in": round(max(0.0, self.until - now), 3),
        }


@dataclass(frozen=True, slots=True)
class _FreeSlot:
    """A free slot and who let it go when (``app``/``uid`` None: nobody known)."""

    slot: int
    freed_at: float
    app: str | None = None
    uid: int | None = None


@dataclass(slots=True)
class _App:
    name: str
    generations: list[Generation] = field(default_factory=list)  # oldest first

    @property
    def active(self) -> Generation | None:
        if self.generations and not self.generations[-1].draining:
            return self.generations[-1]
        return None


def server_id(layout: CidLayout, slot: int) -> bytes:
    """The server ID bytes (host ID, then slot) a worker in ``slot`` puts in its CIDs:
    the CID minus its first octet and nonce, so the layout stays defined once, in quic/."""
    return layout.encode(slot, bytes(layout.nonce_len))[1 : layout.slot_offset + layout.slot_len]


def covers(pattern: str, name: str) -> bool:
    """Whether an ACL server-name pattern allows claiming ``name`` (itself a pattern).

    ``*`` covers everything; ``*.example.com`` covers ``a.example.com``, ``a.b.example.com``
    and ``*.b.example.com`` (but not ``example.com``: a wildcard is not its own apex);
    an exact name covers only itself.
    """
    if pattern == ANY_NAME:
        return True
    if name == ANY_NAME:
        return False
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return name.endswith(suffix) and len(name) > len(suffix)
    return pattern == name


def broader(name: str) -> Iterator[str]:
    """The claim patterns strictly broader than ``name`` that cover it, most specific first:
    ``a.b.c`` -> ``*.b.c``, ``*.c``, ``*``; ``*.b.c`` -> ``*.c``, ``*``; ``*`` -> nothing.
    The same suffix walk as ``decide``, so what shadows what matches what wins there."""
    if name == ANY_NAME:
        return
    host = name[2:] if name.startswith("*.") else name
    dot = host.find(".")
    while dot >= 0:
        yield "*" + host[dot:]
        dot = host.find(".", dot + 1)
    yield ANY_NAME


def _checked(key: str, value: Any, check: Callable[[Any], str]) -> str:
    """``check(value)``, its ValueError naming ``key``."""
    try:
        return check(value)
    except ValueError as e:
        raise ValueError(f'"{key}": {e}') from None


def _short(value: object, limit: int = 80) -> str:
    text = render(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_name(name: str) -> str:
    return "all server names" if name == ANY_NAME else f"server name {render(name)}"


def _describe_pattern(pattern: str) -> str:
    return f"{render(pattern)} (all server names)" if pattern == ANY_NAME else render(pattern)
