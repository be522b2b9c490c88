"""Worker slots: the free pool, its quarantine, orphans of a previous run, per-uid limits.

Where a slot is allocated (:meth:`SlotsMixin._choose_slots`, then ``_take_slots``) and counted
against its uid (``uid_slots``) or the learned tables (``_check_learned_slots``). The state:
``_free`` (least recently freed first) and ``_orphans``; freeing is ``Registry._remove``'s
(generations.py), which appends to ``_free``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence

from steerd.app.protocol import Steering
from steerd.daemon.registry.model import Generation, RegistryError, Reservation, _App, _FreeSlot


class SlotsMixin:
    """The slot pool of :class:`~steerd.daemon.registry.Registry`."""

    # The registry's state this part reads or writes (made in Registry.__init__, facade.py).
    worker_slots: int
    slot_quarantine: float
    clock: Callable[[], float]
    uid_worker_slots: int | None
    learned_slots: int | None
    _free: deque[_FreeSlot]
    _orphans: set[int]
    _orphan_records: list[Reservation]
    _reservations: list[Reservation]
    _apps: dict[str, _App]

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

    def slot_holder(self, slot: int) -> Generation | None:
        """The generation holding ``slot``, if any (the socket watchdog records whose
        sockets it watches)."""
        for record in self._apps.values():
            for gen in record.generations:
                if any(w.slot == slot for w in gen.workers):
                    return gen
        return None
