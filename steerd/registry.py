"""Which app owns which ALPN and server name, and which worker gets the next connection.

Pure logic, no I/O: the control server feeds it requests (with the peer's credentials already
resolved into a ``Peer``) and the classifier asks it ``decide(sni, alpns)``. Keeping it free
of sockets and clocks lets every rule below be unit-tested exactly.

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
  and a slot is never handed out while any generation, draining or not, holds it.
- *Claims* are (ALPN, server name) pairs of the newest non-draining generation of each app;
  the server name is exact (``example.com``), a suffix wildcard (``*.example.com``) or all
  names (``*``, written as no server names in a register request). Two apps may not hold the
  same pair; different specificity is fine (exact beats wildcard beats all).
- Every connection-oriented operation names an *owner* (the control connection); only the
  owner of a generation may drain, deregister or report load for it, and when the owner goes
  away all its generations go with it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quic.cid import CidLayout
from steerd.config import (
    AclRule,
    Config,
    PolicyConfig,
    check_alpn,
    check_app_name,
    check_server_name,
    render,
)

ANY_NAME = "*"
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
    replaced: Generation | None = field(default=None, repr=False)  # for undo()

    @property
    def state(self) -> str:
        return "draining" if self.draining else "active"

    def snapshot(self) -> dict[str, Any]:
        return {
            "generation": self.number, "state": self.state, "uid": self.uid,
            "alpn": list(self.alpns), "server_names": list(self.server_names),
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


def _describe_name(name: str) -> str:
    return "all server names" if name == ANY_NAME else f"server name {render(name)}"


class Registry:
    """The app table. Not thread-safe: one owner (the daemon's event loop) calls it."""

    def __init__(
        self,
        layout: CidLayout,
        policy: PolicyConfig,
        acl: Sequence[AclRule],
        worker_slots: int,
        workers_per_app: int,
    ) -> None:
        self.layout = layout
        self.policy = policy
        self.acl = tuple(acl)
        self.worker_slots = worker_slots
        self.workers_per_app = workers_per_app
        self._free: deque[int] = deque(range(worker_slots))
        # Slots whose sockets a previous daemon run handed out and that are still in the data
        # plane: their apps keep serving (their CIDs name these slots) and are expected to
        # re-register with "resume". Never handed to anyone else meanwhile.
        self._orphans: set[int] = set()
        self._apps: dict[str, _App] = {}
        self._claims: dict[tuple[str, str], str] = {}  # (alpn, name pattern) -> app
        self._next_generation: dict[str, int] = {}
        # ALPN rank under server preference; ALPNs not listed rank after, in client order.
        self._server_rank = {a: i for i, a in enumerate(policy.alpn_order)}

    @classmethod
    def from_config(cls, config: Config) -> Registry:
        return cls(config.cid, config.policy, config.acl, config.limits.worker_slots,
                   config.limits.workers_per_app)

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
    ) -> Generation:
        """Start a generation of ``app``; the previous one (if any, and ``replace``) drains.

        ``resume``: the orphaned slots (see :meth:`reserve_orphans`) an app that survived a
        daemon restart still serves; the generation takes exactly those (the caller has
        checked the app holds their sockets), instead of fresh ones.
        """
        app = self._check("app", app, check_app_name)
        if not isinstance(alpns, list | tuple) or not alpns:
            raise RegistryError(
                "bad_request", f'"alpn" must be a non-empty list of strings, got {render(alpns)}'
            )
        clean_alpns = self._unique("alpn", [self._check("alpn", a, check_alpn) for a in alpns])
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

        for alpn in clean_alpns:
            for name in names:
                if not self._allowed(peer, alpn, name):
                    raise RegistryError(
                        "acl_denied",
                        f"uid {peer.uid} may not claim ALPN {render(alpn)} for "
                        f"{_describe_name(name)}",
                    )

        record = self._apps.get(app)
        if record is not None and record.generations:
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

        for alpn in clean_alpns:
            for name in names:
                other = self._claims.get((alpn, name))
                if other is not None and other != app:
                    raise RegistryError(
                        "conflict",
                        f"ALPN {render(alpn)} for {_describe_name(name)} is already claimed by "
                        f"app {render(other)}",
                    )

        if resume is not None:
            bad = [slot for slot in resume if slot not in self._orphans]
            if bad or len(set(resume)) != len(resume) or len(resume) != workers:
                raise RegistryError(
                    "bad_resume",
                    f"cannot resume slots {list(resume)}: only slots a previous daemon run "
                    f"handed out and still in the data plane can be resumed, once each "
                    f"(resumable: {sorted(self._orphans)})",
                )
        elif len(self._free) < workers:
            raise RegistryError(
                "no_slots",
                f"no free worker slots: {workers} wanted, {len(self._free)} free of "
                f"{self.worker_slots}",
            )

        # Everything checked: now change state (nothing below can fail).
        if record is None:
            record = self._apps[app] = _App(app)
        replaced = record.active
        if replaced is not None:
            self._set_draining(replaced)
        number = self._next_generation.get(app, 0) + 1
        self._next_generation[app] = number
        if resume is not None:
            slots = list(resume)
            self._orphans.difference_update(slots)
        else:
            slots = [self._free.popleft() for _ in range(workers)]
        generation = Generation(
            app=app, number=number, owner=owner, uid=peer.uid, alpns=clean_alpns,
            server_names=names,
            workers=[Worker(slot=s, server_id=server_id(self.layout, s)) for s in slots],
            replaced=replaced,
        )
        record.generations.append(generation)
        for alpn in clean_alpns:
            for name in names:
                self._claims[(alpn, name)] = app
        return generation

    def reserve_orphans(self, slots: Iterable[int]) -> None:
        """At start-up: these slots still hold a previous run's worker sockets."""
        for slot in slots:
            if slot in self._free:
                self._free.remove(slot)
                self._orphans.add(slot)

    def release_orphans(self, alive: Callable[[int], bool]) -> list[int]:
        """Free the orphaned slots whose sockets are gone (the app exited without resuming:
        the kernel took its sockets out of the data plane). Returns them."""
        gone = [slot for slot in self._orphans if not alive(slot)]
        for slot in gone:
            self._orphans.discard(slot)
            self._free.append(slot)
        return gone

    @property
    def orphans(self) -> frozenset[int]:
        return frozenset(self._orphans)

    def undo(self, gen: Generation) -> list[int]:
        """Take back a registration that could not be completed (its sockets could not be
        made or handed over): remove ``gen`` and give the generation it replaced its claims
        back, as if the request had never come. Returns the freed slots."""
        freed = self._remove([gen])
        old = gen.replaced
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

    def generations(self, app: str) -> list[Generation]:
        record = self._apps.get(app)
        return list(record.generations) if record else []

    def counts(self) -> Counts:
        gens = [g for a in self._apps.values() for g in a.generations]
        return Counts(
            apps=len(self._apps),
            active_generations=sum(not g.draining for g in gens),
            draining_generations=sum(g.draining for g in gens),
            workers=sum(len(g.workers) for g in gens),
            free_slots=len(self._free),
        )

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for ``steerd status``."""
        return {
            "apps": [
                {"app": a.name, "generations": [g.snapshot() for g in a.generations]}
                for a in sorted(self._apps.values(), key=lambda a: a.name)
            ],
            "slots": {"total": self.worker_slots, "free": len(self._free),
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

    def _allowed(self, peer: Peer, alpn: str, name: str) -> bool:
        if peer.uid == 0:
            return True  # root could rewrite the config anyway
        gids = peer.all_gids
        for rule in self.acl:
            if not (
                peer.uid in rule.uids
                or (peer.user is not None and peer.user in rule.users)
                or not gids.isdisjoint(rule.gids)
                or not peer.group_names.isdisjoint(rule.groups)
            ):
                continue
            if ("*" in rule.alpn or alpn in rule.alpn) and any(
                covers(p, name) for p in rule.server_names
            ):
                return True
        return False

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
        freed: list[int] = []
        for gen in gens:
            self._set_draining(gen)
            record = self._apps[gen.app]
            record.generations.remove(gen)
            if not record.generations:
                del self._apps[gen.app]
            for w in gen.workers:
                self._free.append(w.slot)
                freed.append(w.slot)
        return freed
