"""Getting bpf/steer.c and guard.c into the kernel: what the machine must have
(prerequisites), which kernel headers bcc compiles against, the -D flags that specialise the
C for one deployment, and compiling, loading and pinning the programs.

Why -D flags: per-deployment numbers (CID layout, slot counts, service ports) are compiled
in, so the programs do no config lookups on the fast path; the map descriptors are filled in
at load time (compiled.py), so one compile serves every run of a deployment.

Why prerequisites are checked first and all at once: a missing header tree or an unmounted
bpffs otherwise surfaces as a compiler or syscall error deep in start-up; every failure
becomes one DataplaneError whose message names what is missing and how to fix it, and
``steerd doctor`` lists them all.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from steerd.daemon.dataplane import compiled
from steerd.daemon.dataplane.compiled import Entry
from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import BPF_DIR
from steerd.daemon.dataplane.maps import DEFAULT_PIN_DIR, MAP_ARRAY, libbcc, pin_fd

if TYPE_CHECKING:
    from steerd.daemon.dataplane import DataplaneConfig

# Where deploy/setup.sh merges Debian's generic header trees when the running kernel has
# none of its own (a system cache: an installed steerd finds it outside any checkout).
KERNEL_HEADERS_CACHE = Path("/var/cache/steerd/kernel-headers")
BPFFS_MAGIC = 0xCAFE4A11

# Program types (include/uapi/linux/bpf.h enum bpf_prog_type).
PROG_SCHED_CLS = 3
PROG_XDP = 6
PROG_SK_REUSEPORT = 21

# Pin names of the programs under the pin dir (a restarted daemon finds them there).
STEER_PIN = "prog_steer"
GUARD_PIN = "prog_guard"
GUARD_TC_PIN = "prog_guard_tc"


# ---------------------------------------------------------------------------------------
# Prerequisites


@dataclass(frozen=True, slots=True)
class Prerequisite:
    """One thing the data plane needs, whether it holds, and how to make it hold."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


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


# Long on purpose: one real probe after another, in the order steerd doctor reports them.
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
                "--system-site-packages (deploy/setup.sh and deploy/install.sh do both; "
                "docs/OPERATIONS.md)",
            )
        )
    headers, where = find_kernel_headers()
    checks.append(
        Prerequisite(
            "kernel headers",
            headers is not None,
            f"using {headers}" if headers else f"no header tree: {where}",
            "install linux-headers-$(uname -r), or merge Debian's generic headers into "
            f"{KERNEL_HEADERS_CACHE} (deploy/setup.sh does; docs/OPERATIONS.md), or set "
            "BCC_KERNEL_SOURCE to a header tree",
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
        fd = libbcc().bcc_create_map(MAP_ARRAY, b"steerd_probe", 4, 8, 1, 0)
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
# Compiling and loading


def cflags(config: DataplaneConfig) -> list[str]:
    """The -D flags that specialise bpf/*.c for this deployment (the map descriptors are
    ``fd_macros``: filled in at load time, so a compile serves every run)."""
    c, layout = config, config.layout
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
    return flags


def fd_macros(map_fds: dict[str, int]) -> dict[str, int]:
    """The macro bpf/*.c names each map by (STEERD_FD_<NAME>) and the map's descriptor."""
    return {f"STEERD_FD_{name.upper()}": fd for name, fd in map_fds.items()}


@dataclass(slots=True)
class Programs:
    """One group's loaded steering and guard programs (this process's descriptors)."""

    steer_fd: int
    guard_fd: int
    guard_tc_fd: int

    def close(self) -> None:
        """Release this process's handles; what is pinned or attached stays."""
        for fd in (self.steer_fd, self.guard_fd, self.guard_tc_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


STEER = [Entry("steerd_steer", PROG_SK_REUSEPORT)]
GUARD = [Entry("steerd_guard", PROG_XDP), Entry("steerd_guard_tc", PROG_SCHED_CLS)]


def load_programs(flags: list[str], fds: dict[str, int], pin_dir: str) -> Programs:
    """Compile (or find compiled), load and pin the steering and guard programs against the
    open maps ``fds`` (fd_macros)."""
    loaded: dict[str, int] = {}
    try:
        loaded |= compiled.load("steer.c", flags, STEER, fds)
        loaded |= compiled.load("guard.c", flags, GUARD, fds)
        pin_fd(loaded["steerd_steer"], os.path.join(pin_dir, STEER_PIN))
        pin_fd(loaded["steerd_guard"], os.path.join(pin_dir, GUARD_PIN))
        pin_fd(loaded["steerd_guard_tc"], os.path.join(pin_dir, GUARD_TC_PIN))
    except Exception as exc:
        for fd in loaded.values():
            os.close(fd)
        if isinstance(exc, DataplaneError):
            raise
        raise DataplaneError(f"loading the BPF programs failed: {exc}") from exc
    return Programs(loaded["steerd_steer"], loaded["steerd_guard"], loaded["steerd_guard_tc"])
