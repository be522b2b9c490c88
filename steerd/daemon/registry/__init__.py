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

Where each part lives (``Registry``, in facade.py, mixes them in): claims.py checks a claim,
slots.py allocates and frees slots, reservations.py holds and resumes a previous run's claims,
records.py reads and writes the persistent records, generations.py drains and removes
generations, decide.py picks the worker for a ClientHello; model.py holds the records.
"""

from steerd.daemon.registry.facade import Registry
from steerd.daemon.registry.model import (
    ANY_NAME,
    MAX_LEARNED_LENGTHS,
    MAX_NAME_LEN,
    Counts,
    Decision,
    Generation,
    Peer,
    RegistryError,
    Reservation,
    Worker,
    broader,
    covers,
    server_id,
)

__all__ = [
    "ANY_NAME",
    "MAX_LEARNED_LENGTHS",
    "MAX_NAME_LEN",
    "Counts",
    "Decision",
    "Generation",
    "Peer",
    "Registry",
    "RegistryError",
    "Reservation",
    "Worker",
    "broader",
    "covers",
    "server_id",
]
