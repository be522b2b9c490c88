"""The programs' counters: the per-CPU ``counters`` map, read and summed over CPUs, and the
names steerd reports them by.

Why per-CPU: the programs count every branch of every packet; in a PERCPU_ARRAY each CPU
bumps its own copy without atomics, and Python adds the copies up when asked.
The names are bpf/steerd.h's ``STEERD_CNT_*`` defines, lower-cased without the prefix,
so a counter added in C shows up in ``steerd status`` and the metrics with no Python change.
"""

from __future__ import annotations

import ctypes as ct
import os
from pathlib import Path

from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import HEADER, header_constants
from steerd.daemon.dataplane.maps import libbcc


def counter_names(path: Path = HEADER) -> dict[int, str]:
    """Counter index -> name ("steer_short_worker", "xdp_drop_small_initial", ...)."""
    return {
        value: name.removeprefix("STEERD_CNT_").lower()
        for name, value in header_constants(path).items()
        if name.startswith("STEERD_CNT_") and name != "STEERD_CNT_MAX"
    }


def possible_cpus() -> int:
    """Possible CPUs: the width of a per-CPU map's value."""
    import bcc

    return len(bcc.utils.get_possible_cpus())


def read_counters(fd: int, ncpus: int, names: dict[int, str]) -> dict[str, int]:
    """Every counter of ``names`` in the per-CPU map ``fd``, summed over ``ncpus`` CPUs."""
    lib = libbcc()
    values = (ct.c_uint64 * ncpus)()
    out: dict[str, int] = {}
    for index, name in sorted(names.items()):
        key = ct.c_uint32(index)
        if lib.bpf_lookup_elem(fd, ct.byref(key), values) != 0:
            raise DataplaneError(f"reading counter {name}: {os.strerror(ct.get_errno())}")
        out[name] = sum(values)
    return out


def read_counter(fd: int, ncpus: int, index: int) -> int:
    """One entry of the per-CPU map ``fd``, summed over ``ncpus`` CPUs: one syscall, for the
    watchdog's canary check every few milliseconds (read_counters reads them all)."""
    values = (ct.c_uint64 * ncpus)()
    key = ct.c_uint32(index)
    if libbcc().bpf_lookup_elem(fd, ct.byref(key), values) != 0:
        raise DataplaneError(f"reading counter {index}: {os.strerror(ct.get_errno())}")
    return sum(values)


def write_every_cpu(fd: int, ncpus: int, index: int, value: int) -> None:
    """Set entry ``index`` of the per-CPU map ``fd`` to ``value`` on every CPU: how the
    canary secret (STEERD_CANARY_SECRET) reaches the steering program, which reads its own
    CPU's copy."""
    values = (ct.c_uint64 * ncpus)(*([value] * ncpus))
    key = ct.c_uint32(index)
    if libbcc().bpf_update_elem(fd, ct.byref(key), values, 0) != 0:
        raise DataplaneError(f"writing entry {index}: {os.strerror(ct.get_errno())}")
