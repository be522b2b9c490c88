"""Which app owns which ALPN and server name, and which worker gets the next connection.

Pure logic, no I/O: the control server feeds it requests (with the peer's credentials already
resolved into a ``Peer``) and the classifier asks it ``decide(sni, alpns)``. Keeping it free
of sockets, files and the system clock (time comes from an injected ``clock``) lets every
rule below be unit-tested exactly.

Model:
- An *app* (a name such as ``web``) has one or more *generations*. Registering an existing
  name with ``replace`` starts a new generation; the previous one *drains*: it gets no new
  connections but keeps its worker slots, because the CIDs of its live connections name those
  slots and the kernel keeps steering their packets there until the old process exits
  (its control connection closes). That is a graceful restart.
- Each generation has *workers*, each with a *slot* from a bounded pool: the index in the BPF
  sockarray and the number encoded in every server CID the worker issues. Slots are handed
  out least-recently-freed first, so a slot that just lost its worker is reused as late as
  possible (stray packets for its old connections then meet the classifier, not a stranger),
  and a slot is never handed out while any generation, draining or not, holds it. A freed
  slot is also *quarantined* for ``slot_quarantine`` seconds (the daemon passes
  ``limits.route_ttl``): first-flight routes in the kernel name slots for that long, so a
  different app given the slot sooner could receive the old app's stragglers. The same app
  (same name and uid) takes its own quarantined slots back first, at once: the stragglers
  are its own, and a churning app then does not quarantine the whole pool for everyone.
- *Claims* are (ALPN, server name) pairs of the newest non-draining generation of each app;
  the server name is exact (``example.com``), a suffix wildcard (``*.example.com``) or all
  names (``*``, written as no server names in a register request). Two apps may not hold the
  same pair; different specificity is fine (exact beats wildcard beats all) -- but a claim
  more specific than another uid's takes that uid's traffic for the name, so it is a
  *shadowing* claim and needs the operator's explicit say-so (see ``register``).
- Every connection-oriented operation names an *owner* (the control connection); only the
  owner of a generation may drain, deregister or report load for it, and when the owner goes
  away all its generations go with it.
- A daemon restart empties the table while apps keep serving on their *orphaned* slots. The
  daemon persists ``claims_snapshot()`` and, at start-up, hands the records of still-living
  slots back to ``reserve_claims``: their claims are *reserved* for a while, so that nobody
  can take an app's names in the window before it resumes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quic.cid import CidLayout
from steerd.app.protocol import CID_MODES, LAYOUT, LEARNED_CID_LEN, Steering
from steerd.daemon.config import (
    AclRule,
    Config,
    PolicyConfig,
    check_alpn,
    check_app_name,
    check_server_name,
    render,
)

ANY_NAME = "*"
MAX_LEARNED_LENGTHS = 4  # steerd/bpf/steerd.h STEERD_MAX_LEARN_LENGTHS: a lookup per length
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


class Registry:
    """The app table. Not thread-safe: one owner (the daemon's event loop) calls it.

    ``slot_quarantine``: seconds a freed slot stays out of reach of other apps (see the
    module docstring); 0 turns the quarantine off. ``clock``: monotonic seconds, the same
    clock the caller uses for ``reserve_claims(until=...)``.

    Tenant limits (``[limits]``, docs/SECURITY.md §2.6; None: no limit):
    ``uid_worker_slots`` bounds the slots one uid other than 0 holds, draining generations
    and slots awaiting its resume included ("uid_slots", see :meth:`uid_slots`);
    ``app_generations`` bounds the generations one app has at once, for every uid
    ("generations"). Neither ever refuses a resume.
    """

    def __init__(
        self,
        layout: CidLayout,
        policy: PolicyConfig,
        acl: Sequence[AclRule],
        worker_slots: int,
        workers_per_app: int,
        *,
        slot_quarantine: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        uid_worker_slots: int | None = None,
        app_generations: int | None = None,
        learned_slots: int | None = None,
    ) -> None:
        self.layout = layout
        self.policy = policy
        self.acl = tuple(acl)
        self.worker_slots = worker_slots
        self.workers_per_app = workers_per_app
        self.slot_quarantine = slot_quarantine
        self.clock = clock
        self.uid_worker_slots = uid_worker_slots
        self.app_generations = app_generations
        # Worker slots in learned mode at once, at most: the kernel's learned tables are
        # sized for that many slots' quotas ([limits] learned_slots, checked in config).
        self.learned_slots = learned_slots
        # Least recently freed first. Never-used slots count as freed long ago by nobody.
        self._free: deque[_FreeSlot] = deque(
            _FreeSlot(slot, -math.inf) for slot in range(worker_slots)
        )
        # Slots whose sockets a previous daemon run handed out and that are still in the data
        # plane: their apps keep serving (their CIDs name these slots) and are expected to
        # re-register with "resume". Never handed to anyone else meanwhile.
        self._orphans: set[int] = set()
        # Whose those orphans are, as the previous run's records say (draining generations'
        # too; no two records share a slot): they count against that uid's slot limit until
        # resumed or closed, and are persisted again for the next run (claims_snapshot).
        self._orphan_records: list[Reservation] = []
        self._reservations: list[Reservation] = []
        self._apps: dict[str, _App] = {}
        self._claims: dict[tuple[str, str], str] = {}  # (alpn, name pattern) -> app
        self._next_generation: dict[str, int] = {}
        # ALPN rank under server preference; ALPNs not listed rank after, in client order.
        self._server_rank = {a: i for i, a in enumerate(policy.alpn_order)}

    @classmethod
    def from_config(
        cls, config: Config, *, clock: Callable[[], float] = time.monotonic
    ) -> Registry:
        limits = config.limits
        return cls(config.cid, config.policy, config.acl, limits.worker_slots,
                   limits.workers_per_app, slot_quarantine=limits.route_ttl, clock=clock,
                   uid_worker_slots=limits.uid_worker_slots,
                   app_generations=limits.app_generations,
                   learned_slots=limits.learned_slots)

    # -- registration -------------------------------------------------------------------

    def register(
        self,
        app: str,
        alpns: Sequence[str],
        server_names: Sequence[str],
        workers: int,
        replace: bool,
        peer: Peer,
        owner: Hashable,
        resume: Sequence[int] | None = None,
        steering: Steering = LAYOUT,
    ) -> Generation:
        """Start a generation of ``app``; the previous one (if any, and ``replace``) drains.

        ``steering``: how its packets are steered (see :class:`Steering`). The data plane
        looks learned CIDs up once per length in use, so at most MAX_LEARNED_LENGTHS
        distinct lengths may be registered at once ("too_many_lengths").

        ``resume``: the orphaned slots (see :meth:`reserve_orphans`) an app that survived a
        daemon restart still serves; the generation takes exactly those (the caller has
        checked the app holds their sockets), instead of fresh ones.

        No cross-uid shadowing: a claim of (ALPN, N) is refused ("conflict") when another
        app, registered by a different uid, holds (ALPN, P) for a broader pattern P that
        covers N -- the new claim would silently take N's traffic from it (``decide`` prefers
        the more specific claim) -- unless the ACL grants the peer N through a pattern that
        does not cover P: the operator then gave this uid something narrower than what the
        other app holds, so taking N is intended. Root is exempt (it bypasses the ACL), and
        so is a peer shadowing its own uid's claims. The check is made at claim time, against
        the claims that exist then: a specific claim made while nobody held a broader one
        stands when a broader claim arrives later (that one shadows nothing). So an ACL that
        grants a uid a name only through a broad pattern still lets it take names nobody holds
        yet; grant narrow patterns where that matters.

        Reservations (see :meth:`reserve_claims`): a register that is not the resume of a
        reservation may not claim a reserved pair, shadow one (under the rule above, with
        the reservation's uid), or use a reserved app name ("reserved"). The resume of a
        reservation (same app name and uid, slots among the reserved ones) consumes it, and
        its reserved pairs are exempt from the shadowing rule (live or reserved): they were
        held before the restart, whichever order the apps come back in. Likewise a
        ``replace`` keeps the pairs the replaced generation held without a new shadowing
        check, so an app's graceful restart cannot be blocked by a broader claim that
        arrived after its own; a fresh register after a deregister is a new claim.

        Root is bound by reservations of exact pairs and app names (taking one would make
        the resume fail); it is exempt only from the shadowing part, as above.
        """
        app = self._check("app", app, check_app_name)
        clean_alpns = self._clean_alpns(alpns)
        names = self._clean_server_names(server_names)
        self._check_workers_and_replace(workers, replace)
        pairs = [(alpn, name) for alpn in clean_alpns for name in names]
        self._check_steering(steering)
        self._check_acl(pairs, peer)
        record = self._apps.get(app)
        self._check_app_holder(app, record, replace, peer)
        if resume is None:
            self._check_generations(record)
        self._check_conflicts(app, pairs)
        self._check_resume(resume, workers)

        now = self.clock()
        self._prune(now)
        resumed = self._resumed_reservation(app, peer.uid, resume)
        kept = self._kept_pairs(record, resumed)
        self._check_reservations(app, pairs, peer, resumed, kept, now)
        self._check_shadowing(app, [p for p in pairs if p not in kept], peer)
        chosen: list[_FreeSlot] = []
        if resume is None:
            self._check_uid_slots(peer.uid, workers)
            self._check_learned_slots(steering, workers)
            chosen = self._choose_slots(app, peer.uid, workers, now)

        # Everything checked: now change state (nothing below can fail).
        if record is None:
            record = self._apps[app] = _App(app)
        replaced = self._retire_active(record)
        number = self._next_generation.get(app, 0) + 1
        self._next_generation[app] = number
        slots = self._take_slots(resume, resumed, chosen)
        generation = Generation(
            app=app, number=number, owner=owner, uid=peer.uid, alpns=clean_alpns,
            server_names=names,
            workers=[Worker(slot=s, server_id=server_id(self.layout, s)) for s in slots],
            replaced=replaced, steering=steering,
        )
        record.generations.append(generation)
        for pair in pairs:
            self._claims[pair] = app
        return generation

    # The steps of register, in the order it takes them: checks first (their order decides
    # which refusal a bad request gets), then the state changes, which cannot fail.

    def _clean_alpns(self, alpns: Sequence[str]) -> tuple[str, ...]:
        """The claimed ALPNs, held to the config's rules: an ACL rule can then never name
        an ALPN a request could not claim, nor a request claim one no rule could grant."""
        if not isinstance(alpns, list | tuple) or not alpns:
            raise RegistryError(
                "bad_request", f'"alpn" must be a non-empty list of strings, got {render(alpns)}'
            )
        return self._unique("alpn", [self._check("alpn", a, check_alpn) for a in alpns])

    def _clean_server_names(self, server_names: Sequence[str]) -> tuple[str, ...]:
        """The claimed names, lowercased as ``decide`` compares them; no names means all
        names, spelt ``("*",)`` so that claims of "all" and of "*" are one and the same."""
        if not isinstance(server_names, list | tuple):
            raise RegistryError(
                "bad_request",
                f'"server_names" must be a list of strings, got {render(server_names)}',
            )
        names = self._unique(
            "server_names",
            [self._check("server_names", n, check_server_name) for n in server_names],
        )
        if not names or ANY_NAME in names:
            if len(names) > 1:
                raise RegistryError(
                    "bad_request", '"server_names": "*" (all names) cannot be combined with names'
                )
            names = (ANY_NAME,)
        return names

    def _check_workers_and_replace(self, workers: int, replace: bool) -> None:
        """The request's scalars come from JSON, so their types are checked, not assumed: a
        ``true`` for ``workers`` would otherwise count as one worker."""
        if (
            isinstance(workers, bool) or not isinstance(workers, int)
            or not 1 <= workers <= self.workers_per_app
        ):
            raise RegistryError(
                "bad_request",
                f'"workers" must be an integer 1..{self.workers_per_app}, got {render(workers)}',
            )
        if not isinstance(replace, bool):
            raise RegistryError(
                "bad_request", f'"replace" must be true or false, got {render(replace)}'
            )

    def _check_acl(self, pairs: Sequence[tuple[str, str]], peer: Peer) -> None:
        """The operator decides who may serve what: every pair needs a rule granting it."""
        for alpn, name in pairs:
            if not self._allowed(peer, alpn, name):
                raise RegistryError(
                    "acl_denied",
                    f"uid {peer.uid} may not claim ALPN {render(alpn)} for "
                    f"{_describe_name(name)}",
                )

    def _check_app_holder(
        self, app: str, record: _App | None, replace: bool, peer: Peer
    ) -> None:
        """An app name belongs to the uid that holds it, so another user cannot restart
        someone else's app into their own; and a second register of a live app is refused
        unless it asks to ``replace`` it, so a misconfigured duplicate cannot silently take
        over."""
        if record is None or not record.generations:
            return
        holder = record.generations[-1]
        if holder.uid != peer.uid and peer.uid != 0:
            raise RegistryError(
                "not_owner", f"app {render(app)} belongs to uid {holder.uid}; "
                f"uid {peer.uid} may not replace it",
            )
        if record.active is not None and not replace:
            raise RegistryError(
                "exists",
                f"app {render(app)} is already registered (generation "
                f"{record.active.number}); send \"replace\": true to start a new generation",
            )

    def _check_generations(self, record: _App | None) -> None:
        """A replace leaves the old generation draining with its slots until its process
        exits, so without a bound an app that replaces and never lets the old one go keeps
        adding generations (and slots) for ever. Root too: a legitimate app needs its live
        generation and a draining one or two, so this stops a replace loop, not a use."""
        limit = self.app_generations
        if record is None or limit is None or len(record.generations) < limit:
            return
        draining = sum(g.draining for g in record.generations)
        raise RegistryError(
            "generations",
            f"app {render(record.name)} has {len(record.generations)} generations "
            f"({len(record.generations) - draining} active, {draining} draining): the limit is "
            f"{limit} per app ([limits] app_generations); a draining generation must exit "
            "(deregister or close its control connection) before another replace",
        )

    def uid_slots(self, uid: int) -> int:
        """The worker slots ``uid`` holds: its generations' (draining ones too: their slots
        stay taken until they exit) and, after a daemon restart, the orphans the previous
        run's records give it (draining or not) until they are resumed or closed: its
        processes still hold them, so a fresh register must not spend its share again."""
        held = sum(len(g.workers) for a in self._apps.values() for g in a.generations
                   if g.uid == uid)
        return held + sum(len(r.slots & self._orphans) for r in self._orphan_records
                          if r.uid == uid)

    def _check_uid_slots(self, uid: int, workers: int) -> None:
        """One tenant must not take the pool from the others (three replaces of 64 workers
        used to hold 192 of 256 slots). Root is exempt: a uid-0 process can signal the
        root daemon or rewrite its config without any capability, so a limit would not hold
        it, and the global pool still bounds it. A resume is never checked (the caller
        skips it): its slots are the uid's already, whatever the limit says now."""
        limit = self.uid_worker_slots
        if limit is None or uid == 0:
            return
        held = self.uid_slots(uid)
        if held + workers > limit:
            raise RegistryError(
                "uid_slots",
                f"uid {uid} holds {held} worker slots (draining generations and slots awaiting "
                f"a resume included) and asks for {workers}: the limit is {limit} per uid "
                "([limits] uid_worker_slots)",
            )

    def _check_conflicts(self, app: str, pairs: Sequence[tuple[str, str]]) -> None:
        """A pair has one owner, or ``decide`` could not say whose a connection is."""
        for alpn, name in pairs:
            other = self._claims.get((alpn, name))
            if other is not None and other != app:
                raise RegistryError(
                    "conflict",
                    f"ALPN {render(alpn)} for {_describe_name(name)} is already claimed by "
                    f"app {render(other)}",
                )

    def _check_resume(self, resume: Sequence[int] | None, workers: int) -> None:
        """Only orphans can be resumed: a slot that is free or held by a live generation
        would hand the resuming app someone else's connections."""
        if resume is None:
            return
        bad = [slot for slot in resume if slot not in self._orphans]
        if bad or len(set(resume)) != len(resume) or len(resume) != workers:
            raise RegistryError(
                "bad_resume",
                f"cannot resume slots {list(resume)}: only slots a previous daemon run "
                f"handed out and still in the data plane can be resumed, once each "
                f"(resumable: {sorted(self._orphans)})",
            )

    @staticmethod
    def _kept_pairs(record: _App | None, resumed: Reservation | None) -> set[tuple[str, str]]:
        """Claims held before this request are not new claims: shadowing is judged when a
        claim is first made, not again on every graceful restart or daemon restart."""
        kept: set[tuple[str, str]] = set(resumed.pairs()) if resumed is not None else set()
        if record is not None and record.active is not None:
            kept.update((a, n) for a in record.active.alpns for n in record.active.server_names)
        return kept

    def _retire_active(self, record: _App) -> Generation | None:
        """The app's current generation starts draining, keeping its slots for its live
        connections; it is returned so that ``undo`` can bring it back should the new one
        fail to get its sockets. Only the newest generation may be undone: no chains."""
        replaced = record.active
        for g in record.generations:
            g.replaced = None
        if replaced is not None:
            self._set_draining(replaced)
        return replaced

    def _take_slots(
        self, resume: Sequence[int] | None, resumed: Reservation | None,
        chosen: list[_FreeSlot],
    ) -> list[int]:
        """The new generation's slots leave the pool they wait in, so nobody else gets them:
        a resume's orphans (its reservation has done its job), or the chosen free slots."""
        if resume is not None:
            slots = list(resume)
            self._orphans.difference_update(slots)
            if resumed is not None:
                self._reservations.remove(resumed)
            return slots
        taken = {f.slot for f in chosen}
        self._free = deque(f for f in self._free if f.slot not in taken)
        return [f.slot for f in chosen]

    def reserve_orphans(self, slots: Iterable[int]) -> None:
        """At start-up: these slots still hold a previous run's worker sockets."""
        wanted = set(slots)
        kept: deque[_FreeSlot] = deque()
        for f in self._free:
            if f.slot in wanted:
                self._orphans.add(f.slot)
            else:
                kept.append(f)
        self._free = kept

    def reserve_claims(self, records: Iterable[Mapping[str, Any]], until: float) -> list[str]:
        """At start-up, after :meth:`reserve_orphans`: hold the claims of the generations a
        previous run persisted (``claims_snapshot`` records) for their apps to resume.

        A record's reservation lasts until ``until`` (clock time), its app resumes, or none
        of its slots is an orphan any more. The records come from a file that may be corrupt
        or stale, so each is checked and skipped (with a reason, returned for the log) when
        malformed, when none of its slots is an orphan, when it shares a slot or a claim with
        an earlier record or a live claim. Draining records reserve nothing: they held no
        claims (their app's newer generation did).
        """
        skipped: list[str] = []
        now = self.clock()
        self._prune(now)
        taken_slots = {s for r in self._reservations for s in r.slots}
        taken_pairs = {p for r in self._reservations for p in r.pairs()}
        for i, raw in enumerate(records):
            try:
                res, draining = self._parse_record(raw, until)
            except ValueError as e:
                text = str(e)  # the checks quote values: keep a corrupt file's log line short
                skipped.append(f"record {i}: {text if len(text) <= 200 else text[:197] + '...'}")
                continue
            owned = res.slots & self._orphans
            for known in self._orphan_records:
                owned -= known.slots
            if owned:  # whose, for the uid slot limit
                self._orphan_records.append(Reservation(res.app, res.uid, res.alpns,
                                                        res.server_names, owned, until))
            if draining:
                continue
            if until <= now:
                skipped.append(f"record {i} (app {render(res.app)}): expired already")
                continue
            if not res.slots & self._orphans:
                skipped.append(
                    f"record {i} (app {render(res.app)}): none of its slots awaits a resume"
                )
                continue
            if res.slots & taken_slots:
                skipped.append(
                    f"record {i} (app {render(res.app)}): slots "
                    f"{sorted(res.slots & taken_slots)} are reserved by an earlier record"
                )
                continue
            clash = next(
                (p for p in res.pairs() if p in taken_pairs or p in self._claims), None
            )
            if clash is not None:
                skipped.append(
                    f"record {i} (app {render(res.app)}): ALPN {render(clash[0])} for "
                    f"{_describe_name(clash[1])} is already claimed or reserved"
                )
                continue
            res = Reservation(res.app, res.uid, res.alpns, res.server_names,
                              res.slots & self._orphans, until)
            self._reservations.append(res)
            taken_slots |= res.slots
            taken_pairs.update(res.pairs())
        return skipped

    def release_orphans(self, alive: Callable[[int], bool]) -> list[int]:
        """Free the orphaned slots whose sockets are gone (the app exited without resuming:
        the kernel took its sockets out of the data plane), and drop the reservations none
        of whose slots remains. Returns the freed slots; they are quarantined like any other
        freed slot, for the reservation's app if one names them, else for everyone."""
        now = self.clock()
        gone = [slot for slot in sorted(self._orphans) if not alive(slot)]
        for slot in gone:
            self._orphans.discard(slot)
            holder = next((r for r in self._reservations if slot in r.slots), None)
            self._free.append(_FreeSlot(slot, now, holder.app if holder else None,
                                        holder.uid if holder else None))
        self._prune(now)
        return gone

    @property
    def orphans(self) -> frozenset[int]:
        return frozenset(self._orphans)

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """The reservations still in force (expired or dead ones are dropped on the way)."""
        self._prune(self.clock())
        return tuple(self._reservations)

    def claims_snapshot(self) -> list[dict[str, Any]]:
        """What the daemon persists so that claims survive its restart (JSON-ready): one
        record per generation with ``app``, ``uid``, ``alpn``, ``server_names``, ``slots``
        and ``draining``; plus the reservations still awaiting their resume (as active
        records), so that a second restart before they resume does not forget them, and the
        other slots still awaiting a resume (as draining records: they reserve nothing, but
        still say whose the slots are, for the uid slot limit)."""
        out: list[dict[str, Any]] = [
            {
                "app": g.app, "uid": g.uid, "alpn": list(g.alpns),
                "server_names": list(g.server_names), "slots": [w.slot for w in g.workers],
                "draining": g.draining,
            }
            for a in sorted(self._apps.values(), key=lambda a: a.name)
            for g in a.generations
        ]
        out.extend(
            {
                "app": r.app, "uid": r.uid, "alpn": list(r.alpns),
                "server_names": list(r.server_names), "slots": sorted(r.slots),
                "draining": False,
            }
            for r in self.reservations
        )
        reserved = {s for r in self._reservations for s in r.slots}
        for r in self._orphan_records:
            if left := sorted((r.slots & self._orphans) - reserved):
                out.append({"app": r.app, "uid": r.uid, "alpn": list(r.alpns),
                            "server_names": list(r.server_names), "slots": left,
                            "draining": True})
        return out

    def undo(self, gen: Generation) -> list[int]:
        """Take back a registration that could not be completed (its sockets could not be
        made or handed over): remove ``gen`` and give the generation it replaced its claims
        back, as if the request had never come. Returns the freed slots."""
        old = gen.replaced  # read before _remove drops the link
        freed = self._remove([gen])
        record = self._apps.get(gen.app)
        if old is not None and record is not None and record.generations[-1:] == [old]:
            old.draining = False
            for alpn in old.alpns:
                for name in old.server_names:
                    self._claims.setdefault((alpn, name), old.app)
        return freed

    def drain(self, app: str, owner: Hashable) -> list[Generation]:
        """Stop giving new connections to the owner's generations of ``app``; they keep their
        slots (and so their existing connections) until deregistered or disconnected."""
        gens = self._owned(app, owner)
        for g in gens:
            self._set_draining(g)
        return gens

    def deregister(self, app: str, owner: Hashable) -> list[int]:
        """Remove the owner's generations of ``app``; returns the freed slots."""
        gens = self._owned(app, owner)
        return self._remove(gens)

    def disconnect(self, owner: Hashable) -> list[int]:
        """The owner is gone: remove every generation it held; returns the freed slots."""
        gens = [g for a in self._apps.values() for g in a.generations if g.owner == owner]
        return self._remove(gens)

    def slot_holder(self, slot: int) -> Generation | None:
        """The generation holding ``slot``, if any (the socket watchdog records whose
        sockets it watches)."""
        for record in self._apps.values():
            for gen in record.generations:
                if any(w.slot == slot for w in gen.workers):
                    return gen
        return None

    def evictees(self, uid: int, app: str | None = None) -> set[Hashable]:
        """The owners to disconnect to evict ``app`` of ``uid`` (every app of ``uid`` when
        None): every generation's, draining ones too. An app that changed one of its
        sockets, or a uid that replaced a group's program, keeps none of its slots; the
        disconnect then frees them as an app's exit does."""
        return {g.owner for a in self._apps.values() for g in a.generations
                if g.uid == uid and (app is None or g.app == app)}

    def report_load(self, app: str, owner: Hashable, loads: Mapping[int, float]) -> None:
        """Record the load of workers (any generation of ``app`` held by ``owner``)."""
        workers = {w.slot: w for g in self._owned(app, owner) for w in g.workers}
        for slot in loads:
            if slot not in workers:
                raise RegistryError(
                    "bad_request",
                    f"slot {render(slot)} is not a worker of app {render(app)} on this connection",
                )
        for slot, load in loads.items():
            workers[slot].load = float(load)
            workers[slot].assigned = 0

    # -- the decision ---------------------------------------------------------------------

    def decide(self, sni: str | None, alpns: Sequence[str]) -> Decision | None:
        """Pick app, generation and worker for a ClientHello, or None: close the connection.

        The ALPN order decides first (the client's, or the server's when the policy says so),
        the server name second: for each ALPN in order, an exact claim beats the longest
        wildcard claim, which beats an all-names claim. The protocol comes first because a
        client that prefers h3 over h3-29 wants h3 from whoever serves it.
        """
        order: Iterable[str] = alpns
        if self.policy.alpn_preference == "server" and self._server_rank:
            rank = self._server_rank
            last = len(rank)
            order = sorted(alpns, key=lambda a: rank.get(a, last))  # stable: client order after
        name = sni.lower().rstrip(".") if sni else None
        if name is not None and len(name) > MAX_NAME_LEN:
            name = None  # no claim can match it; and the suffix walk below stays bounded
        claims = self._claims
        for alpn in order:
            app = None
            if name is not None:
                app = claims.get((alpn, name))
                dot = name.find(".")
                while app is None and dot >= 0:
                    app = claims.get((alpn, "*" + name[dot:]))
                    dot = name.find(".", dot + 1)
            if app is None:
                app = claims.get((alpn, ANY_NAME))
            if app is not None:
                gen = self._apps[app].active
                if gen is not None:  # always, as claims only index active generations
                    return Decision(app, gen.number, self._pick(gen), alpn)
        if self.policy.no_owner == "default_app" and self.policy.default_app:
            record = self._apps.get(self.policy.default_app)
            gen = record.active if record else None
            if gen is not None:
                return Decision(gen.app, gen.number, self._pick(gen), None)
        return None

    @staticmethod
    def _pick(gen: Generation) -> int:
        """Least loaded worker when every worker has reported (reported load plus what we
        sent it since, so a burst between reports spreads out), else round-robin; ties go
        round-robin too."""
        workers = gen.workers
        n = len(workers)
        start = gen.cursor % n
        chosen = start
        if all(w.load is not None for w in workers):
            best = None
            for i in range(n):
                j = (start + i) % n
                w = workers[j]
                score = (w.load or 0.0) + w.assigned
                if best is None or score < best:
                    best, chosen = score, j
        w = workers[chosen]
        w.assigned += 1
        gen.cursor = chosen + 1
        return w.slot

    # -- views ----------------------------------------------------------------------------

    def learned_lengths(self) -> frozenset[int]:
        """The CID lengths of every learned-mode generation (draining ones too: their
        connections are still steered by what was learned)."""
        return frozenset(g.steering.cid_len for a in self._apps.values()
                         for g in a.generations if g.steering.learned)

    def _check_steering(self, steering: Steering) -> None:
        if steering.mode not in CID_MODES:
            raise RegistryError("bad_request", f'"cid_mode" must be "layout" or "learned", '
                                f"got {render(steering.mode)}")
        if not steering.learned:
            return
        low, high = LEARNED_CID_LEN
        if not low <= steering.cid_len <= high:
            raise RegistryError("bad_request", f'"cid_len" must be {low}..{high} in learned '
                                f"mode, got {render(steering.cid_len)}")
        lengths = self.learned_lengths()
        if steering.cid_len not in lengths and len(lengths) >= MAX_LEARNED_LENGTHS:
            raise RegistryError(
                "too_many_lengths",
                f"learned-mode apps already use {MAX_LEARNED_LENGTHS} CID lengths "
                f"({', '.join(map(str, sorted(lengths)))}); use one of them, or layout mode")

    def _check_learned_slots(self, steering: Steering, workers: int) -> None:
        """The learned tables hold learned_slots slots' quotas and unproven budgets (the
        config checks learned_capacity against that); more learned-mode slots would let
        them fill, and a full table refuses every app's new entries. Draining generations
        count (their entries live on). Root too: the tables are shared by every tenant. A
        resume is not checked: its slots and entries are in the tables already."""
        limit = self.learned_slots
        if limit is None or not steering.learned:
            return
        held = sum(len(g.workers) for a in self._apps.values() for g in a.generations
                   if g.steering.learned)
        if held + workers > limit:
            raise RegistryError(
                "learned_slots",
                f"{held} worker slots are in learned mode (draining generations included) and "
                f"{workers} more were asked for: the kernel's learned tables hold {limit} "
                "([limits] learned_slots); use layout mode (the steerd SDK) or fewer workers",
            )

    def generations(self, app: str) -> list[Generation]:
        record = self._apps.get(app)
        return list(record.generations) if record else []

    def counts(self) -> Counts:
        """Sizes for the gauges; ``free_slots`` counts quarantined slots too (they are free,
        only not yet for everyone; ``status()`` says how many are quarantined)."""
        gens = [g for a in self._apps.values() for g in a.generations]
        return Counts(
            apps=len(self._apps),
            active_generations=sum(not g.draining for g in gens),
            draining_generations=sum(g.draining for g in gens),
            workers=sum(len(g.workers) for g in gens),
            free_slots=len(self._free),
        )

    def status(self, viewer_uid: int | None = None) -> dict[str, Any]:
        """A JSON-ready snapshot for ``steerd status``.

        ``viewer_uid``: the asking peer's uid. None or 0 (root) sees everything; any other
        uid sees only the apps with a generation of its own and its own reservations, since
        another user's app names, claims and loads are none of its business. Slot totals
        stay: they explain a ``no_slots`` refusal without naming anyone.
        """
        now = self.clock()
        self._prune(now)
        everything = viewer_uid is None or viewer_uid == 0
        apps = [
            a for a in sorted(self._apps.values(), key=lambda a: a.name)
            if everything or any(g.uid == viewer_uid for g in a.generations)
        ]
        return {
            "apps": [
                {"app": a.name, "generations": [g.snapshot() for g in a.generations]}
                for a in apps
            ],
            "reserved": [
                r.snapshot(now) for r in self._reservations if everything or r.uid == viewer_uid
            ],
            "slots": {"total": self.worker_slots, "free": len(self._free),
                      "quarantined": sum(self._quarantine_left(f, now) > 0 for f in self._free),
                      "awaiting_resume": sorted(self._orphans)},
            "policy": {
                "no_owner": self.policy.no_owner, "default_app": self.policy.default_app,
                "alpn_preference": self.policy.alpn_preference,
                "alpn_order": list(self.policy.alpn_order),
            },
        }

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _check(key: str, value: Any, check: Any) -> Any:
        try:
            return check(value)
        except ValueError as e:
            raise RegistryError("bad_request", f'"{key}": {e}') from None

    @staticmethod
    def _unique(key: str, values: list[str]) -> tuple[str, ...]:
        seen: set[str] = set()
        for v in values:
            if v in seen:
                raise RegistryError("bad_request", f'"{key}": duplicate item {render(v)}')
            seen.add(v)
        return tuple(values)

    def _grants(self, peer: Peer, alpn: str) -> Iterator[str]:
        """The server-name patterns of the ACL rules that let ``peer`` claim ``alpn``."""
        gids = peer.all_gids
        for rule in self.acl:
            if not (
                peer.uid in rule.uids
                or (peer.user is not None and peer.user in rule.users)
                or not gids.isdisjoint(rule.gids)
                or not peer.group_names.isdisjoint(rule.groups)
            ):
                continue
            if "*" in rule.alpn or alpn in rule.alpn:
                yield from rule.server_names

    def _allowed(self, peer: Peer, alpn: str, name: str) -> bool:
        if peer.uid == 0:
            return True  # root could rewrite the config anyway
        return any(covers(p, name) for p in self._grants(peer, alpn))

    def _granted_within(self, peer: Peer, alpn: str, name: str, shadowed: str) -> bool:
        """Whether the ACL grants ``name`` to ``peer`` through a pattern narrower than (not
        covering) ``shadowed``: the operator's explicit say-so for shadowing it."""
        return any(
            covers(p, name) and not covers(p, shadowed) for p in self._grants(peer, alpn)
        )

    def _check_shadowing(self, app: str, pairs: Iterable[tuple[str, str]], peer: Peer) -> None:
        if peer.uid == 0:
            return
        for alpn, name in pairs:
            for pattern in broader(name):
                other = self._claims.get((alpn, pattern))
                if other is None or other == app:
                    continue
                holder = self._apps[other].active
                if holder is None or holder.uid == peer.uid:
                    continue
                if not self._granted_within(peer, alpn, name, pattern):
                    raise RegistryError(
                        "conflict",
                        f"ALPN {render(alpn)} for {_describe_name(name)} would shadow app "
                        f"{render(other)} (uid {holder.uid}), which claims it through "
                        f"{_describe_pattern(pattern)}; the ACL grants uid {peer.uid} this "
                        "name only through a pattern at least as broad",
                    )

    def _resumed_reservation(
        self, app: str, uid: int, resume: Sequence[int] | None
    ) -> Reservation | None:
        """The reservation a resume takes back: same app name and uid, and only its slots
        (a subset: workers that died meanwhile are simply not presented)."""
        if not resume:
            return None
        slots = set(resume)
        for r in self._reservations:
            if r.app == app and r.uid == uid and slots <= r.slots:
                return r
        return None

    def _check_reservations(
        self, app: str, pairs: Sequence[tuple[str, str]], peer: Peer,
        resumed: Reservation | None, kept: set[tuple[str, str]], now: float,
    ) -> None:
        for r in self._reservations:
            if r is resumed:
                continue
            reserved = set(r.pairs())
            ends = (
                "its workers are expected to resume after a daemon restart; the reservation "
                f"ends when they do or their slots close, at the latest in {r.until - now:.1f}s"
            )
            if r.app == app:
                raise RegistryError(
                    "reserved", f"app {render(app)} is reserved for uid {r.uid}: {ends}"
                )
            for alpn, name in pairs:
                if (alpn, name) in reserved:
                    raise RegistryError(
                        "reserved",
                        f"ALPN {render(alpn)} for {_describe_name(name)} is reserved for app "
                        f"{render(r.app)} (uid {r.uid}): {ends}",
                    )
                if peer.uid == 0 or r.uid == peer.uid or (alpn, name) in kept:
                    continue
                for pattern in broader(name):
                    if (alpn, pattern) in reserved and not self._granted_within(
                        peer, alpn, name, pattern
                    ):
                        raise RegistryError(
                            "reserved",
                            f"ALPN {render(alpn)} for {_describe_name(name)} would shadow "
                            f"{_describe_pattern(pattern)}, reserved for app {render(r.app)} "
                            f"(uid {r.uid}): {ends}",
                        )

    def _prune(self, now: float) -> None:
        """Drop the reservations past their time or without an orphaned slot left."""
        self._reservations = [
            r for r in self._reservations if now < r.until and r.slots & self._orphans
        ]

    def _quarantine_left(self, f: _FreeSlot, now: float) -> float:
        return self.slot_quarantine - (now - f.freed_at)

    def _choose_slots(self, app: str, uid: int, n: int, now: float) -> list[_FreeSlot]:
        """The ``n`` slots ``app`` (of ``uid``) gets: first its own still-quarantined ones
        (nobody else may have them yet, so taking them costs no one anything, and an app
        that churns keeps reusing a few slots instead of quarantining the whole pool), then
        the least recently freed of those out of quarantine."""
        own: list[_FreeSlot] = []
        others: list[_FreeSlot] = []
        waits: list[float] = []
        for f in self._free:
            left = self._quarantine_left(f, now)
            if left <= 0:
                others.append(f)
            elif f.app == app and f.uid == uid:
                own.append(f)
            else:
                waits.append(left)
        usable = own + others
        if len(usable) >= n:
            return usable[:n]
        message = (
            f"no free worker slots: {n} wanted, {len(usable)} free of {self.worker_slots}"
        )
        if waits:
            message += (
                f", and {len(waits)} more free but quarantined for up to {max(waits):.1f}s "
                f"(other apps left them less than {self.slot_quarantine:g}s ago; routes may "
                "still name them)"
            )
        raise RegistryError("no_slots", message)

    def _parse_record(self, raw: Any, until: float) -> tuple[Reservation, bool]:
        """A persisted record as a reservation, and whether it was draining (then it
        reserves nothing, but says whose its slots are); ValueError when malformed (its
        message quotes at most a little of a corrupt file)."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"not an object: {_short(raw)}")
        missing = [k for k in ("app", "uid", "alpn", "server_names", "slots") if k not in raw]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        draining = raw.get("draining", False)
        if not isinstance(draining, bool):
            raise ValueError(f'"draining" must be true or false, got {_short(draining)}')
        app = _checked("app", raw["app"], check_app_name)
        alpns, names = raw["alpn"], raw["server_names"]
        if not isinstance(alpns, list) or not alpns:
            raise ValueError(f'"alpn" must be a non-empty list, got {_short(alpns)}')
        if not isinstance(names, list):
            raise ValueError(f'"server_names" must be a list, got {_short(names)}')
        clean_alpns = tuple(_checked("alpn", a, check_alpn) for a in alpns)
        clean_names = tuple(_checked("server_names", n, check_server_name) for n in names)
        clean_names = clean_names or (ANY_NAME,)
        if len(set(clean_alpns)) != len(clean_alpns) or len(set(clean_names)) != len(
            clean_names
        ):
            raise ValueError("duplicate ALPNs or server names")
        if ANY_NAME in clean_names and len(clean_names) > 1:
            raise ValueError('"*" (all names) combined with names')
        uid = raw["uid"]
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2**32:
            raise ValueError(f'"uid" must be a uid, got {_short(uid)}')
        slots = raw["slots"]
        if (
            not isinstance(slots, list) or not slots
            or any(isinstance(s, bool) or not isinstance(s, int) for s in slots)
            or not all(0 <= s < self.worker_slots for s in slots)
            or len(set(slots)) != len(slots)
        ):
            raise ValueError(
                f'"slots" must be distinct slots 0..{self.worker_slots - 1}, got {_short(slots)}'
            )
        return Reservation(app, uid, clean_alpns, clean_names, frozenset(slots), until), draining

    def _owned(self, app: str, owner: Hashable) -> list[Generation]:
        record = self._apps.get(app)
        gens = [g for g in record.generations if g.owner == owner] if record else []
        if not gens:
            raise RegistryError(
                "not_registered", f"app {render(app)} has no generation on this connection"
            )
        return gens

    def _set_draining(self, gen: Generation) -> None:
        if gen.draining:
            return
        gen.draining = True
        for alpn in gen.alpns:
            for name in gen.server_names:
                if self._claims.get((alpn, name)) == gen.app:
                    del self._claims[(alpn, name)]

    def _remove(self, gens: list[Generation]) -> list[int]:
        """Remove generations; their slots go to the back of the free pool, quarantined
        for other apps from now."""
        now = self.clock()
        freed: list[int] = []
        for gen in gens:
            self._set_draining(gen)
            record = self._apps[gen.app]
            record.generations.remove(gen)
            gen.replaced = None
            for g in record.generations:
                if g.replaced is gen:
                    g.replaced = None  # gone: nothing to give its claims back to
            if not record.generations:
                del self._apps[gen.app]
            for w in gen.workers:
                self._free.append(_FreeSlot(w.slot, now, gen.app, gen.uid))
                freed.append(w.slot)
        return freed
