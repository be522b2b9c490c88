"""The steerd daemon: the data plane, classifier sockets, control socket and metrics, wired.

One reuseport group per listen address (an IPv4 and an IPv6 wildcard are two groups), each
with its own :class:`~steerd.daemon.dataplane.Dataplane` pinned under ``PIN_DIR/g-ADDRESS``
(:func:`group_pin_dir`): the kernel only lets the steering program select sockets of the
group the datagram arrived on, so worker and classifier sockarrays are per group. A worker
slot means the same worker in every group, so a server CID routes the same whichever address
family the client moves to.

The event loop owns everything (registry, assembler): readers on the classifier sockets and on
the control socket, and a tick (every ``_REPORT_INTERVAL``) that ages pending flights out,
pushes registry replicas to the classifier processes and updates the gauges. The daemon never
sees a TLS key or a 1-RTT byte.
"""

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import math
import os
import pickle
import selectors
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from quic.flight import AssemblerConfig
from quic.token import derive_token_key
from steerd.app.client import ControlClient
from steerd.app.protocol import DEFAULT_CONTROL_PATH, ControlError, Steering
from steerd.daemon.classifier import Address, Classifier, ClassifierReport, Origin, RetryConfig
from steerd.daemon.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    first_flight_capacity,
    load_config,
)
from steerd.daemon.control import IP_PKTINFO, RESET_KEY_LEN, ControlServer, bind_group_socket
from steerd.daemon.dataplane import Dataplane, DataplaneConfig, DataplaneError
from steerd.daemon.dataplane import guard as guard_mod
from steerd.daemon.dataplane.counters import read_counter, write_every_cpu
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.dataplane.jail import Jail, remove_jail
from steerd.daemon.dataplane.learn import (
    MODE_LAYOUT,
    MODE_LEARNED,
    Learner,
    LearnLimits,
    remove_learner,
)
from steerd.daemon.dataplane.maps import DEFAULT_PIN_DIR
from steerd.daemon.dataplane.unicast import UnicastFilter, remove_unicast_filter
from steerd.daemon.metrics import Metrics, bump
from steerd.daemon.pool import MESSAGE_MAX, ClassifierPool
from steerd.daemon.registry import Registry
from steerd.daemon.reinject import Reinjector
from steerd.daemon.sockwatch import (
    PROGRAM,
    Finding,
    SocketWatchdog,
    canary_secret,
    protection,
)
from steerd.daemon.watchdog import LoopWatchdog, notify, watchdog_requested

log = logging.getLogger("steerd")

_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_RECV_BUFFER = 65535
_ANC_SPACE = socket.CMSG_SPACE(64)
_BATCH = 64  # datagrams read per readiness event, so one busy socket cannot starve the loop


def _local_address(ancdata: Sequence[tuple[int, int, bytes]], fallback: tuple[str, int]
                   ) -> str | None:
    """The local address a datagram was sent to, or None if it was not one of ours as a
    unicast destination: IPv4 reports the header's destination and the local address the
    route chose apart, and they differ exactly for broadcasts (also a subnet's directed
    broadcast, which the steering program cannot tell) and multicasts."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, spec_dst, addr = _IN_PKTINFO.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, addr) if addr == spec_dst else None
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            addr = _IN6_PKTINFO.unpack_from(data)[0]
            return None if addr[0] == 0xFF else socket.inet_ntop(socket.AF_INET6, addr)
    return fallback[0]


def receive(
    sock: socket.socket, group: int, address: str, port: int, dropped: dict[str, int]
) -> Iterator[tuple[bytes, Origin]]:
    """Drain up to a batch of datagrams from a non-blocking classifier socket. Datagrams
    not sent to a local unicast address are counted in ``dropped`` and never answered."""
    for _ in range(_BATCH):
        try:
            data, anc, _flags, client = sock.recvmsg(_RECV_BUFFER, _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ICMP errors surfacing on the socket: not fatal
            log.debug("classifier recv: %s", exc)
            return
        local = _local_address(anc, (address, port))
        if local is None:
            bump(dropped, "not_unicast")
            continue
        # An IPv6 link-local client keeps its scope (the interface), or re-injection and
        # replies would go out the wrong one; everyone else is (host, port).
        if len(client) == 4 and client[3]:
            peer: Address = (client[0], client[1], 0, client[3])
        else:
            peer = (client[0], client[1])
        yield data, Origin(peer, (local, port), group)


# After a restart, how long (past start-up) flights for ALPNs nobody owns yet are left
# unanswered while the previous run's apps resume (the client retransmits) rather than refused.
RESUME_GRACE = 5.0
RETRY_PREFIX_SHARE = 100  # kernel Retry: one source prefix gets retry_rate / this
_PR_SET_PDEATHSIG = 1
_REPORT_INTERVAL = 0.5  # classifier processes report tallies and sizes this often
_CANARY_SECRET_INDEX = header_constants()["STEERD_CANARY_SECRET"]
_CANARY_COUNTER_INDEX = header_constants()["STEERD_CNT_STEER_CANARY"]
_OFFENCE_MEMORY = 2.0  # seconds a 32-bit offence stays the suspect for a program finding
_SWEEP_INTERVAL = 5.0  # seconds between sweeps of the learned tables (expiry, quota counts)


# How long after start-up the claims of a previous run's apps stay reserved for them (their
# slots' sockets still steer their connections) against registrations by anyone else: the
# program compile (seconds) plus RESUME_GRACE, with room to spare.
CLAIM_RESERVATION = 30.0


def claims_path(config: Config) -> str:
    """Beside the master secret: who claimed what, for the next run to reserve."""
    return os.path.join(os.path.dirname(config.control.path) or ".", "claims.json")


def save_claims(path: str, records: list[dict[str, Any]]) -> None:
    """Write the registry's claims atomically (a new private file renamed over the old one,
    never following a planted link)."""
    tmp = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(records, f)
    os.replace(tmp, path)


def load_claims(path: str) -> list[Any]:
    """The previous run's claim records, [] when there are none or they are unreadable
    (the registry checks each record anyway). A file anyone else could have written is
    ignored: reserving claims on its word would let its author hold other apps' names."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            log.warning("%s is not a private file of uid %d: ignoring it", path, os.geteuid())
            return []
        try:
            records = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("%s is not valid JSON (%s): no claims reserved", path, exc)
            return []
    return records if isinstance(records, list) else []


# Root's runtime directory: the pin dir locks always, and by default the control socket,
# reset.key and claims.json. Never a world-writable one (/run/lock, /tmp): anyone could plant
# a lock there and keep `steerd run` and `steerd purge` from starting.
RUN_DIR = "/run/steerd"


def runtime_dir(path: str = RUN_DIR) -> str:
    """``path``, made (mode 0755, so apps can reach a control socket in it) if missing, and
    refused unless it is a directory of the daemon's uid that group and others cannot
    write: whoever could write in it could plant or swap the daemon's runtime files."""
    try:
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)  # whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"runtime directory {path} is not a directory: refusing it (remove it)")
    _check_private(st, f"runtime directory {path}")
    return path


def _lock_path(pin_dir: str, run_dir: str = RUN_DIR) -> str:
    """A regular file naming ``pin_dir`` (bpffs holds no regular files), in ``run_dir``."""
    return os.path.join(run_dir, "pin" + os.path.abspath(pin_dir).replace("/", "_") + ".lock")


def lock_pin_dir(pin_dir: str, run_dir: str = RUN_DIR) -> int:
    """Take the one-daemon-per-pin-dir lock (held for the daemon's life: the returned fd).

    Why: a second daemon on the same pin dir, even one about to be refused, would rewrite
    what the running one relies on (its classifier sockets in the maps, its pids in the
    socket jail). The lock comes before anything touches them; the message names the live
    daemon. It lives in the root-only :data:`RUN_DIR` (checked by :func:`runtime_dir`), so
    no other user can hold it."""
    fd = os.open(_lock_path(pin_dir, runtime_dir(run_dir)),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(f"another steerd (pid {holder}) serves pin dir {pin_dir}: one daemon "
                      "per pin dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def reset_key_path(config: Config) -> str:
    """Beside the control socket (root's runtime directory, gone at reboot with the pins)."""
    return os.path.join(os.path.dirname(config.control.path) or ".", "reset.key")


def _check_private(st: os.stat_result, what: str) -> None:
    """Refuse a key file or its directory that anyone but the daemon's uid could have
    written: a key an attacker planted would let them forge resets and Retry tokens."""
    if st.st_uid != os.geteuid():
        raise OSError(f"{what} is owned by uid {st.st_uid}, not {os.geteuid()}: refusing it "
                      "(remove it, or fix its owner)")
    if st.st_mode & 0o022:
        raise OSError(f"{what} is writable by group or others (mode "
                      f"{stat.S_IMODE(st.st_mode):04o}): refusing it")


def load_reset_key(path: str) -> bytes:
    """The master secret of earlier runs (apps' per-slot reset keys and the Retry token key
    derive from it), or a new one saved for later runs.

    The file is opened with O_NOFOLLOW and must be a regular file of the daemon's uid that
    nobody else can read or write (mode 0600); its directory must not be writable by
    others. A new one is created with O_EXCL|O_NOFOLLOW, so a planted file or symlink is
    refused, never followed or overwritten."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _check_private(os.stat(directory), f"the directory of {path}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link: refusing it (remove it)") from None
        raise
    if fd >= 0:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file: refusing it (remove it)")
            _check_private(st, path)
            if st.st_mode & 0o077:
                raise OSError(f"{path} is readable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): refusing it (chmod 600)")
            key = f.read(RESET_KEY_LEN + 1)
        if len(key) == RESET_KEY_LEN:
            return key
        log.warning("%s is not a %d-byte key: making a new one", path, RESET_KEY_LEN)
        os.unlink(path)
    key = os.urandom(RESET_KEY_LEN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def retry_config(config: Config, secret: bytes, share: int = 1) -> RetryConfig:
    """The classifier's Retry mode from [flood]; ``share`` divides the Retry budget among
    classifier processes. The token key derives from the daemon's master secret, which no app
    ever sees (apps get per-slot keys derived from it), so only the daemon mints tokens; it
    outlives restarts, so a token issued just before one is still good just after."""
    flood = config.flood
    return RetryConfig(
        mode=flood.retry, key=derive_token_key(secret), lifetime=flood.token_lifetime,
        pending_fraction=flood.retry_pending_fraction,
        initial_rate=flood.retry_initial_rate / share, hold=flood.retry_hold,
        rate=flood.retry_rate / share, burst=max(1, flood.retry_burst // share),
    )


class _Group:
    """One reuseport group: a listen address, its data plane and its classifier sockets."""

    def __init__(self, index: int, address: str, dataplane: Dataplane) -> None:
        self.index = index
        self.address = address
        self.dataplane = dataplane
        self.learner = Learner(dataplane)
        self.sockets: list[socket.socket] = []


class Daemon:
    """Everything ``steerd run`` starts; :meth:`start` and :meth:`stop` bracket its life."""

    def __init__(self, config: Config, *, pin_dir: str = DEFAULT_PIN_DIR) -> None:
        self.config = config
        self.pin_dir = pin_dir
        self.metrics = Metrics()
        limits = config.limits
        self.registry = Registry.from_config(config)
        self.groups: list[_Group] = []
        self.reinjector = Reinjector()
        # Apps derive stateless-reset tokens from it; the classifier resets the connections
        # of a worker that died with the same key. It outlives a daemon restart (apps that
        # resume keep the tokens they advertised), not a purge or a reboot.
        reset_key = load_reset_key(reset_key_path(config))
        self.started = time.monotonic()
        self.classifier = Classifier(
            self.registry,
            self._write_route,
            self.reinjector.send,
            self._reply,
            layout=config.cid,
            reset_key=reset_key,
            assembler=AssemblerConfig(
                max_pending=limits.pending_connections,
                max_bytes_per_connection=limits.pending_bytes,
                ttl=limits.pending_ttl,
            ),
            decided_ttl=limits.route_ttl,
            decided_max=first_flight_capacity(limits),
            # Until the programs are loaded, then RESUME_GRACE more (set in start()).
            hold_unowned_until=math.inf,
            retry=retry_config(config, reset_key),
        )
        self.control = ControlServer(
            config, self.registry, self, metrics=self.metrics, reset_key=reset_key,
            status_extra=self._status_extra, on_change=self._registry_changed,
            on_load=lambda: self._registry_changed(urgent=False),
            socket_refusal=self.socket_refusal, settle=self._settle,
        )
        # The socket jail (steerd/bpf/jail.c): opened before anything binds, attached with the
        # programs; until it is attached, worker sockets go only to the daemon's own uid.
        self.jail: Jail | None = None
        self._jail_error = "not attached yet: the daemon is starting"
        self._kernel_retry_dp: Dataplane | None = None  # the guard's, in "auto" (see _kernel_retry)
        # The socket watchdog (steerd/daemon/sockwatch.py): a thread that sets back what a
        # holder changed on a worker socket or a group's program, on paths the jail misses.
        self.sockwatch = SocketWatchdog(
            on_finding=self._on_finding,
            own_pids=lambda: self.pool.pids if self.pool is not None else ())
        self._canary_secret = canary_secret()
        self.sockwatch.set_secret(self._canary_secret)
        self._repairs: dict[str, int] = {}  # what -> repairs (steerd status)
        self._evictions: dict[str, int] = {}  # what -> apps evicted
        self._offences: list[tuple[float, int, int, str]] = []  # (when, pid, uid, what)
        # Broadcast and multicast dropped on the way into every service socket (unicast.c).
        self.unicast: UnicastFilter | None = None
        self._unicast_error = "not attached yet: the daemon is starting"
        self._learn_error: str | None = None
        self._learned_counts: dict[int, tuple[int, int]] = {}  # slot -> (CIDs, peers), swept
        self._unproven_counts: dict[int, tuple[int, int]] = {}  # the same, still unproven
        self._next_sweep = 0.0
        self._slot_apps: dict[int, str] = {}  # slot -> app, for the metrics scrape
        self._saved_claims: list[dict[str, Any]] | None = None
        self._lock = -1  # the pin dir lock's fd while running
        self._loading: threading.Event | None = None  # set once the compile thread is done
        self._maps_lock = threading.Lock()
        # Every group has a steering program (a previous run's, pinned, or this run's).
        self.steering_attached = False
        self._tick: asyncio.Task[None] | None = None
        # The loop's witnesses (steerd/daemon/watchdog.py): a thread that reports a stall,
        # and systemd's WatchdogSec= when the unit asks for pings.
        self._watchdog: LoopWatchdog | None = None
        self._ping_systemd = watchdog_requested()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Classifier processes (when limits.classifiers > 1): the pool that runs them, and the
        # last report of each; with one classifier the main process classifies itself.
        self.pool: ClassifierPool | None = None
        self._reports: dict[int, ClassifierReport] = {}
        self._socket_index = 0  # which classifier socket of a group this process replies from
        self._expired_counted = 0
        self._early_expired_counted = 0
        self._stopping = False
        self.metrics_address: tuple[str, int] | None = None
        self._stopped = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the data plane, the classifier sockets and the control socket, then load the
        programs. The order is what makes a restart seamless: a previous run's program stays
        attached to each group (the apps' sockets keep the groups alive) and its pinned maps
        are reopened here, so the new classifier sockets receive traffic and apps can resume
        within a moment, while compiling the programs takes seconds."""
        self._loop = asyncio.get_running_loop()
        self._lock = lock_pin_dir(self.pin_dir)  # before anything touches the pinned state
        for sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a stop during start-up
            self._loop.add_signal_handler(sig, self._stopped.set)  # is still a clean stop
        cfg, limits = self.config, self.config.limits
        try:
            for index, address in enumerate(cfg.listen.addresses):
                dp = Dataplane(
                    DataplaneConfig(
                        layout=cfg.cid,
                        port=cfg.listen.port,
                        classifier_slots=limits.classifiers,
                        worker_slots=limits.worker_slots,
                        route_capacity=first_flight_capacity(limits),
                        learned_capacity=limits.learned_capacity,
                        pin_dir=group_pin_dir(self.pin_dir, address),
                    )
                )
                group = _Group(index, address, dp)
                self.groups.append(group)
                dp.open_maps()
                # The canary's secret, before any program of ours (a previous run's too) runs.
                write_every_cpu(dp.map_fd("counters"), dp.ncpus, _CANARY_SECRET_INDEX,
                                int.from_bytes(self._canary_secret, sys.byteorder))
            self.sockwatch.start()  # watches nothing until the first registration
            if self.groups:
                # Before binding: a previous run's jail is still attached and refuses binds
                # to the port from any process it does not list. The classifier processes
                # forked later inherit the cgroup.
                self.jail = Jail(self.pin_dir, cfg.listen.port,
                                 self.groups[0].dataplane.map_fd("counters"))
                self.jail.open()
                self.jail.enter_own_cgroup()
                # A previous run's filter stays attached until this run's is; the
                # broadcast addresses it needs are kept current from here on.
                self.unicast = UnicastFilter(self.pin_dir, cfg.listen.port,
                                             self.groups[0].dataplane.map_fd("counters"))
                self.unicast.open()
                self.unicast.sync_broadcasts()
                self._loop.add_reader(self.unicast.watch(), self.unicast.changed)
            for group in self.groups:
                address, dp = group.address, group.dataplane
                for j in range(limits.classifiers):
                    sock = bind_group_socket(address, cfg.listen.port, classifier=True)
                    group.sockets.append(sock)
                    dp.set_classifier(j, sock)
                    if limits.classifiers == 1:
                        self._loop.add_reader(sock.fileno(), self._readable, group, sock)
            # A group whose apps all left died with them, and its new one (our classifier
            # sockets) has no program: the kernel would hash. The previous run's pinned
            # program steers at once, until this run's is compiled.
            self.steering_attached = bool(self.groups) and all(
                g.dataplane.attach_pinned_steering(g.sockets[0]) for g in self.groups)
            # Slots a previous run handed out whose sockets are still in the data plane:
            # their apps serve on; nobody else gets them until the apps resume or exit.
            orphans = [slot for slot in range(limits.worker_slots) if self._slot_alive(slot)]
            self.registry.reserve_orphans(orphans)
            if orphans:
                # Their claims too, before the control socket opens: nobody else may take
                # them while the apps resume.
                for why in self.registry.reserve_claims(
                        load_claims(claims_path(cfg)), time.monotonic() + CLAIM_RESERVATION):
                    log.warning("claims of the previous run: %s", why)
            if orphans:
                log.info("slots %s still serve a previous run's apps: awaiting resume", orphans)
            self._configure_learning()  # keeps the lengths the orphans' learned entries use
            if limits.classifiers > 1:
                self._start_children()
            self.metrics.set_bpf_source(self.counters)
            self.metrics.set_app_packets_source(self._app_packets)
            await self.control.start()
            if cfg.metrics.enabled:
                self.metrics_address = self.metrics.serve(cfg.metrics.address, cfg.metrics.port)
            self._watchdog = LoopWatchdog(threading.get_ident(),
                                          on_stall=lambda *_: self.metrics.loop_stalls.inc())
            self._watchdog.start()
            self._tick = asyncio.create_task(self._ticker())
            log.info("classifying and accepting apps")
            print("steerd: classifying", flush=True)  # before the (slow) program compile
            self._loading = threading.Event()
            await self._loop.run_in_executor(None, self._load_programs, self._loading)
            # Apps of a previous run have had the whole start-up to resume; give them a
            # little more, then flights nobody owns are refused again.
            self.classifier.hold_unowned_until = time.monotonic() + RESUME_GRACE
            self._registry_changed()
        except BaseException:
            await self.stop()
            raise

    def _load_programs(self, done: threading.Event) -> None:
        """Compile and attach (in a thread: the event loop keeps classifying meanwhile). The
        jail first: until it holds, apps of other uids get no sockets. ``done`` is set when
        the thread no longer touches the maps (stop() waits for it before closing them)."""
        try:
            self._load_programs_now()
        finally:
            done.set()

    def _load_programs_now(self) -> None:
        cfg = self.config
        if self.jail is not None:
            try:
                self.jail.attach()
                log.info("socket jail attached (cgroup hooks for UDP port %d; 32-bit "
                         "setsockopt: %s)", cfg.listen.port,
                         "callers killed by the compat hook" if self.jail.compat_error is None
                         else f"not hooked: {self.jail.compat_error}")
            except DataplaneError as exc:
                self._jail_error = str(exc)
                log.error("socket jail: %s; worker sockets go only to uid %d%s", exc,
                          os.geteuid(), " and, as [security] allow_unjailed says, to every "
                          "other uid too (UNSAFE)" if cfg.security.allow_unjailed else "")
        # A stop during start-up waits for this thread (it holds the maps' fds): give up
        # between compiles rather than compile on for a daemon that is going away.
        if self._stopping:
            return
        if self.unicast is not None:
            try:
                self.unicast.attach()
                self._unicast_error = ""
                log.info("non-unicast filter attached (cgroup ingress, UDP port %d, %s)",
                         cfg.listen.port, self.unicast.scope)
            except DataplaneError as exc:
                self._unicast_error = str(exc)
                log.error("non-unicast filter: %s; broadcasts can reach worker sockets", exc)
        for group in self.groups:
            if self._stopping:
                return
            group.dataplane.load_programs()
            # Replaces the group's program (a previous run's, or the kernel's hash).
            group.dataplane.attach_reuseport(group.sockets[0])
        self.steering_attached = True
        for group in self.groups:  # from now on, every group's program must be this one
            dp = group.dataplane
            self.sockwatch.add_group(
                group.address, cfg.listen.port,
                functools.partial(read_counter, dp.map_fd("counters"), dp.ncpus,
                                  _CANARY_COUNTER_INDEX),
                functools.partial(dp.attach_reuseport, group.sockets[0]))
        for group in self.groups:
            if self._stopping:
                return
            try:
                group.learner.attach()
            except DataplaneError as exc:  # layout-mode apps do not need it
                self._learn_error = str(exc)
                log.error("learned mode unavailable: %s", exc)
        if self.groups:
            dp0 = self.groups[0].dataplane
            for ifname in cfg.xdp.interfaces:
                if cfg.xdp.mode == "tc":
                    dp0.detach_stale_tc(ifname)  # a previous run's guard
                    dp0.attach_tc(ifname)
                    mode = "tc"
                else:
                    mode = dp0.attach_xdp(ifname, cfg.xdp.mode)  # replaces a previous one
                log.info("guard on %s (%s)", ifname, mode)
            flood = cfg.flood
            if cfg.xdp.interfaces and flood.guard_rate > 0:
                dp0.set_flood_guard(flood.guard_rate, flood.guard_burst,
                                    flood.guard_v4_prefix_len, flood.guard_v6_prefix_len,
                                    flood.guard_total_rate, flood.guard_total_burst)
                log.info("flood guard: %g new Initials/s per source prefix, burst %d; %s",
                         flood.guard_rate, flood.guard_burst,
                         f"{flood.guard_total_rate:g}/s in all" if flood.guard_total_rate
                         else "no total cap")
            elif cfg.xdp.interfaces:
                dp0.disable_flood_guard()  # a previous run's may still be configured
            if cfg.xdp.interfaces:
                self._kernel_retry(dp0)

    def _kernel_retry(self, dp: Dataplane) -> None:
        """The guard's Retry and token check (docs/DATAPLANE.md "Kernel Retry"): the token key
        (the classifier's, so either side validates the other's tokens), the Retries' budget,
        and Retry mode: on for good with ``retry = "always"``; with "auto" and "off" it stays
        off here and the classifier's Python Retry answers under load, as it does wherever
        no guard is attached."""
        flood = self.config.flood
        # One source prefix may take 1% of the Retry budget (retry_rate, retry_burst bound
        # all prefixes together), so a few prefixes cannot make steerd reflect at its cap.
        dp.set_retry(self.classifier.retry.key, flood.token_lifetime,
                     rate=flood.retry_rate / RETRY_PREFIX_SHARE,
                     burst=max(1, flood.retry_burst // 10),
                     total_rate=flood.retry_rate, total_burst=flood.retry_burst,
                     # "always" means every token-less Initial: none is let past
                     proven_ttl=flood.retry_proven_ttl if flood.retry == "auto" else 0.0,
                     proven_rate=flood.retry_proven_rate)
        dp.set_retry_until(guard_mod.RETRY_ALWAYS if flood.retry == "always" else 0)
        if flood.retry == "auto":
            # A quarter second of the rate as burst: a legitimate spike passes, a flood
            # turns Retry mode on within milliseconds, in the kernel, before Python sees it.
            dp.set_retry_auto(flood.retry_initial_rate,
                              max(1, int(flood.retry_initial_rate / 4)), flood.retry_hold)
            self._kernel_retry_dp = dp
        log.info("kernel Retry: %s; tokens checked in the guard", flood.retry)

    def _hold_kernel_retry(self, reports: Sequence[ClassifierReport]) -> None:
        """In "auto", the classifiers falling behind (their pending first flights past
        ``retry_pending_fraction``) also turn the guard's Retry mode on, for ``retry_hold``."""
        dp = self._kernel_retry_dp
        if dp is None or not any(r.retrying for r in reports):
            return
        until = time.monotonic_ns() + int(self.config.flood.retry_hold * 1e9)
        try:
            if dp.guard_config().retry_until_ns < until:
                dp.set_retry_until(until)
        except DataplaneError as exc:
            log.warning("kernel Retry: cannot turn Retry mode on: %s", exc)

    async def stop(self) -> None:
        """Close the daemon's sockets and leave the pinned data plane as it is: programs,
        maps and guard keep steering the apps' connections, and the next run takes over.
        ``steerd purge`` removes it all."""
        notify("STOPPING=1")
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None
        if self._watchdog is not None:  # no ticks from here on: not a stall
            self._watchdog.stop()
            self._watchdog = None
        # Closing the control socket disconnects every app; that must not take their sockets
        # out of the data plane: they serve on, and resume with the next run.
        self._stopping = True
        self.sockwatch.stop()  # before the maps and sockets it uses close
        if self.pool is not None:
            self.pool.freeze()  # the classifiers hold their last replica: hold, never refuse
        await self.control.close()
        self.metrics.close()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        if self.jail is not None:
            # While no daemon runs, no process at all may touch the port's sockets.
            with contextlib.suppress(DataplaneError):
                self.jail.set_daemon_cgroups([])
            self.jail.leave_own_cgroup()
            self.jail.close()
            self.jail = None
        if self.unicast is not None and self._loop is not None and self.unicast.watch_fd >= 0:
            self._loop.remove_reader(self.unicast.watch_fd)
        for group in self.groups:
            for sock in group.sockets:
                if self._loop is not None and self.config.limits.classifiers == 1:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
        if self._loading is not None and not self._loading.is_set():
            # a stop during start-up (a signal, a failure): the compile thread still holds
            # the map fds it was given; let it finish before they are closed
            await asyncio.get_running_loop().run_in_executor(None, self._loading.wait, 120)
        if self.unicast is not None:  # the pinned filter stays attached
            self.unicast.close()
            self.unicast = None
        self.metrics.set_bpf_source(None)
        self.metrics.set_app_packets_source(None)
        with self._maps_lock:  # a scrape thread may be reading counters right now
            for group in self.groups:
                group.learner.close()
                group.dataplane.close()
            self.groups.clear()
        self.reinjector.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT (handlers installed by start()), then stop cleanly."""
        await self._stopped.wait()
        await self.stop()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(_REPORT_INTERVAL)
            try:
                self._tick_once()
            except Exception:  # a bug here must not stop the ticking (expiry, pushes, gauges)
                log.exception("periodic tick failed")
            self._beat()

    def _beat(self) -> None:
        """The loop is alive: tell both witnesses (steerd/daemon/watchdog.py)."""
        if self._watchdog is not None:
            self._watchdog.beat()
        if self._ping_systemd:
            notify("WATCHDOG=1")

    def _tick_once(self) -> None:
        if self.pool is None:
            self.classifier.expire(time.monotonic())
            self.metrics.absorb(self.classifier.tally.take())
        if self.registry.orphans:
            released = self.registry.release_orphans(self._slot_alive)
            if released:  # an app exited without resuming: slots are free
                for group in self.groups:
                    for slot in released:
                        group.learner.forget_slot(slot)
                self._registry_changed()
        now = time.monotonic()
        if now >= self._next_sweep and self._loop is not None:
            # In a thread (map syscalls release the GIL): a full table is 10^5 syscalls,
            # too long to hold up the classifier on the event loop.
            self._next_sweep = math.inf  # until this sweep is done
            self._loop.run_in_executor(None, self._sweep)
        if self.pool is not None:
            self.pool.tick()
        self._update_gauges()

    def _sweep(self) -> None:
        """Expire learned entries and recount the quotas (see Learner.sweep)."""
        counts: dict[int, tuple[int, int]] = {}
        unproven: dict[int, tuple[int, int]] = {}  # not yet proven by a client: not in quota
        try:
            with self._maps_lock:
                if self._stopping:
                    return
                for group in self.groups:
                    for slot, (cids, peers) in group.learner.sweep().items():
                        have = counts.get(slot, (0, 0))
                        counts[slot] = (have[0] + cids, have[1] + peers)
                    for slot, (cids, peers) in group.learner.unproven.items():
                        have = unproven.get(slot, (0, 0))
                        unproven[slot] = (have[0] + cids, have[1] + peers)
            self._learned_counts = counts
            self._unproven_counts = unproven
        except Exception:  # a failed sweep must not stop the next ones
            log.exception("sweeping the learned tables failed")
        finally:
            self._next_sweep = time.monotonic() + _SWEEP_INTERVAL

    def _current_reports(self) -> list[ClassifierReport]:
        if self.pool is None:
            return [self.classifier.report()]
        return list(self._reports.values())

    def _update_gauges(self) -> None:
        reports = self._current_reports()
        self._hold_kernel_retry(reports)
        self.metrics.pending_connections.set(sum(r.pending_connections for r in reports))
        self.metrics.pending_bytes.set(sum(r.pending_bytes for r in reports))
        self.metrics.routes.set(sum(r.routes for r in reports))
        self.metrics.retry_mode.set(sum(r.retrying for r in reports))
        # Reports carry totals since start; the counter wants what is new.
        expired = sum(r.expired for r in reports)
        if expired > self._expired_counted:
            self.metrics.first_flights.labels("expired", "").inc(expired - self._expired_counted)
            self._expired_counted = expired
        early = sum(r.early_expired for r in reports)  # 0-RTT that never met its Initial
        if early > self._early_expired_counted:
            self.metrics.first_flights.labels("early_expired", "").inc(
                early - self._early_expired_counted)
            self._early_expired_counted = early

    # -- the socket sink the control server calls ----------------------------------------------

    def add_worker(self, slot: int, sockets: Sequence[socket.socket]) -> None:
        for group, sock in zip(self.groups, sockets, strict=True):
            group.dataplane.set_worker(slot, sock)
        self.watch_worker(slot, [sock.fileno() for sock in sockets])

    def watch_worker(self, slot: int, fds: Sequence[int]) -> None:
        """The socket watchdog keeps its own copy of ``slot``'s sockets (one per group): the
        control server closes the daemon's after handing them over, or a resume's after the
        request."""
        gen = self.registry.slot_holder(slot)
        if gen is None:  # not registered (an undone registration): nothing to watch
            return
        self.sockwatch.watch(slot, gen.app, gen.uid,
                             [(group.address, fd) for group, fd in zip(self.groups, fds,
                                                                       strict=True)])

    def remove_worker(self, slot: int) -> None:
        if self._stopping:
            return
        self.sockwatch.release(slot)  # watched on until nobody holds its sockets
        for group in self.groups:
            group.dataplane.remove_worker(slot)
            group.learner.forget_slot(slot)

    def set_steering(self, slot: int, steering: Steering, fresh: bool) -> None:
        mode = MODE_LEARNED if steering.learned else MODE_LAYOUT
        for group in self.groups:
            cookie = group.dataplane.worker_cookie(slot)
            if cookie is None:
                continue
            if fresh:
                group.learner.clear_slot_stats(slot)
            group.learner.set_socket(cookie, slot, mode, steering.cid_len)

    def _app_packets(self) -> dict[tuple[str, str], int]:
        """steerd_app_packets_total: every slot's statistics, summed per app."""
        slot_apps = self._slot_apps
        total: dict[tuple[str, str], int] = {}
        with self._maps_lock:
            for group in self.groups:
                for slot, row in group.learner.slot_stats(slot_apps).items():
                    app = slot_apps.get(slot)
                    if app is not None:
                        for what, value in row.items():
                            total[(app, what)] = total.get((app, what), 0) + value
        return total

    def steering_stats(self, slot: int) -> dict[str, int]:
        total: dict[str, int] = {}
        with self._maps_lock:
            for group in self.groups:
                for name, value in group.learner.slot_stats([slot]).get(slot, {}).items():
                    total[name] = total.get(name, 0) + value
        cids, peers = self._learned_counts.get(slot, (0, 0))
        if cids or peers:
            total.update(learned_cids=cids, learned_peers=peers)
        cids, peers = self._unproven_counts.get(slot, (0, 0))
        if cids or peers:
            total.update(unproven_cids=cids, unproven_peers=peers)
        return total

    def _configure_learning(self) -> None:
        """Quotas, TTL and the CID lengths in use: the registry's learned-mode generations,
        and the apps of a previous run still awaiting resume (their learned entries steer
        their connections meanwhile; the data plane's socket list still says how)."""
        limits = self.config.limits
        learn = LearnLimits(limits.learned_quota, limits.learned_quota, limits.learned_ttl,
                            limits.learned_unproven_quota, limits.learned_unproven_ttl)
        orphans = self.registry.orphans
        for group in self.groups:
            lengths = set(self.registry.learned_lengths())
            lengths.update(cid_len for slot, mode, cid_len in group.learner.sockets().values()
                           if mode == MODE_LEARNED and slot in orphans)
            group.learner.configure(learn, lengths)

    def worker_cookies(self, slot: int) -> list[int | None]:
        return [group.dataplane.worker_cookie(slot) for group in self.groups]

    def socket_refusal(self, uid: int) -> tuple[str, str] | None:
        """Why worker sockets may not be handed to a peer of ``uid`` now, as (reason,
        message); None: they may.

        Before a steering program is attached to every group, the kernel would hash new
        datagrams over whatever sockets join it: nobody gets sockets. Without the jail, any
        holder of a worker socket can take the whole port, so only the daemon's own uid (who
        could do that anyway) gets sockets, unless the operator accepted the risk."""
        if not self.steering_attached:
            return ("not_ready", "no steering program is attached yet (the daemon is "
                    "starting: it compiles its programs); retry in a moment")
        if uid == os.geteuid() or (self.jail is not None and self.jail.attached):
            return None
        if self.config.security.allow_unjailed:
            return None
        return ("unjailed",
                f"the socket jail is not attached ({self._jail_error}), so worker sockets go "
                f"only to uid {os.geteuid()}; [security] allow_unjailed = true overrides this "
                "(unsafe: see docs/SECURITY.md)")

    def _slot_alive(self, slot: int) -> bool:
        return any(cookie is not None for cookie in self.worker_cookies(slot))

    # -- classifier I/O --------------------------------------------------------------------------

    def _readable(self, group: _Group, sock: socket.socket) -> None:
        now = time.monotonic()
        for data, origin in receive(sock, group.index, group.address, self.config.listen.port,
                                    self.classifier.dropped):
            try:
                self.classifier.on_datagram(data, origin, now)
            except Exception:  # a bug must cost one datagram, never the daemon
                log.exception("classifier failed on a datagram from %s", origin.client)
                bump(self.classifier.dropped, "internal_error")

    def _start_children(self) -> None:
        """Fork one classifier process per classifier index (a ClassifierPool supervises
        them). Each reads the sockets of its index in every group (the BPF program's DCID
        hash picks the index, so every datagram of one connection meets the same process) and
        does the whole job itself — assembly, decision on its replica of the registry, route
        write, re-injection — so capacity grows with processes instead of queueing at one
        decider."""
        def lost(index: int) -> None:  # the steering program probes on to a live one
            self._reports.pop(index, None)
            for group in self.groups:
                with contextlib.suppress(DataplaneError):
                    group.dataplane.remove_classifier(index)

        def ready(index: int) -> None:  # at start, its sockets are in the map already
            for group in self.groups:
                with contextlib.suppress(DataplaneError):
                    group.dataplane.remove_classifier(index)
                group.dataplane.set_classifier(index, group.sockets[index])

        def report(index: int, tally: Any, rep: ClassifierReport) -> None:
            self.metrics.absorb(tally)
            self._reports[index] = rep

        self.pool = ClassifierPool(
            self.config.limits.classifiers, self._run_child,
            lambda: (self.registry, self.classifier.hold_unowned_until), report, lost, ready,
            count_restart=self.metrics.classifier_restarts.inc,
        )
        self.pool.start()

    def _run_child(self, index: int, channel: socket.socket) -> NoReturn:
        """Body of classifier process ``index``: exits with the main process (PDEATHSIG, or
        its channel closing). Messages in: (version, (registry replica, hold_unowned_until)),
        pickled. Messages out, at once and then every _REPORT_INTERVAL: (the version it
        holds, tally, report)."""
        code = 0
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._socket_index = index
            self.reinjector = Reinjector()  # raw sockets of its own
            limits = self.config.limits
            classifier = Classifier(
                self.registry, self._write_route, self.reinjector.send, self._reply,
                layout=self.config.cid, reset_key=self.classifier.reset_key,
                assembler=self.classifier.front.assembler.config,
                decided_ttl=limits.route_ttl,
                decided_max=-(-first_flight_capacity(limits) // limits.classifiers),  # its share
                send_rate=self.classifier.send_rate / limits.classifiers,
                send_burst=max(1, self.classifier.send_burst // limits.classifiers),
                hold_unowned_until=self.classifier.hold_unowned_until,
                retry=retry_config(self.config, self.classifier.reset_key or b"",
                                   limits.classifiers),
            )
            port = self.config.listen.port
            sel = selectors.DefaultSelector()
            for group in self.groups:
                sel.register(group.sockets[index], selectors.EVENT_READ, group)
            sel.register(channel, selectors.EVENT_READ, None)
            channel.setblocking(True)
            next_report = time.monotonic()
            version = -1
            while True:
                for key, _ in sel.select(max(0.0, next_report - time.monotonic())):
                    if key.data is None:
                        message = channel.recv(MESSAGE_MAX)
                        if not message:
                            raise SystemExit(0)
                        version, (classifier.registry, classifier.hold_unowned_until) = (
                            pickle.loads(message))
                        next_report = time.monotonic()  # say at once: control replies wait
                        continue
                    group = key.data
                    now = time.monotonic()
                    for data, origin in receive(group.sockets[index], group.index,
                                                group.address, port, classifier.dropped):
                        try:
                            classifier.on_datagram(data, origin, now)
                        except Exception:  # a bug must cost one datagram, not the process
                            log.exception("classifier %d failed on a datagram", index)
                            bump(classifier.dropped, "internal_error")
                now = time.monotonic()
                if now >= next_report:
                    classifier.expire(now)
                    report = (version, classifier.tally.take(), classifier.report())
                    channel.send(pickle.dumps(report, pickle.HIGHEST_PROTOCOL))
                    next_report = now + _REPORT_INTERVAL
        except (SystemExit, BrokenPipeError, ConnectionResetError):
            pass
        except BaseException:
            log.exception("classifier process %d failed", index)
            code = 1
        os._exit(code)

    def _save_claims(self) -> None:
        records = self.registry.claims_snapshot()
        if records == self._saved_claims:
            return
        try:
            save_claims(claims_path(self.config), records)
            self._saved_claims = records
        except OSError as exc:
            log.error("cannot save the claims for the next run: %s", exc)

    def _registry_changed(self, urgent: bool = True) -> None:
        """Keep the claims for the next run and the classifier processes' replicas current
        (registrations are rare, decisions are per flight: copying the table beats asking
        the main process). Load reports are not urgent: they go with the next tick."""
        if not self._stopping:  # a stopping daemon disconnects every app: keep their claims
            self._save_claims()
            if urgent:
                self._configure_learning()
                # for scrapes (other threads): a fresh dict, never one being changed
                self._slot_apps = {w["slot"]: a["app"] for a in self.registry.status()["apps"]
                                   for g in a["generations"] for w in g["workers"]}
        if self.pool is not None:
            self.pool.changed(urgent)

    def _settle(self, reply: Callable[[], None]) -> None:
        """Send a control reply once every classifier holds the registry it describes
        (``ClassifierPool.when_synced``); the in-process classifier reads it directly."""
        if self.pool is None:
            reply()
        else:
            self.pool.when_synced(reply)

    def _write_route(self, group: int, dcid: bytes, slot: int) -> None:
        self.groups[group].dataplane.add_route(dcid, slot, ttl=self.config.limits.route_ttl)

    def _reply(self, packet: bytes, client: tuple[str, int], service: tuple[str, int],
               group: int) -> None:
        """Send from the service address the client used, via this process's socket."""
        sock = self.groups[group].sockets[self._socket_index]
        ip = ipaddress.ip_address(service[0])
        if ip.version == 4:
            anc = [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, ip.packed, bytes(4)))]
        else:
            anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(ip.packed, 0))]
        try:
            sock.sendmsg([packet], anc, 0, client)
        except OSError as exc:
            log.debug("reply to %s failed: %s", client, exc)

    # -- views --------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """BPF counters summed over the groups (each group counts what it steered). Also
        called from the metrics server's threads: under the lock stop() closes maps with."""
        total: dict[str, int] = {}
        with self._maps_lock:
            for group in self.groups:
                for name, value in group.dataplane.counters().items():
                    total[name] = total.get(name, 0) + value
        return total

    def _drops(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for report in self._current_reports():
            for reason, n in report.dropped.items():
                bump(total, reason, n)
        return total

    def _on_finding(self, finding: Finding) -> None:
        """From the watchdog's thread, after its repair: count and log it now, evict on the
        event loop (the registry and the control connections are the loop's)."""
        what = finding.what
        if finding.repaired:  # a new dict, never one a status request is copying
            self._repairs = {**self._repairs, what: self._repairs.get(what, 0) + 1}
            self.metrics.jail_repairs.labels(what).inc()
        whose = ("the group's steering program" if finding.app is None else
                 f"a worker socket of app {finding.app!r} (uid {finding.uid}, slot "
                 f"{finding.slot if finding.slot is not None else 'released'})")
        log.error("watchdog: %s changed on %s on %s: %s", what, whose, finding.address,
                  "set back" if finding.repaired else "REPAIR FAILED (trying again)")
        if self._loop is not None and not self._stopping:
            self._loop.call_soon_threadsafe(self._evict, finding)

    def _evict(self, finding: Finding) -> None:
        """Evict the app whose socket changed; for a group's program (no socket says who),
        the apps of the uids the jail's 32-bit hook saw (``Jail.drain_offences``, where the
        jail has one); nobody known: repaired and counted only."""
        now = time.monotonic()
        drain = getattr(self.jail, "drain_offences", None)
        if drain is not None:
            try:
                for o in drain():  # Offence(pid, uid, what, count), or a (pid, uid, what)
                    pid, uid, what = ((o.pid, o.uid, o.what) if hasattr(o, "pid")
                                      else tuple(o)[:3])
                    self._offences.append((now, pid, uid, what))
            except Exception:  # the offence record is a hint: never fatal
                log.exception("reading the jail's offences failed")
        own = {os.getpid(), *(self.pool.pids if self.pool is not None else ())}
        self._offences = [o for o in self._offences if now - o[0] < _OFFENCE_MEMORY
                          and o[1] not in own]
        if finding.what == PROGRAM:
            targets = {(uid, None) for _, _, uid, _ in self._offences}
        elif finding.uid is not None:
            targets = {(finding.uid, finding.app)}
        else:
            targets = set()
        if not targets:
            log.error("watchdog: nobody known to have changed the %s on %s: repaired only",
                      finding.what, finding.address)
            return
        for uid, app in targets:
            owners = self.registry.evictees(uid, app)
            message = (f"evicted: {finding.what} changed on a worker socket of "
                       f"{app or f'uid {uid}'} on {finding.address}"
                       if finding.what != PROGRAM else
                       f"evicted: the steering program of the group on {finding.address} was "
                       f"replaced or removed by uid {uid}")
            evicted = sum(self.control.evict(owner, message) for owner in owners)
            if evicted:
                bump(self._evictions, finding.what)
                self.metrics.jail_evictions.labels(finding.what).inc()
                log.error("watchdog: %s (%d control connection(s) closed, their slots "
                          "left the data plane)", message, evicted)

    def _status_extra(self) -> dict[str, Any]:
        return {
            "protection": protection(
                getattr(self.jail, "compat_refused_by", None),
                "a raw tracepoint" if getattr(self.jail, "compat_attached", False) else None),
            "watchdog": {"repairs": dict(self._repairs), "evictions": dict(self._evictions)},
            "listen": [g.address for g in self.groups],
            "port": self.config.listen.port,
            "pending_connections": sum(r.pending_connections for r in self._current_reports()),
            "pending_bytes": sum(r.pending_bytes for r in self._current_reports()),
            "classifier_processes": len(self.pool.pids) if self.pool is not None else 1,
            "classifier_restarts": self.pool.restarts if self.pool is not None else 0,
            "steering_attached": self.steering_attached,
            "jail_attached": self.jail is not None and self.jail.attached,
            "unicast_filter": self._unicast_error or "attached",
            "learned_mode": self._learn_error or "available",
            "retry_mode": sum(r.retrying for r in self._current_reports()),
            "classifier_drops": self._drops(),
            "counters": self.counters(),
            "metrics": (f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics"
                        if self.metrics_address else None),
        }


# -- CLI: steerd run, steerd status -----------------------------------------------------------


def _cli_config(path: str | None) -> Config:
    """``--config``, else DEFAULT_CONFIG_PATH when it exists, else the embedded defaults: the
    same for ``steerd run`` and ``steerd purge`` (which must find what the run used)."""
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    return load_config(path) if path else Config()


def _run(args: Any) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="steerd: %(message)s")
    try:
        config = _cli_config(args.config)
    except ConfigError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        daemon = Daemon(config, pin_dir=args.pin_dir)
        await daemon.start()
        groups = ", ".join(f"{g.address}:{config.listen.port}" for g in daemon.groups)
        log.info("serving %s; control %s; metrics %s", groups, config.control.path,
                 daemon.metrics_address)
        # The line tests and scripts wait for: everything is listening from here on.
        print("steerd: ready", flush=True)
        notify("READY=1")  # systemd's Type=notify: started; WATCHDOG=1 pings follow each tick
        await daemon.serve_forever()

    try:
        asyncio.run(main())
    except DataplaneError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 1
    return 0


def purge(config: Config, pin_dir: str) -> list[str]:
    """Remove everything a stopped daemon leaves for its successor: the guard on the
    configured interfaces, the pinned maps and programs, the reset key. Established
    connections of apps still running lose their steering (new datagrams are hashed by the
    kernel); run it when steerd is to go away, not between restarts. Returns what it did."""
    lock = lock_pin_dir(pin_dir)  # refuses while a daemon serves this pin dir
    try:
        return _purge_locked(config, pin_dir)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(pin_dir))
        os.close(lock)


def group_pin_dir(pin_dir: str, address: str) -> str:
    """Where the group of listen address ``address`` pins its maps: keyed by the address,
    so editing ``[listen] addresses`` never hands one address's routes and sockets to
    another."""
    return os.path.join(pin_dir, "g-" + address.replace(":", "-").replace(".", "_"))  # bpffs
    # takes no "." in names


def _purge_locked(config: Config, pin_dir: str) -> list[str]:
    done: list[str] = remove_jail(pin_dir) + remove_unicast_filter(pin_dir)
    # Every group this pin dir holds, also of addresses the config no longer lists (and the
    # g<N> directories of versions that keyed groups by position).
    groups = sorted(p for p in Path(pin_dir).glob("g*") if p.is_dir()) if os.path.isdir(
        pin_dir) else []
    for group_dir in groups:
        dp = Dataplane(DataplaneConfig(layout=config.cid, pin_dir=str(group_dir)))
        for ifname in config.xdp.interfaces:  # only the group that attached it has its pin
            with contextlib.suppress(OSError):
                done += [f"{kind} guard off {ifname}"
                         for kind in dp.remove_pinned_guard(ifname)]
        if remove_learner(str(group_dir)):
            done.append(f"detached the learned-mode egress program of {group_dir}")
        shutil.rmtree(group_dir)
        done.append(f"removed {group_dir}")
    with contextlib.suppress(OSError):
        os.rmdir(pin_dir)  # only when empty: never another tool's pins
    for path in (reset_key_path(config), claims_path(config)):
        if os.path.exists(path):
            os.unlink(path)
            done.append(f"removed {path}")
    return done


def _purge(args: Any) -> int:
    try:
        config = _cli_config(args.config)
    except ConfigError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 2
    try:
        done = purge(config, args.pin_dir)
    except OSError as exc:
        print(f"steerd purge: {exc}", file=sys.stderr)
        return 1
    for line in done or ["nothing to remove"]:
        print(line)
    return 0


def _status(args: Any) -> int:
    try:
        with ControlClient(args.control or DEFAULT_CONTROL_PATH) as client:
            status = client.status()
    except (OSError, ControlError) as exc:
        print(f"steerd: cannot reach the daemon at {args.control or DEFAULT_CONTROL_PATH}: "
              f"{exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The human table of ``steerd status``: apps and generations, then counters."""
    lines = [f"listen: {', '.join(status.get('listen', []))} port {status.get('port')}"]
    lines.append(f"pending first flights: {status.get('pending_connections', 0)} "
                 f"({status.get('pending_bytes', 0)} bytes)")
    if status.get("protection"):
        watch = status.get("watchdog", {})
        done = ", ".join(f"{k}={v}" for k, v in sorted(watch.get("repairs", {}).items()))
        evicted = ", ".join(f"{k}={v}" for k, v in sorted(watch.get("evictions", {}).items()))
        lines.append(f"protection: {status['protection']}"
                     + (f"; repaired {done}" if done else "")
                     + (f"; evicted {evicted}" if evicted else ""))
    lines.append("")
    lines.append(f"{'APP':<16} {'GEN':>4} {'STATE':<9} {'ALPN':<16} {'SERVER NAMES':<24} "
                 f"{'CIDS':<10} WORKERS")
    for app in status.get("apps", []):
        for gen in app.get("generations", []):
            workers = " ".join(str(w.get("slot")) for w in gen.get("workers", []))
            mode = gen.get("cid_mode", "layout")
            if mode == "learned":
                mode = f"learned/{gen.get('cid_len')}"
            lines.append(
                f"{app.get('app', ''):<16} {gen.get('generation', ''):>4} "
                f"{gen.get('state', ''):<9} {','.join(gen.get('alpn', [])):<16} "
                f"{','.join(gen.get('server_names', [])):<24} {mode:<10} {workers}"
            )
            steering: dict[str, int] = {}
            for w in gen.get("workers", []):
                for k, v in w.get("steering", {}).items():
                    steering[k] = steering.get(k, 0) + v
            if steering:
                lines.append("    " + " ".join(f"{k}={v}" for k, v in sorted(steering.items())))
    counters = status.get("counters", {})
    if counters:
        lines.append("")
        lines.append("data plane counters:")
        width = max(len(k) for k in counters)
        lines.extend(f"  {k:<{width}} {v}" for k, v in sorted(counters.items()) if v)
    if status.get("retry_mode"):
        lines.append(f"Retry mode: on in {status['retry_mode']} classifier(s)")
    drops = status.get("classifier_drops", {})
    if drops:
        lines.append("classifier drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


def add_command(subparsers: Any) -> None:
    """``steerd run``, ``steerd purge`` and ``steerd status``."""
    p = subparsers.add_parser("run", help="run the daemon (as root)")
    p.add_argument("--config", "-c", default=None,
                   help=f"TOML config (default {DEFAULT_CONFIG_PATH} if it exists, "
                        "else the embedded defaults)")
    p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help="bpffs directory for maps/programs")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_run)
    u = subparsers.add_parser(
        "purge", help="remove the pinned data plane and guard a stopped daemon leaves behind")
    u.add_argument("--config", "-c", default=None,
                   help=f"the config the daemon ran with (default {DEFAULT_CONFIG_PATH} if it "
                        "exists, else the embedded defaults)")
    u.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    u.set_defaults(func=_purge)
    s = subparsers.add_parser("status", help="apps, generations, workers and counters")
    s.add_argument("--control", default=None, help="control socket path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)
