"""The persistent claims records: what the daemon writes to ``claims.json`` so that claims
survive its restart (``claims_snapshot``), and how a record read back is checked
(``_parse_record``, for ``reserve_claims``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerd.daemon.config import (
    check_alpn,
    check_app_name,
    check_server_name,
)
from steerd.daemon.registry.model import ANY_NAME, Reservation, _App, _checked, _short


class RecordsMixin:
    """The claims records of :class:`~steerd.daemon.registry.Registry`."""

    # The registry's state this part reads or writes (made in Registry.__init__, facade.py).
    worker_slots: int
    _orphans: set[int]
    _orphan_records: list[Reservation]
    _reservations: list[Reservation]
    _apps: dict[str, _App]

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
