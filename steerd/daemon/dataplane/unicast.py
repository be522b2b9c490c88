"""Unicast only: the cgroup ingress program (bpf/unicast.c) that drops every broadcast
and multicast datagram on its way into a service-port socket, and the host's broadcast
addresses it needs.

Why: the kernel hands a datagram sent to a broadcast or multicast address to every
wildcard-bound socket of the port, one clone each, without reuseport selection; the steering
program never sees it, and each worker of each app would answer the (spoofed) sender. The
group sockets the daemon makes leave multicast groups alone (``IP_MULTICAST_ALL`` off,
steerd/daemon/control/sockets.py ``bind_group_socket``), but an app can turn that back on or
join a group on the socket it holds, and broadcast has no such switch. This program runs for every
socket delivery, each clone included, and no app can remove it.

A subnet's directed broadcast (198.18.0.255) may arrive in a unicast frame, and only the
routing table says it is a broadcast address: :meth:`UnicastFilter.sync_broadcasts` copies the
local table's broadcast routes into the pinned ``local_broadcasts`` map, and a netlink
subscription (:meth:`UnicastFilter.watch`, :meth:`UnicastFilter.changed`) copies them again
whenever one is added or removed. While no daemon runs, the map keeps the last copy.

Life cycle: like the jail, the program and its map are pinned (``PIN_DIR/unicast``) and stay
attached when the daemon stops; a new run attaches its own before detaching the old one (no
gap); ``steerd purge`` detaches and unpins them (:func:`remove_unicast_filter`).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import logging
import os
import socket
import struct
import tempfile

from steerd.daemon.dataplane import compiled
from steerd.daemon.dataplane.cgroup import (
    RootProgram,
    attach_at_root,
    cgroup2_root,
    remove_from_root,
)
from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import BPF_DIR
from steerd.daemon.dataplane.jail import netns_cookie
from steerd.daemon.dataplane.learn import PROG_CGROUP_SKB
from steerd.daemon.dataplane.maps import (
    MAP_HASH,
    MAP_PERCPU_ARRAY,
    MapSpec,
    libbcc,
    open_or_create_map,
)
from steerd.daemon.dataplane.netns import run_in_netns
from steerd.daemon.dataplane.programs import Prerequisite, find_kernel_headers

log = logging.getLogger("steerd")

BPF_CGROUP_INET_INGRESS = 0
UNICAST = compiled.Entry("steerd_unicast", PROG_CGROUP_SKB, BPF_CGROUP_INET_INGRESS)
SUBDIR = "unicast"
PROG_PIN = "prog_unicast"
BROADCASTS = MapSpec("local_broadcasts", MAP_HASH, 4, 1, 1024)

# rtnetlink (include/uapi/linux/rtnetlink.h, netlink.h)
_NETLINK_ROUTE = 0
_RTMGRP_IPV4_ROUTE = 0x40
_NETLINK_GET_STRICT_CHK = 12
_SOL_NETLINK = 270
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_RT_TABLE_LOCAL = 255
_RTN_BROADCAST = 3
_RTA_DST = 1
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _routes(data: bytes) -> tuple[list[tuple[int, int, bytes | None]], bool]:
    """The (message type, route type, RTA_DST) of each route message in ``data``, and
    whether the dump ended (NLMSG_DONE)."""
    out: list[tuple[int, int, bytes | None]] = []
    offset, done = 0, False
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if kind == _NLMSG_DONE:
            done = True
        elif kind == _NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0]
            if err:
                raise OSError(err, f"route dump: {os.strerror(err)}")
        elif kind in (_RTM_NEWROUTE, _RTM_DELROUTE) and len(body) >= _RTMSG.size:
            rtype = _RTMSG.unpack_from(body)[7]
            dst, at = None, _RTMSG.size
            while at + _RTATTR.size <= len(body):
                alen, atype = _RTATTR.unpack_from(body, at)
                if alen < _RTATTR.size:
                    break
                if atype == _RTA_DST:
                    dst = body[at + _RTATTR.size : at + alen]
                at += (alen + 3) & ~3
            out.append((kind, rtype, dst))
    return out, done


def local_broadcasts() -> set[bytes]:
    """The IPv4 broadcast addresses of the calling thread's network namespace (network
    order): every broadcast route, which the kernel keeps in the local table (each
    address's subnet broadcast, 127.255.255.255, and any ``brd`` given explicitly)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       _NETLINK_ROUTE) as nl:
        # Strict checking makes the kernel filter the dump by table and type (Linux 4.20);
        # without it the whole table comes, and the filter below does the job.
        with contextlib.suppress(OSError):
            nl.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
        request = _RTMSG.pack(socket.AF_INET, 0, 0, 0, _RT_TABLE_LOCAL, 0, 0, _RTN_BROADCAST, 0)
        nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), _RTM_GETROUTE,
                               _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + request)
        found: set[bytes] = set()
        done = False
        while not done:
            routes, done = _routes(nl.recv(1 << 16))
            found.update(dst for _, rtype, dst in routes
                         if rtype == _RTN_BROADCAST and dst is not None and len(dst) == 4)
    return found


class UnicastFilter:
    """The ingress filter of one daemon: its pinned program and ``local_broadcasts`` map.

    ``pin_dir`` is the daemon's pin dir (the filter lives in ``pin_dir/unicast``); ``port``
    the service port; ``counters_fd`` the counters map its drops are counted in; ``netns`` the
    named network namespace to guard (None: the caller's, as for the daemon).
    """

    def __init__(self, pin_dir: str, port: int, counters_fd: int,
                 netns: str | None = None) -> None:
        self.pin_dir = pin_dir
        self.port = port
        self.counters_fd = counters_fd
        self.netns = netns
        self.scope = "its network namespace only"
        self._map_fd = -1
        self._watch: socket.socket | None = None
        self._prog_fd: int | None = None

    @property
    def directory(self) -> str:
        return os.path.join(self.pin_dir, SUBDIR)

    @property
    def attached(self) -> bool:
        """Whether a filter is attached (this run's, or a previous run's still pinned)."""
        return os.path.exists(os.path.join(self.directory, PROG_PIN))

    def open(self) -> None:
        """Open (or create and pin) ``local_broadcasts``."""
        os.makedirs(self.directory, exist_ok=True)
        self._map_fd = open_or_create_map(BROADCASTS, self.directory)

    def sync_broadcasts(self) -> set[str]:
        """Make ``local_broadcasts`` the namespace's broadcast addresses; returns them."""
        fd = self._need_open()
        want = run_in_netns(self.netns, local_broadcasts)
        lib = libbcc()
        have: set[bytes] = set()
        key, nxt = ct.create_string_buffer(4), ct.create_string_buffer(4)
        first = True
        while lib.bpf_get_next_key(fd, None if first else key, nxt) == 0:
            first = False
            ct.memmove(key, nxt, 4)
            have.add(key.raw)
        for addr in have - want:
            lib.bpf_delete_elem(fd, ct.create_string_buffer(addr, 4))
        one = ct.c_uint8(1)
        for addr in want - have:
            if lib.bpf_update_elem(fd, ct.create_string_buffer(addr, 4), ct.byref(one), 0):
                raise DataplaneError(f"local_broadcasts: cannot add "
                                     f"{socket.inet_ntoa(addr)}: {os.strerror(ct.get_errno())}")
        return {socket.inet_ntoa(a) for a in want}

    def watch(self) -> int:
        """A non-blocking netlink socket told of every IPv4 route change; when it is
        readable, call :meth:`changed`. Returns its fd (for ``loop.add_reader``)."""
        if self._watch is None:
            def make() -> socket.socket:
                nl = socket.socket(socket.AF_NETLINK,
                                   socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                                   _NETLINK_ROUTE)
                nl.bind((0, _RTMGRP_IPV4_ROUTE))
                return nl

            self._watch = run_in_netns(self.netns, make)
        return self._watch.fileno()

    @property
    def watch_fd(self) -> int:
        """The fd :meth:`watch` returned, -1 if not watching."""
        return self._watch.fileno() if self._watch is not None else -1

    def changed(self) -> bool:
        """Drain the route notifications; copy the broadcast addresses again if one of them
        concerned a broadcast route (or some were lost). True if it copied. Never raises (an
        event loop callback): a failure is logged, and the map keeps its last copy."""
        if self._watch is None:
            return False
        resync = False
        try:
            while True:
                try:
                    data = self._watch.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    resync = True  # notifications were lost: copy anew to be sure
                    continue
                routes, _ = _routes(data)
                resync |= any(rtype == _RTN_BROADCAST for _, rtype, _ in routes)
            if resync:
                log.info("broadcast addresses now %s", sorted(self.sync_broadcasts()))
        except (OSError, DataplaneError) as exc:
            log.error("non-unicast filter: copying the broadcast addresses failed: %s", exc)
        return resync

    def attach(self) -> None:
        """Compile bpf/unicast.c for this port and namespace and attach it at the
        cgroup v2 root, then retire a previous run's (attached first: no gap)."""
        root = cgroup2_root()
        if root is None:
            raise DataplaneError("no cgroup v2 hierarchy is mounted: the non-unicast filter "
                                 "needs one")
        attach_at_root(root, [RootProgram("bpf/unicast.c", self._compile(),
                                          BPF_CGROUP_INET_INGRESS,
                                          os.path.join(self.directory, PROG_PIN))])

    def _compile(self) -> int:
        """Load the program; without the namespace test where the kernel does not give
        cgroup_skb programs bpf_get_netns_cookie (older kernels; 6.18 has it): the port is
        then guarded in every namespace, which costs other namespaces only their broadcast
        and multicast to it."""
        headers, _ = find_kernel_headers()  # as the daemon's data plane set it, else found
        if headers is not None:
            os.environ.setdefault("BCC_KERNEL_SOURCE", str(headers))
        cookie = run_in_netns(self.netns, netns_cookie)
        flags = [f"-I{BPF_DIR}", f"-DSTEERD_UNICAST_PORT={self.port}"]
        fds = {"STEERD_FD_LOCAL_BROADCASTS": self._need_open(),
               "STEERD_FD_COUNTERS": self.counters_fd}
        first: DataplaneError | None = None
        for words in ({"STEERD_UNICAST_NETNS": cookie}, {}):
            try:
                fd = compiled.load("unicast.c", flags, [UNICAST], fds, words)[UNICAST.name]
            except DataplaneError as exc:
                first = first or exc
                continue
            self.close_program()
            self._prog_fd = fd
            if not words:
                self.scope = "every network namespace (no bpf_get_netns_cookie here)"
            return fd
        assert first is not None
        raise first  # the namespace-scoped program's reason: the one that matters here

    def close_program(self) -> None:
        fd, self._prog_fd = self._prog_fd, None
        if fd is not None:
            os.close(fd)  # the pin keeps it attached

    def close(self) -> None:
        """Release this process's handles; the pins and the attachment stay."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._map_fd >= 0:
            os.close(self._map_fd)
            self._map_fd = -1
        self.close_program()

    def _need_open(self) -> int:
        if self._map_fd < 0:
            raise DataplaneError("non-unicast filter not open: call open() first")
        return self._map_fd


def remove_unicast_filter(pin_dir: str) -> list[str]:
    """Detach and unpin the filter under ``pin_dir`` (``steerd purge``); what was done."""
    directory = os.path.join(pin_dir, SUBDIR)
    if not os.path.isdir(directory):
        return []
    root, detached = remove_from_root(directory, {PROG_PIN: BPF_CGROUP_INET_INGRESS})
    return [*([f"detached the non-unicast filter from {root}"] if detached else []),
            f"removed {directory}"]


def check_unicast_prerequisites(probe: bool = True) -> list[Prerequisite]:
    """``steerd doctor``: with ``probe`` (root, bcc, headers and cgroup v2 needed), attach the
    filter for a throw-away loopback port and check that a unicast datagram passes and a
    broadcast one (127.255.255.255, lo's own: nothing leaves the host) is dropped and
    counted. Everything is detached and removed afterwards."""
    fix = ("a kernel with cgroup BPF (CONFIG_CGROUP_BPF) and a cgroup v2 hierarchy; without it "
           "broadcast and multicast datagrams reach wildcard-bound worker sockets")
    if not probe:
        return []
    root = cgroup2_root()
    if root is None:
        return [Prerequisite("non-unicast filter", False, "no cgroup v2 hierarchy", fix)]
    probe_dir = tempfile.mkdtemp(prefix="steerd-doctor-unicast-", dir="/sys/fs/bpf")
    counters = libbcc().bcc_create_map(MAP_PERCPU_ARRAY, b"steerd_probe_u", 4, 8, 64, 0)
    flt: UnicastFilter | None = None
    sockets: list[socket.socket] = []
    try:
        if counters < 0:
            return [Prerequisite("non-unicast filter", False, "cannot create a test map", fix)]
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(receiver)
        receiver.bind(("0.0.0.0", 0))
        port = receiver.getsockname()[1]
        flt = UnicastFilter(probe_dir, port, counters)
        flt.open()
        flt.sync_broadcasts()
        flt.attach()
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sockets.append(sender)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sender.sendto(b"broadcast", ("127.255.255.255", port))
        sender.sendto(b"unicast", ("127.0.0.1", port))
        receiver.settimeout(5)
        got = [receiver.recv(64)]
        receiver.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(receiver.recv(64))
        dropped = _counter(counters, "STEERD_CNT_UNICAST_DROP_BROADCAST")
        ok = got == [b"unicast"] and dropped >= 1
        detail = (f"ingress hook attached at {root} ({flt.scope}) dropped a broadcast to a "
                  f"wildcard socket ({dropped} counted) and let unicast through" if ok else
                  f"hook attached, but the socket received {got} and {dropped} drops counted")
        return [Prerequisite("non-unicast filter", ok, detail, fix)]
    except (DataplaneError, OSError) as exc:
        return [Prerequisite("non-unicast filter", False, str(exc), fix)]
    finally:
        for sock in sockets:
            sock.close()
        if flt is not None:
            flt.close()
        remove_unicast_filter(probe_dir)
        if counters >= 0:
            os.close(counters)
        os.rmdir(probe_dir)


def _counter(fd: int, name: str) -> int:
    """One counter of steerd.h, summed over CPUs."""
    from steerd.daemon.dataplane.counters import possible_cpus, read_counters
    from steerd.daemon.dataplane.header import header_constants

    index = header_constants()[name]
    return read_counters(fd, possible_cpus(), {index: name})[name]
