"""steerd.daemon.registry, the security rules: no cross-uid shadowing, claims reserved across a
daemon restart, quarantined slots, and status filtered by viewer. Exact, with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from quic.cid import CidLayout
from steerd.daemon.config import AclRule, Config, LimitsConfig, PolicyConfig
from steerd.daemon.registry import (
    Generation,
    Peer,
    Registry,
    RegistryError,
    Reservation,
    broader,
    covers,
)

ROOT = Peer(uid=0, gid=0)
A = Peer(uid=33, gid=33, user="www-data")
B = Peer(uid=1000, gid=1000, user="bob")
C = Peer(uid=1001, gid=1001, user="carol")

RESUME_HINT = ("its workers are expected to resume after a daemon restart; the reservation "
               "ends when they do or their slots close, at the latest in {}s")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rule(uid: int, *names: str, alpn: tuple[str, ...] = ("h3",)) -> AclRule:
    return AclRule(uids=(uid,), alpn=alpn, server_names=names)


def make(acl: tuple[AclRule, ...] = (), slots: int = 16, quarantine: float = 0.0,
         clock: Clock | None = None) -> Registry:
    return Registry(CidLayout(), PolicyConfig(), acl, slots, 8, slot_quarantine=quarantine,
                    clock=clock or Clock())


def reg(r: Registry, app: str, names: list[str] | None = None, peer: Peer = ROOT,
        owner: object = "c1", alpns: list[str] | None = None, workers: int = 1,
        replace: bool = False, resume: list[int] | None = None) -> Generation:
    return r.register(app, alpns or ["h3"], names or [], workers, replace, peer, owner,
                      resume=resume)


def refused(fn: Any, *args: Any, **kw: Any) -> tuple[str, str]:
    with pytest.raises(RegistryError) as e:
        fn(*args, **kw)
    return e.value.reason, str(e.value)


def shadow_message(name: str, app: str, uid: int, pattern: str, peer_uid: int) -> str:
    return (f'ALPN "h3" for {name} would shadow app "{app}" (uid {uid}), which claims it '
            f"through {pattern}; the ACL grants uid {peer_uid} this name only through a "
            "pattern at least as broad")


# -- no cross-uid shadowing ---------------------------------------------------------------


def test_broader_walks_like_decide() -> None:
    assert list(broader("a.b.c")) == ["*.b.c", "*.c", "*"]
    assert list(broader("*.b.c")) == ["*.c", "*"]
    assert list(broader("c")) == ["*"]
    assert list(broader("*")) == []
    for name in ("a.b.c", "*.b.c", "x.example.com"):
        assert all(covers(p, name) and p != name for p in broader(name))


def test_more_specific_claim_of_another_uid_is_refused() -> None:
    r = make((rule(33, "*.example.com"), rule(1000, "*", alpn=("h3", "h3-29"))))
    reg(r, "site", ["*.example.com"], peer=A, owner=1)
    assert refused(reg, r, "evil", ["victim.example.com"], peer=B, owner=2) == (
        "conflict",
        shadow_message('server name "victim.example.com"', "site", 33, '"*.example.com"', 1000),
    )
    assert refused(reg, r, "evil", ["*.deep.example.com"], peer=B, owner=2) == (
        "conflict",
        shadow_message('server name "*.deep.example.com"', "site", 33, '"*.example.com"', 1000),
    )
    # the name's traffic stays where it was, and the refusal left nothing behind
    assert r.decide("victim.example.com", ["h3"]).app == "site"
    assert r.generations("evil") == [] and r.counts().free_slots == 15
    # not shadowing: a name the pattern does not cover (the apex), or another ALPN
    reg(r, "apex", ["example.com"], peer=B, owner=2)
    reg(r, "old", ["victim.example.com"], alpns=["h3-29"], peer=B, owner=2)
    assert r.decide("example.com", ["h3"]).app == "apex"


def test_all_names_claim_is_protected_and_the_most_specific_is_named() -> None:
    r = make((rule(33, "*"), rule(1000, "*"), rule(1001, "*.example.com")))
    reg(r, "catchall", peer=A, owner=1)
    assert refused(reg, r, "evil", ["x.example.org"], peer=B, owner=2) == (
        "conflict", shadow_message('server name "x.example.org"', "catchall", 33,
                                   '"*" (all server names)', 1000))
    assert refused(reg, r, "evil", ["*.example.org"], peer=B, owner=2)[0] == "conflict"
    # carol's ACL is narrower than "*": the operator gave her example.com's subdomains
    reg(r, "carol", ["*.example.com"], peer=C, owner=3)
    # bob would shadow both; the most specific holder is named
    assert refused(reg, r, "evil", ["a.example.com"], peer=B, owner=2) == (
        "conflict",
        shadow_message('server name "a.example.com"', "carol", 1001, '"*.example.com"', 1000),
    )


@pytest.mark.parametrize(("grant", "claim"), [
    ("victim.example.com", "victim.example.com"),  # the exact name
    ("*.victim.example.com", "a.victim.example.com"),  # a narrower wildcard
    ("*.victim.example.com", "*.victim.example.com"),
])
def test_acl_granting_a_narrower_pattern_allows_shadowing(grant: str, claim: str) -> None:
    r = make((rule(33, "*.example.com"), rule(1000, "*", grant)))
    reg(r, "site", ["*.example.com"], peer=A, owner=1)
    reg(r, "mine", [claim], peer=B, owner=2)
    assert r.decide(claim.replace("*", "z"), ["h3"]).app == "mine"


def test_acl_grant_must_be_narrower_than_the_shadowed_claim() -> None:
    # bob's "*.example.com" is narrower than a "*" claim but not than a "*.example.com" one
    r = make((rule(33, "*"), rule(1000, "*.example.com"), rule(1001, "*.example.com")))
    reg(r, "catchall", peer=A, owner=1)
    reg(r, "bob", ["victim.example.com"], peer=B, owner=2)
    reg(r, "carol", ["*.example.com"], peer=C, owner=3)
    assert refused(reg, r, "bob2", ["other.example.com"], peer=B, owner=2) == (
        "conflict", shadow_message('server name "other.example.com"', "carol", 1001,
                                   '"*.example.com"', 1000))
    # a grant of the exact name for another ALPN does not count
    r2 = make((rule(33, "*"), rule(1000, "*"), rule(1000, "v.example", alpn=("h3-29",))))
    reg(r2, "catchall", peer=A, owner=1)
    assert refused(reg, r2, "bob", ["v.example"], peer=B, owner=2)[0] == "conflict"


def test_same_uid_and_root_may_shadow_but_roots_claims_are_protected() -> None:
    r = make((rule(33, "*", alpn=("*",)),))
    reg(r, "catchall", peer=A, owner=1)
    reg(r, "special", ["x.example"], peer=A, owner=1)  # same uid
    reg(r, "rootsite", ["y.example"], peer=ROOT, owner=2)  # root bypasses the ACL
    assert [r.decide(n, ["h3"]).app for n in ("x.example", "y.example", "z.example")] == [
        "special", "rootsite", "catchall"]
    reg(r, "rootdoq", alpns=["doq"], peer=ROOT, owner=2)
    assert refused(reg, r, "mydoq", ["x.example"], alpns=["doq"], peer=A, owner=1) == (
        "conflict",
        'ALPN "doq" for server name "x.example" would shadow app "rootdoq" (uid 0), which '
        'claims it through "*" (all server names); the ACL grants uid 33 this name only '
        "through a pattern at least as broad",
    )


def test_check_is_at_claim_time() -> None:
    """A specific claim made while nobody held a broader one stands, and survives its own
    graceful restarts; a fresh claim after it let go is judged anew."""
    r = make((rule(33, "*"), rule(1000, "*")))
    reg(r, "bob", ["victim.example.com"], peer=B, owner=2)  # nobody held a broader claim
    reg(r, "catchall", peer=A, owner=1)  # broader, later: shadows nothing
    assert r.decide("victim.example.com", ["h3"]).app == "bob"
    assert r.decide("other.example.com", ["h3"]).app == "catchall"
    # bob's graceful restart keeps what it held, but may not add a new shadowing name
    assert refused(reg, r, "bob", ["victim.example.com", "more.example.com"], peer=B, owner=3,
                   replace=True)[0] == "conflict"
    g = reg(r, "bob", ["victim.example.com"], peer=B, owner=3, replace=True)
    assert g.number == 2 and r.decide("victim.example.com", ["h3"]).app == "bob"
    # gone and back is a new claim
    r.disconnect(2)
    r.disconnect(3)
    assert refused(reg, r, "bob", ["victim.example.com"], peer=B, owner=4)[0] == "conflict"


def test_draining_claims_are_not_shadowed() -> None:
    r = make((rule(33, "*"), rule(1000, "*")))
    reg(r, "catchall", peer=A, owner=1)
    r.drain("catchall", 1)
    reg(r, "bob", ["x.example"], peer=B, owner=2)


# -- reservations across a daemon restart -------------------------------------------------


def record(app: str, uid: int, names: list[str], slots: list[int], draining: bool = False,
           alpn: list[str] | None = None) -> dict[str, Any]:
    return {"app": app, "uid": uid, "alpn": alpn or ["h3"], "server_names": names,
            "slots": slots, "draining": draining}


def test_claims_snapshot() -> None:
    r = make((rule(33, "*"),))
    reg(r, "web", ["example.com"], peer=A, owner=1, workers=2)
    reg(r, "web", ["example.com", "www.example.com"], peer=A, owner=2, replace=True)
    reg(r, "files", alpns=["smb"], owner=3)
    assert r.claims_snapshot() == [
        {"app": "files", "uid": 0, "alpn": ["smb"], "server_names": ["*"], "slots": [3],
         "draining": False},
        record("web", 33, ["example.com"], [0, 1], draining=True),
        record("web", 33, ["example.com", "www.example.com"], [2]),
    ]


def test_reserve_claims_validates_records() -> None:
    clock = Clock(100.0)
    r = make(slots=8, clock=clock)
    r.reserve_orphans([1, 2, 3, 4, 5])
    records: list[Any] = [
        record("web", 33, ["example.com"], [1, 2]),
        record("wild", 1001, ["*.example.org"], [3, 6]),  # 6 is not an orphan: dropped
        record("web", 33, ["example.com"], [4], draining=True),  # reserves nothing
        "garbage",
        record("x", 33, [], [7]),
        record("x", True, [], [4]),
        record("x", 33, ["example.com"], [4]),
        record("y", 33, ["y.example"], [2]),
        record("bad name", 33, [], [4]),
        {"uid": 33},
        record("z", 33, [], [99]),
        record("z", 33, ["*", "a.example"], [4]),
        {**record("z", 33, [], [4]), "alpn": ["x" * 300]},
    ]
    long_alpn = '"alpn": must be a string of 1..255 bytes, got "' + "x" * 300 + '"'
    assert r.reserve_claims(records, until=130.0) == [
        'record 3: not an object: "garbage"',
        'record 4 (app "x"): none of its slots awaits a resume',
        'record 5: "uid" must be a uid, got true',
        'record 6 (app "x"): ALPN "h3" for server name "example.com" is already claimed or '
        "reserved",
        'record 7 (app "y"): slots [2] are reserved by an earlier record',
        "record 8: \"app\": must be 1..64 characters of letters, digits, '.', '_' or '-', "
        'starting with a letter or digit, got "bad name"',
        "record 9: missing app, alpn, server_names, slots",
        'record 10: "slots" must be distinct slots 0..7, got [99]',
        'record 11: "*" (all names) combined with names',
        "record 12: " + long_alpn[:197] + "...",  # a corrupt file's log line stays short
    ]
    assert r.reservations == (
        Reservation("web", 33, ("h3",), ("example.com",), frozenset({1, 2}), 130.0),
        Reservation("wild", 1001, ("h3",), ("*.example.org",), frozenset({3}), 130.0),
    )
    # a second restart before they resume must not forget them, nor whose the draining
    # generation's slot is (the uid slot limit counts it)
    assert r.claims_snapshot() == [record("web", 33, ["example.com"], [1, 2]),
                                   record("wild", 1001, ["*.example.org"], [3]),
                                   record("web", 33, ["example.com"], [4], draining=True)]
    assert (r.uid_slots(33), r.uid_slots(1001)) == (3, 1)
    assert r.status()["reserved"] == [
        {"app": "web", "uid": 33, "alpn": ["h3"], "server_names": ["example.com"],
         "slots": [1, 2], "expires_in": 30.0},
        {"app": "wild", "uid": 1001, "alpn": ["h3"], "server_names": ["*.example.org"],
         "slots": [3], "expires_in": 30.0},
    ]
    clock.now = 130.0
    assert r.reserve_claims([record("late", 33, [], [5])], until=130.0) == [
        'record 0 (app "late"): expired already']
    assert r.reservations == ()


def reserved_registry(clock: Clock, quarantine: float = 0.0) -> Registry:
    r = make((rule(33, "*"), rule(1000, "*", alpn=("h3", "h3-29")), rule(1001, "*")),
             slots=8, clock=clock, quarantine=quarantine)
    r.reserve_orphans([1, 2, 3])
    assert r.reserve_claims([record("web", 33, ["example.com"], [1, 2]),
                             record("wild", 1001, ["*.example.org"], [3])], until=130.0) == []
    return r


def test_reserved_claims_are_refused_to_others_until_resumed() -> None:
    clock = Clock(100.0)
    r = reserved_registry(clock)
    clock.now = 112.5
    hint = RESUME_HINT.format("17.5")
    assert refused(reg, r, "mine", ["example.com"], peer=B, owner=2) == (
        "reserved",
        f'ALPN "h3" for server name "example.com" is reserved for app "web" (uid 33): {hint}')
    assert refused(reg, r, "mine", ["a.example.org"], peer=B, owner=2) == (
        "reserved",
        'ALPN "h3" for server name "a.example.org" would shadow "*.example.org", reserved for '
        f'app "wild" (uid 1001): {hint}')
    assert refused(reg, r, "web", ["other.example"], alpns=["h3-29"], peer=B, owner=2) == (
        "reserved", f'app "web" is reserved for uid 33: {hint}')
    # root may shadow (as ever) but not take the reserved pair or app name itself
    assert refused(reg, r, "mine", ["example.com"], peer=ROOT, owner=9)[0] == "reserved"
    assert refused(reg, r, "web", ["x.example"], peer=ROOT, owner=9)[0] == "reserved"
    reg(r, "rootsite", ["a.example.org"], peer=ROOT, owner=9)
    # the same uid may shadow its own reservation, not take it
    reg(r, "wild2", ["b.example.org"], peer=C, owner=3)
    assert refused(reg, r, "wild3", ["*.example.org"], peer=C, owner=3)[0] == "reserved"
    # a resume by another uid, or of slots not reserved for the app, is no resume of it
    assert refused(reg, r, "web", ["example.com"], peer=B, owner=2, resume=[1]) == (
        "reserved", f'app "web" is reserved for uid 33: {hint}')
    assert refused(reg, r, "web", ["example.com"], peer=A, owner=1, resume=[1, 3],
                   workers=2)[0] == "reserved"
    # the app's resume (of the workers still alive) takes the reservation back
    g = reg(r, "web", ["example.com"], peer=A, owner=1, resume=[2])
    assert [w.slot for w in g.workers] == [2]
    assert [res.app for res in r.reservations] == ["wild"]
    assert refused(reg, r, "mine", ["example.com"], peer=B, owner=2)[0] == "conflict"
    assert r.decide("example.com", ["h3"]).app == "web"


def test_reservation_ends_at_until() -> None:
    clock = Clock(100.0)
    r = reserved_registry(clock)
    clock.now = 129.9
    assert refused(reg, r, "mine", ["example.com"], peer=B, owner=2)[1].endswith(
        "at the latest in 0.1s")
    clock.now = 130.0
    reg(r, "mine", ["example.com"], peer=B, owner=2)
    reg(r, "mine2", ["a.example.org"], peer=B, owner=2)
    assert r.reservations == () and r.status()["reserved"] == []
    # the late app can still resume its slots, but not its lost name
    assert refused(reg, r, "web", ["example.com"], peer=A, owner=1, resume=[1, 2],
                   workers=2)[0] == "conflict"


def test_reservation_ends_when_its_slots_close() -> None:
    clock = Clock(100.0)
    r = reserved_registry(clock, quarantine=10.0)
    assert r.release_orphans(lambda slot: slot == 3) == [1, 2]  # web exited, wild lives
    assert [res.app for res in r.reservations] == ["wild"]
    reg(r, "mine", ["example.com"], peer=B, owner=2)
    # web's slots are quarantined for others, not for web itself
    assert refused(reg, r, "mine", ["example.com"], peer=B, owner=3, workers=5,
                   replace=True)[1].startswith("no free worker slots: 5 wanted, 4 free of 8, "
                                               "and 2 more free but quarantined")
    assert [w.slot for w in reg(r, "mine", ["example.com"], peer=B, owner=3,
                                workers=4, replace=True).workers] == [4, 5, 6, 7]
    g = reg(r, "web", ["web.example"], peer=A, owner=1, workers=2)
    assert [w.slot for w in g.workers] == [1, 2]
    assert r.release_orphans(lambda slot: False) == [3]
    assert r.reservations == ()


def test_resumes_restore_shadowing_claims_in_any_order() -> None:
    """Bob's exact claim predates Alice's catch-all; after a daemon restart both come back,
    whoever resumes first."""
    for order in (("catchall", "bob"), ("bob", "catchall")):
        r = make((rule(33, "*"), rule(1000, "*")), slots=4)
        r.reserve_orphans([0, 1])
        r.reserve_claims([record("catchall", 33, ["*"], [0]),
                          record("bob", 1000, ["victim.example.com"], [1])], until=130.0)
        args = {"catchall": ([], A, 0), "bob": (["victim.example.com"], B, 1)}
        for app in order:
            names, peer, slot = args[app]
            reg(r, app, names, peer=peer, owner=app, resume=[slot])
        assert r.decide("victim.example.com", ["h3"]).app == "bob"
        assert r.decide("x.example.com", ["h3"]).app == "catchall"
    # once the reservation has lapsed, bob's return is a new claim
    clock = Clock(100.0)
    r = make((rule(33, "*"), rule(1000, "*")), slots=4, clock=clock)
    r.reserve_orphans([0, 1])
    r.reserve_claims([record("catchall", 33, ["*"], [0]),
                      record("bob", 1000, ["victim.example.com"], [1])], until=130.0)
    reg(r, "catchall", peer=A, owner=1, resume=[0])
    clock.now = 131.0
    assert refused(reg, r, "bob", ["victim.example.com"], peer=B, owner=2,
                   resume=[1])[0] == "conflict"


# -- slot quarantine ----------------------------------------------------------------------


def test_freed_slots_are_quarantined_for_other_apps() -> None:
    clock = Clock(100.0)
    r = make((rule(33, "*", alpn=("*",)), rule(1000, "*", alpn=("*",))), slots=4,
             quarantine=10.0, clock=clock)
    reg(r, "a", alpns=["a"], peer=A, owner=1, workers=2)  # slots 0, 1
    reg(r, "b", alpns=["b"], peer=B, owner=2, workers=2)  # slots 2, 3
    assert r.deregister("a", 1) == [0, 1]
    assert r.counts().free_slots == 2  # free, quarantined or not
    assert r.status()["slots"] == {"total": 4, "free": 2, "quarantined": 2,
                                   "awaiting_resume": []}
    clock.now = 104.0
    assert refused(reg, r, "c", alpns=["c"], peer=B, owner=3) == (
        "no_slots",
        "no free worker slots: 1 wanted, 0 free of 4, and 2 more free but quarantined for "
        "up to 6.0s (other apps left them less than 10s ago; routes may still name them)",
    )
    # the same name under another uid is another app
    assert refused(reg, r, "a", alpns=["a"], peer=B, owner=3)[0] == "no_slots"
    # the app that left them may take them back at once (least recently freed first)
    assert [w.slot for w in reg(r, "a", alpns=["a"], peer=A, owner=1, workers=2).workers] == [
        0, 1]
    assert r.deregister("a", 1) == [0, 1]  # freed again at 104
    assert r.deregister("b", 2) == [2, 3]  # at 104 too
    clock.now = 110.0
    assert refused(reg, r, "c", alpns=["c"], peer=B, owner=3)[1] == (
        "no free worker slots: 1 wanted, 0 free of 4, and 4 more free but quarantined for "
        "up to 4.0s (other apps left them less than 10s ago; routes may still name them)")
    # b may take its own back, least recently freed first among those it may have
    assert [w.slot for w in reg(r, "b", alpns=["b"], peer=B, owner=2).workers] == [2]
    clock.now = 114.0
    assert r.status()["slots"]["quarantined"] == 0
    assert [w.slot for w in reg(r, "c", alpns=["c"], peer=B, owner=3, workers=3).workers] == [
        0, 1, 3]


def test_a_churning_app_reuses_its_own_slots_first() -> None:
    """Its own quarantined slots are useless to others for now: taking them first keeps the
    fresh ones for everyone (with no quarantine, least recently freed first as ever)."""
    clock = Clock(100.0)
    r = make(slots=4, quarantine=10.0, clock=clock)
    for i in range(5):
        g = reg(r, "churn", alpns=["c"], owner=i, workers=2)
        assert [w.slot for w in g.workers] == [0, 1]
        r.disconnect(i)
        clock.now += 1.0
    assert [w.slot for w in reg(r, "other", alpns=["o"], owner=9, workers=2).workers] == [2, 3]
    plain = make(slots=4)
    reg(plain, "churn", alpns=["c"], owner=1, workers=2)
    plain.disconnect(1)
    assert [w.slot for w in reg(plain, "churn", alpns=["c"], owner=2, workers=2).workers] == [
        2, 3]


def test_from_config_quarantines_for_route_ttl() -> None:
    clock = Clock(0.0)
    r = Registry.from_config(
        Config(limits=LimitsConfig(route_ttl=5.0, worker_slots=1)), clock=clock
    )
    assert r.slot_quarantine == 5.0
    reg(r, "a", alpns=["a"], owner=1)
    r.disconnect(1)
    assert refused(reg, r, "b", alpns=["b"], owner=2)[1] == (
        "no free worker slots: 1 wanted, 0 free of 1, and 1 more free but quarantined for up "
        "to 5.0s (other apps left them less than 5s ago; routes may still name them)")
    clock.now = 5.0
    reg(r, "b", alpns=["b"], owner=2)


# -- status by viewer ---------------------------------------------------------------------


def test_status_shows_a_user_only_its_own() -> None:
    clock = Clock(100.0)
    r = make((rule(33, "*", alpn=("*",)), rule(1000, "*", alpn=("*",))), slots=8, clock=clock)
    r.reserve_orphans([7])
    r.reserve_claims([record("gone", 1001, ["g.example"], [7])], until=110.0)
    reg(r, "alice", alpns=["a"], peer=A, owner=1)
    reg(r, "bob", alpns=["b"], peer=B, owner=2)
    reg(r, "bob", alpns=["b"], peer=ROOT, owner=3, replace=True)  # root took it over
    full = r.status()
    assert r.status(0) == full
    assert [a["app"] for a in full["apps"]] == ["alice", "bob"]
    assert [res["app"] for res in full["reserved"]] == ["gone"]
    mine = r.status(33)
    assert [a["app"] for a in mine["apps"]] == ["alice"] and mine["reserved"] == []
    bobs = r.status(1000)
    assert [a["app"] for a in bobs["apps"]] == ["bob"]
    assert [g["uid"] for g in bobs["apps"][0]["generations"]] == [1000, 0]
    assert r.status(1001)["apps"] == [] and len(r.status(1001)["reserved"]) == 1
    assert r.status(4242)["apps"] == [] and r.status(4242)["reserved"] == []
    for uid in (33, 1000, 1001, 4242):
        assert r.status(uid)["slots"] == full["slots"] == {
            "total": 8, "free": 4, "quarantined": 0, "awaiting_resume": [7]}
        assert r.status(uid)["policy"] == full["policy"]


# -- tenant limits (issue 18 item 6) ------------------------------------------------------


def limited(slots: int = 16, uid_slots: int = 6, generations: int = 3,
            clock: Clock | None = None) -> Registry:
    """A registry with the tenant limits on; A and B may claim anything."""
    return Registry(CidLayout(), PolicyConfig(), (rule(33, "*", alpn=("*",)),
                                                  rule(1000, "*", alpn=("*",))),
                    slots, 8, clock=clock or Clock(), uid_worker_slots=uid_slots,
                    app_generations=generations)


def uid_slots_message(uid: int, held: int, wanted: int, limit: int) -> str:
    return (f"uid {uid} holds {held} worker slots (draining generations and slots awaiting a "
            f"resume included) and asks for {wanted}: the limit is {limit} per uid ([limits] "
            "uid_worker_slots)")


def test_draining_generations_count_against_the_uids_slots() -> None:
    """The attack of issue 18: replace with many workers and keep the old generations
    draining. The slots they keep count, so the uid stops at its limit, the refusal
    changes nothing, and another uid still registers and replaces."""
    r = limited(uid_slots=6)
    reg(r, "big", alpns=["x"], peer=B, owner=1, workers=3)
    reg(r, "big", alpns=["x"], peer=B, owner=2, workers=3, replace=True)  # 1st drains: 6
    assert r.uid_slots(1000) == 6
    before = r.status()
    assert refused(reg, r, "big", alpns=["x"], peer=B, owner=3, workers=1, replace=True) == (
        "uid_slots", uid_slots_message(1000, 6, 1, 6))
    assert refused(reg, r, "other", alpns=["y"], peer=B, owner=3) == (
        "uid_slots", uid_slots_message(1000, 6, 1, 6))
    assert r.status() == before  # a refusal takes nothing and drains nothing
    # another tenant is unaffected: registers, replaces, up to its own limit
    reg(r, "web", alpns=["h3"], peer=A, owner=4, workers=3)
    reg(r, "web", alpns=["h3"], peer=A, owner=5, workers=3, replace=True)
    assert r.decide(None, ["h3"]).app == "web" and r.decide(None, ["x"]).app == "big"
    # once B's draining generation exits, its slots are B's to spend again
    r.disconnect(1)
    assert r.uid_slots(1000) == 3
    g = reg(r, "big", alpns=["x"], peer=B, owner=3, workers=3, replace=True)
    assert g.number == 3 and r.uid_slots(1000) == 6


def test_one_request_beyond_the_uids_limit_is_refused_whole() -> None:
    r = limited(uid_slots=6)
    assert refused(reg, r, "big", alpns=["x"], peer=B, workers=7) == (
        "uid_slots", uid_slots_message(1000, 0, 7, 6))
    assert r.counts().free_slots == 16


def test_root_is_not_bound_by_the_uid_slot_limit() -> None:
    r = limited(uid_slots=2)
    reg(r, "a", alpns=["a"], owner=1, workers=8)
    reg(r, "a", alpns=["a"], owner=2, workers=8, replace=True)
    assert r.uid_slots(0) == 16


def test_generations_per_app_bound_replace_for_everyone() -> None:
    r = limited(uid_slots=16, generations=3)
    for owner in (1, 2, 3):
        reg(r, "web", alpns=["h3"], peer=A, owner=owner, replace=owner > 1)
    message = ('app "web" has 3 generations (1 active, 2 draining): the limit is 3 per app '
               "([limits] app_generations); a draining generation must exit (deregister or "
               "close its control connection) before another replace")
    assert refused(reg, r, "web", alpns=["h3"], peer=A, owner=4, replace=True) == (
        "generations", message)
    assert refused(reg, r, "web", alpns=["h3"], peer=ROOT, owner=4, replace=True) == (
        "generations", message)  # root too: no legitimate app needs more
    # an app whose generations all drain gets no new one past the limit either
    r.drain("web", 3)
    assert refused(reg, r, "web", alpns=["h3"], peer=A, owner=4)[1].startswith(
        'app "web" has 3 generations (0 active, 3 draining)')
    r.deregister("web", 1)
    assert reg(r, "web", alpns=["h3"], peer=A, owner=4).number == 4
    # the ownership and "exists" rules still answer first
    assert refused(reg, r, "web", alpns=["h3"], peer=B, owner=5, replace=True)[0] == "not_owner"


def test_resume_is_never_refused_by_the_limits() -> None:
    """After a daemon restart a uid takes back what it held, even above a limit lowered
    meanwhile. Until then the slots its processes still hold (the previous run's records
    say whose, draining generations' too) count against fresh registers, so a restart does
    not give a tenant its share a second time."""
    clock = Clock(100.0)
    r = limited(uid_slots=4, generations=2, clock=clock)
    r.reserve_orphans([1, 2, 3, 4, 5, 6, 7, 8])
    assert r.reserve_claims([record("web", 1000, ["example.com"], [1, 2, 3, 4, 5]),
                             record("web", 1000, ["example.com"], [6, 7, 8], draining=True)],
                            until=130.0) == []
    assert r.uid_slots(1000) == 8
    assert refused(reg, r, "fresh", alpns=["f"], peer=B, owner=1) == (
        "uid_slots", uid_slots_message(1000, 8, 1, 4))
    # three generations of "web" each resume their slots, past both limits
    reg(r, "web", ["example.com"], peer=B, owner=2, workers=5, resume=[1, 2, 3, 4, 5])
    reg(r, "web", ["example.com"], peer=B, owner=3, resume=[6], replace=True)
    reg(r, "web", ["example.com"], peer=B, owner=4, resume=[7], replace=True)
    assert r.uid_slots(1000) == 8 and len(r.generations("web")) == 3
    assert refused(reg, r, "web", ["example.com"], peer=B, owner=5, replace=True)[0] == (
        "generations")
    assert refused(reg, r, "fresh", alpns=["f"], peer=B, owner=5) == (
        "uid_slots", uid_slots_message(1000, 8, 1, 4))
    # an orphan whose socket closed is nobody's any more
    assert r.claims_snapshot()[-1] == record("web", 1000, ["example.com"], [8], draining=True)
    assert r.release_orphans(lambda slot: False) == [8]
    assert r.uid_slots(1000) == 7 and r.uid_slots(33) == 0
    assert not any(rec["slots"] == [8] for rec in r.claims_snapshot())
    # the next run, from this run's records, counts the same
    again = limited(uid_slots=4, clock=clock)
    again.reserve_orphans([1, 2, 3, 4, 5, 6, 7])
    assert again.reserve_claims(r.claims_snapshot(), until=200.0) == []
    assert again.uid_slots(1000) == 7


def test_from_config_applies_the_tenant_limits() -> None:
    r = Registry.from_config(Config(limits=LimitsConfig(
        worker_slots=16, uid_worker_slots=5, app_generations=2)))
    assert (r.uid_worker_slots, r.app_generations) == (5, 2)
    default = Registry.from_config(Config())
    assert (default.uid_worker_slots, default.app_generations) == (64, 3)
