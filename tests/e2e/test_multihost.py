"""Issue 20 items 3, 4, 6: three steerd hosts behind one nftables balancer (steerd lb-config).

One fleet (deploy/multihost.py: client, balancer and three host namespaces, a real ``steerd
run`` per host with its own host ID, the h3 site and the file service on each, the kernel's
nftables in the balancer) is shared by every test of the module, to keep wall time low. What
must hold:

- every connection is served, by the right app, on the host whose ID is in the server's CID
  (the balancer hashes Initials by 4-tuple; the CID then names the host that answered);
- a host taken out of the balancer keeps its established connections (conntrack) and gets
  no new ones; put back, it gets new ones again;
- a steerd restart on one host breaks no connection open through the balancer;
- a ClientHello over two datagrams (X25519MLKEM768) reaches one host whole;
- Chromium and ngtcp2's gtlsclient get through the balancer;
- tshark, on the balancer's link to each host, sees only CIDs naming that host.

No timing assertions: this must hold on a loaded 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deploy.demo import run_chromium, run_gtlsclient
from deploy.multihost import KINDS, Served, Topology, link_cids, topology
from deploy.netns import list_netns
from deploy.quicclient import RequestFailed, Session
from tests import tshark

pytestmark = [pytest.mark.root, pytest.mark.tshark, pytest.mark.serial]

V4, V6 = socket.AF_INET, socket.AF_INET6
MIXES = [(stack, kind, family) for stack in ("aioquic", "qh3") for kind in KINDS
         for family in (V4, V6)]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.fail("the multi-host tests need root (network namespaces, BPF, nftables)")
    tshark.require_tshark()
    with topology(3) as t:
        namespaces = {t.client, t.balancer, *(h.netns for h in t.hosts.values())}
        pins = [h.pin_dir for h in t.hosts.values()]
        work = t.work
        yield t
    assert t.problems == []
    assert namespaces.isdisjoint(list_netns())
    assert [p for p in pins if os.path.exists(p)] == []
    assert not work.exists()


def attempt(topo: Topology, stack: str, kind: str, family: int) -> Served | str:
    """One fresh connection and request; a failure as its message, so a batch runs whole
    and reports every failure at once."""
    try:
        served = topo.request(stack, kind, family)
    except (RequestFailed, OSError, ValueError) as exc:
        return f"{stack} {kind} {socket.AddressFamily(family).name}: {exc}"
    return topo.served_error(served, kind) or served


def batch(topo: Topology, count: int, mixes: list[tuple[str, str, int]] = MIXES,
          threads: int = 6) -> list[Served]:
    """``count`` connections over the mixes; fails on any error, naming every one."""
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda i: attempt(topo, *mixes[i % len(mixes)]),
                                range(count)))
    errors = [r for r in results if isinstance(r, str)]
    assert errors == [], f"{len(errors)} of {count} failed:\n" + "\n".join(errors[:20])
    return [r for r in results if isinstance(r, Served)]


def open_on_every_host(topo: Topology, kinds: tuple[str, ...] = ("h3",), per_host: int = 1,
                       limit: int = 80) -> dict[int, list[tuple[Session, str, Served]]]:
    """Open connections (h3 and file, IPv4 and IPv6 by turns) until each host holds
    ``per_host`` of them; the 4-tuple hash decides where each goes."""
    held: dict[int, list[tuple[Session, str, Served]]] = {h: [] for h in topo.hosts}
    for i in range(limit):
        if all(len(v) >= per_host for v in held.values()):
            return held
        kind, family = kinds[i % len(kinds)], (V4, V6)[i // len(kinds) % 2]
        s = topo.session("aioquic" if i % 3 else "qh3", kind, family)
        served = topo.ask(s, kind)
        assert topo.served_error(served, kind) == ""
        assert served.host is not None
        if len(held[served.host]) < per_host:
            held[served.host].append((s, kind, served))
        else:
            s.close()
    closing(held)
    raise AssertionError(f"{limit} connections did not reach every host {per_host} times")


def closing(held: dict[int, list[tuple[Session, str, Served]]]) -> None:
    for sessions in held.values():
        for s, _, _ in sessions:
            s.close()


def test_300_connections_each_served_on_the_host_its_cid_names(topo: Topology) -> None:
    served = batch(topo, 300)
    assert len(served) == 300
    assert all(s.host == s.cid_host for s in served)  # batch() checked it; the count is 0
    per_host = Counter(s.host for s in served)
    assert set(per_host) == set(topo.hosts), per_host
    per_app = Counter((s.host, s.app) for s in served)
    assert len(per_app) == 2 * len(topo.hosts), per_app  # both apps on every host
    print(f"300 connections: per host {dict(per_host)}, 0 misroutes")


def test_removed_host_keeps_its_connections_and_gets_no_new_ones(topo: Topology) -> None:
    held = open_on_every_host(topo, kinds=("h3", "file"))
    try:
        victim = sorted(topo.hosts)[1]
        rest = [h for h in topo.hosts if h != victim]
        topo.set_balanced(rest)
        try:
            for host, sessions in held.items():  # established: still on their hosts
                for s, kind, before in sessions:
                    again = topo.ask(s, kind)
                    assert (again.host, again.info["pid"]) == (host, before.info["pid"])
            fresh = batch(topo, 40)
            assert victim not in {s.host for s in fresh}
            assert {s.host for s in fresh} == set(rest)
        finally:
            topo.set_balanced(topo.hosts)
        for _ in range(60):  # put back: the hash sends new connections to it again
            s = topo.request("qh3", "h3", V4)
            assert topo.served_error(s, "h3") == ""
            if s.host == victim:
                break
        else:
            raise AssertionError(f"host {victim} got no new connection after it was re-added")
        s, kind, _ = held[victim][0]  # and its old connection is still fine
        assert topo.ask(s, kind).host == victim
    finally:
        closing(held)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["clean", "sigkill"])
def test_steerd_restart_on_one_host_breaks_no_connection(topo: Topology,
                                                         how: signal.Signals) -> None:
    """The daemon stops (cleanly, or killed) and starts again on the same pin dir while
    connections through the balancer are open on every host, two on the restarted one."""
    held = open_on_every_host(topo, kinds=("h3", "file"), per_host=2)
    try:
        target = sorted(topo.hosts)[0 if how == signal.SIGTERM else 2]
        topo.restart_steerd(target, how)
        for host, sessions in held.items():
            for s, kind, before in sessions:
                again = topo.ask(s, kind)
                assert topo.served_error(again, kind) == ""
                assert (again.host, again.info["pid"]) == (host, before.info["pid"])
        # The restarted daemon classifies new connections again: some reach its host.
        assert target in {s.host for s in batch(topo, 24)}
    finally:
        closing(held)


def _client_hellos(paths: dict[int, Path]) -> dict[int, list[tshark.Connection]]:
    """tshark's client connections with a ClientHello, per host link."""
    return {h: [c for c in tshark.connections(p, 443).values() if c.hello_frame is not None]
            for h, p in paths.items()}


def test_two_datagram_client_hellos_reach_one_host(topo: Topology) -> None:
    """qh3 offers X25519MLKEM768: its ClientHello spans two datagrams, which the balancer
    hashes alike (one 4-tuple) and tshark finds whole on exactly one host link."""
    count = 30
    pq = [("qh3", kind, family) for kind in KINDS for family in (V4, V6)]
    with topo.capture() as paths:
        served = batch(topo, count, pq)
        # dumpcap writes in batches, and stopping it drops what it has not read yet: wait
        # until the files hold every ClientHello (a file cut mid-packet counts as not yet)
        deadline = time.monotonic() + 30
        while True:
            try:
                if sum(map(len, _client_hellos(paths).values())) >= count:
                    break
            except AssertionError as exc:  # tshark: "cut short in the middle of a packet"
                assert "cut short" in str(exc), exc
            assert time.monotonic() < deadline, "the capture never held every ClientHello"
    hellos = _client_hellos(paths)
    everything = [c for cs in hellos.values() for c in cs]
    assert len(everything) == count
    assert len({c.dcid for c in everything}) == count  # no flight seen on two links
    assert all(c.hello_datagrams == 2 for c in everything), [
        (c.dcid.hex(), c.hello_datagrams) for c in everything]
    assert all(0x11EC in c.key_share_groups for c in everything)  # X25519MLKEM768
    assert Counter(s.host for s in served) == Counter(
        {h: len(cs) for h, cs in hellos.items() if cs})
    counts, wrong = link_cids(topo, paths)
    assert wrong == []
    assert sum(counts.values()) >= 2 * count  # each connection's server SCIDs at least


def test_chromium_and_gtlsclient_through_the_balancer(topo: Topology) -> None:
    missing = [b for b in ("chromium", "gtlsclient") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    cert = topo.work / "web-cert" / "cert.pem"
    with topo.capture() as paths, ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_chromium, topo.pair, topo.work, cert),
                pool.submit(run_gtlsclient, topo.pair, topo.work)]
        answers = [f.result() for f in runs]
    for info in answers:
        host, app = topo.who(info["pid"])
        assert app == "web" and host in topo.hosts, info
    counts, wrong = link_cids(topo, paths)
    assert wrong == []
    assert sum(counts.values()) > 0
