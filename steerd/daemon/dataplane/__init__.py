"""The steerd data plane: the SK_REUSEPORT steering program and the guard (bpf/),
loaded with bcc, their maps pinned under a bpffs directory, driven from Python.

This module is the facade: ``Dataplane`` holds one group's maps, programs and attachments
and delegates each job to the module that owns it:

- header.py: where the C lives and the numbers bpf/steerd.h shares with Python;
- maps.py: libbcc, the maps (created by Python, pinned, found again by a restarted daemon);
- programs.py: prerequisites, kernel headers, -D flags, compiling, loading and pinning;
- steering.py: the reuseport attachment, the worker and classifier sockarrays, routes;
- guard.py: the guard at XDP or TC ingress, and the flood guard's settings;
- counters.py: the per-CPU counters and their names.

Beside them: jail.py (the socket jail), learn.py (learned mode), netns.py (run a call in a
named network namespace). ``DataplaneError`` is defined in errors.py so that every layer can
raise it; everything outside those layers imports it from here.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field

from quic.cid import MAX_CID_LEN, CidLayout
from steerd.daemon.dataplane import counters, guard, maps, programs, steering
from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import header_constants

__all__ = ["Dataplane", "DataplaneConfig", "DataplaneError"]


@dataclass(frozen=True, slots=True)
class DataplaneConfig:
    """What a deployment decides: CID layout, service port(s), slot counts, pin dir.

    ``port`` is the port whose reuseport group this data plane steers; ``guard_ports`` are
    the ports the XDP guard classifies (default: just ``port``). One Dataplane steers one
    reuseport group; a second service port needs its own Dataplane with its own pin dir.
    """

    layout: CidLayout = field(default_factory=CidLayout)
    port: int = 443
    guard_ports: tuple[int, ...] = ()
    classifier_slots: int = 4
    worker_slots: int | None = None
    route_capacity: int = 65536
    bucket_capacity: int = 65536
    learned_capacity: int = 65536  # learned CIDs (and, apart, learned client addresses)
    pin_dir: str = maps.DEFAULT_PIN_DIR

    def effective_worker_slots(self) -> int:
        """Slots the ``workers`` sockarray holds: all a CID can name, capped by the header."""
        cap = header_constants()["STEERD_MAX_WORKER_SLOTS"]
        return self.worker_slots or min(256**self.layout.slot_len, cap)

    def effective_guard_ports(self) -> tuple[int, ...]:
        return self.guard_ports or (self.port,)


class Dataplane:
    """Maps, programs and their attachments for one steered service port.

    Use: ``dp = Dataplane(cfg); dp.load(); dp.attach_reuseport(sock); dp.set_worker(slot,
    sock); dp.attach_xdp("eth0")``. ``close()`` keeps the pins (a restarted daemon finds the
    routes, counters and sockets); ``destroy()`` detaches XDP and removes the pin dir.
    """

    def __init__(self, config: DataplaneConfig) -> None:
        self.config = config
        self._consts = header_constants()
        self._counter_names = counters.counter_names()
        self._fds: dict[str, int] = {}
        self._programs: programs.Programs | None = None
        self._xdp: dict[tuple[str | None, str], int] = {}
        self._tc: set[tuple[str | None, str]] = set()
        self._ncpus = 0
        self._validate()

    def _validate(self) -> None:
        c, k, layout = self.config, self._consts, self.config.layout
        if layout.cid_len > MAX_CID_LEN or layout.host_id_len > 8 or layout.slot_len > 4:
            raise DataplaneError(
                f"CID layout {layout} not supported by the BPF programs "
                "(cid_len <= 20, host_id_len <= 8, slot_len <= 4)"
            )
        if not 1 <= c.classifier_slots <= k["STEERD_MAX_CLASSIFIER_SLOTS"]:
            raise DataplaneError(
                f"classifier_slots must be 1..{k['STEERD_MAX_CLASSIFIER_SLOTS']}"
            )
        if not 1 <= len(c.effective_guard_ports()) <= k["STEERD_MAX_PORTS"]:
            raise DataplaneError(f"1..{k['STEERD_MAX_PORTS']} guard ports are supported")
        if not 1 <= c.effective_worker_slots() <= k["STEERD_MAX_WORKER_SLOTS"]:
            raise DataplaneError("worker_slots out of range")

    # -- loading --------------------------------------------------------------------------

    def cflags(self) -> list[str]:
        """The -D flags that specialise bpf/*.c for this deployment."""
        return programs.cflags(self.config)

    def fd_macros(self) -> dict[str, int]:
        """The macros bpf/*.c names this group's maps by, and their descriptors."""
        return programs.fd_macros(self._fds)

    def load(self) -> None:
        """Check prerequisites, open or create the pinned maps, compile, load and pin both
        programs. Raises DataplaneError on any failure."""
        self.open_maps()
        self.load_programs()

    def open_maps(self) -> None:
        """Check prerequisites and open (or create and pin) the maps: fast, no compiler.

        A restarted daemon calls this first: while the previous run's program is still
        attached to the reuseport group (the apps' sockets keep the group alive), new
        classifier sockets put into the reopened ``classifiers`` map receive traffic at once,
        long before the programs are compiled again.
        """
        headers = programs.require_prerequisites(self.config.pin_dir)
        os.environ["BCC_KERNEL_SOURCE"] = str(headers)
        self._ncpus = counters.possible_cpus()
        try:
            self._fds = maps.open_maps(maps.map_specs(self.config), self.config.pin_dir)
            guard.write_ghash_tables(self._fds["ghash_tables"])
        except DataplaneError:
            self.close()
            raise

    def load_programs(self) -> None:
        """Compile, load and pin the steering and guard programs against the open maps."""
        self._need_maps()
        try:
            loaded = programs.load_programs(self.cflags(), self.fd_macros(),
                                            self.config.pin_dir)
        except DataplaneError:
            self.close()
            raise
        if self._programs is not None:
            self._programs.close()
        self._programs = loaded

    def remove_pinned_guard(self, ifname: str, netns: str | None = None) -> list[str]:
        """Take the guard this pin dir's programs put on ``ifname`` off it, whichever run
        attached it (see guard.remove_pinned_guard). Returns what was removed."""
        return guard.remove_pinned_guard(self.config.pin_dir, ifname, netns)

    def detach_stale_tc(self, ifname: str, netns: str | None = None) -> bool:
        """Detach the TC guard a previous run pinned (before attaching this run's), so a
        restart does not leave two guards on one interface. True if one was removed."""
        return guard.detach_stale_tc(self.config.pin_dir, ifname, netns)

    @property
    def steer_prog_fd(self) -> int:
        return self._need_loaded().steer_fd

    @property
    def guard_prog_fd(self) -> int:
        return self._need_loaded().guard_fd

    @property
    def ncpus(self) -> int:
        """Possible CPUs: the width of a per-CPU map's value."""
        self._need_maps()
        return self._ncpus

    def map_fd(self, name: str) -> int:
        """The open fd of map ``name`` (e.g. ``counters``, which the socket jail shares)."""
        self._need_maps()
        return self._fds[name]

    def _need_loaded(self) -> programs.Programs:
        if self._programs is None:
            raise DataplaneError("data plane not loaded: call load() first")
        return self._programs

    def _need_maps(self) -> None:
        if not self._fds:
            raise DataplaneError("data plane not loaded: call load() or open_maps() first")

    def close(self) -> None:
        """Release this process's handles; pinned maps and programs stay for a restart."""
        if self._programs is not None:
            self._programs.close()
            self._programs = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def destroy(self) -> None:
        """Detach every XDP and TC attachment made here, close, and remove the pin dir."""
        errors: list[str] = []
        for netns, ifname in list(self._xdp):
            try:
                self.detach_xdp(ifname, netns=netns)
            except DataplaneError as exc:
                errors.append(str(exc))
        for netns, ifname in list(self._tc):
            try:
                self.detach_tc(ifname, netns=netns)
            except DataplaneError as exc:
                errors.append(str(exc))
        from steerd.daemon.dataplane.learn import remove_learner

        remove_learner(self.config.pin_dir)  # the egress program, if learned mode was on
        self.close()
        shutil.rmtree(self.config.pin_dir, ignore_errors=True)
        if errors:
            raise DataplaneError("; ".join(errors))

    def __enter__(self) -> Dataplane:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- attachments ----------------------------------------------------------------------

    def attach_reuseport(self, sock: socket.socket) -> None:
        """Attach the steering program to ``sock``'s reuseport group (one member suffices)."""
        steering.attach_reuseport(sock, self._need_loaded().steer_fd)

    def attach_pinned_steering(self, sock: socket.socket) -> bool:
        """Attach the steering program a previous run pinned to ``sock``'s group, before
        this run's is compiled; False if there is none (a first start)."""
        return steering.attach_pinned_steering(sock, self.config.pin_dir)

    def attach_xdp(self, ifname: str, mode: str = "auto", netns: str | None = None) -> str:
        """Attach the XDP guard to ``ifname`` (in network namespace ``netns``).

        mode "native" (driver), "generic" (SKB) or "auto" (native if the driver has it, else
        generic). Returns the mode used.
        """
        used, flags = guard.attach_xdp(self._need_loaded().guard_fd, ifname, mode, netns)
        self._xdp[(netns, ifname)] = flags
        return used

    def detach_xdp(self, ifname: str, netns: str | None = None) -> None:
        """Remove the XDP guard from ``ifname``."""
        flags = self._xdp.pop((netns, ifname), guard.XDP_FLAGS_DRV_MODE)
        guard.detach_xdp(ifname, flags, netns)

    def attach_tc(self, ifname: str, netns: str | None = None) -> None:
        """Attach the guard at TC ingress (tcx) of ``ifname`` instead of XDP.

        Same verdicts and counters as the XDP guard. For virtual interfaces: on veth, any
        native XDP program makes the kernel copy every locally built skb (see
        docs/PERFORMANCE.md), while TC sees the skb as it is.
        """
        guard.attach_tc(self._need_loaded().guard_tc_fd, ifname, netns)
        self._tc.add((netns, ifname))

    def detach_tc(self, ifname: str, netns: str | None = None) -> None:
        """Remove the TC guard from ``ifname``."""
        self._tc.discard((netns, ifname))
        guard.detach_tc(self._need_loaded().guard_tc_fd, ifname, netns)

    # -- sockets --------------------------------------------------------------------------

    def worker_cookie(self, slot: int) -> int | None:
        """The socket cookie (SO_COOKIE) of the socket in ``slot``, None if empty; a
        restarted daemon uses it to tell which slots still hold a live worker."""
        return steering.sockarray_cookie(self.map_fd("workers"), slot)

    def set_worker(self, slot: int, sock: socket.socket | int) -> None:
        """Worker slot ``slot`` (the number its CIDs carry) is ``sock``."""
        steering.sockarray_set(self.map_fd("workers"), "workers", slot, sock)

    def remove_worker(self, slot: int) -> None:
        """Empty a worker slot: its traffic goes to a classifier from now on."""
        steering.sockarray_delete(self.map_fd("workers"), "workers", slot)

    def set_classifier(self, index: int, sock: socket.socket | int) -> None:
        """Classifier socket ``index`` (0..classifier_slots-1) is ``sock``."""
        steering.sockarray_set(self.map_fd("classifiers"), "classifiers", index, sock)

    def remove_classifier(self, index: int) -> None:
        steering.sockarray_delete(self.map_fd("classifiers"), "classifiers", index)

    # -- routes ---------------------------------------------------------------------------

    def add_route(self, dcid: bytes, slot: int, ttl: float | None = 10.0) -> None:
        """Long-header packets with this client-chosen DCID go to worker ``slot`` for
        ``ttl`` seconds (None: until deleted or evicted by the LRU)."""
        steering.add_route(self.map_fd("initial_routes"), dcid, slot, ttl)

    def delete_route(self, dcid: bytes) -> bool:
        """Forget a route; False if there was none."""
        return steering.delete_route(self.map_fd("initial_routes"), dcid)

    def routes(self) -> dict[bytes, tuple[int, int]]:
        """DCID -> (slot, expires_ns) for every route in the map."""
        return steering.routes(self.map_fd("initial_routes"))

    # -- flood guard ----------------------------------------------------------------------

    def set_flood_guard(
        self, rate: float, burst: int, v4_prefix_len: int = 24, v6_prefix_len: int = 48,
        total_rate: float = 0.0, total_burst: int = 1,
    ) -> None:
        """Allow each source prefix ``rate`` new Initials (and 0-RTT) per second, ``burst``
        at once; and all prefixes together ``total_rate`` (0: no total cap)."""
        guard.set_flood_guard(self.map_fd("guard_config"), self.map_fd("flood_buckets"), rate,
                              burst, v4_prefix_len, v6_prefix_len, total_rate, total_burst)

    def disable_flood_guard(self) -> None:
        guard.disable_flood_guard(self.map_fd("guard_config"))

    # -- kernel Retry and token check (docs/DATAPLANE.md "Kernel Retry") ----------------------

    def set_retry(self, token_key: bytes, token_lifetime: float, rate: float = 0.0,
                  burst: int = 1, total_rate: float = 0.0, total_burst: int = 1,
                  proven_ttl: float = 0.0, proven_rate: float = 1000.0) -> None:
        """The token key (tokens of ours are checked in the guard from now on), the
        Retries' budget per source prefix and in all, and how long a token proves its
        address (``guard.set_retry``); Retry mode is :meth:`set_retry_until`."""
        guard.set_retry(self.map_fd("guard_config"), token_key=token_key,
                        token_lifetime=token_lifetime, rate=rate, burst=burst,
                        total_rate=total_rate, total_burst=total_burst,
                        buckets_fd=self.map_fd("flood_buckets"), proven_ttl=proven_ttl,
                        proven_rate=proven_rate)

    def set_retry_until(self, until_ns: int) -> None:
        """Kernel Retry mode on while CLOCK_MONOTONIC < ``until_ns`` (guard.RETRY_ALWAYS:
        always, 0: off)."""
        guard.set_retry_until(self.map_fd("guard_config"), until_ns)

    def set_retry_auto(self, initial_rate: float, burst: int, hold: float) -> None:
        """Retry mode on in the guard itself while token-less Initials exceed
        ``initial_rate`` per second (then for ``hold`` s more)."""
        guard.set_retry_auto(self.map_fd("guard_config"), initial_rate, burst, hold)

    def disable_retry(self) -> None:
        guard.disable_retry(self.map_fd("guard_config"))

    def guard_config(self) -> guard.GuardConfig:
        return guard.read_guard_config(self.map_fd("guard_config"))

    # -- counters -------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter named in bpf/steerd.h, summed over CPUs."""
        return counters.read_counters(self.map_fd("counters"), self.ncpus, self._counter_names)
