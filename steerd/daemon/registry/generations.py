"""Generations after registration: drain, deregister, disconnect, undo, evictees, load
reports; and ``_remove``, where a generation's slots go back to the free pool (quarantined)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Mapping

from steerd.daemon.config import (
    render,
)
from steerd.daemon.registry.model import Generation, RegistryError, _App, _FreeSlot


class GenerationsMixin:
    """Generation life of :class:`~steerd.daemon.registry.Registry`."""

    # The registry's state this part reads or writes (made in Registry.__init__, facade.py).
    clock: Callable[[], float]
    _free: deque[_FreeSlot]
    _apps: dict[str, _App]
    _claims: dict[tuple[str, str], str]

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

    def generations(self, app: str) -> list[Generation]:
        record = self._apps.get(app)
        return list(record.generations) if record else []

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
