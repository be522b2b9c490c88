"""A 32-bit setsockopt from this 64-bit process: ``int $0x80`` with i386 syscall 366.

Why it exists: the kernel runs the cgroup setsockopt hook only for native calls, so the
socket jail's 32-bit path (bpf/compat.c) has to be proven with a real 32-bit call;
``steerd doctor`` and the tests make one on a socket of a throw-away jail and check that the
caller was killed. x86-64 only: ``int $0x80`` reaches the i386 syscall table there when the
kernel has CONFIG_IA32_EMULATION; the buffers it names must lie in the low 4 GiB
(``MAP_32BIT``), since the call passes 32-bit pointers.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import platform
import struct

NR_I386_SETSOCKOPT = 366
SYS_SETSOCKOPT = 14  # socketcall's call number
_MAP_32BIT = 0x40
# int setsockopt32(int fd, int level, int optname, u32 optval, int optlen):
#   push rbx; mov eax, 366; mov ebx, edi; mov r10, rcx; mov ecx, esi; mov esi, r10d;
#   mov edi, r8d; (edx is optname already) int $0x80; pop rbx; ret
_SETSOCKOPT = bytes.fromhex(
    "53" "b86e010000" "89fb" "4989ca" "89f1" "4489d6" "4489c7" "cd80" "5b" "c3")
# int socketcall32(int call, u32 args): push rbx; mov eax, 102; mov ebx, edi; mov ecx, esi;
#   int $0x80; pop rbx; ret
_SOCKETCALL = bytes.fromhex("53" "b866000000" "89fb" "89f1" "cd80" "5b" "c3")
# long syscall32(nr, a, b, c): push rbx; mov eax, edi; mov ebx, esi; mov r10, rcx;
#   mov ecx, edx; mov edx, r10d; int $0x80; pop rbx; ret
_SYSCALL = bytes.fromhex("53" "89f8" "89f3" "4989ca" "89d1" "4489d2" "cd80" "5b" "c3")


def available() -> bool:
    """Whether this process can make the call at all (x86-64)."""
    return platform.machine() == "x86_64"


class I386:
    """One executable page with the trampoline and one low page for the option value."""

    def __init__(self) -> None:
        if not available():
            raise OSError(f"int $0x80 needs x86-64, not {platform.machine()}")
        self._code = mmap.mmap(-1, mmap.PAGESIZE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._code.write(_SETSOCKOPT)
        self._code.seek(64)
        self._code.write(_SOCKETCALL)
        address = ct.addressof(ct.c_char.from_buffer(self._code))
        self._setsockopt = ct.CFUNCTYPE(ct.c_int32, ct.c_int, ct.c_int, ct.c_int, ct.c_uint32,
                                        ct.c_int)(address)
        self._socketcall = ct.CFUNCTYPE(ct.c_int32, ct.c_int, ct.c_uint32)(address + 64)
        self._code.seek(128)
        self._code.write(_SYSCALL)
        self._syscall = ct.CFUNCTYPE(ct.c_int32, ct.c_int, ct.c_uint32, ct.c_uint32,
                                     ct.c_uint32)(address + 128)
        libc = ct.CDLL(None, use_errno=True)
        libc.mmap.restype = ct.c_void_p
        libc.mmap.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_int, ct.c_int,
                              ct.c_long]
        low = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_32BIT, -1, 0)
        if low in (None, ct.c_void_p(-1).value) or low >= 1 << 32:
            raise OSError("cannot map a page below 4 GiB (MAP_32BIT)")
        self._low = int(low)

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> int:
        """i386 setsockopt (366). The raw result: 0, or minus the errno."""
        optval = self._value(value)
        return int(self._setsockopt(fd, level, optname, optval, len(value)))

    def socketcall_setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> int:
        """i386 socketcall(SYS_SETSOCKOPT, args) (102), the older path to the same call."""
        optval = self._value(value)
        args = self._low + 2048
        ct.memmove(args, struct.pack("<5I", fd, level, optname, optval, len(value)), 20)
        return int(self._socketcall(SYS_SETSOCKOPT, args))

    def syscall(self, nr: int, *args: int) -> int:
        """Any i386 syscall of up to three 32-bit arguments (pointers from :attr:`low`)."""
        a, b, c = [*args, 0, 0, 0][:3]
        return int(self._syscall(nr, a, b, c))

    @property
    def low(self) -> int:
        """The address of a scratch page below 4 GiB (the first KiB holds option values)."""
        return self._low

    def _value(self, value: bytes) -> int:
        if len(value) > 1024:
            raise ValueError("option value larger than 1 KiB")
        ct.memmove(self._low, value, len(value))
        return self._low
