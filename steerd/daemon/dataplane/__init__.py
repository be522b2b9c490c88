"""The steerd data plane: the SK_REUSEPORT steering program and the XDP guard (steerd/bpf/), loaded
with bcc, their maps pinned under a bpffs directory, driven from Python.

Why this shape:
- Python creates every map itself (libbcc ``bcc_create_map``) and the C refers to them with
  ``bpf_pseudo_fd``: bcc's ``BPF_TABLE`` cannot make a REUSEPORT_SOCKARRAY, and maps that
  Python owns can be pinned and found again by a restarted daemon (routes, counters and the
  worker sockets apps still hold survive a daemon restart).
- Per-deployment numbers (CID layout, slot counts, service ports, map fds) are -D flags, so
  the programs do no config lookups on the fast path; fixed numbers live in steerd/bpf/steerd.h,
  which this module also parses for the counter names.
- Every prerequisite failure becomes one DataplaneError whose message names what is missing
  and how to fix it; ``steerd doctor`` lists them all.

Slot numbering: worker slot N is index N of the ``workers`` sockarray and is the number a
server CID carries; classifier sockets live in a separate ``classifiers`` sockarray
(indexes 0..classifier_slots-1), so a CID can never name a classifier.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quic.cid import MAX_CID_LEN, CidLayout
from steerd.daemon.dataplane.netns import run_in_netns

# The C sources ship inside the package (package data, in the wheel too): steerd/bpf.
BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER = BPF_DIR / "steerd.h"
# Where deploy/setup.sh merges Debian's generic header trees when the running kernel has
# none of its own (a system cache: an installed steerd finds it outside any checkout).
KERNEL_HEADERS_CACHE = Path("/var/cache/steerd/kernel-headers")
DEFAULT_PIN_DIR = "/sys/fs/bpf/steerd"
BPFFS_MAGIC = 0xCAFE4A11

# Kernel ABI numbers (include/uapi/linux/bpf.h, asm-generic/socket.h, if_link.h).
MAP_HASH = 1
MAP_ARRAY = 2
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_REUSEPORT_SOCKARRAY = 20
PROG_SCHED_CLS = 3
PROG_XDP = 6
PROG_SK_REUSEPORT = 21
BPF_TCX_INGRESS = 46  # uapi enum bpf_attach_type (kernel 6.6+; newer than Debian 12's headers)
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class DataplaneError(Exception):
    """A data-plane operation failed; the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class Prerequisite:
    """One thing the data plane needs, whether it holds, and how to make it hold."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------
# steerd/bpf/steerd.h: the shared numbers


@functools.cache
def header_constants(path: Path = HEADER) -> dict[str, int]:
    """Every ``#define NAME <integer>`` in the shared header."""
    consts: dict[str, int] = {}
    pattern = re.compile(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.MULTILINE)
    for name, value in pattern.findall(path.read_text()):
        consts[name] = int(value, 0)
    return consts


def counter_names(path: Path = HEADER) -> dict[int, str]:
    """Counter index -> name ("steer_short_worker", "xdp_drop_small_initial", ...)."""
    return {
        value: name.removeprefix("STEERD_CNT_").lower()
        for name, value in header_constants(path).items()
        if name.startswith("STEERD_CNT_") and name != "STEERD_CNT_MAX"
    }


# ---------------------------------------------------------------------------------------
# Prerequisites


def find_kernel_headers() -> tuple[Path | None, str]:
    """The kernel header tree bcc should compile against, and where the choice came from.

    Order: $BCC_KERNEL_SOURCE, the running kernel's /lib/modules/$(uname -r)/build, then the
    merged Debian tree that deploy/setup.sh builds in KERNEL_HEADERS_CACHE.
    """
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        path = Path(env)
        return (path if (path / "include").is_dir() else None), f"$BCC_KERNEL_SOURCE={env}"
    build = Path("/lib/modules") / os.uname().release / "build"
    if (build / "include").is_dir():
        return build, str(build)
    cache = KERNEL_HEADERS_CACHE
    if (cache / "include").is_dir():
        return cache, str(cache)
    return None, f"neither {build} nor {cache}"


def _is_bpffs(path: str) -> bool:
    libc = ct.CDLL(None, use_errno=True)

    class StatFs(ct.Structure):
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_byte * 112)]

    buf = StatFs()
    if libc.statfs(path.encode(), ct.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPFFS_MAGIC


def _bpffs_root(pin_dir: str) -> str:
    """The nearest existing ancestor of ``pin_dir`` (the pin dir itself may not exist yet)."""
    path = Path(pin_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path)


def check_prerequisites(pin_dir: str = DEFAULT_PIN_DIR) -> list[Prerequisite]:
    """Every prerequisite of loading the data plane, each checked for real."""
    checks: list[Prerequisite] = []
    root = os.geteuid() == 0
    checks.append(
        Prerequisite(
            "root",
            root,
            f"euid {os.geteuid()}",
            "run as root (BPF, XDP and the shared :443 sockets need it): sudo steerd ...",
        )
    )
    try:
        import bcc  # noqa: F401

        checks.append(Prerequisite("bcc", True, "python bcc module imports"))
        have_bcc = True
    except ImportError as exc:
        have_bcc = False
        checks.append(
            Prerequisite(
                "bcc",
                False,
                f"cannot import bcc: {exc}",
                "apt-get install python3-bpfcc, and use a venv made with "
                "--system-site-packages (deploy/setup.sh does both)",
            )
        )
    headers, where = find_kernel_headers()
    checks.append(
        Prerequisite(
            "kernel headers",
            headers is not None,
            f"using {headers}" if headers else f"no header tree: {where}",
            "install linux-headers-$(uname -r), or run deploy/setup.sh (merged Debian tree in "
            f"{KERNEL_HEADERS_CACHE}), or set BCC_KERNEL_SOURCE to a header tree",
        )
    )
    root_dir = _bpffs_root(pin_dir)
    mounted = _is_bpffs(root_dir)
    checks.append(
        Prerequisite(
            "bpffs",
            mounted,
            f"{root_dir} is {'' if mounted else 'not '}a bpf filesystem (pin dir {pin_dir})",
            "mount -t bpf bpf /sys/fs/bpf (and keep the pin dir under it)",
        )
    )
    if have_bcc and root:
        fd = _lib().bcc_create_map(MAP_ARRAY, b"steerd_probe", 4, 8, 1, 0)
        if fd >= 0:
            os.close(fd)
            checks.append(Prerequisite("bpf syscall", True, "created a test map"))
        else:
            err = ct.get_errno()
            checks.append(
                Prerequisite(
                    "bpf syscall",
                    False,
                    f"map creation failed: {os.strerror(err)}",
                    "use a kernel with CONFIG_BPF_SYSCALL and run with CAP_BPF/CAP_NET_ADMIN",
                )
            )
    else:
        checks.append(
            Prerequisite("bpf syscall", False, "not tried (needs root and bcc)", "see above")
        )
    return checks


def require_prerequisites(pin_dir: str = DEFAULT_PIN_DIR) -> Path:
    """Raise one DataplaneError naming every failed prerequisite; return the header tree."""
    failed = [c for c in check_prerequisites(pin_dir) if not c.ok]
    if failed:
        lines = [f"{c.name}: {c.detail} -- fix: {c.fix}" for c in failed]
        raise DataplaneError("data plane prerequisites missing:\n  " + "\n  ".join(lines))
    headers, _ = find_kernel_headers()
    assert headers is not None
    return headers


# ---------------------------------------------------------------------------------------
# libbcc / libbpf through ctypes


_LIB: Any = None


def _lib() -> Any:
    """libbcc (which links libbpf), with the prototypes this module uses."""
    global _LIB
    if _LIB is None:
        from bcc.libbcc import lib

        lib.bcc_create_map.restype = ct.c_int
        lib.bcc_create_map.argtypes = [
            ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int,
        ]
        lib.bpf_obj_pin.restype = ct.c_int
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        lib.bpf_obj_get.restype = ct.c_int
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        lib.bpf_prog_attach.restype = ct.c_int
        lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        lib.bpf_prog_detach2.restype = ct.c_int
        lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
        lib.bpf_obj_get_info.restype = ct.c_int
        lib.bpf_obj_get_info.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
        _LIB = lib
    return _LIB


def _errno_of(ret: int) -> int:
    """libbpf returns -errno; libbcc's own calls return -1 and set errno."""
    return -ret if ret < -1 else ct.get_errno() or errno.EINVAL


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One map the programs use: name (also its pin file), type and sizes."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def _map_info(fd: int) -> tuple[int, int, int, int]:
    """(type, key_size, value_size, max_entries) of an open map."""
    buf = (ct.c_uint32 * 32)()
    size = ct.c_uint32(ct.sizeof(buf))
    if _lib().bpf_obj_get_info(fd, buf, ct.byref(size)) != 0:
        raise DataplaneError(f"cannot read map info of fd {fd}: {os.strerror(ct.get_errno())}")
    return buf[0], buf[2], buf[3], buf[4]


def _open_or_create_map(spec: MapSpec, pin_dir: str) -> int:
    """Reuse the pinned map if its layout matches, else create and pin a new one."""
    lib = _lib()
    path = os.path.join(pin_dir, spec.name)
    want = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries)
    if os.path.exists(path):
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            raise DataplaneError(f"cannot open pinned map {path}: {os.strerror(_errno_of(fd))}")
        have = _map_info(fd)
        if have == want:
            return fd
        os.close(fd)
        raise DataplaneError(
            f"pinned map {path} has layout {have}, this steerd wants {want}: it was made by "
            f"another steerd version or configuration; remove {pin_dir} (rm -r) and reload"
        )
    fd = lib.bcc_create_map(spec.map_type, spec.name.encode()[:15], spec.key_size,
                            spec.value_size, spec.max_entries, 0)
    if fd < 0:
        raise DataplaneError(f"cannot create map {spec.name}: {os.strerror(_errno_of(fd))}")
    ret = lib.bpf_obj_pin(fd, path.encode())
    if ret != 0:
        os.close(fd)
        raise DataplaneError(f"cannot pin map at {path}: {os.strerror(_errno_of(ret))}")
    return fd


def _pin_fd(fd: int, path: str) -> None:
    """Pin ``fd`` at ``path``, replacing an older pin (a reload re-pins new programs)."""
    if os.path.exists(path):
        os.unlink(path)
    ret = _lib().bpf_obj_pin(fd, path.encode())
    if ret != 0:
        raise DataplaneError(f"cannot pin {path}: {os.strerror(_errno_of(ret))}")


def detach_pinned(path: str, attach_type: int, target: Callable[[], int],
                  netns: str | None = None) -> bool:
    """Detach the program pinned at ``path`` from ``target()`` (a cgroup fd or an ifindex,
    looked up in ``netns``): how a run retires what an earlier run attached, found by its
    pin. False if there is no such pin or it was not attached there."""
    if not os.path.exists(path):
        return False
    lib = _lib()
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        return False
    try:
        detached = run_in_netns(netns, lambda: int(lib.bpf_prog_detach2(fd, target(), attach_type)))
        return detached == 0
    except OSError:
        return False
    finally:
        os.close(fd)


def _fd_of(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


# ---------------------------------------------------------------------------------------
# The data plane


@dataclass(frozen=True, slots=True)
class DataplaneConfig:
    """What a deployment decides: CID layout, service port(s), slot counts, pin dir.

    ``port`` is the port whose reuseport group this data plane steers; ``guard_ports`` are
    the ports the XDP guard classifies (default: just ``port``). One Dataplane steers one
    reuseport group; a second service port needs its own Dataplane with its own pin dir.
    """

    layout: CidLayout = field(default_factory=CidLayout)
    port: int = 443
    guard_ports: tuple[int, ...] = ()
    classifier_slots: int = 4
    worker_slots: int | None = None
    route_capacity: int = 65536
    bucket_capacity: int = 65536
    learned_capacity: int = 65536  # learned CIDs (and, apart, learned client addresses)
    pin_dir: str = DEFAULT_PIN_DIR

    def effective_worker_slots(self) -> int:
        """Slots the ``workers`` sockarray holds: all a CID can name, capped by the header."""
        cap = header_constants()["STEERD_MAX_WORKER_SLOTS"]
        return self.worker_slots or min(256**self.layout.slot_len, cap)

    def effective_guard_ports(self) -> tuple[int, ...]:
        return self.guard_ports or (self.port,)


class Dataplane:
    """Maps, programs and their attachments for one steered service port.

    Use: ``dp = Dataplane(cfg); dp.load(); dp.attach_reuseport(sock); dp.set_worker(slot,
    sock); dp.attach_xdp("eth0")``. ``close()`` keeps the pins (a restarted daemon finds the
    routes, counters and sockets); ``destroy()`` detaches XDP and removes the pin dir.
    """

    def __init__(self, config: DataplaneConfig) -> None:
        self.config = config
        self._consts = header_constants()
        self._counter_names = counter_names()
        self._fds: dict[str, int] = {}
        self._bpf: list[Any] = []
        self._steer_fd = -1
        self._guard_fd = -1
        self._guard_fn: Any = None
        self._guard_tc_fd = -1
        self._xdp: dict[tuple[str | None, str], int] = {}
        self._tc: set[tuple[str | None, str]] = set()
        self._ncpus = 0
        self._validate()

    def _validate(self) -> None:
        c, k, layout = self.config, self._consts, self.config.layout
        if layout.cid_len > MAX_CID_LEN or layout.host_id_len > 8 or layout.slot_len > 4:
            raise DataplaneError(
                f"CID layout {layout} not supported by the BPF programs "
                "(cid_len <= 20, host_id_len <= 8, slot_len <= 4)"
            )
        if not 1 <= c.classifier_slots <= k["STEERD_MAX_CLASSIFIER_SLOTS"]:
            raise DataplaneError(
                f"classifier_slots must be 1..{k['STEERD_MAX_CLASSIFIER_SLOTS']}"
            )
        if not 1 <= len(c.effective_guard_ports()) <= k["STEERD_MAX_PORTS"]:
            raise DataplaneError(f"1..{k['STEERD_MAX_PORTS']} guard ports are supported")
        if not 1 <= c.effective_worker_slots() <= k["STEERD_MAX_WORKER_SLOTS"]:
            raise DataplaneError("worker_slots out of range")

    # -- loading --------------------------------------------------------------------------

    def _map_specs(self) -> list[MapSpec]:
        c, k = self.config, self._consts
        slots = c.effective_worker_slots()
        return [
            MapSpec("workers", MAP_REUSEPORT_SOCKARRAY, 4, 8, c.effective_worker_slots()),
            MapSpec("classifiers", MAP_REUSEPORT_SOCKARRAY, 4, 8, c.classifier_slots),
            MapSpec("initial_routes", MAP_LRU_HASH, k["STEERD_ROUTE_KEY_SIZE"],
                    k["STEERD_ROUTE_VALUE_SIZE"], c.route_capacity),
            MapSpec("counters", MAP_PERCPU_ARRAY, 4, 8, k["STEERD_CNT_MAX"]),
            MapSpec("guard_config", MAP_ARRAY, 4, k["STEERD_GUARD_CONFIG_SIZE"], 1),
            MapSpec("flood_buckets", MAP_LRU_HASH, k["STEERD_BUCKET_KEY_SIZE"], 8,
                    c.bucket_capacity),
            # learned mode (steerd/bpf/learn.c, steerd/daemon/dataplane/learn.py)
            MapSpec("learned_cids", MAP_HASH, k["STEERD_ROUTE_KEY_SIZE"],
                    k["STEERD_ROUTE_VALUE_SIZE"], c.learned_capacity),
            MapSpec("learned_peers", MAP_HASH, k["STEERD_PEER_KEY_SIZE"],
                    k["STEERD_ROUTE_VALUE_SIZE"], c.learned_capacity),
            MapSpec("learn_sockets", MAP_HASH, 8, k["STEERD_LEARN_SOCKET_SIZE"],
                    2 * slots),
            MapSpec("learn_config", MAP_ARRAY, 4, k["STEERD_LEARN_CONFIG_SIZE"], 1),
            MapSpec("learn_counts", MAP_ARRAY, 4, 4, 2 * slots),
            MapSpec("slot_stats", MAP_PERCPU_ARRAY, 4, 8, slots * k["STEERD_SLOT_STATS"]),
        ]

    def cflags(self) -> list[str]:
        """The -D flags that specialise steerd/bpf/*.c for this deployment and these maps."""
        c, layout = self.config, self.config.layout
        # The CID numbers come from CidLayout itself, so BPF and quic/ cannot disagree.
        flags = [
            f"-I{BPF_DIR}",
            f"-DSTEERD_WORKER_SLOTS={c.effective_worker_slots()}",
            f"-DSTEERD_CLASSIFIER_SLOTS={c.classifier_slots}",
            f"-DSTEERD_NPORTS={len(c.effective_guard_ports())}",
        ]
        flags += [f"-D{name}={value:#x}" for name, value in layout.defines().items()]
        flags += [f"-DSTEERD_PORT_{i}={p}" for i, p in enumerate(c.effective_guard_ports())]
        flags.append(f"-DSTEERD_LEARN_PORT={c.port}")
        flags += [f"-DSTEERD_FD_{name.upper()}={fd}" for name, fd in self._fds.items()]
        return flags

    def load(self) -> None:
        """Check prerequisites, open or create the pinned maps, compile, load and pin both
        programs. Raises DataplaneError on any failure."""
        self.open_maps()
        self.load_programs()

    def open_maps(self) -> None:
        """Check prerequisites and open (or create and pin) the maps: fast, no compiler.

        A restarted daemon calls this first: while the previous run's program is still
        attached to the reuseport group (the apps' sockets keep the group alive), new
        classifier sockets put into the reopened ``classifiers`` map receive traffic at once,
        long before the programs are compiled again.
        """
        headers = require_prerequisites(self.config.pin_dir)
        os.environ["BCC_KERNEL_SOURCE"] = str(headers)
        import bcc

        self._ncpus = len(bcc.utils.get_possible_cpus())
        try:
            os.makedirs(self.config.pin_dir, exist_ok=True)
            for spec in self._map_specs():
                self._fds[spec.name] = _open_or_create_map(spec, self.config.pin_dir)
        except DataplaneError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise DataplaneError(f"opening the BPF maps failed: {exc}") from exc

    def load_programs(self) -> None:
        """Compile, load and pin the steering and guard programs against the open maps."""
        self._need_maps()
        try:
            steer = self._compile("steer.c")
            self._steer_fd = steer.load_func(b"steerd_steer", PROG_SK_REUSEPORT).fd
            guard = self._compile("guard.c")
            self._guard_fn = guard.load_func(b"steerd_guard", PROG_XDP)
            self._guard_fd = self._guard_fn.fd
            self._guard_tc_fd = guard.load_func(b"steerd_guard_tc", PROG_SCHED_CLS).fd
            _pin_fd(self._steer_fd, os.path.join(self.config.pin_dir, "prog_steer"))
            _pin_fd(self._guard_fd, os.path.join(self.config.pin_dir, "prog_guard"))
            _pin_fd(self._guard_tc_fd, os.path.join(self.config.pin_dir, "prog_guard_tc"))
        except DataplaneError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise DataplaneError(f"loading the BPF programs failed: {exc}") from exc

    def remove_pinned_guard(self, ifname: str, netns: str | None = None) -> list[str]:
        """Take the guard this pin dir's programs put on ``ifname`` off it, whichever run
        attached it: TC by its pinned program, XDP only if the attached program is ours (the
        pinned one), never another tool's. Returns what was removed."""
        import bcc

        removed = ["tc"] if self.detach_stale_tc(ifname, netns) else []
        pinned = os.path.join(self.config.pin_dir, "prog_guard")
        if not os.path.exists(pinned):
            return removed
        ours = json.loads(subprocess.run(
            ["bpftool", "-j", "prog", "show", "pinned", pinned],
            capture_output=True, text=True, check=False).stdout or "{}").get("id")
        ip = ["ip", *(["-n", netns] if netns else []), "-j", "link", "show", "dev", ifname]
        links = json.loads(subprocess.run(ip, capture_output=True, text=True,
                                          check=False).stdout or "[]")
        xdp = links[0].get("xdp", {}) if links else {}
        if ours is not None and xdp.get("prog", {}).get("id") == ours:
            flags = XDP_FLAGS_SKB_MODE if xdp.get("mode") == 2 else XDP_FLAGS_DRV_MODE
            run_in_netns(netns, lambda: bcc.BPF.remove_xdp(ifname.encode(), flags))
            removed.append("xdp")
        return removed

    def detach_stale_tc(self, ifname: str, netns: str | None = None) -> bool:
        """Detach the TC guard a previous run pinned (before attaching this run's), so a
        restart does not leave two guards on one interface. True if one was removed."""
        return detach_pinned(os.path.join(self.config.pin_dir, "prog_guard_tc"),
                             BPF_TCX_INGRESS, lambda: socket.if_nametoindex(ifname), netns)

    def _compile(self, source: str) -> Any:
        import bcc

        text = (BPF_DIR / source).read_text()
        flags = self.cflags()
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=flags)
        except Exception as exc:
            raise DataplaneError(f"compiling steerd/bpf/{source} failed: {exc}") from exc
        self._bpf.append(bpf)
        return bpf

    @property
    def steer_prog_fd(self) -> int:
        self._need_loaded()
        return self._steer_fd

    @property
    def guard_prog_fd(self) -> int:
        self._need_loaded()
        return self._guard_fd

    @property
    def ncpus(self) -> int:
        """Possible CPUs: the width of a per-CPU map's value."""
        self._need_maps()
        return self._ncpus

    def map_fd(self, name: str) -> int:
        """The open fd of map ``name`` (e.g. ``counters``, which the socket jail shares)."""
        self._need_maps()
        return self._fds[name]

    def _need_loaded(self) -> None:
        if self._steer_fd < 0:
            raise DataplaneError("data plane not loaded: call load() first")

    def _need_maps(self) -> None:
        if not self._fds:
            raise DataplaneError("data plane not loaded: call load() or open_maps() first")

    def close(self) -> None:
        """Release this process's handles; pinned maps and programs stay for a restart."""
        for bpf in self._bpf:
            try:
                bpf.cleanup()
            except Exception:  # bcc cleanup is best effort; nothing of ours depends on it
                pass
        self._bpf.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._steer_fd = self._guard_fd = self._guard_tc_fd = -1
        self._guard_fn = None

    def destroy(self) -> None:
        """Detach every XDP and TC attachment made here, close, and remove the pin dir."""
        errors: list[str] = []
        for netns, ifname in list(self._xdp):
            try:
                self.detach_xdp(ifname, netns=netns)
            except DataplaneError as exc:
                errors.append(str(exc))
        for netns, ifname in list(self._tc):
            try:
                self.detach_tc(ifname, netns=netns)
            except DataplaneError as exc:
                errors.append(str(exc))
        from steerd.daemon.dataplane.learn import remove_learner

        remove_learner(self.config.pin_dir)  # the egress program, if learned mode was on
        self.close()
        shutil.rmtree(self.config.pin_dir, ignore_errors=True)
        if errors:
            raise DataplaneError("; ".join(errors))

    def __enter__(self) -> Dataplane:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- attachments ----------------------------------------------------------------------

    def attach_reuseport(self, sock: socket.socket) -> None:
        """Attach the steering program to ``sock``'s reuseport group (one member suffices)."""
        self._need_loaded()
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF,
                            struct.pack("i", self._steer_fd))
        except OSError as exc:
            raise DataplaneError(
                f"attaching the steering program failed: {exc} (the socket must be UDP, "
                "bound, with SO_REUSEPORT set)"
            ) from exc

    def attach_pinned_steering(self, sock: socket.socket) -> bool:
        """Attach the steering program a previous run pinned to ``sock``'s group, before
        this run's is compiled; False if there is none (a first start)."""
        path = os.path.join(self.config.pin_dir, "prog_steer")
        if not os.path.exists(path):
            return False
        fd = _lib().bpf_obj_get(path.encode())
        if fd < 0:
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", fd))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    @staticmethod
    def detach_reuseport(sock: socket.socket) -> None:
        """Back to the kernel's hash for ``sock``'s group."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, struct.pack("i", 0))
        except OSError as exc:
            raise DataplaneError(f"detaching the steering program failed: {exc}") from exc

    def attach_xdp(self, ifname: str, mode: str = "auto", netns: str | None = None) -> str:
        """Attach the XDP guard to ``ifname`` (in network namespace ``netns``).

        mode "native" (driver), "generic" (SKB) or "auto" (native if the driver has it, else
        generic). Returns the mode used.
        """
        self._need_loaded()
        import bcc

        if mode not in ("auto", "native", "generic"):
            raise DataplaneError(f"unknown XDP mode {mode!r}")
        tries = {"auto": ["native", "generic"], "native": ["native"], "generic": ["generic"]}
        flag_of = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
        errors: list[str] = []
        dev, fn = ifname.encode(), self._guard_fn
        for m in tries[mode]:
            flags = flag_of[m]
            try:
                run_in_netns(netns, lambda f=flags: bcc.BPF.attach_xdp(dev, fn, f))
            except Exception as exc:
                errors.append(f"{m}: {exc}")
                continue
            self._xdp[(netns, ifname)] = flags
            return m
        raise DataplaneError(f"attaching XDP to {ifname} failed: {'; '.join(errors)}")

    def detach_xdp(self, ifname: str, netns: str | None = None) -> None:
        """Remove the XDP guard from ``ifname``."""
        import bcc

        flags = self._xdp.pop((netns, ifname), XDP_FLAGS_DRV_MODE)
        try:
            run_in_netns(netns, lambda: bcc.BPF.remove_xdp(ifname.encode(), flags))
        except Exception as exc:
            raise DataplaneError(f"detaching XDP from {ifname} failed: {exc}") from exc

    def attach_tc(self, ifname: str, netns: str | None = None) -> None:
        """Attach the guard at TC ingress (tcx) of ``ifname`` instead of XDP.

        Same verdicts and counters as the XDP guard. For virtual interfaces: on veth, any
        native XDP program makes the kernel copy every locally built skb (see
        docs/PERFORMANCE.md), while TC sees the skb as it is.
        """
        self._need_loaded()
        lib = _lib()

        def attach() -> int:
            index = socket.if_nametoindex(ifname)
            if lib.bpf_prog_attach(self._guard_tc_fd, index, BPF_TCX_INGRESS, 0) != 0:
                return ct.get_errno() or errno.EINVAL
            return 0

        try:
            err = run_in_netns(netns, attach)
        except OSError as exc:
            raise DataplaneError(f"attaching the TC guard to {ifname} failed: {exc}") from exc
        if err:
            raise DataplaneError(
                f"attaching the TC guard to {ifname} failed: {os.strerror(err)} "
                "(tcx needs kernel 6.6 or later)"
            )
        self._tc.add((netns, ifname))

    def detach_tc(self, ifname: str, netns: str | None = None) -> None:
        """Remove the TC guard from ``ifname``."""
        self._tc.discard((netns, ifname))
        lib = _lib()

        def detach() -> int:
            index = socket.if_nametoindex(ifname)
            if lib.bpf_prog_detach2(self._guard_tc_fd, index, BPF_TCX_INGRESS) != 0:
                return ct.get_errno() or errno.EINVAL
            return 0

        try:
            err = run_in_netns(netns, detach)
        except OSError as exc:
            raise DataplaneError(f"detaching the TC guard from {ifname} failed: {exc}") from exc
        if err:
            raise DataplaneError(f"detaching the TC guard from {ifname} failed: "
                                 f"{os.strerror(err)}")

    # -- sockets --------------------------------------------------------------------------

    def _sockarray_set(self, name: str, index: int, sock: socket.socket | int) -> None:
        self._need_maps()
        key = ct.c_uint32(index)
        value = ct.c_uint64(_fd_of(sock))
        if _lib().bpf_update_elem(self._fds[name], ct.byref(key), ct.byref(value), 0) != 0:
            err = ct.get_errno()
            raise DataplaneError(
                f"putting a socket in {name}[{index}] failed: {os.strerror(err)} (UDP socket, "
                "bound with SO_REUSEPORT in the same group, index in range)"
            )

    def _sockarray_del(self, name: str, index: int) -> None:
        self._need_maps()
        key = ct.c_uint32(index)
        if _lib().bpf_delete_elem(self._fds[name], ct.byref(key)) != 0:
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise DataplaneError(f"removing {name}[{index}] failed: {os.strerror(err)}")

    def _sockarray_cookie(self, name: str, index: int) -> int | None:
        self._need_maps()
        key = ct.c_uint32(index)
        value = ct.c_uint64()
        if _lib().bpf_lookup_elem(self._fds[name], ct.byref(key), ct.byref(value)) != 0:
            return None
        return value.value

    def worker_cookie(self, slot: int) -> int | None:
        """The socket cookie (SO_COOKIE) of the socket in ``slot``, None if empty; a
        restarted daemon uses it to tell which slots still hold a live worker."""
        return self._sockarray_cookie("workers", slot)

    def classifier_cookie(self, index: int) -> int | None:
        return self._sockarray_cookie("classifiers", index)

    def set_worker(self, slot: int, sock: socket.socket | int) -> None:
        """Worker slot ``slot`` (the number its CIDs carry) is ``sock``."""
        self._sockarray_set("workers", slot, sock)

    def remove_worker(self, slot: int) -> None:
        """Empty a worker slot: its traffic goes to a classifier from now on."""
        self._sockarray_del("workers", slot)

    def set_classifier(self, index: int, sock: socket.socket | int) -> None:
        """Classifier socket ``index`` (0..classifier_slots-1) is ``sock``."""
        self._sockarray_set("classifiers", index, sock)

    def remove_classifier(self, index: int) -> None:
        self._sockarray_del("classifiers", index)

    # -- routes ---------------------------------------------------------------------------

    @staticmethod
    def _route_key(dcid: bytes) -> ct.Array[ct.c_char]:
        if len(dcid) > MAX_CID_LEN:
            raise DataplaneError(f"DCID of {len(dcid)} bytes is longer than {MAX_CID_LEN}")
        raw = bytes([len(dcid)]) + dcid.ljust(MAX_CID_LEN, b"\0") + b"\0\0\0"
        return ct.create_string_buffer(raw, len(raw))

    def add_route(self, dcid: bytes, slot: int, ttl: float | None = 10.0) -> None:
        """Long-header packets with this client-chosen DCID go to worker ``slot`` for
        ``ttl`` seconds (None: until deleted or evicted by the LRU)."""
        self._need_maps()
        expires = 0 if ttl is None else time.monotonic_ns() + int(ttl * 1e9)
        value = ct.create_string_buffer(struct.pack("=IIQ", slot, 0, expires), 16)
        key = self._route_key(dcid)
        if _lib().bpf_update_elem(self._fds["initial_routes"], key, value, 0) != 0:
            raise DataplaneError(f"adding a route failed: {os.strerror(ct.get_errno())}")

    def delete_route(self, dcid: bytes) -> bool:
        """Forget a route; False if there was none."""
        self._need_maps()
        if _lib().bpf_delete_elem(self._fds["initial_routes"], self._route_key(dcid)) == 0:
            return True
        if ct.get_errno() == errno.ENOENT:
            return False
        raise DataplaneError(f"deleting a route failed: {os.strerror(ct.get_errno())}")

    def routes(self) -> dict[bytes, tuple[int, int]]:
        """DCID -> (slot, expires_ns) for every route in the map."""
        self._need_maps()
        lib, fd = _lib(), self._fds["initial_routes"]
        size = self._consts["STEERD_ROUTE_KEY_SIZE"]
        out: dict[bytes, tuple[int, int]] = {}
        key = ct.create_string_buffer(size)
        nxt = ct.create_string_buffer(size)
        value = ct.create_string_buffer(16)
        first = True
        while lib.bpf_get_next_key(fd, None if first else key, nxt) == 0:
            first = False
            ct.memmove(key, nxt, size)
            if lib.bpf_lookup_elem(fd, key, value) == 0:
                slot, _flags, expires = struct.unpack("=IIQ", value.raw)
                out[key.raw[1 : 1 + key.raw[0]]] = (slot, expires)
        return out

    def clear_routes(self) -> None:
        for dcid in self.routes():
            self.delete_route(dcid)

    # -- flood guard ----------------------------------------------------------------------

    def set_flood_guard(
        self, rate: float, burst: int, v4_prefix_len: int = 24, v6_prefix_len: int = 48,
        total_rate: float = 0.0, total_burst: int = 1,
    ) -> None:
        """Allow each source prefix ``rate`` new Initials (and 0-RTT) per second, ``burst``
        at once; and all prefixes together ``total_rate`` (0: no total cap)."""
        if (rate <= 0 or burst < 1 or not 0 <= v4_prefix_len <= 32
                or not 0 <= v6_prefix_len <= 128 or total_rate < 0 or total_burst < 1):
            raise DataplaneError("flood guard: rate > 0, burst >= 1, prefix lengths in range, "
                                 "total_rate >= 0, total_burst >= 1")
        interval = int(1e9 / rate)
        total = int(1e9 / total_rate) if total_rate else 0
        self._write_guard_config(1, v4_prefix_len, v6_prefix_len, interval,
                                 (burst - 1) * interval, total, (total_burst - 1) * total)
        self._clear_map("flood_buckets")

    def disable_flood_guard(self) -> None:
        self._write_guard_config(0, 24, 48, 0, 0, 0, 0)

    def _write_guard_config(self, on: int, v4: int, v6: int, interval: int, burst: int,
                            total: int, total_burst: int) -> None:
        self._need_maps()
        key = ct.c_uint32(0)
        value = ct.create_string_buffer(struct.pack(
            "=IBBHQQQQQ", on, v4, v6, 0, interval, burst, total, total_burst, 0),
            self._consts["STEERD_GUARD_CONFIG_SIZE"])
        if _lib().bpf_update_elem(self._fds["guard_config"], ct.byref(key), value, 0) != 0:
            raise DataplaneError(f"writing guard_config failed: {os.strerror(ct.get_errno())}")

    def _clear_map(self, name: str) -> None:
        lib, fd = _lib(), self._fds[name]
        size = _map_info(fd)[1]
        key = ct.create_string_buffer(size)
        while lib.bpf_get_next_key(fd, None, key) == 0:
            if lib.bpf_delete_elem(fd, key) != 0:
                break

    # -- counters -------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter named in steerd/bpf/steerd.h, summed over CPUs."""
        self._need_maps()
        lib, fd = _lib(), self._fds["counters"]
        values = (ct.c_uint64 * self._ncpus)()
        out: dict[str, int] = {}
        for index, name in sorted(self._counter_names.items()):
            key = ct.c_uint32(index)
            if lib.bpf_lookup_elem(fd, ct.byref(key), values) != 0:
                raise DataplaneError(f"reading counter {name}: {os.strerror(ct.get_errno())}")
            out[name] = sum(values)
        return out
