"""The socket watchdog: every worker socket keeps its flags, every group keeps steerd's program.

Why: the socket jail (bpf/jail.c) refuses the calls that would take the port, but not
on every path. A 32-bit ``setsockopt`` (``int $0x80`` from a 64-bit process, or
``socketcall``) skips the cgroup setsockopt hook, and a raw tracepoint that sees it can only
kill the caller after the call ran; a ring made with a 32-bit ``io_uring_setup`` skips the
hook too. What such a call can change on a member socket of a reuseport group is small and
visible from any other holder of the socket, so the daemon keeps its own reference to every
worker socket it handed out and looks, from a thread of its own (the event loop may be busy
classifying), every :data:`PERIOD` seconds at the sockets and every :data:`CANARY_PERIOD`
seconds at the programs:

- the socket: ``SO_REUSEPORT`` still set (cleared, the socket wins every lookup on the port:
  the newest IPv4 socket heads the lookup chain and a socket without the flag wins ties),
  ``SO_REUSEADDR`` still clear, no device binding (``SO_BINDTODEVICE``/``SO_BINDTOIFINDEX``),
  not connected. :func:`inspect` says what changed, :func:`repair` sets it back from the
  daemon (the jail lets the daemon).
- the group: steerd's steering program still attached (``SO_ATTACH_REUSEPORT_*`` or
  ``SO_DETACH_REUSEPORT_BPF`` on any member replace or remove it for the whole group, and
  the kernel then hashes new datagrams over all members). No syscall reports a group's
  program, so a :class:`Canary` datagram goes through each group: only steerd's program
  knows the per-run secret it carries (bpf/steerd.h, ``STEERD_CANARY_*``), counts it
  and drops it. A canary not counted within :data:`CANARY_GRACE`: the daemon attaches its
  own program again, and reports it once the next canary shows it was not ours.

Each finding is repaired at once, in the thread, then reported (``on_finding``) for the
daemon to log, count and evict the app whose socket changed (steerd/daemon/service/status.py).

The watchdog holds no socket of an app: a descriptor of its own would keep a dead worker's
socket alive, a member of its group, and the steering program would go on sending that
worker's clients there instead of to a classifier (which answers them with a stateless
reset). It finds, by a scan of /proc, a process that holds each watched socket (by inode),
and borrows the socket from it for each look (``pidfd_open`` and ``pidfd_getfd``: a copy
closed again at once; the daemon keeps no descriptor of it between looks). A socket whose
holders are all gone has left its group with its last descriptor; its record goes after
:data:`GONE_AFTER` scans find no holder (the first scans may run while the socket is still
in flight to the app, in an SCM_RIGHTS message, which no process table shows:
docs/SECURITY.md §2.7). Scans run when a socket is new or its holder exited, at most every
:data:`HOLDER_SCAN_INTERVAL` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from steerd.daemon.dataplane.header import header_constants

log = logging.getLogger("steerd")

PERIOD = 0.02  # seconds between two looks at the sockets
# The program is looked at more often: while it is not ours, the kernel hashes new datagrams
# over every member, and a new flight that lands on another app's worker fails. A look there
# is 2 syscalls a group.
CANARY_PERIOD = 0.005
CANARY_GRACE = 0.01  # a canary not counted this long after it was sent: attach ours again
# The longest a change can last: a flag, until the next look (one period); a program, the
# canary sent at the next canary look is judged CANARY_GRACE later, at the first canary look
# after that.
REPAIR_BOUND_MS = round(max(PERIOD, 2 * CANARY_PERIOD + CANARY_GRACE) * 1000)
HOLDER_SCAN_INTERVAL = 0.5  # seconds at least between two scans of /proc for holders
GONE_AFTER = 3  # scans finding no holder before a socket is taken for closed
_NR_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SO_BINDTOIFINDEX = 62  # asm-generic/socket.h (Linux >= 5.0)
_CANARY_DATAGRAM_LEN = 1200  # past the guard's drop of small datagrams of unknown versions
_CANARY_RCVBUF = 1  # the kernel's minimum: a stray answer to a canary is not kept

# The canary's verdicts (Canary.look).
OK, WAIT, MISS, REPLACED, LATE = "ok", "wait", "miss", "replaced", "late"

# The findings' names: also the ``what`` label of steerd_jail_repairs_total and
# steerd_jail_evictions_total.
REUSEPORT, REUSEADDR, DEVICE, CONNECTED, PROGRAM = (
    "reuseport", "reuseaddr", "device", "connected", "program")


def protection(refused_by: str | None, killed_by: str | None = None) -> str:
    """What stops a 32-bit call on a service socket on this kernel, as ``steerd status`` and
    ``steerd doctor`` say it: refused by a hook (``refused_by`` names it), or only undone by
    the watchdog (the caller perhaps killed after its call ran: ``killed_by``)."""
    if refused_by:
        return f"32-bit calls refused by {refused_by}; watchdog repairs within {REPAIR_BOUND_MS} ms"
    line = f"watchdog only: repaired within {REPAIR_BOUND_MS} ms"
    return line + (f" (32-bit callers killed after the call by {killed_by})" if killed_by else "")


# -- one socket -------------------------------------------------------------------------------


def _int_option(sock: socket.socket, option: int) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, option)


def _peer(sock: socket.socket) -> tuple[str, int] | None:
    try:
        return tuple(sock.getpeername()[:2])  # type: ignore[return-value]
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return None
        raise


def _nowhere(sock: socket.socket) -> tuple[str, int]:
    """The peer a stray socket is connected to: its own address and port (loopback for a
    wildcard), a 4-tuple no real datagram carries."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
    return host, port


def inspect(sock: socket.socket, stray: bool = False) -> list[str]:
    """What differs on a worker socket from how the daemon made it (bound with
    ``SO_REUSEPORT``, nothing else), in 4 getsockopt-class syscalls; for a ``stray`` socket
    (see :func:`repair`), from how the daemon left it: connected to :func:`_nowhere`."""
    wrong = []
    if not _int_option(sock, socket.SO_REUSEPORT):
        wrong.append(REUSEPORT)
    if _int_option(sock, socket.SO_REUSEADDR):
        wrong.append(REUSEADDR)
    if _int_option(sock, SO_BINDTOIFINDEX) and not stray:
        wrong.append(DEVICE)
    peer = _peer(sock)
    if (peer != _nowhere(sock)) if stray else (peer is not None):
        wrong.append(CONNECTED)
    return wrong


def repair(sock: socket.socket, wrong: Iterable[str]) -> bool:
    """Set back what :func:`inspect` found, from the daemon (which the jail allows). Returns
    whether the socket is now a stray. Raises OSError if the kernel refuses.

    The flags are simply set back: the socket never left its group. A device binding or a
    connect() cannot be undone that way: either rehashes the socket, and the kernel takes a
    rehashed socket out of its reuseport group for good (``udp_lib_rehash``); unbound or
    disconnected again, such a stray (its flag still set, no group) at the head of the
    lookup chain would win every lookup on the port. So a stray is made to lose every
    lookup instead: connected to :func:`_nowhere`, a 4-tuple no datagram carries, and left
    bound to its device (an app without CAP_NET_RAW cannot change a binding once made).
    An app that disconnects it (AF_UNSPEC: no hook sees that) gets it connected again at the
    next look."""
    stray = False
    for what in wrong:
        if what == REUSEPORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        elif what == REUSEADDR:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        elif what in (DEVICE, CONNECTED):
            stray = True
    if stray:
        sock.connect(_nowhere(sock))
    return stray


# -- the canary -------------------------------------------------------------------------------


def canary_secret() -> bytes:
    """A fresh per-run secret of STEERD_CANARY_DCID_LEN bytes. Its first octet carries the
    unroutable config-rotation codepoint (7), so it never decodes as a CID of the layout and
    is never 0 (0 in the map means "no canary")."""
    k = header_constants()
    raw = bytearray(os.urandom(k["STEERD_CANARY_DCID_LEN"]))
    raw[0] = (k["STEERD_CR_UNROUTABLE"] << k["STEERD_CONFIG_ROTATION_SHIFT"]) | (
        raw[0] & k["STEERD_LENGTH_MASK"])
    return bytes(raw)


def canary_datagram(secret: bytes) -> bytes:
    """A long header of version STEERD_CANARY_VERSION with ``secret`` as its DCID and no SCID,
    padded to 1200 bytes (a guard on ``lo`` drops smaller datagrams of unknown versions)."""
    version = header_constants()["STEERD_CANARY_VERSION"]
    head = bytes([0xC0]) + struct.pack("!I", version) + bytes([len(secret)]) + secret + b"\0"
    return head.ljust(_CANARY_DATAGRAM_LEN, b"\0")


def canary_target(address: str, port: int) -> tuple[int, tuple[str, int]]:
    """Where a group's canary goes: its listen address, loopback for a wildcard."""
    if ":" in address:
        return socket.AF_INET6, ("::1" if address == "::" else address, port)
    return socket.AF_INET, ("127.0.0.1" if address == "0.0.0.0" else address, port)


@dataclass
class Canary:
    """One group's program check: ``send`` puts a canary on its way, ``read`` is the group's
    canary counter. One canary in flight at a time; :meth:`look` sends the next one once the
    last was counted.

    A canary not counted within ``grace`` is a ``MISS``: the caller attaches steerd's
    program again at once (harmless if it was ours: an atomic replace) and calls
    :meth:`restart` with ``suspect``. Whether the program really was not ours shows at the
    next count: a canary that was only late (a softirq deferred on a loaded machine) is
    counted beside the one sent after the repair (``LATE``: nothing to report), one that went
    to some member socket never is (``REPLACED``)."""

    read: Callable[[], int]
    send: Callable[[], None]
    grace: float = CANARY_GRACE
    _base: int = 0
    _sent_at: float | None = None
    _suspect: bool = False

    def look(self, now: float) -> str:
        """``OK``, ``WAIT`` (in flight, not due yet), ``MISS``, then ``REPLACED`` or
        ``LATE``."""
        value = self.read()
        if self._sent_at is None or value > self._base:
            verdict = OK
            if self._suspect:
                verdict = LATE if value - self._base >= 2 else REPLACED
            self.restart(now, value)
            return verdict
        return WAIT if now - self._sent_at < self.grace else MISS

    def restart(self, now: float, value: int | None = None, suspect: bool = False) -> None:
        """Forget the canary in flight and send a new one (after a repair, whose canary may
        have gone astray before it); ``suspect``: after a MISS, counting from where the
        missed one was sent (so a late count of it shows)."""
        if not suspect:
            self._base = self.read() if value is None else value
        self._sent_at = now
        self._suspect = suspect
        self.send()


# -- the watchdog -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """Something changed and was set back. ``app``/``uid``: whose socket it was (None for a
    group's program: no socket says who replaced it); ``repaired``: False if the kernel
    refused the repair (logged; the next look tries again)."""

    what: str
    address: str
    slot: int | None
    app: str | None
    uid: int | None
    repaired: bool = True


@dataclass(eq=False)
class _Handle:
    """One watched socket, known by its inode; borrowed from a holder for each look."""

    address: str
    inode: int
    holder: tuple[int, int] | None = None  # (pid, fd number) of a process holding it
    stray: bool = False  # out of its group for good (connected to nowhere by a repair)
    misses: int = 0  # scans in a row that found no holder

    @property
    def gone(self) -> bool:
        """No process has held it for GONE_AFTER scans: closed for good (a socket nobody
        holds cannot come back), so no scan looks for it again."""
        return self.holder is None and self.misses >= GONE_AFTER


@dataclass(eq=False)
class _Watched:
    slot: int | None  # None once released
    app: str
    uid: int
    sockets: list[_Handle]


@dataclass
class _Group:
    address: str
    canary: Canary
    reattach: Callable[[], None]


@dataclass
class SocketWatchdog:
    """Looks every ``period`` seconds, in its own thread, at every watched worker socket and
    every group's program; repairs what changed and calls ``on_finding`` (from the thread).

    ``own_pids``: the daemon's processes (its classifier processes inherit its descriptors),
    which do not count as holders of a released socket."""

    on_finding: Callable[[Finding], None]
    own_pids: Callable[[], Iterable[int]] = lambda: ()
    period: float = PERIOD
    canary_period: float = CANARY_PERIOD
    grace: float = CANARY_GRACE
    looks: int = 0  # looks made (for tests and the cost figures)
    _live: dict[int, _Watched] = field(default_factory=dict)
    _released: list[_Watched] = field(default_factory=list)
    _groups: list[_Group] = field(default_factory=list)
    _canary_socks: dict[int, socket.socket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _next_scan: float = 0.0
    _datagram: bytes = b""

    # -- what to watch (event-loop thread) -------------------------------------------------------

    def watch(self, slot: int, app: str, uid: int, sockets: Sequence[tuple[str, int]]) -> None:
        """Watch ``slot``'s sockets, given as (listen address, fd): by inode; the watchdog
        keeps no descriptor of them (the caller keeps or closes its own)."""
        handles = [_Handle(address, os.fstat(fd).st_ino) for address, fd in sockets]
        with self._lock:
            old = self._live.pop(slot, None)
            if old is not None:
                old.slot = None
                self._released.append(old)
            self._live[slot] = _Watched(slot, app, uid, handles)
            self._next_scan = 0.0  # find their holders at the next look

    def release(self, slot: int) -> None:
        """``slot`` is no longer steered to: its sockets are watched until nobody holds them."""
        with self._lock:
            watched = self._live.pop(slot, None)
            if watched is not None:
                watched.slot = None
                self._released.append(watched)

    def add_group(self, address: str, port: int, read_canary: Callable[[], int],
                  reattach: Callable[[], None]) -> None:
        """Check the program of the group on ``address`` from now on (call it once steerd's
        own program is attached and the secret written): ``read_canary`` reads its
        STEERD_CNT_STEER_CANARY, ``reattach`` attaches steerd's program again."""
        family, target = canary_target(address, port)
        with self._lock:
            sock = self._canary_socks.get(family)
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CANARY_RCVBUF)
                self._canary_socks[family] = sock
            datagram = self._datagram

            def send() -> None:
                with contextlib.suppress(OSError):  # a full queue: the next one goes
                    sock.sendto(datagram, target)

            canary = Canary(read_canary, send, self.grace)
            self._groups.append(_Group(address, canary, reattach))
            canary.restart(time.monotonic())

    def set_secret(self, secret: bytes) -> None:
        """The secret the canaries carry (written into the groups' maps by the caller)."""
        self._datagram = canary_datagram(secret)

    @property
    def watched(self) -> tuple[int, int]:
        """(live slots, released sockets' records) being watched."""
        with self._lock:
            return len(self._live), len(self._released)

    # -- the looks ------------------------------------------------------------------------------

    def look(self, now: float | None = None, sockets: bool = True) -> list[Finding]:
        """One look at every group's program and (``sockets``) every watched socket: the
        thread's body (tests call it directly). Repairs what changed and returns the
        findings (``on_finding`` is the thread's business)."""
        now = time.monotonic() if now is None else now
        findings: list[Finding] = []
        with self._lock:
            self.looks += 1
            if sockets:
                for watched in (*self._live.values(), *self._released):
                    for handle in watched.sockets:
                        findings += self._look_at(watched, handle)
            for group in self._groups:
                if findings:  # a socket taken out of the group may have eaten its canary
                    group.canary.restart(now)
                    continue
                verdict = group.canary.look(now)
                if verdict == MISS:
                    failed = self._reattach(group)
                    if failed is not None:
                        findings.append(failed)
                    group.canary.restart(now, suspect=True)  # one sent after the repair
                elif verdict == REPLACED:
                    findings.append(Finding(PROGRAM, group.address, None, None, None))
                elif verdict == LATE:
                    log.warning("watchdog: a canary through the group on %s came late; its "
                                "program was steerd's", group.address)
            scan = now >= self._next_scan and any(
                h.holder is None and not h.gone
                for w in (*self._live.values(), *self._released) for h in w.sockets)
            if scan:
                self._next_scan = now + HOLDER_SCAN_INTERVAL
        if scan:
            self._scan_holders()
        return findings

    def _look_at(self, watched: _Watched, handle: _Handle) -> list[Finding]:
        sock = self._borrow(handle)
        if sock is None:
            return []
        with sock:
            try:
                wrong = inspect(sock, handle.stray)
            except OSError as exc:
                log.error("watchdog: cannot inspect a worker socket of %s on %s: %s",
                          watched.app, handle.address, exc)
                return []
            if not wrong:
                return []
            repaired = True
            try:
                if repair(sock, wrong):
                    handle.stray = True
            except OSError as exc:
                log.error("watchdog: repairing %s on a socket of %s failed: %s", wrong,
                          watched.app, exc)
                repaired = False
        return [Finding(what, handle.address, watched.slot, watched.app, watched.uid,
                        repaired) for what in wrong]

    def _borrow(self, handle: _Handle) -> socket.socket | None:
        """A copy of the watched socket from its holder, or None (holder gone: the next scan
        looks for another). A pidfd is opened for the borrowing only, so the daemon keeps no
        descriptor between looks; a pid reused by another process cannot pass for the
        holder, since the copy must be the watched inode."""
        if handle.holder is None:
            return None
        pid, fd = handle.holder
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        got = -1
        if pidfd >= 0:
            got = int(_libc.syscall(_NR_PIDFD_GETFD, pidfd, fd, 0))
            os.close(pidfd)
        if got >= 0:
            try:
                if os.fstat(got).st_ino == handle.inode:
                    return socket.socket(fileno=got)
            except OSError:
                pass
            os.close(got)
        handle.holder = None  # the holder exited or closed it: find another
        self._next_scan = min(self._next_scan, time.monotonic())
        return None

    def _reattach(self, group: _Group) -> Finding | None:
        """Attach steerd's program again; a Finding only if that failed (a success is
        reported once the next canary shows the program was really not ours)."""
        try:
            group.reattach()
            return None
        except Exception as exc:  # a DataplaneError, an OSError: say so, try again next look
            log.error("watchdog: attaching steerd's program to the group on %s failed: %s",
                      group.address, exc)
            return Finding(PROGRAM, group.address, None, None, None, repaired=False)

    def _scan_holders(self) -> None:
        """Find a holder for every socket that has none; forget the records whose sockets
        no process has held for :data:`GONE_AFTER` scans (they left their groups). The scan
        of /proc runs without the lock (it may take milliseconds)."""
        with self._lock:
            wanted = {h.inode for w in (*self._live.values(), *self._released)
                      for h in w.sockets if h.holder is None and not h.gone}
        found = holders(wanted, set(self.own_pids()))
        with self._lock:
            for watched in (*self._live.values(), *self._released):
                for handle in watched.sockets:
                    if handle.holder is not None or handle.gone:
                        continue
                    where = found.get(handle.inode)
                    if where is None:
                        handle.misses += 1
                        continue
                    handle.holder = where
                    handle.misses = 0
            for watched in list(self._released):
                if all(h.gone for h in watched.sockets):
                    self._released.remove(watched)

    # -- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="steerd-sockwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_look = next_sockets = time.monotonic()
        while not self._stop.wait(max(0.0, next_look - time.monotonic())):
            now = time.monotonic()
            next_look = max(next_look + self.canary_period, now)  # after a stall, no burst
            sockets = now >= next_sockets
            if sockets:
                next_sockets = max(next_sockets + self.period, now)
            try:
                findings = self.look(now, sockets)
            except Exception:  # a bug here must not end the watching
                log.exception("watchdog: a look failed")
                continue
            for finding in findings:
                try:
                    self.on_finding(finding)
                except Exception:
                    log.exception("watchdog: reporting %s failed", finding)

    def stop(self) -> None:
        """Stop the thread and close every socket the watchdog holds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            for watched in (*self._live.values(), *self._released):
                for handle in watched.sockets:
                    handle.holder = None
            self._live.clear()
            self._released.clear()
            self._groups.clear()
            for sock in self._canary_socks.values():
                sock.close()
            self._canary_socks.clear()


def holders(inodes: set[int], exclude: set[int], proc: str = "/proc"
            ) -> dict[int, tuple[int, int]]:
    """For each of the socket ``inodes`` some process outside ``exclude`` holds, one
    (pid, fd number) holding it."""
    found: dict[int, tuple[int, int]] = {}
    if not inodes:
        return found
    names = {f"socket:[{ino}]": ino for ino in inodes}
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            fds = os.scandir(f"{proc}/{entry.name}/fd")
        except OSError:  # gone, or not ours to read
            continue
        with fds:
            for fd in fds:
                try:
                    ino = names.get(os.readlink(fd.path))
                except OSError:
                    continue
                if ino is not None and ino not in found:
                    found[ino] = (int(entry.name), int(fd.name))
        if len(found) == len(inodes):
            break
    return found
