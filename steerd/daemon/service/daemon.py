"""``Daemon``: everything ``steerd run`` starts, as a facade over its parts: its state is
made here (``__init__``); start-up and stop (startup.py), the programs' compile and attach
thread (programs.py), the tick (tick.py), the classifiers and their processes
(classifiers.py), what the control server calls (sink.py), status and watchdog findings
(status.py) are mixed in."""

import asyncio
import math
import threading
import time
from typing import Any

from quic.flight import AssemblerConfig
from steerd.daemon.classifier import Classifier, ClassifierReport
from steerd.daemon.config import (
    Config,
    first_flight_capacity,
)
from steerd.daemon.control import ControlServer
from steerd.daemon.dataplane import Dataplane
from steerd.daemon.dataplane.jail import Jail
from steerd.daemon.dataplane.maps import DEFAULT_PIN_DIR
from steerd.daemon.dataplane.unicast import UnicastFilter
from steerd.daemon.metrics import Metrics
from steerd.daemon.pool import ClassifierPool
from steerd.daemon.registry import Registry
from steerd.daemon.reinject import Reinjector
from steerd.daemon.service.classifiers import ClassifierMixin, retry_config
from steerd.daemon.service.files import load_reset_key, reset_key_path
from steerd.daemon.service.programs import ProgramsMixin
from steerd.daemon.service.sink import SinkMixin
from steerd.daemon.service.startup import StartupMixin, _Group
from steerd.daemon.service.status import StatusMixin
from steerd.daemon.service.tick import TickMixin
from steerd.daemon.sockwatch import (
    SocketWatchdog,
    canary_secret,
)
from steerd.daemon.watchdog import LoopWatchdog, watchdog_requested


class Daemon(StartupMixin, ProgramsMixin, TickMixin, ClassifierMixin, SinkMixin, StatusMixin):
    """Everything ``steerd run`` starts; :meth:`start` and :meth:`stop` bracket its life."""

    # Long on purpose: the state of every part (startup.py, programs.py, tick.py,
    # classifiers.py, sink.py, status.py), made in one place, each piece with why it is there.
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
        # The socket jail (bpf/jail.c): opened before anything binds, attached with the
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

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT (handlers installed by start()), then stop cleanly."""
        await self._stopped.wait()
        await self.stop()
