"""The socket jail: BPF hooks (bpf/jail.c, bpf/compat.c) that stop apps from
turning the worker sockets they hold into keys to the whole port.

Why: the kernel lets the holder of any member socket of a reuseport group replace or remove
the group's program, clear the socket's SO_REUSEPORT (it then wins every lookup), and
``connect()``, ``SO_BINDTODEVICE`` or a new ``bind()`` to the port take traffic out of the
group; nothing in socket permissions stops an app that was handed a worker socket.
``cgroup/setsockopt``, ``cgroup/connect4|6`` and ``cgroup/bind4|6`` programs attached at the
root of the cgroup v2 hierarchy see every such native call on the machine first: on the
service port's UDP sockets (in the daemon's network namespace) only the options of
:data:`ALLOWED_OPTIONS` pass for processes outside the daemon's cgroup, and connect and bind
are refused. The 32-bit entry skips the setsockopt hook, so a raw tracepoint (compat.c)
kills a process making a 32-bit setsockopt outside the same table on a service socket and
records it for the daemon's watchdog, which repairs what the call changed.

The daemon is identified by its own cgroup (``jail_cgroups``), which it creates under the one
it was started in and enters before it binds anything; its classifier processes inherit it.
Not by pid: pids are reused after a SIGKILL and mean other processes in other pid
namespaces; a cgroup is entered only by writing its ``cgroup.procs`` (root), and cgroup ids
are never reused.

Life cycle: the programs, the tracepoint's link and the maps are pinned under
``PIN_DIR/jail`` and stay attached when the daemon stops (a stopped daemon lists no cgroup,
so while it is down nobody at all may touch the port's sockets); the next run lists itself
before it binds, attaches its freshly compiled programs beside the old ones and only then
detaches the old ones (no gap). ``steerd purge`` detaches and unpins them
(:func:`remove_jail`).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import hashlib
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from steerd.daemon.dataplane import DataplaneError, compiled
from steerd.daemon.dataplane.btf import member_offsets
from steerd.daemon.dataplane.cgroup import (
    RootProgram,
    attach_at_root,
    cgroup2_root,
    remove_from_root,
)
from steerd.daemon.dataplane.header import BPF_DIR, header_constants
from steerd.daemon.dataplane.maps import (
    MAP_HASH,
    MAP_PERCPU_ARRAY,
    MapSpec,
    errno_of,
    libbcc,
    open_or_create_map,
    pin_fd,
)
from steerd.daemon.dataplane.programs import Prerequisite, find_kernel_headers

PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_RAW_TRACEPOINT = 17
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_SETSOCKOPT = 22
SO_NETNS_COOKIE = 71  # Linux >= 5.14
MAX_DAEMON_CGROUPS = 16
MAX_OFFENCES = 1024
COMPAT_HOOK = "steerd_jail_compat"
COMPAT_LINK = "compat_link"  # the pinned raw tracepoint link (sys_enter)
LEGACY_PIDS = "jail_pids"  # the map of releases that listed the daemon by pid

# (function in bpf/jail.c, program type, cgroup attach type): one program per hook.
HOOKS = (
    ("steerd_jail_setsockopt", PROG_CGROUP_SOCKOPT, BPF_CGROUP_SETSOCKOPT),
    ("steerd_jail_connect4", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    ("steerd_jail_connect6", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT),
    ("steerd_jail_bind4", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_BIND),
    ("steerd_jail_bind6", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_BIND),
)

_SOL_SOCKET, _IP, _IPV6, _UDP = socket.SOL_SOCKET, socket.IPPROTO_IP, socket.IPPROTO_IPV6, 17
ALLOW, ON_ONLY = 1, 2  # STEERD_JAIL_ALLOW, STEERD_JAIL_ON_ONLY in bpf/steerd.h


@dataclass(frozen=True)
class Option:
    """One socket option a process other than the daemon may set on a service socket."""

    level: int
    optname: int
    name: str
    verdict: int  # ALLOW, or ON_ONLY (setting it on is answered as done; off is refused)
    why: str


# The allowlist: the options the SDK, aioquic, qh3, hypercorn and common QUIC servers set on
# a UDP socket they were given, each affecting only that socket's own buffers, ancillary
# data, timestamps or outgoing packets. Everything else is refused on a service socket:
# the reuseport program and flags, device binding, socket filters, multicast membership,
# IP_TRANSPARENT/FREEBIND, SO_MARK, UDP encapsulation, ...  docs/SECURITY.md §2.1 lists it.
ALLOWED_OPTIONS: tuple[Option, ...] = (
    Option(_SOL_SOCKET, socket.SO_REUSEADDR, "SO_REUSEADDR", ON_ONLY,
           "hypercorn sets it on fd:// sockets; the daemon's sockets have it on already"),
    Option(_SOL_SOCKET, socket.SO_REUSEPORT, "SO_REUSEPORT", ON_ONLY,
           "servers set it; clearing it would make the socket win every lookup"),
    Option(_SOL_SOCKET, socket.SO_SNDBUF, "SO_SNDBUF", ALLOW, "own buffer size"),
    Option(_SOL_SOCKET, socket.SO_RCVBUF, "SO_RCVBUF", ALLOW, "own buffer size"),
    Option(_SOL_SOCKET, 32, "SO_SNDBUFFORCE", ALLOW, "own buffer size (CAP_NET_ADMIN)"),
    Option(_SOL_SOCKET, 33, "SO_RCVBUFFORCE", ALLOW, "own buffer size (CAP_NET_ADMIN)"),
    Option(_SOL_SOCKET, socket.SO_PRIORITY, "SO_PRIORITY", ALLOW, "own packets' qdisc band"),
    Option(_SOL_SOCKET, 29, "SO_TIMESTAMP", ALLOW, "receive timestamps"),
    Option(_SOL_SOCKET, 35, "SO_TIMESTAMPNS", ALLOW, "receive timestamps"),
    Option(_SOL_SOCKET, 37, "SO_TIMESTAMPING", ALLOW, "timestamps"),
    Option(_SOL_SOCKET, 63, "SO_TIMESTAMP_NEW", ALLOW, "receive timestamps"),
    Option(_SOL_SOCKET, 64, "SO_TIMESTAMPNS_NEW", ALLOW, "receive timestamps"),
    Option(_SOL_SOCKET, 65, "SO_TIMESTAMPING_NEW", ALLOW, "timestamps"),
    Option(_SOL_SOCKET, 40, "SO_RXQ_OVFL", ALLOW, "drop count as ancillary data"),
    Option(_SOL_SOCKET, 60, "SO_ZEROCOPY", ALLOW, "zero-copy sends"),
    Option(_SOL_SOCKET, 61, "SO_TXTIME", ALLOW, "paced sends"),
    Option(_SOL_SOCKET, 20, "SO_RCVTIMEO", ALLOW, "own blocking calls"),
    Option(_SOL_SOCKET, 21, "SO_SNDTIMEO", ALLOW, "own blocking calls"),
    Option(_SOL_SOCKET, 66, "SO_RCVTIMEO_NEW", ALLOW, "own blocking calls"),
    Option(_SOL_SOCKET, 67, "SO_SNDTIMEO_NEW", ALLOW, "own blocking calls"),
    Option(_SOL_SOCKET, 46, "SO_BUSY_POLL", ALLOW, "own receive latency"),
    Option(_IP, socket.IP_TOS, "IP_TOS", ALLOW, "ECN and DSCP of own packets"),
    Option(_IP, socket.IP_TTL, "IP_TTL", ALLOW, "own packets"),
    Option(_IP, 8, "IP_PKTINFO", ALLOW, "destination address as ancillary data"),
    Option(_IP, 10, "IP_MTU_DISCOVER", ALLOW, "DF bit and PMTU of own packets"),
    Option(_IP, 11, "IP_RECVERR", ALLOW, "own error queue"),
    Option(_IP, 12, "IP_RECVTTL", ALLOW, "ancillary data"),
    Option(_IP, 13, "IP_RECVTOS", ALLOW, "ECN as ancillary data"),
    Option(_IP, 20, "IP_RECVORIGDSTADDR", ALLOW, "ancillary data"),
    Option(_IP, 26, "IP_RECVERR_RFC4884", ALLOW, "own error queue"),
    Option(_IPV6, 16, "IPV6_UNICAST_HOPS", ALLOW, "own packets"),
    Option(_IPV6, 23, "IPV6_MTU_DISCOVER", ALLOW, "PMTU of own packets"),
    Option(_IPV6, 25, "IPV6_RECVERR", ALLOW, "own error queue"),
    Option(_IPV6, 26, "IPV6_V6ONLY", ALLOW, "refused by the kernel once bound anyway"),
    Option(_IPV6, 31, "IPV6_RECVERR_RFC4884", ALLOW, "own error queue"),
    Option(_IPV6, 49, "IPV6_RECVPKTINFO", ALLOW, "destination address as ancillary data"),
    Option(_IPV6, 51, "IPV6_RECVHOPLIMIT", ALLOW, "ancillary data"),
    Option(_IPV6, 60, "IPV6_RECVPATHMTU", ALLOW, "ancillary data"),
    Option(_IPV6, 62, "IPV6_DONTFRAG", ALLOW, "own packets"),
    Option(_IPV6, 66, "IPV6_RECVTCLASS", ALLOW, "ECN as ancillary data"),
    Option(_IPV6, 67, "IPV6_TCLASS", ALLOW, "ECN and DSCP of own packets"),
    Option(_IPV6, 74, "IPV6_RECVORIGDSTADDR", ALLOW, "ancillary data"),
    Option(_UDP, 1, "UDP_CORK", ALLOW, "own sends"),
    Option(_UDP, 103, "UDP_SEGMENT", ALLOW, "GSO of own sends (qh3)"),
    Option(_UDP, 104, "UDP_GRO", ALLOW, "GRO of own receives (qh3)"),
)

# The kernel members compat.c follows, and the widths it reads them with.
_COMPAT_MEMBERS = {
    "STEERD_OFF_TASK_STATUS": ("task_struct.thread_info.status", 4),
    "STEERD_OFF_TASK_FILES": ("task_struct.files", 8),
    "STEERD_OFF_FILES_FDT": ("files_struct.fdt", 8),
    "STEERD_OFF_FDT_MAX_FDS": ("fdtable.max_fds", 4),
    "STEERD_OFF_FDT_FD": ("fdtable.fd", 8),
    "STEERD_OFF_FILE_INODE": ("file.f_inode", 8),
    "STEERD_OFF_FILE_PRIVATE": ("file.private_data", 8),
    "STEERD_OFF_INODE_MODE": ("inode.i_mode", 2),
    "STEERD_OFF_SOCKET_SK": ("socket.sk", 8),
    "STEERD_OFF_SK_NUM": ("sock.__sk_common.skc_num", 2),
    "STEERD_OFF_SK_PROTOCOL": ("sock.sk_protocol", 2),
    "STEERD_OFF_SK_NET": ("sock.__sk_common.skc_net", 8),
    "STEERD_OFF_NET_COOKIE": ("net.net_cookie", 8),
    "STEERD_OFF_REGS_BX": ("pt_regs.bx", 8),
    "STEERD_OFF_REGS_CX": ("pt_regs.cx", 8),
    "STEERD_OFF_REGS_DX": ("pt_regs.dx", 8),
    "STEERD_OFF_REGS_SI": ("pt_regs.si", 8),
}


@dataclass(frozen=True)
class Offence:
    """A process the compat hook killed: who, and which option it tried."""

    pid: int
    uid: int
    what: str
    count: int


def option_name(level: int, optname: int) -> str:
    """A readable name for (level, optname): the table's, else numbers."""
    for opt in ALLOWED_OPTIONS:
        if (opt.level, opt.optname) == (level, optname):
            return opt.name
    known = {(_SOL_SOCKET, 51): "SO_ATTACH_REUSEPORT_CBPF", (_SOL_SOCKET, 52):
             "SO_ATTACH_REUSEPORT_EBPF", (_SOL_SOCKET, 68): "SO_DETACH_REUSEPORT_BPF",
             (_SOL_SOCKET, 25): "SO_BINDTODEVICE", (_SOL_SOCKET, 62): "SO_BINDTOIFINDEX"}
    return known.get((level, optname), f"level {level} option {optname}")


def compat_offsets() -> dict[str, int]:
    """-D flags for compat.c: the running kernel's member offsets, sizes checked."""
    found = member_offsets(path for path, _ in _COMPAT_MEMBERS.values())
    out: dict[str, int] = {}
    for flag, (path, width) in _COMPAT_MEMBERS.items():
        if found[path].size != width:
            raise DataplaneError(f"unexpected kernel layout: {path} is {found[path].size} "
                                 f"bytes, compat.c reads {width}")
        out[flag] = found[path].offset
    return out


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (what bpf_get_netns_cookie
    returns for sockets there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _pin_path(pin_dir: str, name: str) -> str:
    return os.path.join(pin_dir, "jail", name)


def own_cgroup(proc: str = "/proc/self/cgroup") -> str:
    """This process's cgroup v2 directory (under :func:`cgroup2_root`)."""
    root = cgroup2_root()
    if root is None:
        raise DataplaneError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none "
                             "/sys/fs/cgroup/unified): the socket jail needs one")
    with open(proc) as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(root, line[3:].strip().lstrip("/"))
    raise DataplaneError(f"{proc} names no cgroup v2 path")


def cgroup_id(path: str) -> int:
    """What bpf_get_current_cgroup_id() returns for processes in the cgroup at ``path``."""
    return os.stat(path).st_ino


def daemon_cgroup_name(pin_dir: str) -> str:
    """The daemon's own cgroup, one per pin dir (two daemons never vouch for each other)."""
    return "steerd-" + hashlib.sha256(os.path.abspath(pin_dir).encode()).hexdigest()[:12]


class Jail:
    """The jail of one daemon: its pinned maps, five cgroup programs and the compat hook.

    ``pin_dir`` is the daemon's pin dir (the jail lives in ``pin_dir/jail``); ``port`` the
    service port; ``counters_fd`` the counters map its refusals are counted in.
    """

    def __init__(self, pin_dir: str, port: int, counters_fd: int) -> None:
        self.pin_dir = pin_dir
        self.port = port
        self.counters_fd = counters_fd
        self._fds: dict[str, int] = {}
        self._prog_fds: list[int] = []
        self._cgroup: str | None = None  # the cgroup this process entered, to leave at stop
        self.compat_error: str | None = None  # why the 32-bit hook is not in force

    @property
    def attached(self) -> bool:
        """Whether programs are attached (this run's, or a previous run's still pinned)."""
        return all(os.path.exists(_pin_path(self.pin_dir, name)) for name, _, _ in HOOKS)

    @property
    def compat_attached(self) -> bool:
        """Whether the 32-bit hook (compat.c) is attached."""
        return os.path.exists(_pin_path(self.pin_dir, COMPAT_LINK))

    def open(self) -> None:
        """Open (or create and pin) the jail's maps: fast, before the daemon binds anything,
        because a previous run's attached jail refuses binds from processes not listed."""
        jail_dir = os.path.join(self.pin_dir, "jail")
        os.makedirs(jail_dir, exist_ok=True)
        k = header_constants()
        for spec in (MapSpec("jail_cgroups", MAP_HASH, 8, 4, MAX_DAEMON_CGROUPS),
                     MapSpec("jail_options", MAP_HASH, 8, 4, k["STEERD_JAIL_OPTIONS_MAX"]),
                     MapSpec("jail_offences", MAP_HASH, 4, k["STEERD_JAIL_OFFENCE_SIZE"],
                             MAX_OFFENCES)):
            self._fds[spec.name] = open_or_create_map(spec, jail_dir)
        self._write_options()
        self._list_in_legacy_map(jail_dir)
        # Mode 0: a uid-0 app without CAP_DAC_OVERRIDE can neither open the pinned maps (to
        # list itself) nor the programs; the daemon's capabilities pass.
        os.chmod(jail_dir, 0)

    def _list_in_legacy_map(self, jail_dir: str) -> None:
        """An upgrade from a release that listed the daemon by pid: its programs, still
        attached until :meth:`attach` replaces them, read ``jail_pids``; list our pid there
        so they let us bind meanwhile. :meth:`attach` removes the map."""
        path = os.path.join(jail_dir, LEGACY_PIDS)
        if not os.path.exists(path):
            return
        fd = libbcc().bpf_obj_get(path.encode())
        if fd < 0:
            return
        try:
            key, one = ct.c_uint32(os.getpid()), ct.c_uint32(1)
            libbcc().bpf_update_elem(fd, ct.byref(key), ct.byref(one), 0)
        finally:
            os.close(fd)

    def _write_options(self) -> None:
        lib, fd = libbcc(), self._need("jail_options")
        for opt in ALLOWED_OPTIONS:
            key = ct.c_uint64((opt.level << 32) | opt.optname)
            value = ct.c_uint32(opt.verdict)
            if lib.bpf_update_elem(fd, ct.byref(key), ct.byref(value), 0) != 0:
                raise DataplaneError(f"jail_options: cannot add {opt.name}: "
                                     f"{os.strerror(ct.get_errno())}")

    def enter_own_cgroup(self) -> int:
        """Move this process into its own cgroup (created under the current one) and list
        it as the daemon's; children forked later inherit it. Returns its id."""
        current = own_cgroup()
        name = daemon_cgroup_name(self.pin_dir)
        path = current if os.path.basename(current) == name else os.path.join(current, name)
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            raise DataplaneError(f"cannot enter the daemon's cgroup {path}: {exc}") from exc
        self._cgroup = path
        ident = cgroup_id(path)
        self.set_daemon_cgroups([ident])
        return ident

    def leave_own_cgroup(self) -> None:
        """Back to the parent cgroup and remove ours (a clean stop leaves no directory)."""
        path, self._cgroup = self._cgroup, None
        if path is None:
            return
        with contextlib.suppress(OSError):
            with open(os.path.join(os.path.dirname(path), "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            os.rmdir(path)

    def set_daemon_cgroups(self, ids: Iterable[int]) -> None:
        """The daemon's cgroups are exactly ``ids`` from now on (stale ones go)."""
        lib, fd = libbcc(), self._need("jail_cgroups")
        keep = {int(i) for i in ids}
        for ident in keep:
            key, one = ct.c_uint64(ident), ct.c_uint32(1)
            if lib.bpf_update_elem(fd, ct.byref(key), ct.byref(one), 0) != 0:
                raise DataplaneError(f"jail_cgroups: cannot add cgroup {ident}: "
                                     f"{os.strerror(ct.get_errno())}")
        for ident in self.daemon_cgroups() - keep:
            lib.bpf_delete_elem(fd, ct.byref(ct.c_uint64(ident)))

    def daemon_cgroups(self) -> set[int]:
        return set(_keys(self._need("jail_cgroups"), ct.c_uint64))

    def drain_offences(self) -> list[Offence]:
        """The processes the compat hook killed since the last call (then forgotten)."""
        lib, fd = libbcc(), self._need("jail_offences")
        out: list[Offence] = []
        value = (ct.c_uint32 * 4)()
        for pid in _keys(fd, ct.c_uint32):
            key = ct.c_uint32(pid)
            if lib.bpf_lookup_elem(fd, ct.byref(key), value) == 0:
                uid, level, optname, count = value
                out.append(Offence(pid, uid, option_name(level, optname), count))
            lib.bpf_delete_elem(fd, ct.byref(key))
        return out

    def attach(self) -> None:
        """Compile the hooks for this port and network namespace and attach them at the
        cgroup v2 root, then retire a previous run's (attached first, detached after: the
        port is never unguarded). The 32-bit hook follows; if it cannot load on this kernel
        the cgroup hooks stay and ``compat_error`` says why."""
        root = cgroup2_root()
        if root is None:
            raise DataplaneError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none "
                                 "/sys/fs/cgroup/unified): the socket jail needs one")
        flags, fds, words = self._macros()
        loaded = compiled.load("jail.c", flags, [compiled.Entry(*hook) for hook in HOOKS],
                               fds, words)
        self._prog_fds += loaded.values()
        progs = [RootProgram(name, loaded[name], atype, _pin_path(self.pin_dir, name))
                 for name, _, atype in HOOKS]
        attach_at_root(root, progs)
        with contextlib.suppress(FileNotFoundError):  # the old programs are gone
            os.unlink(_pin_path(self.pin_dir, LEGACY_PIDS))
        try:
            self._attach_compat(flags, fds, words)
            self.compat_error = None
        except DataplaneError as exc:
            self.compat_error = str(exc)

    def _macros(self) -> tuple[list[str], dict[str, int], dict[str, int]]:
        """The jail's flags, map descriptors and netns cookie (compiled.load's arguments)."""
        flags = [f"-I{BPF_DIR}", f"-DSTEERD_JAIL_PORT={self.port}"]
        fds = {
            "STEERD_FD_JAIL_CGROUPS": self._need("jail_cgroups"),
            "STEERD_FD_JAIL_OPTIONS": self._need("jail_options"),
            "STEERD_FD_JAIL_OFFENCES": self._need("jail_offences"),
            "STEERD_FD_COUNTERS": self.counters_fd,
        }
        return flags, fds, {"STEERD_JAIL_NETNS": netns_cookie()}

    def _attach_compat(self, flags: list[str], fds: dict[str, int],
                       words: dict[str, int]) -> None:
        """Load compat.c, attach it to the raw tracepoint sys_enter and pin the link (which
        keeps it attached past this process); the previous run's link is unpinned after."""
        try:
            offsets = [f"-D{flag}={off}" for flag, off in compat_offsets().items()]
        except DataplaneError:
            raise
        except Exception as exc:
            raise DataplaneError(f"bpf/compat.c: reading the kernel's layout failed: {exc}") \
                from exc
        entry = compiled.Entry(COMPAT_HOOK, PROG_RAW_TRACEPOINT)
        prog_fd = compiled.load("compat.c", flags + offsets, [entry], fds, words)[COMPAT_HOOK]
        self._prog_fds.append(prog_fd)
        link = libbcc().bpf_attach_raw_tracepoint(prog_fd, b"sys_enter")
        if link < 0:
            raise DataplaneError("attaching bpf/compat.c to raw tracepoint sys_enter "
                                 f"failed: {os.strerror(errno_of(link))}")
        path = _pin_path(self.pin_dir, COMPAT_LINK)
        try:
            pin_fd(link, path)  # replaces (and so detaches) the previous run's link
        finally:
            os.close(link)

    def close(self) -> None:
        """Release this process's handles; the pins and attachments stay."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        fds, self._prog_fds = self._prog_fds, []
        for fd in fds:
            os.close(fd)

    def _need(self, name: str) -> int:
        if name not in self._fds:
            raise DataplaneError("jail not open: call open() first")
        return self._fds[name]


def _keys(fd: int, key_type: type[ct.c_uint32] | type[ct.c_uint64]) -> list[int]:
    """Every key of the hash map ``fd``."""
    lib = libbcc()
    out: list[int] = []
    key, nxt = key_type(), key_type()
    first = True
    while lib.bpf_get_next_key(fd, None if first else ct.byref(key), ct.byref(nxt)) == 0:
        first = False
        key.value = nxt.value
        out.append(int(key.value))
    return out


def remove_jail(pin_dir: str) -> list[str]:
    """Detach and unpin the jail under ``pin_dir`` (``steerd purge``); what was done."""
    jail_dir = os.path.join(pin_dir, "jail")
    if not os.path.isdir(jail_dir):
        return []
    root, detached = remove_from_root(jail_dir, {name: atype for name, _, atype in HOOKS})
    return [*(f"detached {name} from {root}" for name, _, _ in HOOKS if name in detached),
            f"removed {jail_dir}"]


def check_jail_prerequisites(probe: bool = True) -> list[Prerequisite]:
    """``steerd doctor``: a cgroup v2 hierarchy and, with ``probe`` (root, bcc and headers
    needed), the jail's hooks really refusing what they must (:func:`_probe_jail`)."""
    root = cgroup2_root()
    checks = [Prerequisite(
        "cgroup v2", root is not None,
        f"mounted at {root}" if root else "no cgroup2 mount in /proc/self/mounts",
        "mount -t cgroup2 none /sys/fs/cgroup/unified (or boot with "
        "systemd.unified_cgroup_hierarchy=1); without it apps of other uids get no sockets",
    )]
    if probe and root is not None:
        checks.extend(_probe_jail(root))
    return checks


def _probe_jail(root: str) -> list[Prerequisite]:
    """Attach a jail for a throw-away loopback port, and check that it refuses bind(),
    connect(), SO_BINDTODEVICE and clearing SO_REUSEPORT to a process it does not list (this
    one), and allows a setsockopt once this process's cgroup is listed; then that a child
    making a 32-bit setsockopt outside the allowlist on the port is killed (the second
    line: which protection holds against the 32-bit entry on this kernel). Everything is
    detached and removed afterwards."""
    import tempfile

    fix = ("a kernel with cgroup BPF (CONFIG_CGROUP_BPF), bpf_get_netns_cookie in cgroup "
           "hooks (5.8+) and SO_NETNS_COOKIE (5.14+)")
    headers, _ = find_kernel_headers()
    if headers is not None:
        os.environ.setdefault("BCC_KERNEL_SOURCE", str(headers))
    probe_dir = tempfile.mkdtemp(prefix="steerd-doctor-jail-", dir="/sys/fs/bpf")
    counters = libbcc().bcc_create_map(MAP_PERCPU_ARRAY, b"steerd_probe_c", 4, 8, 64, 0)
    jail: Jail | None = None
    member: socket.socket | None = None
    try:
        if counters < 0:
            return [Prerequisite("socket jail", False, "cannot create a test map", fix)]
        member = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        member.bind(("127.0.0.1", 0))
        port = member.getsockname()[1]
        jail = Jail(probe_dir, port, counters)
        jail.open()
        jail.attach()
        results = {
            "bind": _errno_of_call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                                   .bind(("127.0.0.1", port))),
            "connect": _errno_of_call(lambda: member.connect(("127.0.0.1", 9))),  # type: ignore[union-attr]
            "SO_BINDTODEVICE": _errno_of_call(lambda: member.setsockopt(  # type: ignore[union-attr]
                socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")),
            "SO_REUSEPORT off": _errno_of_call(lambda: member.setsockopt(  # type: ignore[union-attr]
                socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)),
        }
        compat = _probe_compat(jail, member)
        jail.set_daemon_cgroups([cgroup_id(own_cgroup())])
        listed = _errno_of_call(lambda: member.setsockopt(  # type: ignore[union-attr]
            socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo"))
        refused = all(err == errno.EPERM for err in results.values())
        ok = refused and listed == 0
        detail = (f"hooks attached at {root} refused bind, connect, SO_BINDTODEVICE and "
                  "SO_REUSEPORT off on a jailed port, and allowed the listed daemon" if ok else
                  f"hooks attached, but errnos {results} for an unlisted process and "
                  f"{listed} for the listed one")
        return [Prerequisite("socket jail", ok, detail, fix), compat]
    except (DataplaneError, OSError) as exc:
        return [Prerequisite("socket jail", False, str(exc), fix)]
    finally:
        if member is not None:
            member.close()
        if jail is not None:
            jail.close()
        remove_jail(probe_dir)
        if counters >= 0:
            os.close(counters)
        os.rmdir(probe_dir)


def _probe_compat(jail: Jail, member: socket.socket) -> Prerequisite:
    """A forked child makes a 32-bit SO_DETACH_REUSEPORT_BPF on the jailed socket: the
    compat hook must kill it (SIGKILL) and record it. Not a failure of the doctor when the
    hook cannot load: the watchdog alone then repairs what such a call changes."""
    from steerd.daemon.dataplane import i386

    name = "32-bit entry"
    if not i386.available():
        return Prerequisite(name, True, "not x86-64: no int $0x80 path", "")
    if jail.compat_error is not None:
        return Prerequisite(name, True, f"watchdog only (compat hook: {jail.compat_error})",
                            "")
    caller = i386.I386()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        caller.setsockopt(member.fileno(), socket.SOL_SOCKET, 68, b"\0\0\0\0")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    recorded = any(o.pid == pid for o in jail.drain_offences())
    ok = killed and recorded
    return Prerequisite(
        name, ok,
        "32-bit setsockopt outside the allowlist: the caller is killed by the compat hook "
        "(raw tracepoint sys_enter, bpf/compat.c); the call itself still runs and "
        "the daemon's watchdog repairs it" if ok else
        f"the compat hook is attached but a 32-bit caller was not killed and recorded "
        f"(status {status:#x}, recorded {recorded})",
        "a kernel with raw tracepoints and BTF (/sys/kernel/btf/vmlinux)")


def _errno_of_call(call: Callable[[], object]) -> int:
    """0 if ``call()`` succeeds, else the errno it failed with (sockets it made are closed
    by the garbage collector at once: nothing else refers to them)."""
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    return 0
