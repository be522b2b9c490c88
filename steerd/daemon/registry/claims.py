"""Claim checks: what a register request may claim, and against whose claims.

The request's fields (ALPNs, server names, workers, steering), the ACL, the app name's holder,
the per-app generation limit, conflicts and the no-cross-uid-shadowing rule. Every check only
reads the registry's state (``_apps``, ``_claims``, ``acl``) and raises ``RegistryError``; the
order :meth:`Registry.register` calls them in decides which refusal a bad request gets."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from steerd.app.protocol import CID_MODES, LEARNED_CID_LEN, Steering
from steerd.daemon.config import (
    AclRule,
    check_alpn,
    check_server_name,
    render,
)
from steerd.daemon.registry.model import (
    ANY_NAME,
    MAX_LEARNED_LENGTHS,
    Peer,
    RegistryError,
    Reservation,
    _App,
    _describe_name,
    _describe_pattern,
    broader,
    covers,
)


class ClaimsMixin:
    """The claim and ACL checks of :class:`~steerd.daemon.registry.Registry`."""

    # The registry's state this part reads or writes (made in Registry.__init__, facade.py).
    acl: tuple[AclRule, ...]
    workers_per_app: int
    app_generations: int | None
    _apps: dict[str, _App]
    _claims: dict[tuple[str, str], str]

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

    @staticmethod
    def _kept_pairs(record: _App | None, resumed: Reservation | None) -> set[tuple[str, str]]:
        """Claims held before this request are not new claims: shadowing is judged when a
        claim is first made, not again on every graceful restart or daemon restart."""
        kept: set[tuple[str, str]] = set(resumed.pairs()) if resumed is not None else set()
        if record is not None and record.active is not None:
            kept.update((a, n) for a in record.active.alpns for n in record.active.server_names)
        return kept

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
