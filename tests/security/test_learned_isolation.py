"""Tenant isolation in learned-CID mode, shown by attacking for real.

What a learned-mode app holds beyond a layout-mode one: every datagram its worker socket
sends teaches the kernel (bpf/learn.c) that the long-header SCID it carries, and the address
it goes to, are its slot's. So the attack surface is the egress path: an intruder registered
for real as uid nobody in learned mode sends crafted server packets from its worker socket
(tests/security/intruder.py, op "long"), trying to learn

1. a CID in steerd's layout (an SDK app's), or a client's first-flight DCID: refused;
2. the CID a victim learned-mode server (tests/e2e/plain_h3_server.py, unmodified aioquic
   with its own random CIDs, under ``steerd exec --cid-mode learned`` as its own uid) issued
   to a real client: the victim wrote it first, conflict;
3. CIDs without end: its slot's unproven budget stops it (nothing it sends to addresses no
   client of its own answers from is ever proven), and the victim still learns new ones;
4. a victim client's address:port: the victim's server wrote it first, conflict; and an
   address the intruder wrote first steers nothing to it until a client there proves it.

Meanwhile real clients load the victim learned app and an SDK app (the demo file service)
and must see 0 failures. Counter deltas are exact where only the intruder moves them
(refused, conflict, full, and the intruder slot's per-slot statistics in ``steerd status``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deploy.netns import NetnsPair
from quic.cid import CidLayout
from quic.packet import parse_long_header
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, ROOT, Daemon, _read_line
from tests.quic.reference import is_long_header
from tests.sdk.harness import (
    Loader,
    RunningApp,
    Session,
    kill_group,
    session,
    staged_command,
    start_demo_app,
    start_loader,
)
from tests.security.players import Intruder, start_intruder
from tests.security.tenants import (
    FILES_UID,
    NOBODY,
    acl_entry,
    counters,
    delta,
    tenant_daemon,
)

pytestmark = pytest.mark.root

VICTIM_UID = 64113
PLAIN = ROOT / "tests" / "e2e" / "plain_h3_server.py"
CID_LEN = 8  # aioquic's own CIDs
QUOTA = 256  # [limits] learned_quota and learned_unproven_quota: each slot's learned CIDs
# (and, apart, addresses), proven and unproven
TTL = 10  # [limits] learned_ttl and learned_unproven_ttl: the victim's entries come and go
LAYOUT = CidLayout()  # the daemon's (no [cid] section): 9-byte CIDs
ALPNS = [f"x-intruder-{i}" for i in range(8)]  # one per intruder: claims must not collide
CONFIG = f"""
[limits]
learned_quota = {QUOTA}
learned_ttl = {TTL}
learned_unproven_quota = {QUOTA}
learned_unproven_ttl = {TTL}
{acl_entry(FILES_UID, "smb")}{acl_entry(VICTIM_UID, "h3")}{acl_entry(NOBODY, *ALPNS)}"""


# -- the players ---------------------------------------------------------------------------


_alpns = iter(ALPNS)


def start_learned_intruder(daemon: Daemon, app: str, cid_len: int) -> Intruder:
    """The intruder as nobody, registered in learned mode with ``cid_len``-byte CIDs."""
    intruder = start_intruder(daemon, NOBODY, app, next(_alpns), cid_len)
    assert intruder.registered["reply"]["cid_mode"] == "learned"
    return intruder


@dataclass
class Plain:
    """tests/e2e/plain_h3_server.py (aioquic, its own random CIDs) under ``steerd exec
    --cid-mode learned --cid-len 8``, both as ``uid``."""

    name: str
    proc: subprocess.Popen[str]
    workdir: Path
    log: Path

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_plain(daemon: Daemon, uid: int, name: str) -> Plain:
    work = Path(tempfile.mkdtemp(prefix="steerd-plain-"))
    os.chmod(work, 0o755)
    script = work / "plain_h3_server.py"
    shutil.copy(PLAIN, script)
    os.chmod(script, 0o644)
    (work / "cert").mkdir()
    os.chown(work / "cert", uid, uid)
    log = work / "stderr.log"
    python, env = staged_command(str(ROOT / "steerd" / "__init__.py"))
    steerd = [python[0], "-c", "import sys; from steerd.cli import main; sys.exit(main())"]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path(daemon.pair.server)}", "setpriv",
             f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *steerd, "exec",
             "--control", daemon.control, "--app", name, "--alpn", "h3",
             "--cid-mode", "learned", "--cid-len", str(CID_LEN), "--",
             python[0], str(script), "--stack", "aioquic", "--cert-dir", str(work / "cert"),
             "--name", name],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd="/",
            env={**os.environ, **env}, start_new_session=True,
        )
    plain = Plain(name, proc, work, log)
    line = _read_line(proc, 30)
    if line is None or "ready" not in line:
        text = log.read_text()
        plain.stop()
        raise AssertionError(f"{name} did not start: {line!r} {text!r}")
    return plain


@dataclass
class PlainLoader:
    """Requests to the victim learned app from the client namespace, in a thread: a new
    connection every 0.2 s (so its own learned entries stay far below the quota), three GETs
    on each, every answer checked."""

    pair: NetnsPair
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PlainLoader:
        self._thread = threading.Thread(target=self._run, name="plain-loader", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            s = session(self.pair, "h3")
            try:
                for i in range(3):
                    got = s.get(f"/load{i}")
                    assert got == (200, f"victim /load{i}".encode()), got
                self.ok += 1
            except Exception as exc:  # counted, and shown by finish()
                self.failed += 1
                self.errors.append(repr(exc))
            finally:
                s.close()
            self._stop.wait(0.2)

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        return {"ok": self.ok, "failed": self.failed, "errors": self.errors[:5]}


@dataclass
class World:
    pair: NetnsPair
    daemon: Daemon
    files: RunningApp  # SDK app, layout mode
    victim: Plain  # plain aioquic, learned mode
    intruder: Intruder  # learned mode, 8-byte CIDs (the victim's length)


@pytest.fixture(scope="module")
def world(pair: NetnsPair) -> Iterator[World]:
    with tenant_daemon(pair, CONFIG) as daemon:
        started: list[Any] = []
        try:
            files = start_demo_app(daemon, "file", uid=FILES_UID)
            started.append(files)
            victim = start_plain(daemon, VICTIM_UID, "victim")
            started.append(victim)
            intruder = start_learned_intruder(daemon, "intruder", CID_LEN)
            started.append(intruder)
            assert daemon.status()["learned_mode"] == "available"
            yield World(pair, daemon, files, victim, intruder)
        finally:
            for thing in reversed(started):
                thing.stop()


@dataclass
class Served:
    files: Loader
    victim: PlainLoader

    def check(self) -> None:
        for totals in (self.files.finish(), self.victim.finish()):
            assert totals["failed"] == 0 and totals["ok"] >= 2, totals


@pytest.fixture
def served(world: World) -> Iterator[Served]:
    """Real clients of the SDK app and of the victim learned app, for the whole test; the
    test's last step is ``served.check()``."""
    files = start_loader(world.pair, "aioquic", "file", "INFO")
    victim = PlainLoader(world.pair).start()
    try:
        yield Served(files, victim)
    finally:
        files.kill()
        victim.finish()


# -- what to look at -------------------------------------------------------------------------


def steering(daemon: Daemon, app: str) -> dict[str, int]:
    """The per-slot statistics of ``app``'s active generation, summed over its workers."""
    total: dict[str, int] = {}
    for record in daemon.status()["apps"]:
        if record["app"] != app:
            continue
        for gen in record["generations"]:
            if gen["state"] != "active":
                continue
            for worker in gen["workers"]:
                for name, value in worker.get("steering", {}).items():
                    total[name] = total.get(name, 0) + value
    return total


def slots_of(daemon: Daemon, app: str) -> list[int]:
    return [w["slot"] for record in daemon.status()["apps"] if record["app"] == app
            for gen in record["generations"] for w in gen["workers"]]


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Statistics that changed (learned_* and unproven_* are the sweep's gauges)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if k not in SWEEP_GAUGES and after.get(k, 0) != before.get(k, 0)}


SWEEP_GAUGES = ("learned_cids", "learned_peers", "unproven_cids", "unproven_peers")


def server_cid(s: Session) -> bytes:
    """The server's first CID: the SCID of the first long-header packet it sent."""
    for data in s.received:
        if is_long_header(data[0]):
            return parse_long_header(data).scid
    raise AssertionError("no long-header packet received")


def nowhere(pair: NetnsPair, intruder: Intruder) -> list[Any]:
    """Where ``intruder``'s packets go: a port no client uses (below the ephemeral range)
    and no other intruder sends to, so the address it learns conflicts with nobody's."""
    return [pair.client_v4, 1000 + intruder.slot]


# -- 1. CIDs that are not a learned-mode server's to learn --------------------------------------


def test_layout_cids_are_never_learned(world: World, served: Served) -> None:
    """An intruder registered with the layout's CID length sends long headers whose SCID is
    a CID an SDK app's worker issued to a real client, and the layout CIDs of every slot in
    use: all refused. The same intruder learns a CID of its own (positive control)."""
    s = session(world.pair, "smb")
    intruder = start_learned_intruder(world.daemon, "intruder-layout", LAYOUT.cid_len)
    try:
        assert s.fetch("INFO")
        real = server_cid(s)
        assert LAYOUT.decode(real) in world.files.slots
        slots = [*world.files.slots, *slots_of(world.daemon, "victim"), world.intruder.slot,
                 intruder.slot]
        scids = [real] + [LAYOUT.encode(slot, os.urandom(LAYOUT.nonce_len)) for slot in slots]
        before, stats = counters(world.daemon), steering(world.daemon, intruder.app)
        assert intruder.long(nowhere(world.pair, intruder), scids) == len(scids)
        after = counters(world.daemon)
        assert delta(before, after, "learn_refused") == len(scids)
        assert delta(before, after, "learn_conflict") == delta(before, after, "learn_full") == 0
        assert moved(stats, steering(world.daemon, intruder.app)) == {
            "egress_long": len(scids), "egress_refused": len(scids)}
        assert s.fetch("INFO")  # the SDK app's client carries on
        own = bytes([0xEF]) + os.urandom(LAYOUT.cid_len - 1)  # unroutable: not the layout
        stats = steering(world.daemon, intruder.app)
        intruder.long(nowhere(world.pair, intruder), [own])
        assert moved(stats, steering(world.daemon, intruder.app)) == {
            "egress_long": 1, "egress_learned": 1}
    finally:
        s.close()
        intruder.stop()
    served.check()


def test_first_flight_dcids_are_never_learned(world: World, served: Served) -> None:
    """The DCIDs real clients chose for their first flights (to the SDK app and to the
    victim learned app) have first-flight routes: the intruder cannot learn them."""
    sessions = [session(world.pair, "smb"), session(world.pair, "h3")]
    try:
        assert sessions[0].fetch("INFO")
        assert sessions[1].get("/first") == (200, b"victim /first")
        dcids = [s.conn._original_destination_connection_id for s in sessions]
        assert all(len(d) == CID_LEN for d in dcids)
        before, stats = counters(world.daemon), steering(world.daemon, world.intruder.app)
        world.intruder.long(nowhere(world.pair, world.intruder), dcids)
        after = counters(world.daemon)
        assert delta(before, after, "learn_refused") == 2
        assert moved(stats, steering(world.daemon, world.intruder.app)) == {
            "egress_long": 2, "egress_refused": 2}
        assert sessions[1].get("/again") == (200, b"victim /again")
    finally:
        for s in sessions:
            s.close()
    served.check()


# -- 2. a victim's learned CID -----------------------------------------------------------------


def test_a_victims_learned_cid_cannot_be_taken(world: World, served: Served) -> None:
    """The intruder sends the CID the victim's aioquic chose for a live connection (read from
    the client's datagrams) as its own SCID: conflict, the entry stays the victim's, and the
    victim's client, whose packets carry that CID, is served on."""
    s = session(world.pair, "h3")
    try:
        assert s.get("/before") == (200, b"victim /before")
        cid = server_cid(s)
        assert len(cid) == CID_LEN and LAYOUT.decode(cid) is None
        before, stats = counters(world.daemon), steering(world.daemon, world.intruder.app)
        victim = steering(world.daemon, "victim")
        world.intruder.long(nowhere(world.pair, world.intruder), [cid, cid, cid])
        after = counters(world.daemon)
        assert delta(before, after, "learn_conflict") == 3
        assert delta(before, after, "learn_refused") == delta(before, after, "learn_full") == 0
        assert moved(stats, steering(world.daemon, world.intruder.app)) == {
            "egress_long": 3, "egress_conflict": 3}
        for i in range(5):
            assert s.get(f"/after{i}") == (200, f"victim /after{i}".encode())
        now = steering(world.daemon, "victim")
        assert now["steered_learned_cid"] > victim.get("steered_learned_cid", 0)
        assert "egress_conflict" not in now
    finally:
        s.close()
    served.check()


# -- 3. a flood of CIDs ------------------------------------------------------------------------


def await_sweep(daemon: Daemon, intruder: Intruder, pair: NetnsPair) -> None:
    """Return right after the daemon's sweep (every 5 s) recounted the intruder's entries:
    a fresh address learned now shows in ``steering`` only once a sweep ran. So the flood
    that follows does not race a sweep (which would recount the quota under it), and the
    slot's count no longer holds what a previous holder of the slot learned (forget_slot
    leaves the count to the sweep)."""
    intruder.ask(op="send", data=(b"\x43" + os.urandom(40)).hex(),
                 to=[pair.client_v4, 2000 + intruder.slot])
    deadline = time.monotonic() + 15
    while steering(daemon, intruder.app).get("unproven_peers", 0) < 1:
        assert time.monotonic() < deadline, "no sweep within 15 s"


def test_a_flood_of_cids_stops_at_the_quota(world: World, served: Served) -> None:
    """A fresh intruder sends QUOTA + 100 random SCIDs: exactly QUOTA are learned (unproven:
    no client ever answers them), the rest counted full; the victim learned app's new
    connections are still learned and served."""
    intruder = start_learned_intruder(world.daemon, "intruder-flood", CID_LEN)
    try:
        await_sweep(world.daemon, intruder, world.pair)
        before, stats = counters(world.daemon), steering(world.daemon, intruder.app)
        victim = steering(world.daemon, "victim")
        assert intruder.long(nowhere(world.pair, intruder), count=QUOTA + 100) == QUOTA + 100
        after = counters(world.daemon)
        assert delta(before, after, "learn_full") == 100
        assert delta(before, after, "learn_conflict") == delta(before, after, "learn_refused") == 0
        assert moved(stats, steering(world.daemon, intruder.app)) == {
            "egress_long": QUOTA + 100, "egress_learned": QUOTA, "egress_full": 100}
        assert intruder.long(nowhere(world.pair, intruder), count=10) == 10  # still full
        assert delta(after, counters(world.daemon), "learn_full") == 10
        for i in range(5):  # new connections of the victim: learned, served
            s = session(world.pair, "h3")
            try:
                assert s.get(f"/new{i}") == (200, f"victim /new{i}".encode())
            finally:
                s.close()
        now = steering(world.daemon, "victim")
        assert now["egress_learned"] - victim.get("egress_learned", 0) >= 5
        assert "egress_full" not in now
    finally:
        intruder.stop()
    served.check()


# -- 4. a victim client's address --------------------------------------------------------------


def test_a_victim_clients_address_cannot_be_taken(world: World, served: Served) -> None:
    """The intruder sends to the address:port of a live client of the victim, whose server
    wrote it first: conflict; a packet from that client with a CID nothing learned (as after
    NEW_CONNECTION_ID) still reaches the victim. An address the intruder writes first steers
    nothing to it while unproven; positive control: once a client there answers with a CID
    the intruder sent it, the address is the intruder's."""
    s = session(world.pair, "h3")
    fresh = world.pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # outside the ephemeral range: no later client of the victim gets this port while
        # the intruder's entry for it lives
        fresh.bind((world.pair.client_v4, 20000 + int.from_bytes(os.urandom(2)) % 10000))
        assert s.get("/before") == (200, b"victim /before")
        client = [world.pair.client_v4, s.sock.getsockname()[1]]
        before, stats = counters(world.daemon), steering(world.daemon, world.intruder.app)
        world.intruder.ask(op="send", data=(b"\x43" + os.urandom(40)).hex(), to=client)
        after = counters(world.daemon)
        assert delta(before, after, "learn_conflict") == 1
        assert moved(stats, steering(world.daemon, world.intruder.app)) == {"egress_conflict": 1}
        victim = steering(world.daemon, "victim")
        unknown = bytes([0x43]) + bytes([0xEE]) + os.urandom(CID_LEN - 1) + os.urandom(40)
        s.sock.sendto(unknown, (world.pair.server_v4, PORT))
        assert s.get("/after") == (200, b"victim /after")
        assert moved(victim, steering(world.daemon, "victim")).get("steered_learned_peer") == 1
        # the intruder writes an address first: unproven, it steers nothing to the intruder
        stats = steering(world.daemon, world.intruder.app)
        fresh_addr = [world.pair.client_v4, fresh.getsockname()[1]]
        own = bytes([0xEF]) + os.urandom(CID_LEN - 1)
        world.intruder.long(fresh_addr, [own])
        before = counters(world.daemon)
        fresh.sendto(unknown, (world.pair.server_v4, PORT))
        deadline = time.monotonic() + 5
        while delta(before, counters(world.daemon), "steer_drop_short_not_ours") < 1:
            assert time.monotonic() < deadline, "the unproven address's datagram not dropped"
        assert "steered_learned_peer" not in moved(stats, steering(world.daemon,
                                                                   world.intruder.app))
        # positive control: the client there answers with the CID the intruder sent it (as
        # a real client of the intruder would): CID and address proven, the address steers
        fresh.sendto(bytes([0x43]) + own + os.urandom(40), (world.pair.server_v4, PORT))
        fresh.sendto(unknown, (world.pair.server_v4, PORT))
        deadline = time.monotonic() + 5
        while "steered_learned_peer" not in moved(stats, now := steering(
                world.daemon, world.intruder.app)):
            assert time.monotonic() < deadline, now
        assert moved(stats, now) == {"egress_long": 1, "egress_learned": 1,
                                     "steered_learned_cid": 1, "steered_learned_peer": 1}
    finally:
        s.close()
        fresh.close()
    served.check()


# -- the prefix attack (last: its intruder's entry lives on for learned_ttl) ------------------


def test_a_shorter_cid_cannot_shadow_a_victims_cid(world: World) -> None:
    """An intruder registered with 4-byte CIDs learns the first 4 bytes of a CID the victim
    issued to a live client (CIDs are on the wire in clear): the victim's client must be
    served on."""
    s = session(world.pair, "h3")
    s.timeout = 3.0
    intruder = start_learned_intruder(world.daemon, "intruder-prefix", 4)
    try:
        assert s.get("/before") == (200, b"victim /before")
        stats = steering(world.daemon, intruder.app)
        intruder.long(nowhere(world.pair, intruder), [server_cid(s)[:4]])
        took = moved(stats, steering(world.daemon, intruder.app)).get("egress_learned", 0)
        try:
            got = s.get("/after")
        except Exception as exc:  # the connection's packets went to the intruder
            got = (0, repr(exc).encode())
        assert got == (200, b"victim /after"), (
            f"intruder learned the prefix: {bool(took)}; victim's client got {got}")
    finally:
        s.close()
        intruder.stop()
