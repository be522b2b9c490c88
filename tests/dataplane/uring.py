"""io_uring from Python by raw syscalls (ctypes): one ring, one submission, one completion.

Why here: the socket jail must hold against io_uring's own paths to setsockopt
(IORING_OP_URING_CMD with SOCKET_URING_OP_SETSOCKOPT, Linux 6.7+) and connect
(IORING_OP_CONNECT); no Debian or PyPI package was worth a build for two opcodes. A ring set up
through the 32-bit entry (``compat=True``: i386 io_uring_setup via int $0x80) is a compat ring,
whose setsockopt the kernel runs without the cgroup hook.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import struct

from steerd.daemon.dataplane.i386 import I386

NR_IO_URING_SETUP = 425  # the same number on x86-64 and i386
NR_IO_URING_ENTER = 426
IORING_OP_CONNECT = 16
IORING_OP_URING_CMD = 46
SOCKET_URING_OP_SETSOCKOPT = 3
IORING_ENTER_GETEVENTS = 1
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_PARAMS = 120

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class Ring:
    """A one-entry ring; :meth:`submit` runs one SQE and returns the CQE's result."""

    def __init__(self, compat: bool = False) -> None:
        self._i386 = I386() if compat else None
        if self._i386 is not None:
            params = self._i386.low + 1024  # the setup call takes a 32-bit pointer
            ct.memset(params, 0, _PARAMS)
            fd = self._i386.syscall(NR_IO_URING_SETUP, 1, params)
            raw = ct.string_at(params, _PARAMS)
        else:
            buf = ct.create_string_buffer(_PARAMS)
            fd = _libc.syscall(NR_IO_URING_SETUP, 1, buf)
            raw = buf.raw
        if fd < 0:
            raise OSError(-fd if fd < -1 else ct.get_errno(), "io_uring_setup failed")
        self.fd = fd
        sq_entries, cq_entries = struct.unpack_from("<II", raw, 0)
        sq = struct.unpack_from("<7I", raw, 40)  # head tail mask entries flags dropped array
        cq = struct.unpack_from("<6I", raw, 80)  # head tail mask entries overflow cqes
        self._sq = mmap.mmap(fd, sq[6] + 4 * sq_entries, offset=_OFF_SQ_RING)
        self._cq = mmap.mmap(fd, cq[5] + 16 * cq_entries, offset=_OFF_CQ_RING)
        self._sqes = mmap.mmap(fd, 64 * sq_entries, offset=_OFF_SQES)
        self._sq_off, self._cq_off = sq, cq

    def submit(self, sqe: bytes) -> int:
        self._sqes[0:64] = sqe.ljust(64, b"\0")
        head, tail, mask = self._sq_off[0], self._sq_off[1], self._sq_off[2]
        t = struct.unpack_from("<I", self._sq, tail)[0]
        mask_v = struct.unpack_from("<I", self._sq, mask)[0]
        struct.pack_into("<I", self._sq, self._sq_off[6] + 4 * (t & mask_v), 0)
        struct.pack_into("<I", self._sq, tail, t + 1)
        del head
        ret = _libc.syscall(NR_IO_URING_ENTER, self.fd, 1, 1, IORING_ENTER_GETEVENTS, None, 0)
        if ret < 0:
            raise OSError(ct.get_errno(), "io_uring_enter failed")
        ch, cm = self._cq_off[0], self._cq_off[2]
        h = struct.unpack_from("<I", self._cq, ch)[0]
        m = struct.unpack_from("<I", self._cq, cm)[0]
        _, res, _ = struct.unpack_from("<QiI", self._cq, self._cq_off[5] + 16 * (h & m))
        struct.pack_into("<I", self._cq, ch, h + 1)
        return int(res)

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> int:
        """SOCKET_URING_OP_SETSOCKOPT: 0 or minus the errno."""
        if self._i386 is not None:
            optval = self._i386.low
            ct.memmove(optval, value, len(value))
        else:
            self._keep = ct.create_string_buffer(value, len(value))
            optval = ct.addressof(self._keep)
        sqe = struct.pack("<BBHiIIIIIIQHHIQQ", IORING_OP_URING_CMD, 0, 0, fd,
                          SOCKET_URING_OP_SETSOCKOPT, 0, level, optname, 0, 0, 1, 0, 0,
                          len(value), optval, 0)
        return self.submit(sqe)

    def connect(self, fd: int, sockaddr: bytes) -> int:
        """IORING_OP_CONNECT: 0 or minus the errno."""
        self._keep = ct.create_string_buffer(sockaddr, len(sockaddr))
        sqe = struct.pack("<BBHiQQIIQHHIQQ", IORING_OP_CONNECT, 0, 0, fd, len(sockaddr),
                          ct.addressof(self._keep), 0, 0, 1, 0, 0, 0, 0, 0)
        return self.submit(sqe)

    def close(self) -> None:
        for m in (self._sq, self._cq, self._sqes):
            m.close()
        import os

        os.close(self.fd)
