"""The socket jail: cgroup BPF hooks (steerd/bpf/jail.c) that stop apps from turning the worker
sockets they hold into keys to the whole port.

Why cgroup hooks: the kernel lets the holder of any member socket of a reuseport group
replace or remove the group's program, and ``connect()``, ``SO_BINDTODEVICE`` or a new
``bind()`` to the port take traffic out of the group; nothing in socket permissions stops an
app that was handed a worker socket. ``cgroup/setsockopt``, ``cgroup/connect4|6`` and
``cgroup/bind4|6`` programs attached at the root of the cgroup v2 hierarchy see every such
call on the machine first, and refuse the ones on the service port's UDP sockets (in the
daemon's network namespace) from any process the daemon did not list in the pinned
``jail_pids`` map. The daemon is identified by process (tgid), not by uid: apps may run as
root too.

Life cycle: the programs and the map are pinned under ``PIN_DIR/jail`` and the attachments
stay when the daemon stops (a stopped daemon lists no live process, so while it is down
nobody at all may touch the port's sockets); the next run lists itself before it binds
anything, attaches its freshly compiled programs beside the old ones and only then detaches
the old ones (no gap). ``steerd purge`` detaches and unpins them (:func:`remove_jail`).

A pid is only as good as the process behind it: the map is rewritten at every start, emptied
at a clean stop, and a classifier process that dies is taken out at once; after a SIGKILL of
the daemon its pids stay listed (and could be taken by new processes) until the next start
(see docs/SECURITY.md).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from steerd.daemon.dataplane import DataplaneError
from steerd.daemon.dataplane.header import BPF_DIR
from steerd.daemon.dataplane.maps import (
    MAP_HASH,
    MAP_PERCPU_ARRAY,
    MapSpec,
    detach_pinned,
    errno_of,
    libbcc,
    open_or_create_map,
    pin_fd,
)
from steerd.daemon.dataplane.programs import Prerequisite, find_kernel_headers

PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
BPF_CGROUP_INET4_BIND = 8
BPF_CGROUP_INET6_BIND = 9
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_SETSOCKOPT = 22
BPF_F_ALLOW_MULTI = 2
SO_NETNS_COOKIE = 71  # Linux >= 5.14
MAX_DAEMON_PIDS = 64  # main process + classifier processes (limits.classifiers <= 64)

# (function in steerd/bpf/jail.c, program type, cgroup attach type): one program per hook.
HOOKS = (
    ("steerd_jail_setsockopt", PROG_CGROUP_SOCKOPT, BPF_CGROUP_SETSOCKOPT),
    ("steerd_jail_connect4", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
    ("steerd_jail_connect6", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT),
    ("steerd_jail_bind4", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_BIND),
    ("steerd_jail_bind6", PROG_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_BIND),
)


def cgroup2_root(mounts: str = "/proc/self/mounts") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on hybrid systems), None if nowhere."""
    found: list[str] = []
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    found.append(fields[1])
    except OSError:
        return None
    # The shortest mount point is the hierarchy's root as this process sees it.
    return min(found, key=len) if found else None


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (what bpf_get_netns_cookie
    returns for sockets there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _pin_path(pin_dir: str, name: str) -> str:
    return os.path.join(pin_dir, "jail", name)


class Jail:
    """The jail of one daemon: its pinned ``jail_pids`` map and its five cgroup programs.

    ``pin_dir`` is the daemon's pin dir (the jail lives in ``pin_dir/jail``); ``port`` the
    service port; ``counters_fd`` the counters map its refusals are counted in.
    """

    def __init__(self, pin_dir: str, port: int, counters_fd: int) -> None:
        self.pin_dir = pin_dir
        self.port = port
        self.counters_fd = counters_fd
        self._pids_fd = -1
        self._bpf: object | None = None

    @property
    def attached(self) -> bool:
        """Whether programs are attached (this run's, or a previous run's still pinned)."""
        return all(os.path.exists(_pin_path(self.pin_dir, name)) for name, _, _ in HOOKS)

    def open(self) -> None:
        """Open (or create and pin) ``jail_pids``: fast, before the daemon binds anything,
        because a previous run's attached jail refuses binds from processes not listed."""
        jail_dir = os.path.join(self.pin_dir, "jail")
        os.makedirs(jail_dir, exist_ok=True)
        self._pids_fd = open_or_create_map(
            MapSpec("jail_pids", MAP_HASH, 4, 4, MAX_DAEMON_PIDS), jail_dir)
        # Mode 0: a uid-0 app without CAP_DAC_OVERRIDE can neither open the pinned map (to
        # list itself) nor the programs; the daemon's capabilities pass.
        os.chmod(jail_dir, 0)

    def set_daemon_pids(self, pids: Iterable[int]) -> None:
        """The daemon's processes are exactly ``pids`` from now on (stale ones go)."""
        keep = {int(p) for p in pids}
        for pid in keep:
            self.add_pid(pid)
        for pid in self.daemon_pids() - keep:
            self.remove_pid(pid)

    def add_pid(self, pid: int) -> None:
        """List ``pid`` (a classifier process the daemon just forked) as the daemon's."""
        key, one = ct.c_uint32(pid), ct.c_uint32(1)
        if libbcc().bpf_update_elem(self._need_open(), ct.byref(key), ct.byref(one), 0) != 0:
            raise DataplaneError(f"jail_pids: cannot add pid {pid}: "
                                 f"{os.strerror(ct.get_errno())}")

    def remove_pid(self, pid: int) -> None:
        libbcc().bpf_delete_elem(self._need_open(), ct.byref(ct.c_uint32(pid)))

    def daemon_pids(self) -> set[int]:
        lib, fd = libbcc(), self._need_open()
        out: set[int] = set()
        key, nxt = ct.c_uint32(), ct.c_uint32()
        first = True
        while lib.bpf_get_next_key(fd, None if first else ct.byref(key), ct.byref(nxt)) == 0:
            first = False
            key.value = nxt.value
            out.add(key.value)
        return out

    def attach(self) -> None:
        """Compile the hooks for this port and network namespace and attach them at the
        cgroup v2 root, then retire a previous run's (attached first, detached after: the
        port is never unguarded)."""
        import bcc

        root = cgroup2_root()
        if root is None:
            raise DataplaneError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none "
                                 "/sys/fs/cgroup/unified): the socket jail needs one")
        fd = self._need_open()
        cflags = [
            f"-I{BPF_DIR}", f"-DSTEERD_JAIL_PORT={self.port}",
            f"-DSTEERD_JAIL_NETNS={netns_cookie()}ULL", f"-DSTEERD_FD_JAIL_PIDS={fd}",
            f"-DSTEERD_FD_COUNTERS={self.counters_fd}",
        ]
        try:
            bpf = bcc.BPF(text=(BPF_DIR / "jail.c").read_bytes(), cflags=cflags)
            progs = [(name, bpf.load_func(name.encode(), ptype, attach_type=atype).fd, atype)
                     for name, ptype, atype in HOOKS]
        except Exception as exc:
            raise DataplaneError(f"compiling steerd/bpf/jail.c failed: {exc}") from exc
        self._bpf = bpf
        lib = libbcc()
        cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        attached: list[tuple[int, int]] = []
        try:
            for name, prog_fd, atype in progs:
                ret = lib.bpf_prog_attach(prog_fd, cg, atype, BPF_F_ALLOW_MULTI)
                if ret != 0:
                    for done_fd, done_type in attached:
                        lib.bpf_prog_detach2(done_fd, cg, done_type)
                    raise DataplaneError(
                        f"attaching {name} to the cgroup v2 root {root} failed: "
                        f"{os.strerror(errno_of(ret))}")
                attached.append((prog_fd, atype))
            for name, prog_fd, atype in progs:
                detach_pinned(_pin_path(self.pin_dir, name), atype, lambda: cg)
                pin_fd(prog_fd, _pin_path(self.pin_dir, name))
        finally:
            os.close(cg)

    def close(self) -> None:
        """Release this process's handles; the pins and attachments stay."""
        if self._pids_fd >= 0:
            os.close(self._pids_fd)
            self._pids_fd = -1
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            try:
                bpf.cleanup()  # type: ignore[attr-defined]
            except Exception:  # best effort: the pinned programs keep the jail alive
                pass

    def _need_open(self) -> int:
        if self._pids_fd < 0:
            raise DataplaneError("jail not open: call open() first")
        return self._pids_fd


def remove_jail(pin_dir: str) -> list[str]:
    """Detach and unpin the jail under ``pin_dir`` (``steerd purge``); what was done."""
    done: list[str] = []
    jail_dir = os.path.join(pin_dir, "jail")
    if not os.path.isdir(jail_dir):
        return done
    root = cgroup2_root()
    if root is not None:
        cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name, _, atype in HOOKS:
                if detach_pinned(_pin_path(pin_dir, name), atype, lambda: cg):
                    done.append(f"detached {name} from {root}")
        finally:
            os.close(cg)
    for entry in Path(jail_dir).iterdir():
        entry.unlink()
    os.rmdir(jail_dir)
    done.append(f"removed {jail_dir}")
    return done


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
        checks.append(_probe_jail(root))
    return checks


def _probe_jail(root: str) -> Prerequisite:
    """Attach a jail for a throw-away loopback port, and check that it refuses bind(),
    connect() and SO_BINDTODEVICE to a process it does not list (this one), and allows a
    bind once this process is listed. Everything is detached and removed afterwards."""
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
            return Prerequisite("socket jail", False, "cannot create a test map", fix)
        member = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        member.bind(("127.0.0.1", 0))
        port = member.getsockname()[1]
        jail = Jail(probe_dir, port, counters)
        jail.open()
        jail.set_daemon_pids([])
        jail.attach()
        results = {
            "bind": _errno_of_call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                                   .bind(("127.0.0.1", port))),
            "connect": _errno_of_call(lambda: member.connect(("127.0.0.1", 9))),  # type: ignore[union-attr]
            "SO_BINDTODEVICE": _errno_of_call(lambda: member.setsockopt(  # type: ignore[union-attr]
                socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")),
        }
        jail.add_pid(os.getpid())
        listed = _errno_of_call(lambda: member.setsockopt(  # type: ignore[union-attr]
            socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo"))
        refused = all(err == errno.EPERM for err in results.values())
        ok = refused and listed == 0
        detail = (f"hooks attached at {root} refused bind, connect and SO_BINDTODEVICE on a "
                  "jailed port, and allowed the listed daemon" if ok else
                  f"hooks attached, but errnos {results} for an unlisted process and "
                  f"{listed} for the listed one")
        return Prerequisite("socket jail", ok, detail, fix)
    except (DataplaneError, OSError) as exc:
        return Prerequisite("socket jail", False, str(exc), fix)
    finally:
        if member is not None:
            member.close()
        if jail is not None:
            jail.close()
        remove_jail(probe_dir)
        if counters >= 0:
            os.close(counters)
        os.rmdir(probe_dir)


def _errno_of_call(call: Callable[[], object]) -> int:
    """0 if ``call()`` succeeds, else the errno it failed with (sockets it made are closed
    by the garbage collector at once: nothing else refers to them)."""
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    return 0
