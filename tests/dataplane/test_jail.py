"""The socket jail's selftests: its allowlist, its 32-bit hook and io_uring, on a throw-away jail.

Each test attaches a real jail (bpf/jail.c at the cgroup v2 root, bpf/compat.c on
the sys_enter raw tracepoint) for a fresh loopback port of its own, makes the calls an app
holding a worker socket could make, and removes everything afterwards. The test process is
not in the listed cgroup, so it plays the app; a forked child plays the daemon where needed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from steerd.daemon.dataplane.counters import counter_names, possible_cpus, read_counters
from steerd.daemon.dataplane.i386 import I386
from steerd.daemon.dataplane.jail import (
    ALLOWED_OPTIONS,
    ON_ONLY,
    Jail,
    cgroup_id,
    own_cgroup,
    remove_jail,
)
from steerd.daemon.dataplane.maps import MAP_PERCPU_ARRAY, libbcc
from steerd.daemon.dataplane.programs import find_kernel_headers
from tests.dataplane.uring import Ring
from tests.security.intruder import errno_of

pytestmark = pytest.mark.root

NOBODY = 65534
SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF = 51, 52, 68
SO_BINDTOIFINDEX, SO_INCOMING_CPU, SO_MARK, SO_ATTACH_FILTER = 62, 49, 36, 26
IP_TRANSPARENT, IP_FREEBIND, IP_MULTICAST_ALL, IP_ADD_MEMBERSHIP = 19, 15, 49, 35
UDP_ENCAP = 100

# Options an app must not set on a service socket: each would let it take or steer traffic
# of the others, or join what it should not see. (level, optname, value).
REFUSED = {
    "SO_REUSEPORT off": (socket.SOL_SOCKET, socket.SO_REUSEPORT, struct.pack("i", 0)),
    "SO_REUSEADDR off": (socket.SOL_SOCKET, socket.SO_REUSEADDR, struct.pack("i", 0)),
    "SO_ATTACH_REUSEPORT_CBPF": (socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(16)),
    "SO_ATTACH_REUSEPORT_EBPF": (socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF,
                                 struct.pack("i", 0)),
    "SO_DETACH_REUSEPORT_BPF": (socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, struct.pack("i", 0)),
    "SO_BINDTODEVICE": (socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo\0"),
    "SO_BINDTOIFINDEX": (socket.SOL_SOCKET, SO_BINDTOIFINDEX, struct.pack("i", 1)),
    "SO_INCOMING_CPU": (socket.SOL_SOCKET, SO_INCOMING_CPU, struct.pack("i", 0)),
    "SO_MARK": (socket.SOL_SOCKET, SO_MARK, struct.pack("i", 1)),
    "SO_ATTACH_FILTER": (socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(16)),
    "IP_TRANSPARENT": (socket.IPPROTO_IP, IP_TRANSPARENT, struct.pack("i", 1)),
    "IP_FREEBIND": (socket.IPPROTO_IP, IP_FREEBIND, struct.pack("i", 1)),
    "IP_MULTICAST_ALL": (socket.IPPROTO_IP, IP_MULTICAST_ALL, struct.pack("i", 1)),
    "IP_ADD_MEMBERSHIP": (socket.IPPROTO_IP, IP_ADD_MEMBERSHIP,
                          socket.inet_aton("224.0.0.1") + socket.inet_aton("0.0.0.0")),
    "UDP_ENCAP": (17, UDP_ENCAP, struct.pack("i", 1)),
}


@dataclass
class Jailed:
    jail: Jail
    port: int
    v4: socket.socket  # bound to 127.0.0.1:port, SO_REUSEPORT on (a worker socket)
    v6: socket.socket  # bound to [::1]:port
    other: socket.socket  # another UDP port: never the jail's business
    counters_fd: int

    def counter(self, name: str) -> int:
        names = {i: n for i, n in counter_names().items() if n == name}
        return read_counters(self.counters_fd, possible_cpus(), names)[name]


@pytest.fixture
def jailed() -> Iterator[Jailed]:
    headers, _ = find_kernel_headers()
    if headers is not None:
        os.environ.setdefault("BCC_KERNEL_SOURCE", str(headers))
    pin_dir = tempfile.mkdtemp(prefix="steerd-test-jail-", dir="/sys/fs/bpf")
    counters = libbcc().bcc_create_map(MAP_PERCPU_ARRAY, b"jail_test_c", 4, 8, 64, 0)
    socks: list[socket.socket] = []
    jail = Jail(pin_dir, 0, counters)
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(v4)
        v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        v4.bind(("127.0.0.1", 0))
        port = v4.getsockname()[1]
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        socks.append(v6)
        v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        v6.bind(("::1", port))
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(other)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        jail.port = port
        jail.open()
        jail.attach()
        assert jail.compat_error is None, jail.compat_error
        yield Jailed(jail, port, v4, v6, other, counters)
    finally:
        for sock in socks:
            sock.close()
        jail.close()
        remove_jail(pin_dir)
        os.close(counters)
        os.rmdir(pin_dir)


def in_child(body: Callable[[], int], uid: int | None = None) -> int:
    """Run ``body`` in a forked child (as ``uid``): its exit code, or -signal if killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_every_listed_option_passes_and_everything_else_is_refused(jailed: Jailed) -> None:
    for opt in ALLOWED_OPTIONS:
        sock = jailed.v6 if opt.level == socket.IPPROTO_IPV6 else jailed.v4
        value = struct.pack("i", 1 if opt.verdict == ON_ONLY else 0)
        got = errno_of(lambda s=sock, o=opt, v=value: s.setsockopt(o.level, o.optname, v))
        # the kernel may still say EINVAL or ENOPROTOOPT for a value it dislikes: not EPERM
        assert got != errno.EPERM, opt.name
    before = jailed.counter("jail_refused_setsockopt")
    for name, (level, optname, value) in REFUSED.items():
        for sock in (jailed.v4, jailed.v6):
            got = errno_of(lambda s=sock, lv=level, o=optname, v=value: s.setsockopt(lv, o, v))
            assert got == errno.EPERM, (name, sock.family)
    assert jailed.counter("jail_refused_setsockopt") - before == 2 * len(REFUSED)
    # nothing changed: still group members, no device, no peer
    for sock in (jailed.v4, jailed.v6):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).strip(b"\0") == b""
    # connect and a second bind to the port are refused too (the protocol hooks)
    assert errno_of(lambda: jailed.v4.connect(("127.0.0.1", 9))) == errno.EPERM
    assert errno_of(lambda: jailed.v6.connect(("::1", 9))) == errno.EPERM
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as extra:
        extra.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        assert errno_of(lambda: extra.bind(("127.0.0.1", jailed.port))) == errno.EPERM


def test_turning_the_reuse_flags_on_is_answered_as_done_and_changes_nothing(
        jailed: Jailed) -> None:
    before = jailed.counter("jail_noop_setsockopt")
    assert jailed.v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    jailed.v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what hypercorn does
    jailed.v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    assert jailed.v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0  # not reached
    assert jailed.counter("jail_noop_setsockopt") - before == 2


def test_other_ports_and_the_daemons_cgroup_are_not_jailed(jailed: Jailed) -> None:
    jailed.other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    assert jailed.other.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0

    # A child that enters a listed cgroup is the daemon, and so is its own child (the
    # classifier processes inherit it); listing follows the cgroup, not a pid.
    parent = own_cgroup()
    path = os.path.join(parent, f"steerd-test-{os.getpid()}")
    os.mkdir(path)
    try:
        jailed.jail.set_daemon_cgroups([cgroup_id(path)])

        def as_daemon() -> int:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            jailed.v4.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            jailed.v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            grandchild = in_child(lambda: 0 if errno_of(lambda: jailed.v4.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)) == 0 else 3)
            return 0 if grandchild == 0 else 2

        assert in_child(as_daemon) == 0
        assert jailed.v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        jailed.jail.set_daemon_cgroups([])
        assert in_child(lambda: errno_of(lambda: jailed.v4.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEPORT, 0))) == errno.EPERM
    finally:
        os.rmdir(path)


@pytest.mark.parametrize("entry", ["setsockopt", "socketcall"])
def test_a_32_bit_call_outside_the_allowlist_kills_its_caller(jailed: Jailed, entry: str) -> None:
    def call(sock: socket.socket, optname: int, value: int) -> Callable[[], int]:
        def body() -> int:
            caller = I386()
            make = caller.setsockopt if entry == "setsockopt" else caller.socketcall_setsockopt
            return 0 if make(sock.fileno(), socket.SOL_SOCKET, optname,
                             struct.pack("i", value)) == 0 else 3
        return body

    before = jailed.counter("jail_killed_compat")
    # allowed options, the flag turned on, and other ports pass: the caller lives
    assert in_child(call(jailed.v4, socket.SO_RCVBUF, 1 << 16), uid=NOBODY) == 0
    assert in_child(call(jailed.v4, socket.SO_REUSEPORT, 1), uid=NOBODY) == 0
    assert in_child(call(jailed.other, socket.SO_REUSEPORT, 0), uid=NOBODY) == 0
    jailed.other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    assert jailed.jail.drain_offences() == []
    # clearing the flag or detaching the program: killed (the call itself still ran: the
    # watchdog's business), and recorded with the caller's uid
    for sock, optname, value in ((jailed.v4, socket.SO_REUSEPORT, 0),
                                 (jailed.v6, SO_DETACH_REUSEPORT_BPF, 0)):
        assert in_child(call(sock, optname, value), uid=NOBODY) == -9
    offences = jailed.jail.drain_offences()
    assert sorted(o.what for o in offences) == ["SO_DETACH_REUSEPORT_BPF", "SO_REUSEPORT"]
    assert {o.uid for o in offences} == {NOBODY}
    assert jailed.counter("jail_killed_compat") - before == 2
    assert jailed.jail.drain_offences() == []  # drained


@pytest.mark.parametrize("entry", ["setsockopt", "socketcall"])
def test_every_refused_option_through_the_32_bit_entry_kills(jailed: Jailed, entry: str) -> None:
    """Each option the native hook refuses, made through the 32-bit entry on the IPv4 and the
    IPv6 socket: every caller is killed and recorded (the same table decides both paths)."""
    def call(sock: socket.socket, level: int, optname: int, value: bytes) -> Callable[[], int]:
        def body() -> int:
            caller = I386()
            make = caller.setsockopt if entry == "setsockopt" else caller.socketcall_setsockopt
            make(sock.fileno(), level, optname, value)
            return 0
        return body

    for name, (level, optname, value) in REFUSED.items():
        for sock in (jailed.v4, jailed.v6):
            assert in_child(call(sock, level, optname, value), uid=NOBODY) == -9, (name, sock)
    offences = jailed.jail.drain_offences()
    assert len(offences) == 2 * len(REFUSED)
    assert {o.uid for o in offences} == {NOBODY}


def test_io_uring_setsockopt_and_connect_meet_the_jail(jailed: Jailed) -> None:
    ring = Ring()
    try:
        for name, (level, optname, value) in REFUSED.items():
            assert ring.setsockopt(jailed.v4.fileno(), level, optname, value) == -errno.EPERM, name
        assert ring.setsockopt(jailed.v4.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF,
                               struct.pack("i", 1 << 16)) == 0
        sockaddr = struct.pack("<HH4s8x", socket.AF_INET, socket.htons(9),
                               socket.inet_aton("127.0.0.1"))
        assert ring.connect(jailed.v4.fileno(), sockaddr) == -errno.EPERM
        assert jailed.v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        ring.close()


def test_a_compat_ring_skips_the_setsockopt_hook(jailed: Jailed) -> None:
    """The kernel's own gap, pinned down: a ring set up through the 32-bit entry runs its
    setsockopt without the cgroup hook, and no syscall of the 32-bit table is made for the
    compat hook to see. What it changes is the watchdog's to repair (docs/SECURITY.md)."""
    with contextlib.closing(Ring(compat=True)) as ring:
        got = ring.setsockopt(jailed.v4.fileno(), socket.SOL_SOCKET, socket.SO_REUSEPORT,
                              struct.pack("i", 0))
    assert got == 0
    assert jailed.v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


@pytest.fixture(scope="module")
def setsockopt32() -> Iterator[str]:
    """tests/dataplane/setsockopt32.c built with gcc -m32 (deploy/setup.sh installs
    gcc-multilib): a real 32-bit program, not a 64-bit one borrowing the 32-bit entry. In a
    directory uid nobody may enter, since it runs as nobody."""
    workdir = tempfile.mkdtemp(prefix="steerd-m32-")
    try:
        os.chmod(workdir, 0o755)
        binary = os.path.join(workdir, "setsockopt32")
        source = os.path.join(os.path.dirname(__file__), "setsockopt32.c")
        subprocess.run(["gcc", "-m32", "-O2", "-o", binary, source], check=True)
        yield binary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("entry", ["setsockopt", "socketcall"])
def test_a_real_32_bit_program_is_killed_too(jailed: Jailed, setsockopt32: str,
                                            entry: str) -> None:
    def run(sock: socket.socket, optname: int, value: int) -> int:
        args = [setsockopt32, str(sock.fileno()), str(optname), str(value)]
        if entry == "socketcall":
            args.append("socketcall")
        proc = subprocess.run(args, pass_fds=(sock.fileno(),), user=NOBODY, group=NOBODY,
                              timeout=30, check=False)
        return proc.returncode

    assert run(jailed.v4, socket.SO_RCVBUF, 1 << 16) == 0  # allowed: it lives
    assert run(jailed.other, socket.SO_REUSEPORT, 0) == 0  # another port: untouched
    jailed.other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    assert jailed.jail.drain_offences() == []
    assert run(jailed.v6, socket.SO_REUSEPORT, 0) == -9
    assert run(jailed.v4, SO_DETACH_REUSEPORT_BPF, 0) == -9
    offences = jailed.jail.drain_offences()
    assert sorted(o.what for o in offences) == ["SO_DETACH_REUSEPORT_BPF", "SO_REUSEPORT"]
    assert {o.uid for o in offences} == {NOBODY}
