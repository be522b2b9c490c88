"""The steering decision: which app, generation and worker a ClientHello goes to. The hot
path of the classifier: it reads ``_claims`` and ``_apps`` directly and never allocates a
slot."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from steerd.daemon.config import PolicyConfig
from steerd.daemon.registry.model import ANY_NAME, MAX_NAME_LEN, Decision, Generation, _App


class DecideMixin:
    """``decide`` of :class:`~steerd.daemon.registry.Registry`."""

    # The registry's state this part reads or writes (made in Registry.__init__, facade.py).
    policy: PolicyConfig
    _apps: dict[str, _App]
    _claims: dict[tuple[str, str], str]
    _server_rank: dict[str, int]

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
