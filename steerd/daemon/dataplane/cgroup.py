"""The cgroup v2 root: where it is mounted, and attaching programs there so that they outlive
the daemon and are replaced without a gap.

Why one module: the socket jail (jail.py), learned mode's egress program (learn.py) and the
non-unicast filter (unicast.py) all attach at the root of the cgroup v2 hierarchy, beside
whatever else is attached there (``BPF_F_ALLOW_MULTI``), keep their programs attached by
pinning them, and at each start attach the new run's programs *before* detaching the previous
run's (found by their pins), so the machine is never without them; ``steerd purge`` detaches
them by the same pins. :func:`attach_at_root`, :func:`detach_from_root` and
:func:`remove_from_root` are that life cycle, written once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.maps import detach_pinned, errno_of, libbcc, pin_fd

BPF_F_ALLOW_MULTI = 2


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


class RootProgram(NamedTuple):
    """One loaded program to attach at the cgroup v2 root, and where it is pinned."""

    what: str  # how an error names it ("bpf/learn.c", or the jail hook's function)
    fd: int
    attach_type: int
    pin: str  # its pin path: the previous run's program there is retired, this one pinned


@contextlib.contextmanager
def _opened(root: str) -> Iterator[int]:
    """An fd of the cgroup directory ``root``, closed afterwards."""
    cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield cg
    finally:
        os.close(cg)


def attach_at_root(root: str, programs: Sequence[RootProgram]) -> None:
    """Attach every one of ``programs`` at the cgroup v2 root ``root`` (mounted there: the
    caller looked it up before compiling), then, for each, detach the previous run's program
    pinned at its pin and pin the new one there. Attaching first and detaching after leaves
    no moment without the programs. If one cannot be attached, those attached so far are
    detached again and the old ones stay, pinned and attached."""
    lib = libbcc()
    with _opened(root) as cg:
        attached: list[RootProgram] = []
        for prog in programs:
            ret = lib.bpf_prog_attach(prog.fd, cg, prog.attach_type, BPF_F_ALLOW_MULTI)
            if ret != 0:
                for done in attached:
                    lib.bpf_prog_detach2(done.fd, cg, done.attach_type)
                raise DataplaneError(f"attaching {prog.what} to the cgroup v2 root {root} "
                                     f"failed: {os.strerror(errno_of(ret))}")
            attached.append(prog)
        for prog in programs:
            detach_pinned(prog.pin, prog.attach_type, lambda: cg)
            pin_fd(prog.fd, prog.pin)


def detach_from_root(pins: Mapping[str, int]) -> tuple[str | None, set[str]]:
    """Detach the programs pinned at the paths of ``pins`` (pin path -> attach type) from
    the cgroup v2 root (``steerd purge``); the pins themselves stay for the caller to remove.
    Returns the root (None if no cgroup v2 hierarchy is mounted: then nothing is attached
    there) and the pins whose program was attached there and is detached now."""
    root = cgroup2_root()
    present = {path: atype for path, atype in pins.items() if os.path.exists(path)}
    if root is None or not present:
        return root, set()
    with _opened(root) as cg:
        return root, {path for path, atype in present.items()
                      if detach_pinned(path, atype, lambda: cg)}


def remove_from_root(directory: str, pins: Mapping[str, int]) -> tuple[str | None, set[str]]:
    """``steerd purge`` of a directory of pins (the jail's, the non-unicast filter's): detach
    the programs pinned there under the names of ``pins`` (name -> attach type) from the
    cgroup v2 root, then remove the directory with every pin in it. Returns the root (None if
    none is mounted) and the names whose program was detached."""
    root, detached = detach_from_root({os.path.join(directory, name): atype
                                       for name, atype in pins.items()})
    for entry in Path(directory).iterdir():
        entry.unlink()
    os.rmdir(directory)
    return root, {name for name in pins if os.path.join(directory, name) in detached}
