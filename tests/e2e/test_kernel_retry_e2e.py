"""The kernel Retry end to end (issue 19 items 1, 2 and 4): the real daemon with the guard at
TC ingress and ``[flood] retry = "always"``; real clients complete HTTP/3 requests to the
SDK's demo app through a Retry the guard built: aioquic and qh3 (QUIC v1 and v2, IPv4 and
IPv6), headless Chromium (v1, IPv4), and ngtcp2's gtlsclient (v1, IPv4), once for a session
and once resuming it with 0-RTT.

What must hold: every client receives a Retry and completes; the Retries came from the kernel
(``xdp_retry_sent`` counts them, the classifier's ``steerd_retries_sent_total`` stays 0) and
the classifier accepted the kernel-minted tokens (``steerd_retry_tokens_total{result=
"accepted"}``), after the guard checked them (``xdp_token_valid``).

Oracle for the wire: every frame on the client's veth end, read by tshark (an independent QUIC
implementation, which checks a Retry's integrity tag against the DCID of the client's first
Initial and flags a bad one with the expert info ``quic.bad_retry``). Per client connection:
its first Initial carries no token; a Retry came back from the server port, in the
connection's version, with a tag and no ``quic.bad_retry``; the client's next Initial carries
that Retry's token (``quic.token_length`` > 0, the same bytes) to that Retry's SCID. That
tshark really checks the tag is shown on the same capture: one bit of the tag flipped, tshark
reports ``quic.bad_retry``. Every Retry the guard counted is one tshark saw.

A caveat of the oracle: tshark checks a Retry against the conversation's latest client DCID,
so a Retry arriving after the client's retried Initial (an answer to the second datagram of
Chromium's first flight, when late) is flagged there although its tag is good; such a Retry
is checked in a capture of its own with the Initial it answers.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.netns import NetnsPair, netns_pair
from quic.packet import VERSION_1, VERSION_2, PacketType, parse_long_header
from tests.e2e.conftest import PORT, Daemon, start_daemon
from tests.linkframes import ETH_P_ALL
from tests.sdk.harness import RunningApp, Session, chromium_get, gtlsclient_get, start_demo_app
from tests.tshark import require_tshark

pytestmark = [pytest.mark.root, pytest.mark.tshark]

HOST = "www.example.test"
PAGE_MARK = "Served over HTTP/3 behind steerd"
BAD_RETRY = "Retry Integrity Tag verification failure"  # tshark's quic.bad_retry expert info
SO_RCVBUFFORCE, SOL_PACKET, PACKET_STATISTICS = 33, 263, 6  # <linux/socket.h>, if_packet.h
# tshark's long-header packet type per version (RFC 9000 §17.2, RFC 9369 §3.2)
TYPES = {VERSION_1: {"initial": "0", "0rtt": "1", "retry": "3"},
         VERSION_2: {"initial": "1", "0rtt": "2", "retry": "0"}}


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    with netns_pair("k") as made:
        yield made


@pytest.fixture(scope="module")
def daemon(pair: NetnsPair) -> Iterator[Daemon]:
    """The daemon with the guard at TC ingress answering every token-less Initial."""
    yield from start_daemon(pair, f'[xdp]\ninterfaces = ["{pair.server_if}"]\nmode = "tc"\n'
                                  '[flood]\nretry = "always"\n')


@pytest.fixture(scope="module")
def site(daemon: Daemon) -> Iterator[RunningApp]:
    """The demo HTTP/3 site, issuing session tickets (resumption and 0-RTT). Its names: HOST
    for Chromium, "localhost" for the Python clients and for gtlsclient (ngtcp2 0.12 sends
    SNI "localhost" for a numeric host)."""
    app = start_demo_app(daemon, "h3", "--server-name", HOST, "--server-name", "localhost",
                         "--session-tickets", name="retrysite")
    try:
        yield app
    finally:
        assert app.stop() == 0


def metric(daemon: Daemon, name: str, label: str = "") -> float:
    """Sum of the samples of ``name`` whose labels contain ``label``."""
    total = 0.0
    for line in daemon.metrics().splitlines():
        if re.match(rf"{re.escape(name)}(\{{|\s)", line) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass(frozen=True)
class Counts:
    python_retries: float
    kernel_retries: float
    tokens_valid: float
    tokens_accepted: float

    @classmethod
    def read(cls, daemon: Daemon) -> Counts:
        return cls(metric(daemon, "steerd_retries_sent_total"),
                   metric(daemon, "steerd_bpf_events_total", '"xdp_retry_sent"'),
                   metric(daemon, "steerd_bpf_events_total", '"xdp_token_valid"'),
                   metric(daemon, "steerd_retry_tokens_total", 'result="accepted"'))


def check_counts(daemon: Daemon, before: Counts, retries: int, connections: int) -> None:
    """The guard sent ``retries`` Retries (those seen on the wire) and checked at least
    ``connections`` tokens, which the classifier accepted; Python sent no Retry. The daemon
    folds its counts in every 0.5 s: awaited."""
    deadline = time.monotonic() + 10
    while True:
        now = Counts.read(daemon)
        if (now.kernel_retries - before.kernel_retries >= retries
                and now.tokens_accepted - before.tokens_accepted >= connections
                and now.tokens_valid - before.tokens_valid >= connections):
            break
        assert time.monotonic() < deadline, (before, now, retries, connections)
        time.sleep(0.05)
    assert now.python_retries == 0, "the classifier's Python Retry sent one"
    assert now.kernel_retries - before.kernel_retries == retries, (
        "the guard counted Retries the capture does not hold", before, now, retries)


# -- the wire: the client's veth end, tshark as the oracle ----------------------


@contextlib.contextmanager
def wire(pair: NetnsPair, path: Path) -> Iterator[Path]:
    """Every frame on the client's veth end, both directions, written to the pcap ``path``
    once the block is left. An AF_PACKET socket: the kernel queues each frame to it as the
    frame crosses the interface, so once the client is done every frame of its conversation
    is queued (no flush to await). dumpcap is not used: stopped (SIGINT) right after the
    traffic, it dropped what its ring had not yet handed over (0 of 5 datagrams here). The
    socket's own drop count must be 0, else the capture is incomplete and the test fails."""
    require_tshark()

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        sock.bind((pair.client_if, ETH_P_ALL))
        sock.setblocking(False)
        return sock

    sock = pair.run_client(make)
    try:
        yield path
        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(sock.recv(65535))
        packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        assert drops == 0, f"the capture socket dropped {drops} of {packets} frames"
    finally:
        sock.close()
    write_pcap(path, frames)


def write_pcap(path: Path, frames: list[bytes]) -> None:
    """Classic pcap, Ethernet, no timestamps (tshark orders by position)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for frame in frames:
            f.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)


def read_pcap(path: Path) -> list[bytes]:
    """The frames ``write_pcap`` wrote."""
    data, at, frames = path.read_bytes(), 24, []
    while at < len(data):
        length = struct.unpack_from("<I", data, at + 8)[0]
        frames.append(data[at + 16 : at + 16 + length])
        at += 16 + length
    return frames


FIELDS = ("frame.number", "ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "udp.srcport",
          "udp.dstport", "quic.version", "quic.long.packet_type", "quic.long.packet_type_v2",
          "quic.dcid", "quic.scid", "quic.token_length", "quic.token", "quic.retry_token",
          "quic.retry_integrity_tag", "_ws.expert.message")


def tshark_packets(path: Path) -> list[dict[str, list[str]]]:
    cmd = [require_tshark(), "-n", "-r", str(path), "-T", "json",
           "-d", f"udp.port=={PORT},quic", "-Y", f"udp.port=={PORT}"]
    for f in FIELDS:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"tshark failed: {proc.stderr[-2000:]}"
    return [p["_source"]["layers"] for p in json.loads(proc.stdout or "[]")]


def _hex(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", ""))


@dataclass
class Datagram:
    """One UDP datagram of a capture as tshark read it (its QUIC packets' fields in order)."""

    frame: int
    client: tuple[str, int]  # the client's address and port, whichever way it went
    to_server: bool
    version: int | None  # of its first packet (None: short header first)
    types: list[str]  # long-header packet types (tshark's numbers for ``version``)
    dcids: list[bytes]
    scid: bytes  # of its first packet (b"": none, or zero-length, as Chromium's)
    token_length: int | None  # of its first Initial
    token: bytes
    retry_token: bytes
    tag: bytes
    expert: list[str]

    @classmethod
    def of(cls, layers: dict[str, list[str]]) -> Datagram:
        to_server = int(layers["udp.dstport"][0]) == PORT
        side = "src" if to_server else "dst"
        address = (layers.get(f"ip.{side}") or layers[f"ipv6.{side}"])[0]
        port = int(layers["udp.srcport" if to_server else "udp.dstport"][0])
        versions = layers.get("quic.version", [])
        one = lambda name: _hex(layers[name][0]) if name in layers else b""  # noqa: E731
        return cls(
            frame=int(layers["frame.number"][0]), client=(address, port), to_server=to_server,
            version=int(versions[0], 0) if versions else None,
            types=layers.get("quic.long.packet_type") or layers.get("quic.long.packet_type_v2")
            or [],
            dcids=[_hex(d) for d in layers.get("quic.dcid", [])],
            scid=one("quic.scid"),
            token_length=int(layers["quic.token_length"][0])
            if "quic.token_length" in layers else None,
            token=one("quic.token"), retry_token=one("quic.retry_token"),
            tag=one("quic.retry_integrity_tag"), expert=layers.get("_ws.expert.message", []),
        )

    @property
    def dcid(self) -> bytes:
        """Its first packet's DCID (tshark shows no field for a zero-length one)."""
        return self.dcids[0] if self.dcids else b""

    def first_is(self, kind: str) -> bool:
        return (self.version in TYPES and bool(self.types)
                and self.types[0] == TYPES[self.version][kind])


@dataclass
class Retried:
    """One client connection that went through a Retry, as tshark saw it."""

    client: tuple[str, int]
    version: int
    first: Datagram  # the client's first Initial, token-less
    retries: list[Datagram]  # every Retry the server sent this client
    retry: Datagram  # the one the client took
    again: Datagram  # the client's next Initial, with its token
    after: list[Datagram] = field(default_factory=list)  # the client's datagrams after again


def retried_on_wire(path: Path, version: int, clients: int) -> list[Retried]:
    """Every client connection in the capture, checked: see the module docstring. Also
    checks, on a copy of the capture with one bit of a tag flipped, that tshark's tag check
    is live (it reports ``quic.bad_retry`` there)."""
    datagrams = [Datagram.of(p) for p in tshark_packets(path)]
    by_client: dict[tuple[str, int], list[Datagram]] = {}
    for d in datagrams:
        by_client.setdefault(d.client, []).append(d)
    # clients that spoke QUIC long headers (Chromium opens no other UDP flows to PORT)
    conns = {c: ds for c, ds in by_client.items() if any(d.to_server and d.version for d in ds)}
    assert len(conns) == clients, f"{len(conns)} client connections on the wire: {list(conns)}"
    found = []
    for client, ds in conns.items():
        first = next(d for d in ds if d.to_server and d.version is not None)
        assert first.version == version, (client, hex(first.version or 0))
        assert first.first_is("initial") and first.token_length == 0, (client, first)
        retries = [d for d in ds if not d.to_server and d.first_is("retry")]
        assert retries, f"{client}: no Retry on the wire"
        for r in retries:
            assert r.version == version and r.frame > first.frame, (client, r)
            assert len(r.tag) == 16 and r.retry_token and r.scid, (client, r)
            assert r.dcid == first.scid, (client, r)  # to the client's SCID
        # Initials to the original DCID may still follow the first Retry (Chromium's second
        # datagram of its first flight): token-less, each answered by a Retry of its own; the
        # client's first Initial to another DCID is the retried one
        initials = [d for d in ds if d.to_server and d.first_is("initial")]
        assert all(d.token_length == 0 for d in initials if d.dcid == first.dcid), initials
        again = next((d for d in initials if d.dcid != first.dcid), None)
        assert again is not None, f"{client}: no Initial after the Retry"
        assert again.frame > retries[0].frame and again.version == version, (client, again)
        assert again.token_length and again.token_length > 0, (client, again)
        taken = [r for r in retries if r.retry_token == again.token]
        assert taken, f"{client}: the Initial's token is no Retry's: {again.token.hex()}"
        assert again.dcid == taken[0].scid, (client, again)  # to that Retry's SCID
        for r in retries:
            if r.frame > again.frame:
                # tshark checks a Retry's tag against the conversation's latest client DCID,
                # so a Retry that arrives after the retried Initial (the client ignores it,
                # RFC 9000 §17.2.5.2) is checked alone with the Initial it answers
                r = tshark_alone(path, first, r)
            assert BAD_RETRY not in r.expert, f"{client}: tshark rejects the Retry's tag: {r}"
        after = [d for d in ds if d.to_server and d.frame > again.frame]
        found.append(Retried(client, version, first, retries, taken[0], again, after))
    tshark_checks_the_tag(path, found[0].retry)
    return found


def tshark_alone(path: Path, initial: Datagram, retry: Datagram) -> Datagram:
    """tshark's view of ``retry`` in a capture of only ``initial`` and ``retry``."""
    frames = read_pcap(path)
    alone = path.with_name(f"{path.stem}-retry{retry.frame}{path.suffix}")
    write_pcap(alone, [frames[initial.frame - 1], frames[retry.frame - 1]])
    (seen,) = [d for d in map(Datagram.of, tshark_packets(alone)) if not d.to_server]
    assert seen.tag == retry.tag, seen
    return seen


def tshark_checks_the_tag(path: Path, retry: Datagram) -> None:
    """The same capture with one bit of ``retry``'s tag flipped: tshark must say so (else
    its silence about the real tags would prove nothing)."""
    data = path.read_bytes()
    assert data.count(retry.tag) == 1, "the tag is not unique in the capture"
    at = data.index(retry.tag) + 15
    bad = path.with_name(path.stem + "-badtag" + path.suffix)
    bad.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    (seen,) = [d for d in map(Datagram.of, tshark_packets(bad)) if d.frame == retry.frame]
    assert BAD_RETRY in seen.expert, f"tshark did not check the Retry's tag: {seen}"


def session(pair: NetnsPair, stack: str, family: int,
            versions: list[int] | None = None) -> Session:
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    sock.bind((pair.client_v4 if family == socket.AF_INET else pair.client_v6, 0))
    return Session(stack, sock, (pair.server_addr(family), PORT), "h3", versions=versions)


# -- the tests ---------------------------------------------------------------------------


def test_real_clients_complete_through_the_kernel_retry(
    pair: NetnsPair, daemon: Daemon, site: RunningApp, tmp_path: Path
) -> None:
    before = Counts.read(daemon)
    done = 0
    with wire(pair, tmp_path / "v1.pcap") as pcap:
        for stack in ("aioquic", "qh3"):
            for family in (socket.AF_INET, socket.AF_INET6):
                s = session(pair, stack, family)
                try:
                    status, body = s.get("/count")
                finally:
                    s.close()
                assert status == 200, (stack, family, body)
                got = [d for d in s.received if d[0] & 0x80
                       and parse_long_header(d).packet_type is PacketType.RETRY]
                assert got, f"{stack}/{family}: no Retry"
                done += 1
    conns = retried_on_wire(pcap, VERSION_1, clients=done)
    check_counts(daemon, before, sum(len(c.retries) for c in conns), done)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
@pytest.mark.parametrize("stack", ["aioquic", "qh3"])
def test_quic_v2_through_the_kernel_retry(
    pair: NetnsPair, daemon: Daemon, site: RunningApp, stack: str, family: int,
    tmp_path: Path
) -> None:
    before = Counts.read(daemon)
    with wire(pair, tmp_path / "v2.pcap") as pcap:
        s = session(pair, stack, family, versions=[VERSION_2])
        me = s.sock.getsockname()[:2]
        try:
            status, body = s.get("/count")
        finally:
            s.close()
    assert status == 200, body
    assert s.conn._version == VERSION_2, "the connection left QUIC v2"
    (conn,) = retried_on_wire(pcap, VERSION_2, clients=1)
    assert conn.client == me
    check_counts(daemon, before, len(conn.retries), 1)


def test_chromium_through_the_kernel_retry(
    pair: NetnsPair, daemon: Daemon, site: RunningApp, tmp_path: Path
) -> None:
    before = Counts.read(daemon)
    with wire(pair, tmp_path / "chromium.pcap") as pcap:
        out = chromium_get(pair, HOST, site)
    assert PAGE_MARK in out.stdout, out.stderr[-2000:]
    conns = retried_on_wire(pcap, VERSION_1, clients=1)
    check_counts(daemon, before, sum(len(c.retries) for c in conns), len(conns))


def test_ngtcp2_through_the_kernel_retry_then_0rtt(
    pair: NetnsPair, daemon: Daemon, site: RunningApp, tmp_path: Path
) -> None:
    """gtlsclient gets the page through a Retry and keeps the session and transport
    parameters; a second run resumes with 0-RTT, again through a Retry: its 0-RTT packets
    after the Retry go to the Retry's SCID (tshark), and the server accepts the early data
    (gtlsclient's packet log: the request left in 0-RTT after the Retry, and no "Early data
    was rejected")."""
    session_file, tp_file = tmp_path / "session.pem", tmp_path / "tp.txt"
    keep = (f"--session-file={session_file}", f"--tp-file={tp_file}")
    for run in ("first", "resumed"):
        before = Counts.read(daemon)
        with wire(pair, tmp_path / f"ngtcp2-{run}.pcap") as pcap:
            out, saved = gtlsclient_get(pair, HOST, ["/"], *keep)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-3000:]
        assert PAGE_MARK in saved.get("index.html", b"").decode(), log[-3000:]
        (conn,) = retried_on_wire(pcap, VERSION_1, clients=1)
        check_counts(daemon, before, len(conn.retries), 1)
        zero_rtt = TYPES[VERSION_1]["0rtt"]
        sent = [conn.first, conn.again, *conn.after]
        # gtlsclient's own packet log: in which packets the request (stream 0, FIN) left
        request_in = set(re.findall(r" frm tx \d+ (\w+) STREAM\(0x0[89a-f]\) id=0x0 [^\n]*fin=1",
                                    out.stderr))
        if run == "first":
            assert session_file.stat().st_size and tp_file.stat().st_size, log[-3000:]
            assert not any(zero_rtt in d.types for d in sent), "0-RTT with nothing to resume"
            assert request_in == {"1RTT"}, (request_in, log[-3000:])
            continue
        # resumed: 0-RTT again after the Retry (RFC 9000 §17.2.5.3), first to the Retry's SCID
        early = [(d, d.dcids[d.types.index(zero_rtt)]) for d in sent[1:] if zero_rtt in d.types]
        assert early, f"no 0-RTT after the Retry: {log[-3000:]}"
        assert early[0][1] == conn.retry.scid, early
        # the request left in 0-RTT after the Retry, and the server accepted the early data:
        # gtlsclient prints "Early data was rejected by server" when it tried 0-RTT and the
        # server's EncryptedExtensions had no early_data (then it resends in 1-RTT)
        retry_at = out.stderr.find(" type=Retry ")
        assert retry_at >= 0, log[-3000:]
        assert re.search(r" frm tx \d+ 0RTT STREAM\(0x0[89a-f]\) id=0x0 [^\n]*fin=1",
                         out.stderr[retry_at:]), log[-3000:]
        assert "0RTT" in request_in and "Early data was rejected" not in log, log[-3000:]
