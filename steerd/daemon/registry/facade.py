"""``Registry``: the app table the control server, the classifier and the daemon call.

The class is a thin facade: its state is made here (``__init__``) and ``register`` runs the
steps of a registration in order; each part of the work lives in its own module, mixed in:

- claims.py (``ClaimsMixin``): request fields, ACL, conflicts, shadowing -- where a claim is
  checked;
- slots.py (``SlotsMixin``): the free pool, quarantine, orphans, per-uid and learned-mode
  slot limits -- where a slot is allocated;
- reservations.py (``ReservationsMixin``): a previous run's claims held for their resume;
- records.py (``RecordsMixin``): the persistent claims records (``claims.json``);
- generations.py (``GenerationsMixin``): drain, deregister, disconnect, undo, load reports;
- decide.py (``DecideMixin``): the steering decision for a ClientHello;
- model.py: the records and name rules they all share.

See the package docstring (steerd/daemon/registry/__init__.py) for the model."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from quic.cid import CidLayout
from steerd.app.protocol import LAYOUT, Steering
from steerd.daemon.config import (
    AclRule,
    Config,
    PolicyConfig,
    check_app_name,
)
from steerd.daemon.registry.claims import ClaimsMixin
from steerd.daemon.registry.decide import DecideMixin
from steerd.daemon.registry.generations import GenerationsMixin
from steerd.daemon.registry.model import (
    Counts,
    Generation,
    Peer,
    Reservation,
    Worker,
    _App,
    _FreeSlot,
    server_id,
)
from steerd.daemon.registry.records import RecordsMixin
from steerd.daemon.registry.reservations import ReservationsMixin
from steerd.daemon.registry.slots import SlotsMixin


class Registry(
    ClaimsMixin, SlotsMixin, ReservationsMixin, RecordsMixin, GenerationsMixin, DecideMixin
):
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

    # Longer than the other methods on purpose: its docstring is the claim rules' one
    # statement, and its body is the steps of a registration in order (each step a call).
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
