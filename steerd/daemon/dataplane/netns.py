"""Run code inside a named network namespace without leaving the caller's namespace.

Why a thread: ``setns(CLONE_NEWNET)`` changes only the calling thread, and a socket keeps the
namespace it was created in for its whole life. So a short-lived thread that enters
``/run/netns/NAME`` can create sockets or attach XDP there and hand them back, while the rest
of the process (and pytest) stays where it was. No pyroute2 and no ``ip netns exec`` needed.
"""

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # os.CLONE_NEWNET and os.setns only exist from Python 3.12

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def netns_path(name: str) -> str:
    """The bind-mounted namespace file that ``ip netns add NAME`` creates."""
    return os.path.join(NETNS_RUN_DIR, name)


def run_in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Call ``fn()`` inside network namespace ``name`` (None: here) and return its result.

    Exceptions raised by ``fn`` are re-raised in the caller.
    """
    if name is None:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
