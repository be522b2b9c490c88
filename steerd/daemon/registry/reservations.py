"""Reservations and resume: the claims of a previous daemon run's apps, held until they
resume (``register(resume=...)``), their slots close, or the reservation expires.

State: ``_reservations`` (in force) and ``_orphan_records`` (whose each orphaned slot is, for
the uid slot limit); reads ``_orphans`` (slots.py) and ``_claims``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from steerd.daemon.config import (
    render,
)
from steerd.daemon.registry.model import (
    Peer,
    RegistryError,
    Reservation,
    _describe_name,
    _describe_pattern,
    broader,
)


class ReservationsMixin:
    """Reservations and resume of :class:`~steerd.daemon.registry.Registry`."""

    # The registry's state this part reads or writes (made in Registry.__init__, facade.py).
    clock: Callable[[], float]
    _orphans: set[int]
    _orphan_records: list[Reservation]
    _reservations: list[Reservation]
    _claims: dict[tuple[str, str], str]

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

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """The reservations still in force (expired or dead ones are dropped on the way)."""
        self._prune(self.clock())
        return tuple(self._reservations)

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
