"""A 32-bit ``setsockopt`` on another process's socket, made by a helper process as another uid.

Why: the cgroup setsockopt hook runs only for native calls, so an attacker test must make
the call the way an attacker gets past it: ``int $0x80`` with i386 syscall 366 (or
``socketcall``) from a 64-bit process, with its buffers in the low 4 GiB. The trampoline is
steerd's own (``steerd.daemon.dataplane.i386.I386``, which ``steerd doctor`` uses too); this
module adds what a test needs around it:

- :func:`held_socket`: a copy (``pidfd_getfd``, as root) of the socket a registered app
  holds, found by family and local port: the descriptor to attack with, and the test's
  independent view of the socket afterwards ("checked from outside");
- :func:`setsockopt32`: runs this file as a helper in the daemon's network namespace with
  that descriptor; the helper drops to ``uid`` (no groups, no capabilities) after it has
  mapped its pages, reports over its stdout pipe **before** the call, makes it and reports
  the result. A hook may SIGKILL it after the call (the call still ran): the
  :class:`Outcome` says which happened, and callers accept either.

As a helper: ``python -m tests.security.compat32 FD LEVEL OPTNAME HEXVALUE UID
{int80,socketcall}``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
SO_DETACH_REUSEPORT_BPF = 68
SO_BINDTOIFINDEX = 62
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
_CALLING = "calling"


@dataclass(frozen=True)
class Outcome:
    """``reported``: the helper said it was about to call (so the call was made, unless it
    died in between); ``result``: the call's raw return (0, or minus the errno), None when
    it did not return to report it (killed); ``returncode``: the helper's exit status
    (-9: SIGKILL)."""

    reported: bool
    result: int | None
    returncode: int

    @property
    def killed(self) -> bool:
        return self.returncode < 0


def _syscall(number: int, *args: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = int(libc.syscall(number, *(ctypes.c_long(a) for a in args)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def held_socket(pid: int, family: int, port: int) -> socket.socket:
    """A copy of the UDP socket of ``family`` bound to ``port`` that process ``pid`` holds
    (root: ``pidfd_getfd`` needs ptrace rights over it)."""
    pidfd = _syscall(_SYS_PIDFD_OPEN, pid, 0)
    try:
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
                sock = socket.socket(fileno=_syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0))
            except OSError:
                continue
            if (sock.family == family and sock.type == socket.SOCK_DGRAM
                    and sock.getsockname()[1] == port):
                return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise LookupError(f"process {pid} holds no UDP socket of family {family} on port {port}")


def setsockopt32(sock: socket.socket, level: int, optname: int, value: bytes, *,
                 uid: int = NOBODY, netns: str | None = None, via: str = "int80",
                 timeout: float = 30.0) -> Outcome:
    """``setsockopt(level, optname, value)`` on ``sock`` through the 32-bit entry (``via``
    ``"int80"``: syscall 366; ``"socketcall"``: syscall 102), made by a helper process
    running as ``uid`` (in network namespace ``netns``, a name from ``ip netns``)."""
    from steerd.daemon.dataplane.netns import netns_path

    python = str(ROOT / ".venv" / "bin" / "python")
    command = [python, "-m", "tests.security.compat32", str(sock.fileno()), str(level),
               str(optname), value.hex(), str(uid), via]
    if netns is not None:
        command = ["nsenter", f"--net={netns_path(netns)}", *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            pass_fds=[sock.fileno()])
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise
    lines = out.splitlines()
    result = next((int(line.split()[1]) for line in lines if line.startswith("result ")), None)
    return Outcome(_CALLING in lines, result, proc.returncode)


def _helper(argv: list[str]) -> int:
    from steerd.daemon.dataplane.i386 import I386

    fd, level, optname = (int(a) for a in argv[:3])
    value, uid, via = bytes.fromhex(argv[3]), int(argv[4]), argv[5]
    i386 = I386()  # its pages mapped while still root; nothing below needs a privilege
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    print(_CALLING, flush=True)  # before the call: a hook may kill this process in it
    call = i386.socketcall_setsockopt if via == "socketcall" else i386.setsockopt
    print(f"result {call(fd, level, optname, value)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1:]))
