"""BPF maps and pins: libbcc through ctypes, the maps one group uses, and opening, creating
and pinning them under the pin dir.

Why Python makes the maps: bcc's ``BPF_TABLE`` cannot make a REUSEPORT_SOCKARRAY, and maps
that Python creates (libbcc ``bcc_create_map``) can be pinned and found again by a restarted
daemon, so routes, counters and the worker sockets apps still hold survive a restart. The C
refers to them with ``bpf_pseudo_fd`` (their fds are -D flags, see programs.py).

Also the other users of pins: the socket jail, learned mode and the non-unicast filter
(jail.py, learn.py, unicast.py) pin their own maps and programs with the same helpers, and
retire an earlier run's attachment by its pin (:func:`detach_pinned`; at the cgroup v2 root
through cgroup.py's :func:`~steerd.daemon.dataplane.cgroup.attach_at_root`).
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quic import ghash
from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.dataplane.netns import run_in_netns

if TYPE_CHECKING:
    from steerd.daemon.dataplane import DataplaneConfig

DEFAULT_PIN_DIR = "/sys/fs/bpf/steerd"

# Map types (include/uapi/linux/bpf.h enum bpf_map_type).
MAP_HASH = 1
MAP_ARRAY = 2
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_REUSEPORT_SOCKARRAY = 20


# ---------------------------------------------------------------------------------------
# libbcc / libbpf through ctypes


_LIB: Any = None


def libbcc() -> Any:
    """libbcc (which links libbpf), with the prototypes the data plane uses."""
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


def errno_of(ret: int) -> int:
    """libbpf returns -errno; libbcc's own calls return -1 and set errno."""
    return -ret if ret < -1 else ct.get_errno() or errno.EINVAL


# ---------------------------------------------------------------------------------------
# The maps


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One map the programs use: name (also its pin file), type and sizes."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def map_specs(config: DataplaneConfig) -> list[MapSpec]:
    """Every map of one group, sized for ``config`` (layouts: bpf/steerd.h)."""
    c, k = config, header_constants()
    slots = c.effective_worker_slots()
    return [
        MapSpec("workers", MAP_REUSEPORT_SOCKARRAY, 4, 8, slots),
        MapSpec("classifiers", MAP_REUSEPORT_SOCKARRAY, 4, 8, c.classifier_slots),
        MapSpec("initial_routes", MAP_LRU_HASH, k["STEERD_ROUTE_KEY_SIZE"],
                k["STEERD_ROUTE_VALUE_SIZE"], c.route_capacity),
        MapSpec("counters", MAP_PERCPU_ARRAY, 4, 8, k["STEERD_CNT_MAX"]),
        MapSpec("guard_config", MAP_ARRAY, 4, k["STEERD_GUARD_CONFIG_SIZE"], 1),
        MapSpec("flood_buckets", MAP_LRU_HASH, k["STEERD_BUCKET_KEY_SIZE"], 8,
                c.bucket_capacity),
        # the kernel Retry (guard.c): GHASH tables per QUIC version (quic/ghash.py), and
        # per-CPU room to build a Retry in
        MapSpec("ghash_tables", MAP_ARRAY, 4, ghash.TABLE_VALUE_SIZE, len(ghash.VERSION_INDEX)),
        MapSpec("guard_scratch", MAP_PERCPU_ARRAY, 4, k["STEERD_GUARD_SCRATCH_SIZE"], 1),
        # learned mode (bpf/learn.c, steerd/daemon/dataplane/learn.py)
        MapSpec("learned_cids", MAP_HASH, k["STEERD_ROUTE_KEY_SIZE"],
                k["STEERD_ROUTE_VALUE_SIZE"], c.learned_capacity),
        MapSpec("learned_peers", MAP_HASH, k["STEERD_PEER_KEY_SIZE"],
                k["STEERD_ROUTE_VALUE_SIZE"], c.learned_capacity),
        MapSpec("learn_sockets", MAP_HASH, 8, k["STEERD_LEARN_SOCKET_SIZE"], 2 * slots),
        MapSpec("learn_config", MAP_ARRAY, 4, k["STEERD_LEARN_CONFIG_SIZE"], 1),
        MapSpec("learn_counts", MAP_ARRAY, 4, 4, k["STEERD_LEARN_COUNT_COLUMNS"] * slots),
        MapSpec("slot_stats", MAP_PERCPU_ARRAY, 4, 8, slots * k["STEERD_SLOT_STATS"]),
    ]


def map_info(fd: int) -> tuple[int, int, int, int]:
    """(type, key_size, value_size, max_entries) of an open map."""
    buf = (ct.c_uint32 * 32)()
    size = ct.c_uint32(ct.sizeof(buf))
    if libbcc().bpf_obj_get_info(fd, buf, ct.byref(size)) != 0:
        raise DataplaneError(f"cannot read map info of fd {fd}: {os.strerror(ct.get_errno())}")
    return buf[0], buf[2], buf[3], buf[4]


def open_or_create_map(spec: MapSpec, pin_dir: str) -> int:
    """Reuse the pinned map if its layout matches, else create and pin a new one."""
    lib = libbcc()
    path = os.path.join(pin_dir, spec.name)
    want = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries)
    if os.path.exists(path):
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            raise DataplaneError(f"cannot open pinned map {path}: {os.strerror(errno_of(fd))}")
        have = map_info(fd)
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
        raise DataplaneError(f"cannot create map {spec.name}: {os.strerror(errno_of(fd))}")
    ret = lib.bpf_obj_pin(fd, path.encode())
    if ret != 0:
        os.close(fd)
        raise DataplaneError(f"cannot pin map at {path}: {os.strerror(errno_of(ret))}")
    return fd


def open_maps(specs: list[MapSpec], pin_dir: str) -> dict[str, int]:
    """Open (or create and pin) every map of ``specs`` under ``pin_dir``: name -> fd. On a
    failure the maps opened so far are closed again."""
    fds: dict[str, int] = {}
    try:
        os.makedirs(pin_dir, exist_ok=True)
        for spec in specs:
            fds[spec.name] = open_or_create_map(spec, pin_dir)
    except Exception as exc:
        for fd in fds.values():
            os.close(fd)
        if isinstance(exc, DataplaneError):
            raise
        raise DataplaneError(f"opening the BPF maps failed: {exc}") from exc
    return fds


def clear_map(fd: int) -> None:
    """Delete every entry of a hash map."""
    lib = libbcc()
    key = ct.create_string_buffer(map_info(fd)[1])
    while lib.bpf_get_next_key(fd, None, key) == 0:
        if lib.bpf_delete_elem(fd, key) != 0:
            break


# ---------------------------------------------------------------------------------------
# Pins


def pin_fd(fd: int, path: str) -> None:
    """Pin ``fd`` at ``path``, replacing an older pin (a reload re-pins new programs)."""
    if os.path.exists(path):
        os.unlink(path)
    ret = libbcc().bpf_obj_pin(fd, path.encode())
    if ret != 0:
        raise DataplaneError(f"cannot pin {path}: {os.strerror(errno_of(ret))}")


def open_pinned(path: str) -> int:
    """An fd of the object pinned at ``path``; -1 if there is none or it cannot be opened."""
    if not os.path.exists(path):
        return -1
    fd = int(libbcc().bpf_obj_get(path.encode()))
    return fd if fd >= 0 else -1


def detach_pinned(path: str, attach_type: int, target: Callable[[], int],
                  netns: str | None = None) -> bool:
    """Detach the program pinned at ``path`` from ``target()`` (a cgroup fd or an ifindex,
    looked up in ``netns``): how a run retires what an earlier run attached, found by its
    pin. False if there is no such pin or it was not attached there."""
    fd = open_pinned(path)
    if fd < 0:
        return False
    lib = libbcc()
    try:
        detached = run_in_netns(netns, lambda: int(lib.bpf_prog_detach2(fd, target(), attach_type)))
        return detached == 0
    except OSError:
        return False
    finally:
        os.close(fd)
