"""Benchmark: new first flights per second through the steerd daemon, and the latency it adds.

    .venv/bin/python bench/daemon.py [--quick | --smoke] [--json] [--classifiers N]
        [--daemon-cpus LIST] [--nice N] [--py-spy FILE | --profile FILE]
    .venv/bin/python bench/daemon.py --stages N      # CPU cost per flight of each stage

What is measured (issue 4 §8): real aioquic client first flights (one 1200-byte Initial each,
every one with its own DCID, so each is a new connection the daemon has never seen) sent from
a client network namespace to the service address in a server namespace, where

- direct: one plain UDP socket is bound on the service address and port (no steerd): the
  baseline path, veth -> UDP socket;
- steerd: ``steerd run`` owns the port; the benchmark registers an app over the control socket
  and receives its worker sockets; every flight goes veth -> steering program -> classifier
  socket -> daemon (decrypt, parse, decide, write initial_routes, raw re-injection with the
  client's address) -> steering program -> worker socket.

Both modes run in the same invocation on the same flights (a fresh daemon has no route for
any of them). A C sender (bench/daemon/sender.c) replays the flights paced to a rate and
records each one's CLOCK_MONOTONIC send time; a C receiver (bench/daemon/receiver.c) holding
the app's sockets records each flight's arrival time (flights are matched by DCID; nothing is
embedded in them) and checks that each arrives from the client's own address. Sender and
receiver share CPU 0; the daemon gets CPU 1 (two cores), or every CPU with more than one
classifier process.

Phases: direct at 1,000/s, 5,000/s and the 20,000/s target; then the daemon: a warm-up,
1,000/s, 5,000/s, the 20,000/s target, a saturation burst (unpaced) whose delivered rate
estimates capacity, and paced steps around that capacity; the highest step with < 1% lost and
>= 95% delivered is the sustained throughput. Reported per phase: offered and delivered
flights/s, loss, latency p50/p99 (sender's send to receiver's read), and the daemon's CPU time
per flight and its run-queue wait (on a shared machine, how much of a result is other load);
added latency = steerd minus direct at the same rate.

Flights are slow to make (aioquic spends ~2.5 ms per client: key generation), so they are made
once in parallel processes and cached in .cache/bench/daemon-flights-N.bin (fixed 1200-byte
records); a larger cached file serves a smaller request. ``--py-spy FILE`` samples the daemon
(py-spy must be installed) and reports its time by part; ``--profile FILE`` runs it under
cProfile instead (slower: the rates are then the profiled daemon's).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from deploy.netns import NetnsPair, netns_pair  # noqa: E402
from steerd.app.client import ControlClient  # noqa: E402
from steerd.app.protocol import ControlError, Registration  # noqa: E402
from steerd.daemon.dataplane.netns import netns_path  # noqa: E402

PORT = 4433
METRICS_PORT = 19444
RECORD = 1200  # aioquic pads every client Initial datagram to exactly this
ALPN = "h3"
SERVER_NAME = "bench.steerd.test"
CACHE = ROOT / ".cache" / "bench"
STEERD = str(ROOT / ".venv" / "bin" / "steerd")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
CPU_CLIENT = "0"  # sender and receiver (app)
CPU_DAEMON = "1"
SENDER_SOCKETS = 16  # distinct client source ports
LOSS_OK = 0.01
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by CPython


# -- flights ----------------------------------------------------------------------------------


def _make_chunk(count: int) -> bytes:
    """``count`` real aioquic client first flights, concatenated (run in a worker process)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    out = bytearray()
    for _ in range(count):
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                   server_name=SERVER_NAME)
        conn = QuicConnection(configuration=config)
        conn.connect(("198.18.0.2", PORT), now=0.0)
        datagrams = [data for data, _ in conn.datagrams_to_send(now=0.0)]
        if len(datagrams) != 1 or len(datagrams[0]) != RECORD:
            raise RuntimeError(f"aioquic made {[len(d) for d in datagrams]}; expected [1200]")
        out += datagrams[0]
    return bytes(out)


def dcid_of(record: bytes) -> bytes:
    return record[6 : 6 + record[5]]


def flights_file(count: int, log: Callable[[str], None]) -> Path:
    """A file of at least ``count`` distinct first flights: cached, else made and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    have = []
    for p in CACHE.glob("daemon-flights-*.bin"):
        try:
            n = int(p.stem.rsplit("-", 1)[1])
        except ValueError:
            continue
        if n >= count and p.stat().st_size == n * RECORD:
            have.append((n, p))
    if have:
        return min(have)[1]
    procs = os.cpu_count() or 1
    log(f"making {count:,} aioquic first flights in {procs} processes (cached for next time)")
    started = time.monotonic()
    chunks = [count // (procs * 8)] * (procs * 8)
    chunks[-1] += count - sum(chunks)
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        data = b"".join(pool.map(_make_chunk, chunks))
    dcids = {dcid_of(data[i : i + RECORD])[:8] for i in range(0, len(data), RECORD)}
    if len(dcids) != count:
        raise RuntimeError("two flights share a DCID prefix; the receiver could not tell them")
    path = CACHE / f"daemon-flights-{count}.bin"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    log(f"made them in {time.monotonic() - started:.0f} s: {path}")
    return path


# -- programs ---------------------------------------------------------------------------------


def build(workdir: Path) -> tuple[str, str]:
    """Compile the sender and the receiver (gcc is part of the toolchain deploy/ sets up)."""
    out = []
    for name in ("sender", "receiver"):
        exe = workdir / name
        subprocess.run(["gcc", "-O2", "-Wall", f"-I{HERE / 'common'}", "-o", str(exe),
                        str(HERE / "daemon" / f"{name}.c")],
                       check=True)
        out.append(str(exe))
    return out[0], out[1]


@dataclass
class Bench:
    """One run's fixed parts (namespaces, flights, built programs) and its phase results."""

    pair: NetnsPair
    flights: Path
    count: int
    sender: str
    receiver: str
    workdir: Path
    verbose: bool
    results: list[dict[str, Any]] = field(default_factory=list)
    daemon_pid: int | None = None
    nice: tuple[str, ...] = ()  # ("nice", "-n", N): the benchmark's processes, daemon included

    def log(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def rcvbuf_errors(self) -> int:
        """UDP RcvbufErrors in the server namespace: datagrams a full socket queue dropped."""
        text = subprocess.run(["nsenter", f"--net={netns_path(self.pair.server)}", "cat",
                               "/proc/net/snmp"], capture_output=True, text=True,
                              check=True).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])

    def daemon_cpu(self) -> tuple[float, float]:
        """The daemon's CPU seconds so far (user + system; its classifier processes included),
        and its seconds spent runnable but waiting for a CPU (schedstat run_delay): the second
        says whether other processes on the machine, not the daemon's own cost, limited what
        it did. (0, 0) without a daemon."""
        if self.daemon_pid is None:
            return 0.0, 0.0
        cpu = wait = 0.0
        for pid in _process_tree(self.daemon_pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/schedstat") as f:
                    wait += int(f.read().split()[1]) / 1e9
            except (FileNotFoundError, ProcessLookupError):
                continue
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return cpu, wait

    def phase(self, mode: str, name: str, fds: Sequence[int], span: tuple[int, int],
              rate: float, batch: int) -> dict[str, Any]:
        """Send flights ``span`` at ``rate`` (0 = unpaced) and time their arrival at ``fds``."""
        lo, hi = span
        n = hi - lo
        if self.daemon_pid is not None and not _alive(self.daemon_pid):
            raise RuntimeError(f"{mode}/{name}: steerd (pid {self.daemon_pid}) has exited")
        send_out, recv_out = self.workdir / "send.bin", self.workdir / "recv.bin"
        expect = n / rate if rate else n / 100_000
        errors_before = self.rcvbuf_errors()
        cpu_before, wall_before = self.daemon_cpu(), time.monotonic()
        recv = subprocess.Popen(
            [*self.nice, "taskset", "-c", CPU_CLIENT, self.receiver, str(self.flights), str(RECORD),
             str(self.count), str(lo), str(hi), self.pair.client_v4, "300",
             str(expect + 30), str(recv_out), *map(str, fds)],
            pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{mode}/{name}: the receiver did not start")
            send = subprocess.run(
                ["ip", "netns", "exec", self.pair.client, *self.nice, "taskset", "-c", CPU_CLIENT,
                 self.sender, self.pair.server_v4, str(PORT), str(self.flights), str(RECORD),
                 str(lo), str(hi), str(rate), str(batch), str(SENDER_SOCKETS), str(send_out)],
                capture_output=True, text=True, timeout=expect + 30, check=False,
            )
            assert recv.stdin is not None
            recv.stdin.close()  # sender done: the receiver drains, then stops when idle
            out = recv.stdout.read()  # the receiver's own deadline bounds this
            recv.wait(timeout=10)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        if send.returncode != 0 or recv.returncode != 0:
            raise RuntimeError(f"{mode}/{name}: sender rc {send.returncode} {send.stderr} "
                               f"receiver rc {recv.returncode}")
        cpu_after = self.daemon_cpu()
        cpu, waited = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        sent, failed, elapsed = send.stdout.split()
        got = json.loads(out)
        # The daemon's busy window: from the phase's start to the last arrival (the receiver's
        # idle wait after it is not the daemon's); time.monotonic is CLOCK_MONOTONIC too.
        wall = (int(got["last_ns"]) / 1e9 if int(got["in_range"]) else time.monotonic()) \
            - wall_before
        sends = _int64s(send_out.read_bytes())
        arrivals = _int64s(recv_out.read_bytes())
        lat_us = sorted((a - s) / 1e3 for s, a in zip(sends, arrivals, strict=True) if a and s)
        received = int(got["in_range"])
        first_send = min((s for s in sends if s), default=0)
        window = (int(got["last_ns"]) - first_send) / 1e9 if received else 0.0
        result = {
            "mode": mode, "phase": name, "flights": n,
            "offered_per_s": rate or None,
            "send_seconds": float(elapsed),
            "sent_per_s": int(sent) / float(elapsed) if float(elapsed) > 0 else None,
            "send_failed": int(failed),
            "received": received,
            "lost": n - received,
            "loss": (n - received) / n,
            # Flights delivered per second, from the first send to the last arrival.
            "delivered_per_s": received / window if window > 0 else None,
            "latency_us": _percentiles(lat_us),
            "wrong_source": int(got["wrong_source"]),
            "duplicates": int(got["duplicates"]),
            "stray": int(got["other"]),
            "per_socket": got["per_fd"],
            "rcvbuf_errors": self.rcvbuf_errors() - errors_before,
            # The daemon's own CPU time (user + system, which includes the kernel work of
            # re-injection done in its context): per flight it is the cost that does not
            # depend on what else the machine runs; the share says whether it had a whole CPU.
            "daemon_cpu_seconds": cpu if self.daemon_pid else None,
            "daemon_cpu_share": cpu / wall if self.daemon_pid else None,
            "daemon_runqueue_wait_share": waited / wall if self.daemon_pid else None,
            "daemon_cpu_us_per_flight": 1e6 * cpu / received
            if self.daemon_pid and received else None,
        }
        self.results.append(result)
        lat = result["latency_us"]
        self.log(f"  {mode:<6} {name:<12} offered {_rate(rate):>8} delivered "
                 f"{_rate(result['delivered_per_s']):>8}/s loss {100 * result['loss']:6.2f}%"
                 f"  p50 {lat.get('p50', float('nan')):8.0f} us p99 "
                 f"{lat.get('p99', float('nan')):8.0f} us  rcvbuf drops "
                 f"{result['rcvbuf_errors']}" + (
                     f"  daemon {result['daemon_cpu_us_per_flight']:.0f} us CPU/flight, "
                     f"busy {100 * result['daemon_cpu_share']:.0f}% of a CPU, waiting for "
                     f"one {100 * result['daemon_runqueue_wait_share']:.0f}%"
                     if result["daemon_cpu_us_per_flight"] else ""))
        return result


def _alive(pid: int) -> bool:
    """False once ``pid`` has exited (a child of ours stays a zombie until reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _process_tree(root: int) -> list[int]:
    """``root`` and its child processes (the daemon forks its classifier processes)."""
    pids = [root]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == root:
                        pids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
    return pids


def _int64s(data: bytes) -> list[int]:
    import array

    values = array.array("q")
    values.frombytes(data)
    return values.tolist()


def _percentiles(sorted_us: list[float]) -> dict[str, float]:
    if not sorted_us:
        return {}

    def pct(p: float) -> float:
        return sorted_us[min(len(sorted_us) - 1, int(p / 100 * len(sorted_us)))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9),
            "max": sorted_us[-1], "mean": statistics.fmean(sorted_us), "n": len(sorted_us)}


def _rate(value: float | None) -> str:
    return "max" if not value else f"{value:,.0f}"


# -- the daemon -------------------------------------------------------------------------------


@contextmanager
def daemon(pair: NetnsPair, workdir: Path, profile: str | None, classifiers: int,
           cpus: str, nice: Sequence[str]) -> Iterator[tuple[str, int]]:
    """``steerd run`` in the server namespace on CPU 1; yields the control socket path and the
    daemon's pid (nsenter and taskset exec into it); stops
    it and checks that it removed its pins, whatever happened."""
    control = str(workdir / "control.sock")
    config = workdir / "steerd.toml"
    config.write_text(f"""
[listen]
addresses = ["{pair.server_v4}"]
port = {PORT}
[control]
path = "{control}"
[metrics]
address = "127.0.0.1"
port = {METRICS_PORT}
[[acl]]
uids = [0]
alpn = ["*"]
server_names = ["*"]
[limits]
classifiers = {classifiers}
[flood]
# What is measured is classification and re-injection of complete first flights; the
# flights here cannot answer a Retry, which the daemon would turn on under this load.
retry = "off"
""")
    pin_dir = f"/sys/fs/bpf/steerd-bench-{uuid.uuid4().hex[:8]}"
    run = [STEERD, "run", "-c", str(config), "--pin-dir", pin_dir]
    if profile:
        run = [PYTHON, "-m", "cProfile", "-o", profile, *run]
    log_path = workdir / "daemon.log"
    with open(log_path, "w") as err:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path(pair.server)}", *nice, "taskset", "-c", cpus, *run],
            stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "steerd: classifying", then "steerd: ready"
        while line.strip() == "steerd: classifying":
            line = proc.stdout.readline()  # blocks until "ready" or the daemon exits
        if "ready" not in line:
            raise RuntimeError(f"steerd did not start:\n{log_path.read_text()}")
        # For attaching a profiler by hand to this daemon, and only this one.
        print(f"bench/daemon: steerd running as pid {proc.pid}", file=sys.stderr, flush=True)
        yield control, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.isdir(pin_dir):  # a stopped daemon leaves its data plane and its socket
            subprocess.run(  # jail (cgroup hooks) for the next run: purge removes them all
                ["nsenter", f"--net={netns_path(pair.server)}", STEERD, "purge", "-c",
                 str(config), "--pin-dir", pin_dir], capture_output=True, check=False)
        if proc.returncode not in (0, -15) or os.environ.get("BENCH_DAEMON_LOG"):
            print(f"bench/daemon: steerd exited {proc.returncode}:\n{log_path.read_text()}",
                  file=sys.stderr)


def register(control: str) -> tuple[ControlClient, Registration]:
    client = ControlClient(control)
    try:
        reg = client.register("bench", [ALPN], workers=2)
    except BaseException:
        client.close()
        raise
    return client, reg



# -- stages: the classifier path's CPU cost per flight, piece by piece, in this process --------


def stages(path: Path, count: int) -> list[tuple[str, float]]:
    """CPU microseconds per flight of each stage of the daemon's per-flight work, measured with
    ``time.thread_time`` (the scheduler's run time of this thread), so other load on the
    machine, which swings the end-to-end rates, hardly moves them. The I/O stages run for real
    in a server namespace: route writes into a loaded data plane's initial_routes, raw
    re-injection into a bound UDP socket, recvmsg with IP_PKTINFO as the daemon reads."""

    from quic.crypto import derive_initial_keys, open_packet
    from quic.flight import AssemblerConfig
    from quic.packet import parse_long_header
    from steerd.daemon.classifier import Classifier, Flight, FlightFront, Origin
    from steerd.daemon.config import AclRule, Config, PolicyConfig
    from steerd.daemon.control import bind_group_socket
    from steerd.daemon.dataplane import Dataplane, DataplaneConfig
    from steerd.daemon.metrics import Metrics
    from steerd.daemon.registry import Peer, Registry
    from steerd.daemon.reinject import Reinjector
    from steerd.daemon.service import receive

    raw = path.read_bytes()[: count * RECORD]
    flights = [raw[i : i + RECORD] for i in range(0, len(raw), RECORD)]
    n = len(flights)
    client, service = ("198.18.0.1", 40000), ("198.18.0.2", PORT)
    origin = Origin(client, service, 0)
    cfg = Config()
    out: list[tuple[str, float]] = []

    def cpu(label: str, fn: Any) -> None:
        started = time.thread_time()
        fn()
        out.append((label, 1e6 * (time.thread_time() - started) / n))

    def registry() -> Registry:
        reg = Registry(cfg.cid, PolicyConfig(), [AclRule(uids=(0,), alpn=("*",))], 256, 64)
        reg.register("bench", [ALPN], [], 2, False, Peer(0, 0), "bench")
        return reg

    def classifier() -> Classifier:
        return Classifier(registry(), lambda g, d, s: None, lambda c, s, ds: len(ds),
                          lambda *a: None, layout=cfg.cid,
                          assembler=AssemblerConfig(max_pending=n + 1))

    def keys() -> None:
        for d in flights:
            h = parse_long_header(d, 0)
            derive_initial_keys(h.dcid, h.version, server=False)

    def keys_open() -> None:
        for d in flights:
            h = parse_long_header(d, 0)
            open_packet(d, h, derive_initial_keys(h.dcid, h.version, server=False))

    events: list[Any] = []

    def front() -> None:
        f = FlightFront(AssemblerConfig(max_pending=n + 1))
        events.extend(f.feed(d, origin, 1.0) for d in flights)

    cpu("header + Initial key derivation (quic/crypto)", keys)
    cpu("  + header protection + AEAD open", keys_open)
    cpu("front: all of quic/ (+ frames, CRYPTO, ClientHello, assembly)", front)
    assert all(isinstance(e, Flight) for e in events), "a flight did not complete"
    metered = classifier()
    each: list[float] = []

    def timed() -> None:
        for d in flights:
            started = time.thread_time()
            metered.on_datagram(d, origin, 1.0)
            each.append(time.thread_time() - started)

    cpu("front + decision (counted in a tally), route/re-inject as no-ops", timed)
    metrics = Metrics()
    cpu("  + folding the tally into Prometheus (on the daemon's timer)",
        lambda: metrics.absorb(metered.tally.take()))
    each.sort()
    # The code's own tail (CPU time, so no scheduler in it): GC pauses, slow paths.
    out.append(("  p99 of one flight", 1e6 * each[int(0.99 * (n - 1))]))
    out.append(("  p99.9 of one flight", 1e6 * each[int(0.999 * (n - 1))]))
    reg = registry()
    cpu("  of which registry.decide", lambda: [reg.decide(SERVER_NAME, (ALPN,)) for _ in flights])
    with netns_pair("bs") as pair:
        pin_dir = f"/sys/fs/bpf/steerd-bench-{uuid.uuid4().hex[:8]}"
        dp = Dataplane(DataplaneConfig(layout=cfg.cid, port=PORT, classifier_slots=1,
                                       pin_dir=pin_dir))

        def setup() -> tuple[Reinjector, socket.socket]:
            injector = Reinjector()
            injector._sock(socket.AF_INET)  # the raw socket must live in this namespace
            return injector, bind_group_socket(pair.server_v4, PORT, classifier=True)

        injector, sink = pair.run_server(setup)
        try:
            dp.load()
            sink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            cpu("route write: Dataplane.add_route (bpf syscall)",
                lambda: [dp.add_route(d[6:14], 1, ttl=10.0) for d in flights])
            cpu("re-injection: Reinjector.send (raw socket, local delivery)",
                lambda: [injector.send(client, service, (d,)) for d in flights])
            got: list[int] = []

            def drain() -> None:
                while len(got) < n:
                    batch = [len(d) for d, _ in receive(sink, 0, pair.server_v4, PORT, {})]
                    if not batch:
                        break
                    got.extend(batch)

            cpu("socket read: recvmsg + IP_PKTINFO (steerd.daemon.receive)", drain)
            if len(got) != n:
                raise RuntimeError(f"re-injected {n} datagrams, read back {len(got)}")
        finally:
            sink.close()
            injector.close()
            dp.destroy()
    return out


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    latency_rate: float
    latency_seconds: float
    low_rate: float  # a second latency point, below the daemon's capacity
    low_seconds: float
    target_rate: float
    target_seconds: float
    warmup: int
    saturation: int
    step_seconds: float
    step_fractions: tuple[float, ...]


FULL = Plan(5000, 2.0, 1000, 2.0, 20000, 1.0, 1000, 15000, 1.0, (0.6, 0.8, 0.9, 1.0, 1.1, 1.25))
QUICK = Plan(5000, 0.5, 1000, 0.5, 20000, 0.15, 300, 3000, 0.3, (0.7, 1.0))
# A functional check in seconds (tests/test_bench_daemon.py); its numbers mean nothing.
SMOKE = Plan(5000, 0.1, 1000, 0.1, 20000, 0.02, 50, 500, 0.1, (0.7,))


def flights_needed(plan: Plan, capacity_guess: float = 8000) -> int:
    """Flights one run uses; the capacity steps are cut short if the daemon is faster."""
    return int(plan.latency_rate * plan.latency_seconds + plan.target_rate * plan.target_seconds
               + plan.low_rate * plan.low_seconds
               + plan.warmup + plan.saturation
               + sum(plan.step_fractions) * capacity_guess * plan.step_seconds)


class Pool:
    """Hands out fresh flight index ranges; a daemon must never see a DCID twice."""

    def __init__(self, count: int, start: int = 0) -> None:
        self.count, self.next = count, start

    def left(self) -> int:
        return self.count - self.next

    def take(self, n: int) -> tuple[int, int]:
        n = min(n, self.count - self.next)
        if n <= 0:
            raise RuntimeError("out of flights; run with a larger --flights")
        span = (self.next, self.next + n)
        self.next += n
        return span


def run(args: argparse.Namespace, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    count = args.flights or flights_needed(plan)
    path = flights_file(count, log)
    count = path.stat().st_size // RECORD
    with tempfile.TemporaryDirectory(prefix="steerd-bench-") as tmp, \
            netns_pair("bd") as pair:
        workdir = Path(tmp)
        sender, receiver = build(workdir)
        nice = ("nice", "-n", str(args.nice)) if args.nice else ()
        bench = Bench(pair, path, count, sender, receiver, workdir, True, nice=nice)
        pool = Pool(count)
        lat_span = pool.take(int(plan.latency_rate * plan.latency_seconds))
        target_span = pool.take(int(plan.target_rate * plan.target_seconds))
        low_span = pool.take(int(plan.low_rate * plan.low_seconds))

        # Direct: a plain socket on the service address and port; nothing else listens.
        sock = pair.server_socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((pair.server_v4, PORT))
            fds = [sock.fileno()]
            bench.phase("direct", "warmup", fds, pool.take(plan.warmup), 1000, 1)
            bench.phase("direct", "latency", fds, lat_span, plan.latency_rate, 1)
            bench.phase("direct", "latency low", fds, low_span, plan.low_rate, 1)
            bench.phase("direct", "target", fds, target_span, plan.target_rate, 8)
        finally:
            sock.close()

        cpus = args.daemon_cpus or (CPU_DAEMON if args.classifiers == 1 else "0,1")
        with daemon(pair, workdir, args.profile, args.classifiers, cpus, nice) as (control, pid):
            bench.daemon_pid = pid
            client, reg = register(control)
            spy: subprocess.Popen[bytes] | None = None
            try:
                fds = [s.fileno() for s in reg.sockets]
                bench.phase("steerd", "warmup", fds, pool.take(plan.warmup), 1000, 1)
                spy = start_py_spy(args.py_spy, pid, args.classifiers > 1) if args.py_spy else None
                bench.phase("steerd", "latency low", fds, low_span, plan.low_rate, 1)
                bench.phase("steerd", "latency", fds, lat_span, plan.latency_rate, 1)
                bench.phase("steerd", "target", fds, target_span, plan.target_rate, 8)
                sat = bench.phase("steerd", "saturation", fds, pool.take(plan.saturation), 0, 64)
                capacity = sat["delivered_per_s"] or 1000.0
                for i, fraction in enumerate(plan.step_fractions):
                    rate = max(500.0, round(capacity * fraction, -2))
                    share = pool.left() // (len(plan.step_fractions) - i)
                    span = pool.take(min(int(rate * plan.step_seconds), share))
                    bench.phase("steerd", f"step {fraction:.2f}", fds, span, rate, 8)
                try:  # diagnostics only: a status failure must not lose the measurements
                    status = client.status()
                except (ControlError, OSError) as exc:
                    status = {"error": str(exc)}
                if spy is not None:
                    stop_py_spy(spy)
                    spy = None
            finally:
                if spy is not None:
                    stop_py_spy(spy)
                reg.close()
                client.close()
    return summarize(args, plan, bench.results, status)


def summarize(args: argparse.Namespace, plan: Plan, results: list[dict[str, Any]],
              status: dict[str, Any]) -> dict[str, Any]:
    def find(mode: str, phase: str) -> dict[str, Any]:
        return next(r for r in results if r["mode"] == mode and r["phase"] == phase)

    d_lat, s_lat = find("direct", "latency")["latency_us"], find("steerd", "latency")["latency_us"]
    d_low = find("direct", "latency low")["latency_us"]
    s_low = find("steerd", "latency low")["latency_us"]
    steps = [r for r in results if r["mode"] == "steerd"
             and (r["phase"].startswith("step") or r["phase"] == "target")]
    # Sustained: (almost) nothing lost and delivered as fast as offered, i.e. no queue that
    # grows for the whole step (the classifier socket's 4 MB buffer hides one for a while).
    sustained = [r["offered_per_s"] for r in steps
                 if r["offered_per_s"] and r["loss"] < LOSS_OK
                 and (r["delivered_per_s"] or 0) >= 0.95 * r["offered_per_s"]]
    target = find("steerd", "target")
    busy = [r["daemon_cpu_us_per_flight"] for r in results if r["mode"] == "steerd"
            and r["phase"] in ("target", "saturation") and r["daemon_cpu_us_per_flight"]]
    return {
        "quick": args.quick,
        "smoke": args.smoke,
        "code": code_version(),
        "plan": plan.__dict__,
        "cpus": os.cpu_count(),
        "classifiers": args.classifiers,
        "nice": args.nice,
        "daemon_cpus": args.daemon_cpus or (CPU_DAEMON if args.classifiers == 1 else "0,1"),
        "load_average_1min": os.getloadavg()[0],
        "first_flights_per_s": {
            "saturation_delivered": find("steerd", "saturation")["delivered_per_s"],
            "max_sustained_offered_loss_lt_1pct": max(sustained, default=None),
            "at_target": {"offered": target["offered_per_s"],
                          "delivered": target["delivered_per_s"], "loss": target["loss"]},
            "target": plan.target_rate,
            # What one whole CPU would classify at the daemon's measured CPU cost per flight
            # under load: the ceiling on a machine where nothing else competes for the CPU.
            "daemon_cpu_us_per_flight": statistics.median(busy) if busy else None,
            "one_cpu_estimate": 1e6 / statistics.median(busy) if busy else None,
        },
        "latency_at_rate": plan.latency_rate,
        "latency_us": {"direct": d_lat, "steerd": s_lat},
        "added_latency_us": {k: s_lat[k] - d_lat[k] for k in ("p50", "p99", "p999", "mean")
                             if k in s_lat and k in d_lat},
        "added_p99_target_us": 1000.0,
        "low_rate": plan.low_rate,
        "latency_low_us": {"direct": d_low, "steerd": s_low},
        "added_latency_low_us": {k: s_low[k] - d_low[k] for k in ("p50", "p99", "p999", "mean")
                                 if k in s_low and k in d_low},
        "wrong_source_total": sum(r["wrong_source"] for r in results),
        "daemon_classifier_drops": status.get("classifier_drops", {}),
        "daemon_counters": {k: v for k, v in status.get("counters", {}).items() if v},
        "phases": results,
    }


def code_version() -> str:
    """The commit measured, and whether the daemon's code had uncommitted changes."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "steerd", "quic",
                            "bpf"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{head}{'+dirty' if dirty else ''}"


def report(summary: dict[str, Any]) -> None:
    print(f"{'mode':<7} {'phase':<11} {'flights':>7} {'offered/s':>10} {'delivered/s':>11}"
          f" {'loss':>7} {'p50 us':>8} {'p99 us':>8} {'rcvbuf':>6}")
    for r in summary["phases"]:
        lat = r["latency_us"]
        print(f"{r['mode']:<7} {r['phase']:<11} {r['flights']:>7} {_rate(r['offered_per_s']):>10}"
              f" {_rate(r['delivered_per_s']):>11} {100 * r['loss']:>6.2f}%"
              f" {lat.get('p50', float('nan')):>8.0f} {lat.get('p99', float('nan')):>8.0f}"
              f" {r['rcvbuf_errors']:>6}")
    ff = summary["first_flights_per_s"]
    print()
    print(f"first flights/s through steerd: saturation {_rate(ff['saturation_delivered'])}/s "
          f"delivered; highest paced rate sustained (< 1% loss, >= 95% delivered) "
          f"{_rate(ff['max_sustained_offered_loss_lt_1pct'])}/s; at the {ff['target']:,.0f}/s "
          f"target: {_rate(ff['at_target']['delivered'])}/s delivered, "
          f"{100 * ff['at_target']['loss']:.1f}% lost")
    if ff["one_cpu_estimate"]:
        waits = [r["daemon_runqueue_wait_share"] for r in summary["phases"]
                 if r["phase"] in ("target", "saturation") and r["mode"] == "steerd"]
        print(f"daemon CPU per flight under load {ff['daemon_cpu_us_per_flight']:.0f} us -> "
              f"{ff['one_cpu_estimate']:,.0f} flights per CPU-second (its processes were "
              f"runnable but waiting for a CPU {100 * max(waits):.0f}% of the time at the target "
              f"or saturation; load average {summary['load_average_1min']:.1f})")
    add = summary["added_latency_us"]
    d, s = summary["latency_us"]["direct"], summary["latency_us"]["steerd"]
    print(f"latency at {summary['latency_at_rate']:,.0f} flights/s: direct p50 "
          f"{d.get('p50', 0):.0f} us p99 {d.get('p99', 0):.0f} us; steerd p50 "
          f"{s.get('p50', 0):.0f} us p99 {s.get('p99', 0):.0f} us; added p50 "
          f"{add.get('p50', 0):.0f} us p99 {add.get('p99', 0):.0f} us (target <= 1000 us)")
    low, dl, sl = summary["added_latency_low_us"], *summary["latency_low_us"].values()
    print(f"latency at {summary['low_rate']:,.0f} flights/s: direct p50 {dl.get('p50', 0):.0f} us"
          f" p99 {dl.get('p99', 0):.0f} us; steerd p50 {sl.get('p50', 0):.0f} us p99 "
          f"{sl.get('p99', 0):.0f} us; added p50 {low.get('p50', 0):.0f} us p99 "
          f"{low.get('p99', 0):.0f} us")
    print(f"datagrams arriving from a wrong source address: {summary['wrong_source_total']}")
    if summary["daemon_classifier_drops"]:
        print(f"daemon classifier drops: {summary['daemon_classifier_drops']}")


def start_py_spy(path: str, pid: int, children: bool) -> subprocess.Popen[bytes]:
    """Sample the daemon (every phase after the warm-up) without stopping it; py-spy needs no
    change in the daemon, and unlike cProfile it does not slow it down."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(ROOT / ".venv" / "bin"))
    if exe is None:
        raise RuntimeError("--py-spy needs py-spy on PATH (pip install py-spy)")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "500", "--nonblocking",
                             "--format", "raw", "--output", path,
                             *(["--subprocesses"] if children else [])], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Where a sample's time goes: the innermost frame from one of these files names the part.
PARTS = (
    ("prometheus_client/", "metrics (prometheus-client)"),
    ("steerd/daemon/reinject.py", "re-injection (build IP/UDP, raw sendto)"),
    ("steerd/daemon/dataplane/", "route write (initial_routes, bpf syscall)"),
    ("steerd/daemon/registry/", "decision (registry)"),
    ("quic/crypto.py", "Initial keys + header protection + AEAD open"),
    ("quic/tls.py", "ClientHello parse"),
    ("quic/flight.py", "first-flight assembly (quic/flight.py)"),
    ("quic/", "header, frames, CRYPTO reassembly (other quic/)"),
    ("steerd/daemon/classifier.py", "classifier bookkeeping"),
    ("steerd/daemon/service/", "daemon I/O (recvmsg, pktinfo; pickles between processes)"),
)
# Frames under which a sample is classifier work: the single-process read handler, a
# classifier process's loop, and the main process's reader of their events.
HANDLERS = ("_readable (steerd/daemon/service/", "run_front (steerd/daemon/service/",
            "_front_readable (steerd/daemon/service/")


def py_spy_parts(path: str) -> dict[str, float]:
    """Share of the daemon's busy samples per part (see PARTS); samples outside the classifier
    socket's read handler are the event loop and everything else."""
    parts: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if not any(f.startswith(HANDLERS) for f in frames):
            name = "event loop, timers, other"
        else:
            name = next((label for f in reversed(frames) for key, label in PARTS if key in f),
                        "other under the read handler")
        parts[name] = parts.get(name, 0) + n
    return {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])} if total else {}


def print_profile(path: str, lines: int = 30) -> None:
    import pstats

    stats = pstats.Stats(path, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 30 s)")
    parser.add_argument("--smoke", action="store_true",
                        help="a functional check in seconds; numbers are meaningless")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--flights", type=int, default=0,
                        help="distinct flights to make/cache (default: what the plan needs)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="run the daemon under cProfile, write stats to FILE, print top")
    parser.add_argument("--classifiers", type=int, default=1,
                        help="steerd's [limits] classifiers (classifier processes)")
    parser.add_argument("--daemon-cpus", default=None,
                        help=f"taskset CPU list for the daemon (default {CPU_DAEMON} with one "
                             "classifier, all CPUs with more)")
    parser.add_argument("--nice", type=int, default=0,
                        help="run daemon, sender and receiver at this nice value (e.g. -10 on a "
                             "machine shared with other work, to measure steerd, not the "
                             "neighbours)")
    parser.add_argument("--py-spy", metavar="FILE", default=None,
                        help="sample the daemon with py-spy after the warm-up (raw stacks to "
                             "FILE) and report where its time goes")
    parser.add_argument("--stages", type=int, metavar="N", default=0,
                        help="instead of the run: CPU us per flight of each stage of the "
                             "classifier path, in process, over N flights")
    parser.add_argument("--make-flights", action="store_true",
                        help="only make (and cache) the flights, then exit")
    args = parser.parse_args()
    if args.make_flights:
        print(flights_file(args.flights or flights_needed(FULL), print))
        return 0
    if args.stages:
        if os.geteuid() != 0:
            print("bench/daemon --stages needs root (namespaces, BPF)", file=sys.stderr)
            return 1
        result = stages(flights_file(args.stages, print), args.stages)
        if args.json:
            print(json.dumps(dict(result), indent=2))
        else:
            for label, us in result:
                print(f"{us:8.1f} us  {label}")
        return 0
    if os.geteuid() != 0:
        print("bench/daemon needs root (namespaces, BPF)", file=sys.stderr)
        return 1
    for tool in ("gcc", "taskset", "nsenter"):
        if not shutil.which(tool):
            print(f"bench/daemon needs {tool}", file=sys.stderr)
            return 1

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.monotonic()
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    summary = run(args, plan, log)
    summary["wall_seconds"] = time.monotonic() - started
    if args.py_spy:
        summary["daemon_time_by_part"] = py_spy_parts(args.py_spy)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)
        for part, share in summary.get("daemon_time_by_part", {}).items():
            print(f"  {100 * share:5.1f}%  {part}")
        print(f"wall time {summary['wall_seconds']:.0f} s")
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
