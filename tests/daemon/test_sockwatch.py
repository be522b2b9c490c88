"""The socket watchdog's checking code (steerd/daemon/sockwatch.py), on real sockets.

Each check is shown to find the change it is for (so it can fail), and each repair to set
the socket back as the kernel reports it. The canary is run through a real steering program
on a real reuseport group; a 32-bit call (tests/security/compat32.py) shows that what the
native path's hook would miss is found all the same. The end-to-end proof with a daemon,
tenants and their clients is tests/security/test_watchdog.py.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

from steerd.daemon import sockwatch
from steerd.daemon.control import bind_group_socket
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.sockwatch import (
    CONNECTED,
    DEVICE,
    PROGRAM,
    REUSEADDR,
    REUSEPORT,
    Canary,
    SocketWatchdog,
    inspect,
    repair,
)
from tests.security.compat32 import setsockopt32

K = header_constants()


@pytest.fixture
def group() -> Iterator[list[socket.socket]]:
    """Two members of a fresh reuseport group on loopback, as the daemon makes them."""
    first = bind_group_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    made = [first, bind_group_socket("127.0.0.1", port)]
    try:
        yield made
    finally:
        for sock in made:
            sock.close()


def test_a_clean_worker_socket_shows_nothing(group: list[socket.socket]) -> None:
    assert inspect(group[1]) == []


@pytest.mark.parametrize("what", [REUSEPORT, REUSEADDR])
def test_a_changed_flag_is_found_and_set_back(group: list[socket.socket], what: str) -> None:
    sock = group[1]
    if what == REUSEPORT:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    assert inspect(sock) == [what]
    assert repair(sock, [what]) is False  # still in its group
    assert inspect(sock) == []
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0


@pytest.mark.parametrize("what", [DEVICE, CONNECTED])
def test_a_rehashed_socket_is_made_to_lose_every_lookup(
    group: list[socket.socket], what: str
) -> None:
    """A device binding or a connect() rehashes the socket, and the kernel takes it out of
    its group for good. Undone plainly, the stray (newest, head of the lookup chain, flag
    set, no group) would take every datagram to the port (shown by the control below);
    the repair connects it to its own address instead, and it gets nothing."""
    port = group[0].getsockname()[1]
    sock = group[1]
    if what == DEVICE:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo\0")
    else:
        sock.connect(("127.0.0.1", 9))
    assert inspect(sock) == [what]
    assert repair(sock, [what]) is True
    assert inspect(sock, stray=True) == []
    assert inspect(sock) == ([DEVICE, CONNECTED] if what == DEVICE else [CONNECTED])  # as made
    assert sock.getpeername() == ("127.0.0.1", port)
    assert received_by(group, port, 32) == {0: 32}
    sock.connect(("127.0.0.1", 9))  # the app connects it elsewhere: found, set back
    assert inspect(sock, stray=True) == [CONNECTED]
    assert repair(sock, [CONNECTED]) is True and inspect(sock, stray=True) == []


def test_an_unbound_stray_would_take_the_port(group: list[socket.socket]) -> None:
    """The control for the test above: why a device binding is not simply undone."""
    port = group[0].getsockname()[1]
    group[1].setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo\0")
    group[1].setsockopt(socket.SOL_SOCKET, sockwatch.SO_BINDTOIFINDEX, 0)
    assert received_by(group, port, 32) == {1: 32}


def test_a_cleared_flag_takes_the_port_until_set_back(group: list[socket.socket]) -> None:
    """Why the flag matters: the newest member without SO_REUSEPORT receives every
    datagram to the port (no program runs); set back, the group hashes again."""
    port = group[0].getsockname()[1]
    thief = group[1]
    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    assert received_by(group, port, 32) == {1: 32}
    repair(thief, inspect(thief))
    assert set(received_by(group, port, 64)) == {0, 1}  # 64 source ports: both, w.h.p.


def received_by(group: list[socket.socket], port: int, n: int) -> dict[int, int]:
    """Send one datagram from each of ``n`` fresh source ports; which member got how many."""
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"x", ("127.0.0.1", port))
    got: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while sum(got.values()) < n and time.monotonic() < deadline:
        for i, sock in enumerate(group):
            sock.settimeout(0.05)
            try:
                sock.recv(16)
            except TimeoutError:
                continue
            got[i] = got.get(i, 0) + 1
    return got


@pytest.mark.root
def test_a_32_bit_clear_is_found(group: list[socket.socket]) -> None:
    """The cgroup setsockopt hook never sees this call; the watchdog's look does. The
    helper runs as nobody on a copy of the socket, as an app holding it would."""
    outcome = setsockopt32(group[1], socket.SOL_SOCKET, socket.SO_REUSEPORT,
                           struct.pack("i", 0))
    assert outcome.reported and (outcome.result == 0 or outcome.killed), outcome
    assert inspect(group[1]) == [REUSEPORT]
    assert repair(group[1], [REUSEPORT]) is False
    assert inspect(group[1]) == []


# -- the canary ---------------------------------------------------------------------------------


class FakeGroup:
    """A program that counts canaries when ``ours`` (synchronously, like loopback does)."""

    def __init__(self) -> None:
        self.ours = True
        self.count = 0
        self.sent = 0

    def send(self) -> None:
        self.sent += 1
        if self.ours:
            self.count += 1


def test_canary_verdicts() -> None:
    g = FakeGroup()
    c = Canary(lambda: g.count, g.send, grace=0.01)
    c.restart(0.0)
    assert c.look(0.005) == sockwatch.OK and g.sent == 2  # counted: the next one goes
    g.ours = False  # detached after that send was counted
    assert c.look(0.010) == sockwatch.OK and g.sent == 3  # that one was counted before
    assert c.look(0.015) == sockwatch.WAIT and g.sent == 3  # not counted, not due yet
    assert c.look(0.021) == sockwatch.MISS  # not counted within the grace
    g.ours = True  # the caller attached steerd's program again
    c.restart(0.021, suspect=True)
    assert c.look(0.025) == sockwatch.REPLACED  # only the post-repair one: it was not ours
    assert c.look(0.030) == sockwatch.OK


def test_a_late_canary_is_no_finding() -> None:
    """A canary the kernel counted late (a deferred softirq) is not taken for a replaced
    program: it is counted beside the one sent after the (harmless) re-attach."""
    g = FakeGroup()
    c = Canary(lambda: g.count, lambda: g.send() if g.ours else None, grace=0.01)
    g.ours = False  # the next canary is held up
    c.restart(0.0)
    assert c.look(0.011) == sockwatch.MISS
    g.count += 1  # the held-up canary is counted at last
    g.ours = True
    c.restart(0.011, suspect=True)
    assert c.look(0.015) == sockwatch.LATE


def test_canary_datagram_and_secret() -> None:
    secret = sockwatch.canary_secret()
    assert len(secret) == K["STEERD_CANARY_DCID_LEN"]
    assert secret[0] >> K["STEERD_CONFIG_ROTATION_SHIFT"] == K["STEERD_CR_UNROUTABLE"]
    data = sockwatch.canary_datagram(secret)
    assert len(data) == 1200 and data[0] & 0xC0 == 0xC0
    assert struct.unpack("!I", data[1:5])[0] == K["STEERD_CANARY_VERSION"]
    assert data[5] == len(secret) and data[6 : 6 + len(secret)] == secret
    assert sockwatch.canary_target("0.0.0.0", 443) == (socket.AF_INET, ("127.0.0.1", 443))
    assert sockwatch.canary_target("::", 443) == (socket.AF_INET6, ("::1", 443))
    assert sockwatch.canary_target("10.1.2.3", 4) == (socket.AF_INET, ("10.1.2.3", 4))


def test_protection_line() -> None:
    bound = sockwatch.REPAIR_BOUND_MS
    assert bound <= 100
    assert sockwatch.protection(None) == f"watchdog only: repaired within {bound} ms"
    assert sockwatch.protection("BPF LSM").startswith("32-bit calls refused by BPF LSM")


@pytest.mark.root
def test_canary_through_a_real_program_and_repair() -> None:
    """steerd's program counts a canary with the secret (and only with it); detached, it
    counts nothing, and the watchdog's look attaches it again."""
    from steerd.daemon.dataplane import Dataplane, DataplaneConfig
    from steerd.daemon.dataplane.counters import read_counter, write_every_cpu

    sock = bind_group_socket("127.0.0.1", 0, classifier=True)
    port = sock.getsockname()[1]
    pin_dir = f"/sys/fs/bpf/steerd-sw-{uuid.uuid4().hex[:8]}"
    dp = Dataplane(DataplaneConfig(port=port, pin_dir=pin_dir))
    findings: list[sockwatch.Finding] = []
    watch = SocketWatchdog(on_finding=findings.append)
    try:
        dp.load()
        dp.set_classifier(0, sock)
        dp.attach_reuseport(sock)
        secret = sockwatch.canary_secret()
        fd = dp.map_fd("counters")
        write_every_cpu(fd, dp.ncpus, K["STEERD_CANARY_SECRET"],
                        int.from_bytes(secret, sys.byteorder))

        def counted() -> int:
            return read_counter(fd, dp.ncpus, K["STEERD_CNT_STEER_CANARY"])

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(sockwatch.canary_datagram(os.urandom(8)), ("127.0.0.1", port))
            assert await_value(counted, 0) == 0  # no secret: the normal path
            sender.sendto(sockwatch.canary_datagram(secret), ("127.0.0.1", port))
            assert await_value(counted, 1) == 1
        watch.set_secret(secret)
        attached = []
        watch.add_group("127.0.0.1", port, counted,
                        lambda: (dp.attach_reuseport(sock), attached.append(1)))
        assert await_value(counted, 2) == 2  # add_group sent the first one
        t = time.monotonic()
        assert watch.look(t + 0.001) == [] and watch.look(t + 0.002) == []
        sock.setsockopt(socket.SOL_SOCKET, 68, struct.pack("i", 0))  # SO_DETACH_REUSEPORT_BPF
        assert watch.look(t + 0.003) == []  # the last one sent while attached: counted
        before = counted()
        assert watch.look(t + 0.004) == []  # sent detached: in flight
        assert watch.look(t + 0.005 + sockwatch.CANARY_GRACE) == []  # missed: attached again
        assert attached == [1]
        assert await_value(counted, before + 1) == before + 1  # the post-repair one counted
        assert watch.look(t + 0.006 + sockwatch.CANARY_GRACE) == [
            sockwatch.Finding(PROGRAM, "127.0.0.1", None, None, None)]  # so it was not ours
    finally:
        watch.stop()
        sock.close()
        dp.destroy()


def await_value(read: Callable[[], int], want: int, timeout: float = 5.0) -> int:
    """``read()`` once it reaches ``want`` or the deadline passed (loopback counts at once
    almost always; a loaded machine may defer the softirq)."""
    deadline = time.monotonic() + timeout
    value = read()
    while value < want and time.monotonic() < deadline:
        time.sleep(0.005)
        value = read()
    return value


# -- the watchdog's looks and released sockets ----------------------------------------------------


def test_look_repairs_and_reports_whose_socket(group: list[socket.socket]) -> None:
    watch = SocketWatchdog(on_finding=lambda f: None)
    try:
        watch.watch(7, "web", 1234, [("127.0.0.1", group[1].fileno())])
        assert watch.look() == []
        group[1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        assert watch.look() == [sockwatch.Finding(REUSEPORT, "127.0.0.1", 7, "web", 1234)]
        assert inspect(group[1]) == []  # the watchdog's dup is the same socket
        watch.release(7)
        group[1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        # released, still watched (its holder may still use it): no slot any more
        assert watch.look() == [sockwatch.Finding(REUSEPORT, "127.0.0.1", None, "web", 1234)]
    finally:
        watch.stop()


def test_the_watchdog_keeps_no_socket_alive(group: list[socket.socket]) -> None:
    """The watchdog finds a holder of a watched socket and borrows it for each look, but
    holds none itself: when the last holder exits, the socket closes (it leaves its group,
    so the steering program sends that worker's clients to a classifier), even while its
    slot is still live; after GONE_AFTER scans without a holder a released record goes."""
    watch = SocketWatchdog(on_finding=lambda f: None)
    sock = group.pop()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, pass_fds=[sock.fileno()])
    try:
        ino = os.fstat(sock.fileno()).st_ino
        watch.watch(3, "files", 99, [("127.0.0.1", sock.fileno())])
        sock.close()  # this process's copy: only the holder's remains
        assert sockwatch.holders({ino}, {os.getpid()}) == {ino: (holder.pid, mock.ANY)}
        watch.look()
        assert watch.watched == (1, 0)
        assert watch._live[3].sockets[0].holder is not None  # found, and borrowed from
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        # nobody holds it now, the watchdog included: the kernel has closed it
        assert not any(line.split()[9] == str(ino) for table in ("udp", "udp6")
                       for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:])
        watch.release(3)
        for _ in range(sockwatch.GONE_AFTER + 1):
            watch._next_scan = 0.0  # the scan is due at once (the test does not wait)
            watch.look()
        assert watch.watched == (0, 0)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(5)
        watch.stop()


def test_inspect_errors_are_oserrors_not_silence(group: list[socket.socket]) -> None:
    """A closed socket cannot be looked at: the watchdog logs it rather than calling it
    clean (inspect raises)."""
    sock = group.pop()
    sock.close()
    with pytest.raises(OSError) as info:
        inspect(sock)
    assert info.value.errno == errno.EBADF
