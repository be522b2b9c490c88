"""Fixtures for the data-plane tests: a namespace pair with the XDP guard on the server veth,
a loaded Dataplane with its own pin dir, and reuseport groups of sockets the test owns.

Every resource is released in a finally/yield path, and a session fixture checks that no
namespace or steerd BPF program made here outlives the suite.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from deploy.netns import LIVE, NetnsPair, netns_pair
from quic.cid import CidLayout
from quic.packet import VERSION_1, PacketType, encode_varint_fixed, long_header_type_bits
from steerd.daemon.dataplane import Dataplane, DataplaneConfig
from steerd.daemon.dataplane.netns import netns_path

PORT = 4433
OTHER_PORT = 4434
LAYOUT = CidLayout(config_id=1, host_id=0x2A, host_id_len=1, slot_len=2, nonce_len=6)
CLASSIFIER_SLOTS = 4
MARKER_SLOT = 65000  # a worker every group has: its arrival proves earlier packets were handled


def held_bpf_prog_ids() -> set[int]:
    """IDs of the BPF programs this process holds a file descriptor to (from fdinfo), so the
    check ignores programs of other test runs sharing the machine."""
    ids = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


@pytest.fixture(scope="session", autouse=True)
def _no_leaks() -> Iterator[None]:
    """After the suite: no namespace made here and no BPF program loaded here may remain
    (pinned ones are checked where they are made: each pin dir must be gone)."""
    if os.geteuid() != 0:
        yield
        return
    before = held_bpf_prog_ids()
    yield
    leaked_ns = [n for n in LIVE if os.path.exists(netns_path(n))]
    leaked_progs = held_bpf_prog_ids() - before
    assert not leaked_ns, f"network namespaces left behind: {leaked_ns}"
    assert not leaked_progs, f"BPF programs still held: {leaked_progs}"


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and BPF")
    with netns_pair() as made:
        yield made


@dataclass
class Loaded:
    dp: Dataplane
    guard: str  # "xdp" or "tc": where the guard is attached
    xdp_mode: str | None


@pytest.fixture(scope="module", params=["xdp", "tc"])
def loaded(pair: NetnsPair, request: pytest.FixtureRequest) -> Iterator[Loaded]:
    """The data plane with the guard on the server veth: every data-plane test runs once with
    the guard at XDP (native) and once at TC ingress, which must judge identically."""
    pin_dir = f"/sys/fs/bpf/steerd-test-{uuid.uuid4().hex[:8]}"
    dp = Dataplane(DataplaneConfig(layout=LAYOUT, port=PORT, classifier_slots=CLASSIFIER_SLOTS,
                                   pin_dir=pin_dir))
    try:
        dp.load()
        mode = None
        if request.param == "xdp":
            mode = dp.attach_xdp(pair.server_if, netns=pair.server)
        else:
            dp.attach_tc(pair.server_if, netns=pair.server)
        yield Loaded(dp, request.param, mode)
    finally:
        dp.destroy()
        assert not os.path.exists(pin_dir)


# -- packets -----------------------------------------------------------------------------


def short_packet(dcid: bytes, tag: bytes, size: int = 64) -> bytes:
    """A short-header packet: only the first byte and the DCID matter to the programs."""
    packet = (bytes([0x40 | 0x03]) + dcid + tag).ljust(size, b"\x00")
    assert len(packet) == size, "packet too small for its tag"
    return packet


def long_packet(ptype: PacketType, dcid: bytes, tag: bytes, version: int = VERSION_1,
                size: int = 1200, scid: bytes = b"\x5c" * 8) -> bytes:
    """A long-header packet with correct header fields and length (payload is filler)."""
    first = 0xC0 | (long_header_type_bits(version, ptype) << 4) | 0x03
    head = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    head += bytes([len(scid)]) + scid
    if ptype == PacketType.INITIAL:
        head += b"\x00"  # token length
    length = size - len(head) - 2
    assert length >= len(tag), "packet too small for its tag"
    return head + encode_varint_fixed(length, 2) + tag.ljust(length, b"\x00")


def unknown_version_packet(dcid: bytes, tag: bytes, size: int = 1200) -> bytes:
    head = b"\xc0" + (0x1A2A3A4A).to_bytes(4, "big") + bytes([len(dcid)]) + dcid + b"\x00"
    return (head + tag).ljust(size, b"\x00")


def new_tag() -> bytes:
    return b"TAG" + uuid.uuid4().bytes


def find_tag(data: bytes) -> bytes | None:
    at = data.find(b"TAG")
    return data[at : at + 19] if at >= 0 else None


# -- reuseport groups ----------------------------------------------------------------------


def reuseport_socket(pair: NetnsPair, port: int = PORT) -> socket.socket:
    """A dual-stack UDP socket in the server namespace, member of the port's group."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("::", port))
        sock.setblocking(False)
        return sock

    return pair.run_server(make)


@dataclass
class Group:
    """One reuseport group on PORT: worker sockets by slot, classifier sockets by index."""

    pair: NetnsPair
    dp: Dataplane
    workers: dict[int, socket.socket] = field(default_factory=dict)
    classifiers: dict[int, socket.socket] = field(default_factory=dict)
    clients: dict[tuple[int, int], socket.socket] = field(default_factory=dict)

    def labels(self) -> dict[socket.socket, str]:
        out = {s: f"worker{slot}" for slot, s in self.workers.items()}
        out.update({s: f"classifier{i}" for i, s in self.classifiers.items()})
        return out

    def client(self, family: int, index: int = 0) -> socket.socket:
        """Client socket number ``index`` of ``family`` (each has its own source port)."""
        key = (family, index)
        if key not in self.clients:
            self.clients[key] = self.pair.client_socket(family, socket.SOCK_DGRAM)
        return self.clients[key]

    def send(self, family: int, payload: bytes, index: int = 0) -> None:
        self.client(family, index).sendto(payload, (self.pair.server_addr(family), PORT))

    def deliver(self, family: int, sends: list[tuple[int, bytes]],
                timeout: float = 5.0) -> dict[bytes, str]:
        """Send ``(client index, payload)`` in order, then a marker to MARKER_SLOT; wait for
        the marker and drain every socket. Returns tag -> receiving socket label for every
        tagged datagram that arrived (the marker excluded)."""
        for index, payload in sends:
            self.send(family, payload, index)
        marker = new_tag()
        self.send(family, short_packet(LAYOUT.encode(MARKER_SLOT, os.urandom(6)), marker))
        labels = self.labels()
        got: dict[bytes, str] = {}
        seen_marker = False
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for sock in labels:
                sel.register(sock, selectors.EVENT_READ)
            while not seen_marker:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"marker not delivered; got so far: {got}")
                for key, _ in sel.select(remaining):
                    seen_marker |= self._drain(key.fileobj, labels, got, marker)  # type: ignore[arg-type]
        for sock in labels:  # anything queued before the marker's socket was read
            self._drain(sock, labels, got, marker)
        return got

    @staticmethod
    def _drain(sock: socket.socket, labels: dict[socket.socket, str], got: dict[bytes, str],
               marker: bytes) -> bool:
        seen = False
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return seen
            tag = find_tag(data)
            if tag == marker:
                assert labels[sock] == f"worker{MARKER_SLOT}", "marker mis-steered"
                seen = True
            elif tag is not None:
                got[tag] = labels[sock]
            else:  # untagged datagrams (runts) must show up too if they slip through
                got[b"untagged:" + data] = labels[sock]

    def close(self) -> None:
        for sock in [*self.workers.values(), *self.classifiers.values(), *self.clients.values()]:
            sock.close()


GroupFactory = Callable[..., Group]


@pytest.fixture
def make_group(pair: NetnsPair, loaded: Loaded) -> Iterator[GroupFactory]:
    """Build groups: ``make_group(workers=[slots], classifiers=N)``; all closed afterwards."""
    groups: list[Group] = []

    def make(workers: list[int] = (), classifiers: int = 2) -> Group:  # type: ignore[assignment]
        group = Group(pair, loaded.dp)
        groups.append(group)
        for slot in [MARKER_SLOT, *workers]:
            group.workers[slot] = reuseport_socket(pair)
        for index in range(classifiers):
            group.classifiers[index] = reuseport_socket(pair)
        loaded.dp.attach_reuseport(group.workers[MARKER_SLOT])
        for slot, sock in group.workers.items():
            loaded.dp.set_worker(slot, sock)
        for index, sock in group.classifiers.items():
            loaded.dp.set_classifier(index, sock)
        return group

    try:
        yield make
    finally:
        for group in groups:
            group.close()
        for dcid in loaded.dp.routes():
            loaded.dp.delete_route(dcid)
        loaded.dp.disable_flood_guard()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that moved."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}
