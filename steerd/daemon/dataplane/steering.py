"""What the SK_REUSEPORT steering program (bpf/steer.c) reads, and its attachment to
the reuseport group: the ``workers`` and ``classifiers`` sockarrays and the
``initial_routes`` of first flights.

Slot numbering: worker slot N is index N of the ``workers`` sockarray and is the number a
server CID carries; classifier sockets live in a separate ``classifiers`` sockarray
(indexes 0..classifier_slots-1), so a CID can never name a classifier.

Every function takes the open map fd (``Dataplane.map_fd``): the maps are one group's, opened
by the facade.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import socket
import struct
import time

from quic.cid import MAX_CID_LEN
from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.dataplane.maps import libbcc, open_pinned
from steerd.daemon.dataplane.programs import STEER_PIN

# asm-generic/socket.h
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68


# ---------------------------------------------------------------------------------------
# The reuseport attachment


def attach_reuseport(sock: socket.socket, prog_fd: int) -> None:
    """Attach the steering program to ``sock``'s reuseport group (one member suffices)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", prog_fd))
    except OSError as exc:
        raise DataplaneError(
            f"attaching the steering program failed: {exc} (the socket must be UDP, "
            "bound, with SO_REUSEPORT set)"
        ) from exc


def attach_pinned_steering(sock: socket.socket, pin_dir: str) -> bool:
    """Attach the steering program a previous run pinned in ``pin_dir`` to ``sock``'s group;
    False if there is none (a first start)."""
    fd = open_pinned(os.path.join(pin_dir, STEER_PIN))
    if fd < 0:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", fd))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Sockarrays (``workers``, ``classifiers``)


def sockarray_set(fd: int, name: str, index: int, sock: socket.socket | int) -> None:
    """Put ``sock`` (a socket or its fd) at ``index`` of sockarray ``name`` (open as ``fd``)."""
    key = ct.c_uint32(index)
    value = ct.c_uint64(sock if isinstance(sock, int) else sock.fileno())
    if libbcc().bpf_update_elem(fd, ct.byref(key), ct.byref(value), 0) != 0:
        err = ct.get_errno()
        raise DataplaneError(
            f"putting a socket in {name}[{index}] failed: {os.strerror(err)} (UDP socket, "
            "bound with SO_REUSEPORT in the same group, index in range)"
        )


def sockarray_delete(fd: int, name: str, index: int) -> None:
    """Empty ``index`` of sockarray ``name``; an empty index is no error."""
    key = ct.c_uint32(index)
    if libbcc().bpf_delete_elem(fd, ct.byref(key)) != 0:
        err = ct.get_errno()
        if err != errno.ENOENT:
            raise DataplaneError(f"removing {name}[{index}] failed: {os.strerror(err)}")


def sockarray_cookie(fd: int, index: int) -> int | None:
    """The socket cookie (SO_COOKIE) of the socket at ``index``, None if empty."""
    key = ct.c_uint32(index)
    value = ct.c_uint64()
    if libbcc().bpf_lookup_elem(fd, ct.byref(key), ct.byref(value)) != 0:
        return None
    return value.value


# ---------------------------------------------------------------------------------------
# initial_routes: struct steerd_route_key -> struct steerd_route (bpf/steerd.h)


def route_key(dcid: bytes) -> ct.Array[ct.c_char]:
    """``{u8 len; u8 cid[20]; u8 pad[3]}`` of ``dcid``."""
    if len(dcid) > MAX_CID_LEN:
        raise DataplaneError(f"DCID of {len(dcid)} bytes is longer than {MAX_CID_LEN}")
    raw = bytes([len(dcid)]) + dcid.ljust(MAX_CID_LEN, b"\0") + b"\0\0\0"
    return ct.create_string_buffer(raw, len(raw))


def route_value(slot: int, expires_ns: int) -> ct.Array[ct.c_char]:
    """``{u32 slot; u32 flags; u64 expires_ns}`` (expires_ns 0: never)."""
    return ct.create_string_buffer(struct.pack("=IIQ", slot, 0, expires_ns), 16)


def add_route(fd: int, dcid: bytes, slot: int, ttl: float | None) -> None:
    """Long-header packets with this client-chosen DCID go to worker ``slot`` for ``ttl``
    seconds (None: until deleted or evicted by the LRU)."""
    expires = 0 if ttl is None else time.monotonic_ns() + int(ttl * 1e9)
    if libbcc().bpf_update_elem(fd, route_key(dcid), route_value(slot, expires), 0) != 0:
        raise DataplaneError(f"adding a route failed: {os.strerror(ct.get_errno())}")


def delete_route(fd: int, dcid: bytes) -> bool:
    """Forget a route; False if there was none."""
    if libbcc().bpf_delete_elem(fd, route_key(dcid)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    raise DataplaneError(f"deleting a route failed: {os.strerror(ct.get_errno())}")


def routes(fd: int) -> dict[bytes, tuple[int, int]]:
    """DCID -> (slot, expires_ns) for every route in the map."""
    lib = libbcc()
    size = header_constants()["STEERD_ROUTE_KEY_SIZE"]
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
