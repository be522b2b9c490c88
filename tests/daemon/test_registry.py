"""steerd.daemon.registry: claims, ACL, decisions, generations and slots — pure logic, exact."""

from __future__ import annotations

from collections import Counter

import pytest

from quic.cid import CidLayout
from steerd.daemon.config import AclRule, PolicyConfig
from steerd.daemon.registry import Decision, Peer, Registry, RegistryError, covers, server_id

ROOT = Peer(uid=0, gid=0)
WWW = Peer(uid=33, gid=33, groups=frozenset({1001}), user="www-data",
           group_names=frozenset({"www-data", "web"}))
NOBODY = Peer(uid=65534, gid=65534, user="nobody", group_names=frozenset({"nogroup"}))


def make(
    policy: PolicyConfig | None = None, acl: tuple[AclRule, ...] = (), slots: int = 16,
    layout: CidLayout | None = None,
) -> Registry:
    return Registry(layout or CidLayout(), policy or PolicyConfig(), acl, slots, 8)


def reg(r: Registry, app: str, alpns: list[str], names: list[str] | None = None,
        workers: int = 1, replace: bool = False, peer: Peer = ROOT, owner: object = "c1"):
    return r.register(app, alpns, names or [], workers, replace, peer, owner)


def refused(fn, *args, **kw) -> tuple[str, str]:
    with pytest.raises(RegistryError) as e:
        fn(*args, **kw)
    return e.value.reason, str(e.value)


def test_register_allocates_slots_and_server_ids() -> None:
    layout = CidLayout(host_id=0x0A0B, host_id_len=2, slot_len=2, nonce_len=4)
    r = make(layout=layout)
    g = reg(r, "web", ["h3"], workers=3)
    assert (g.app, g.number, g.state) == ("web", 1, "active")
    assert [w.slot for w in g.workers] == [0, 1, 2]
    assert [w.server_id for w in g.workers] == [
        bytes.fromhex("0a0b0000"), bytes.fromhex("0a0b0001"), bytes.fromhex("0a0b0002")
    ]
    # the server ID is what the CID codec puts after the first octet
    assert layout.encode(2, b"\x00" * 4)[1:5] == server_id(layout, 2)
    assert layout.decode(layout.encode(2, b"abcd")) == 2
    c = r.counts()
    assert (c.apps, c.active_generations, c.workers, c.free_slots) == (1, 1, 3, 13)


def test_client_alpn_order_decides() -> None:
    r = make()
    reg(r, "web", ["h3"], owner="a")
    reg(r, "files", ["smb"], owner="b")
    assert r.decide("x.example", ["smb", "h3"]) == Decision("files", 1, 1, "smb")
    assert r.decide("x.example", ["h3", "smb"]) == Decision("web", 1, 0, "h3")
    assert r.decide("x.example", ["doq", "h3"]) == Decision("web", 1, 0, "h3")
    assert r.decide(None, ["h3"]) == Decision("web", 1, 0, "h3")
    assert r.decide("x.example", ["doq"]) is None
    assert r.decide("x.example", []) is None


def test_server_preference_reverses_client_order() -> None:
    r = make(PolicyConfig(alpn_preference="server", alpn_order=("smb", "h3")))
    reg(r, "web", ["h3"], owner="a")
    reg(r, "files", ["smb"], owner="b")
    reg(r, "dns", ["doq"], owner="c")
    assert r.decide(None, ["h3", "smb"]).app == "files"
    assert r.decide(None, ["h3", "doq"]).app == "web"  # listed beats unlisted
    assert r.decide(None, ["doq", "h3x"]).app == "dns"  # unlisted: client order
    client = make()
    reg(client, "web", ["h3"], owner="a")
    reg(client, "files", ["smb"], owner="b")
    assert client.decide(None, ["h3", "smb"]).app == "web"


def test_sni_exact_beats_wildcard_beats_all_names() -> None:
    r = make()
    reg(r, "any", ["h3"], owner=1)
    reg(r, "wild", ["h3"], ["*.example.com"], owner=2)
    reg(r, "deep", ["h3"], ["*.b.example.com"], owner=3)
    reg(r, "exact", ["h3"], ["a.b.example.com", "Example.com"], owner=4)
    assert r.decide("a.b.example.com", ["h3"]).app == "exact"
    assert r.decide("A.B.Example.COM.", ["h3"]).app == "exact"  # case, trailing dot
    assert r.decide("c.b.example.com", ["h3"]).app == "deep"  # longest suffix wins
    assert r.decide("x.y.example.com", ["h3"]).app == "wild"  # any depth
    assert r.decide("example.com", ["h3"]).app == "exact"
    assert r.decide("b.example.com", ["h3"]).app == "wild"  # *.b.x does not cover b.x
    assert r.decide("example.org", ["h3"]).app == "any"
    assert r.decide(None, ["h3"]).app == "any"


def test_alpn_order_comes_before_sni_specificity() -> None:
    r = make()
    reg(r, "web", ["h3"], owner=1)
    reg(r, "site", ["h3-29"], ["a.example"], owner=2)
    assert r.decide("a.example", ["h3", "h3-29"]).app == "web"
    assert r.decide("a.example", ["h3-29", "h3"]).app == "site"
    assert r.decide("b.example", ["h3-29", "h3"]).app == "web"  # site does not serve b


def test_conflicts_name_the_other_app() -> None:
    r = make()
    reg(r, "web", ["h3"], ["example.com"], owner=1)
    reg(r, "all", ["smb"], owner=1)
    assert refused(reg, r, "web2", ["h2", "h3"], ["example.com"], owner=2) == (
        "conflict", 'ALPN "h3" for server name "example.com" is already claimed by app "web"'
    )
    assert refused(reg, r, "smb2", ["smb"], owner=2) == (
        "conflict", 'ALPN "smb" for all server names is already claimed by app "all"'
    )
    # different specificity is not a conflict
    reg(r, "wild", ["h3"], ["*.example.com"], owner=2)
    reg(r, "other", ["h3"], ["example.org"], owner=2)
    # the refused registrations left nothing behind
    assert r.generations("web2") == [] and r.generations("smb2") == []
    assert r.counts().free_slots == 12


def test_request_validation_messages() -> None:
    r = make()
    cases = [
        (("bad name", ["h3"]), "\"app\": must be 1..64 characters of letters, digits, '.', "
         "'_' or '-', starting with a letter or digit, got \"bad name\""),
        (("web", []), '"alpn" must be a non-empty list of strings, got []'),
        (("web", "h3"), '"alpn" must be a non-empty list of strings, got "h3"'),
        (("web", ["h3", "h3"]), '"alpn": duplicate item "h3"'),
        (("web", [3]), '"alpn": must be a string of 1..255 bytes, got 3'),
        (("web", ["x" * 256]), '"alpn": must be a string of 1..255 bytes, got "' + "x" * 256
         + '"'),
        (("web", ["h3"], ["*.*.com"]),
         '"server_names": must be a DNS name, "*.suffix" or "*", got "*.*.com"'),
        (("web", ["h3"], ["*", "a.com"]),
         '"server_names": "*" (all names) cannot be combined with names'),
    ]
    for args, message in cases:
        assert refused(reg, r, *args) == ("bad_request", message)
    assert refused(r.register, "web", ["h3"], [], 9, False, ROOT, 1) == (
        "bad_request", '"workers" must be an integer 1..8, got 9')
    assert refused(r.register, "web", ["h3"], [], True, False, ROOT, 1) == (
        "bad_request", '"workers" must be an integer 1..8, got true')
    assert refused(r.register, "web", ["h3"], [], 1, "yes", ROOT, 1) == (
        "bad_request", '"replace" must be true or false, got "yes"')
    assert refused(r.register, "web", ["h3"], "a.com", 1, False, ROOT, 1) == (
        "bad_request", '"server_names" must be a list of strings, got "a.com"')
    assert r.counts().free_slots == 16


def test_acl() -> None:
    acl = (
        AclRule(users=("www-data",), alpn=("h3",), server_names=("*.example.com",)),
        AclRule(groups=("web",), alpn=("h3-29",)),  # "web" is a supplementary group name
        AclRule(gids=(1001,), alpn=("doq",), server_names=("dns.example",)),
        AclRule(uids=(65534,), alpn=("*",), server_names=("nobody.example",)),
    )
    r = make(acl=acl)
    reg(r, "web", ["h3"], ["a.example.com", "*.b.example.com"], peer=WWW, owner=1)
    reg(r, "old", ["h3-29"], peer=WWW, owner=1)  # all names via "*"
    reg(r, "dns", ["doq"], ["dns.example"], peer=WWW, owner=1)  # by supplementary gid
    reg(r, "nb", ["anything", "else"], ["nobody.example"], peer=NOBODY, owner=2)
    assert refused(reg, r, "w2", ["h3"], ["example.com"], peer=WWW) == (
        "acl_denied", 'uid 33 may not claim ALPN "h3" for server name "example.com"')
    assert refused(reg, r, "w3", ["h3"], peer=WWW) == (
        "acl_denied", 'uid 33 may not claim ALPN "h3" for all server names')
    assert refused(reg, r, "n2", ["smb"], peer=NOBODY) == (
        "acl_denied", 'uid 65534 may not claim ALPN "smb" for all server names')
    reg(r, "rootapp", ["smb"])  # root may claim anything
    assert r.counts().apps == 5


def test_covers() -> None:
    assert covers("*", "*") and covers("*", "a.b") and covers("*.b", "a.b")
    assert covers("*.b", "*.a.b") and covers("*.b", "x.y.b") and covers("a.b", "a.b")
    assert not covers("*.b", "b") and not covers("*.b", "*") and not covers("a.b", "*.a.b")
    assert not covers("*.b", "ab") and not covers("a.b", "*")


def test_generations_and_graceful_replace() -> None:
    r = make(slots=4)
    g1 = reg(r, "web", ["h3"], workers=2, owner="old")
    assert refused(reg, r, "web", ["h3"], owner="new") == (
        "exists",
        'app "web" is already registered (generation 1); send "replace": true to start a new '
        "generation",
    )
    g2 = reg(r, "web", ["h3", "h2"], workers=2, replace=True, owner="new")
    assert (g1.state, g2.state, g2.number) == ("draining", "active", 2)
    # new connections go to the newest generation only; the old keeps its slots
    assert {r.decide(None, ["h3"]).slot for _ in range(4)} == {2, 3}
    assert r.decide(None, ["h3"]).generation == 2
    assert refused(reg, r, "x", ["doq"]) == ("no_slots", "no free worker slots: 1 wanted, 0 "
                                             "free of 4")
    # the old process exits: its slots come back, the new generation keeps serving
    assert sorted(r.disconnect("old")) == [0, 1]
    assert [g.number for g in r.generations("web")] == [2]
    assert r.decide(None, ["h3"]).generation == 2
    # a third generation gets numbers that never repeat
    g3 = reg(r, "web", ["h3"], workers=1, replace=True, owner="newer")
    assert g3.number == 3


def test_replace_by_other_uid_is_refused() -> None:
    acl = (AclRule(uids=(33, 65534), alpn=("*",)),)
    r = make(acl=acl)
    reg(r, "web", ["h3"], peer=WWW, owner=1)
    assert refused(reg, r, "web", ["h3"], replace=True, peer=NOBODY, owner=2) == (
        "not_owner", 'app "web" belongs to uid 33; uid 65534 may not replace it')
    reg(r, "web", ["h3"], replace=True, peer=WWW, owner=3)


def test_slots_never_reused_while_held_and_reused_late() -> None:
    r = make(slots=4)
    a = reg(r, "a", ["a"], workers=2, owner=1)  # slots 0, 1
    b = reg(r, "b", ["b"], workers=1, owner=2)  # slot 2
    reg(r, "a", ["a"], workers=1, replace=True, owner=3)  # slot 3; generation 1 drains
    assert [w.slot for w in a.workers] == [0, 1] and b.workers[0].slot == 2
    assert r.counts().free_slots == 0
    assert refused(reg, r, "c", ["c"], owner=4)[0] == "no_slots"  # draining slots stay held
    assert r.deregister("b", 2) == [2]
    assert r.disconnect(1) == [0, 1]
    # least recently freed first: 2 (freed first), then 0, then 1
    assert [w.slot for w in reg(r, "c", ["c"], workers=3, owner=4).workers] == [2, 0, 1]
    # disconnect frees everything an owner held, across apps
    freed = r.disconnect(4)
    assert sorted(freed) == [0, 1, 2]
    assert r.counts().free_slots == 3
    assert r.decide(None, ["c"]) is None  # routes gone at once


def test_drain_deregister_ownership() -> None:
    r = make()
    reg(r, "web", ["h3"], owner=1)
    assert refused(r.drain, "web", 2) == (
        "not_registered", 'app "web" has no generation on this connection')
    assert refused(r.deregister, "nope", 1) == (
        "not_registered", 'app "nope" has no generation on this connection')
    assert [g.number for g in r.drain("web", 1)] == [1]
    assert r.decide(None, ["h3"]) is None  # draining: no new connections
    # after a drain the name can be registered again without replace, by the same uid
    g = reg(r, "web", ["h3"], owner=1)
    assert g.number == 2 and r.decide(None, ["h3"]).generation == 2
    assert sorted(r.deregister("web", 1)) == [0, 1]
    assert r.counts().apps == 0 and r.counts().free_slots == 16


def test_round_robin_then_least_loaded() -> None:
    r = make()
    g = reg(r, "web", ["h3"], workers=3)
    assert [r.decide(None, ["h3"]).slot for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    r.report_load("web", "c1", {0: 10, 1: 0})  # not all reported yet: still round-robin
    assert [r.decide(None, ["h3"]).slot for _ in range(3)] == [0, 1, 2]
    r.report_load("web", "c1", {0: 10, 1: 0, 2: 3})
    # slot 1 takes connections until its load plus what we sent it passes slot 2's
    picks = [r.decide(None, ["h3"]).slot for _ in range(8)]
    assert picks[:4] == [1, 1, 1, 2] and Counter(picks) == Counter({1: 5, 2: 3})
    assert [w.assigned for w in g.workers] == [0, 5, 3]
    assert refused(r.report_load, "web", "c1", {7: 1}) == (
        "bad_request", 'slot 7 is not a worker of app "web" on this connection')
    assert refused(r.report_load, "web", "c2", {0: 1})[0] == "not_registered"


def test_default_app_policy() -> None:
    r = make(PolicyConfig(no_owner="default_app", default_app="web"))
    assert r.decide(None, ["zz"]) is None  # default app not registered
    reg(r, "web", ["h3"], owner=1)
    reg(r, "files", ["smb"], owner=2)
    assert r.decide("a", ["zz"]) == Decision("web", 1, 0, None)
    assert r.decide("a", ["smb"]) == Decision("files", 1, 1, "smb")


def test_status_snapshot() -> None:
    r = make()
    reg(r, "web", ["h3"], ["example.com"], workers=2, owner=1)
    r.report_load("web", 1, {0: 4})
    s = r.status()
    assert s == {
        "apps": [{"app": "web", "generations": [{
            "generation": 1, "state": "active", "uid": 0, "alpn": ["h3"],
            "server_names": ["example.com"], "cid_mode": "layout",
            "workers": [
                {"slot": 0, "server_id": "0000", "load": 4.0, "assigned": 0},
                {"slot": 1, "server_id": "0001", "load": None, "assigned": 0},
            ],
        }]}],
        "reserved": [],
        "slots": {"total": 16, "free": 14, "quarantined": 0, "awaiting_resume": []},
        "policy": {"no_owner": "close", "default_app": None, "alpn_preference": "client",
                   "alpn_order": []},
    }


def test_hostile_sni_cannot_match_or_stall() -> None:
    r = make()
    reg(r, "any", ["h3"], owner=1)
    reg(r, "wild", ["h3"], ["*.a"], owner=2)
    assert r.decide("a." * 30000 + "a", ["h3"]).app == "any"  # too long to be a claim
    assert r.decide("x." * 120 + "a", ["h3"]).app == "wild"
    assert r.decide("..a", ["h3"]).app == "wild"  # whatever the parser let through


def test_undo_restores_the_replaced_generation() -> None:
    r = make(slots=4)
    g1 = reg(r, "web", ["h3"], workers=1, owner=1)
    g2 = reg(r, "web", ["h3", "h2"], workers=2, replace=True, owner=2)
    assert r.decide(None, ["h2"]).app == "web"
    assert sorted(r.undo(g2)) == [1, 2]
    assert (g1.state, r.generations("web")) == ("active", [g1])
    assert r.decide(None, ["h3"]) == Decision("web", 1, 0, "h3")
    assert r.decide(None, ["h2"]) is None
    assert r.counts().free_slots == 3
    g3 = reg(r, "fresh", ["x"], owner=3)
    r.undo(g3)
    assert r.generations("fresh") == [] and r.counts().apps == 1


def test_orphaned_slots_are_held_for_resume_then_freed() -> None:
    """After a daemon restart, slots still in the data plane wait for their app to resume
    them: no new registration gets them, a resume takes exactly them, and those whose
    sockets vanished go back to the pool."""
    reg = Registry(CidLayout(), PolicyConfig(), [], worker_slots=4, workers_per_app=4)
    reg.reserve_orphans([1, 2])
    assert reg.orphans == {1, 2}
    fresh = reg.register("new", ["h3"], [], 2, False, ROOT, "o1")
    assert sorted(w.slot for w in fresh.workers) == [0, 3]
    with pytest.raises(RegistryError) as e:
        reg.register("web", ["smb"], [], 1, False, ROOT, "o2", resume=[0])
    assert e.value.reason == "bad_resume"
    back = reg.register("web", ["smb"], [], 1, False, ROOT, "o2", resume=[2])
    assert [w.slot for w in back.workers] == [2]
    assert [w.server_id for w in back.workers] == [CidLayout().encode(2, bytes(6))[1:3]]
    assert reg.release_orphans(lambda slot: False) == [1]
    assert reg.orphans == frozenset()
    assert reg.decide(None, ["smb"]).slot == 2


def _reachable_generations(root: object) -> int:
    """How many Generation objects hang off ``root`` (a walk of gc referents)."""
    import gc

    from steerd.daemon.registry import Generation

    seen: set[int] = set()
    stack = [root]
    count = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, Generation):
            count += 1
        stack.extend(gc.get_referents(obj))
    return count


@pytest.mark.parametrize("leave", ["deregister", "disconnect"])
def test_replacements_keep_no_chain_of_generations(leave: str) -> None:
    """Issue 12: each replace used to link the new generation to the one it replaced, which
    linked to its own predecessor... After ~300 graceful restarts pickling the registry (to
    the classifier processes) hit RecursionError, and every generation ever registered
    stayed in memory. Now at most the newest generation links back, one step."""
    import pickle

    r = make(slots=8)
    reg(r, "web", ["h3"], workers=2, owner=0)
    for i in range(1, 1001):
        reg(r, "web", ["h3"], workers=2, replace=True, owner=i)
        # the SDK's old generation drains, then leaves
        if leave == "deregister":
            r.deregister("web", i - 1)
        else:
            r.disconnect(i - 1)
    assert [g.number for g in r.generations("web")] == [1001]
    assert _reachable_generations(r) == 1
    back = pickle.loads(pickle.dumps(r))
    assert back.decide(None, ["h3"]).generation == 1001


def test_draining_generations_link_back_one_step_at_most() -> None:
    """Generations that have not left yet: still no chain, and the registry pickles."""
    import pickle

    r = make(slots=1024)
    gens = [reg(r, "web", ["h3"], owner=0)]
    for i in range(1, 600):
        gens.append(reg(r, "web", ["h3"], replace=True, owner=i))
    assert all(g.replaced is None for g in gens[:-1])
    assert gens[-1].replaced is gens[-2]
    pickle.dumps(r)
    # the newest can still be taken back, and its predecessor serves again
    r.undo(gens[-1])
    assert r.decide(None, ["h3"]).generation == gens[-2].number


def test_undo_after_the_older_generation_left() -> None:
    r = make(slots=4)
    reg(r, "web", ["h3"], owner=1)
    g2 = reg(r, "web", ["h3"], replace=True, owner=2)
    r.deregister("web", 1)
    g3 = reg(r, "web", ["h3"], replace=True, owner=3)
    assert g3.replaced is g2 and g2.replaced is None
    r.undo(g3)
    assert (g2.state, r.decide(None, ["h3"]).generation) == ("active", 2)
    # an undone generation whose predecessor is gone restores nothing
    g4 = reg(r, "web", ["h3"], replace=True, owner=4)
    r.deregister("web", 2)
    assert g4.replaced is None
    r.undo(g4)
    assert r.generations("web") == [] and r.decide(None, ["h3"]) is None


@pytest.mark.parametrize("server_name", ["www.example.com.", "WWW.Example.Com."])
def test_client_sni_with_trailing_dot_routes_like_without(server_name: str) -> None:
    """Issue 12: a ClientHello for "www.example.com." (aioquic sends what it is given) was
    refused by the parser as bad_sni, so the classifier dropped it and the client timed out.
    Parsed and decided, it now reaches the app claiming the name, exact or wildcard."""
    from aioquic import tls as aioquic_tls
    from aioquic.buffer import Buffer

    from quic.tls import parse_client_hello

    ctx = aioquic_tls.Context(is_client=True, alpn_protocols=["h3"], server_name=server_name)
    ctx.handshake_extensions = [(0x39, b"\x01\x02\x40\x64")]
    bufs = {epoch: Buffer(capacity=8192) for epoch in aioquic_tls.Epoch}
    ctx.handle_message(b"", bufs)
    hello = parse_client_hello(bufs[aioquic_tls.Epoch.INITIAL].data)
    assert hello.sni == "www.example.com"
    r = make()
    reg(r, "exact", ["h3"], ["www.example.com"], owner=1)
    reg(r, "wild", ["h3"], ["*.example.com"], owner=2)
    assert r.decide(hello.sni, hello.alpn).app == "exact"
    assert r.decide(server_name, ["h3"]).app == "exact"  # decide strips it on its own too
    r.deregister("exact", 1)
    assert r.decide(hello.sni, hello.alpn).app == "wild"


def test_learned_mode_lengths_are_bounded_and_tracked() -> None:
    """The steering program looks a short header up once per learned CID length in use, so
    the registry keeps the set small and says which lengths are in use (draining ones too)."""
    from steerd.app.protocol import Steering
    from steerd.daemon.registry import MAX_LEARNED_LENGTHS

    r = make()
    lengths = [4, 8, 12, 16][:MAX_LEARNED_LENGTHS]
    for i, n in enumerate(lengths):
        r.register(f"a{i}", [f"p{i}"], [], 1, False, ROOT, f"c{i}", steering=Steering("learned", n))
    assert r.learned_lengths() == frozenset(lengths)
    assert refused(r.register, "x", ["px"], [], 1, False, ROOT, "cx",
                   steering=Steering("learned", 20)) == (
        "too_many_lengths", f"learned-mode apps already use {MAX_LEARNED_LENGTHS} CID lengths "
        "(4, 8, 12, 16); use one of them, or layout mode")
    # a length already in use is fine, and layout mode is never limited
    r.register("y", ["py"], [], 1, False, ROOT, "cy", steering=Steering("learned", 8))
    web = reg(r, "web", ["h3"], owner="cw")
    assert web.steering == Steering()
    assert r.generations("y")[0].steering == Steering("learned", 8)
    # a replaced learned generation drains: its length stays in use until it is gone
    r.register("a0", ["p0"], [], 1, True, ROOT, "c0")
    assert 4 in r.learned_lengths()
    r.deregister("a0", "c0")
    assert 4 not in r.learned_lengths()


def test_learned_mode_slots_are_bounded_by_the_learned_tables() -> None:
    """Issue 18: the kernel's learned tables hold [limits] learned_slots slots' quotas, so
    no more slots than that may be in learned mode at once (draining ones count; root too);
    layout mode is never limited, and a slot that leaves learned mode frees its place."""
    from steerd.app.protocol import Steering

    r = Registry(CidLayout(), PolicyConfig(), [], worker_slots=16, workers_per_app=8,
                 learned_slots=4)
    learned = Steering("learned", 8)
    r.register("a", ["pa"], [], 3, False, ROOT, "ca", steering=learned)
    assert refused(r.register, "b", ["pb"], [], 2, False, ROOT, "cb", steering=learned) == (
        "learned_slots", "3 worker slots are in learned mode (draining generations included) "
        "and 2 more were asked for: the kernel's learned tables hold 4 ([limits] "
        "learned_slots); use layout mode (the steerd SDK) or fewer workers")
    r.register("b", ["pb"], [], 1, False, ROOT, "cb", steering=learned)
    reg(r, "web", ["h3"], owner="cw", workers=8)  # layout mode: not counted
    # a replace of a learned app while the old generation drains needs room for both
    assert refused(r.register, "b", ["pb"], [], 1, True, ROOT, "cb", steering=learned)[0] == (
        "learned_slots")
    r.deregister("a", "ca")
    r.register("b", ["pb"], [], 1, True, ROOT, "cb", steering=learned)
