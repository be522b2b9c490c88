"""Fixtures of the reliability tests: a real daemon (``steerd run``) in a server namespace, as
tests/e2e starts it (its helpers are reused, not copied), and a look at the daemon process's
own resources (FDs, RSS) from /proc, so a test can prove that hostile input leaked nothing; and
the flood sender of the flood tests, run until what a test needs has happened (``Flood``)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.netns import NetnsPair, netns_pair
from steerd.app.client import ControlClient
from steerd.app.protocol import ControlError
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import Daemon, start_daemon
from tests.sdk.harness import sessions  # noqa: F401 - the fixture, for test_app_crash

CONTROL_CONNECTIONS = 16  # the daemon's [limits] control_connections in these tests
CONTROL_MESSAGE_BYTES = 8192
CONTROL_BURST = 40


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    if os.geteuid() != 0:
        pytest.fail("the reliability tests need root (network namespaces, BPF)")
    with netns_pair("r") as made:
        yield made


@pytest.fixture(scope="module")
def steerd(pair: NetnsPair) -> Iterator[Daemon]:
    """One daemon (classifier in its main process, so /proc/PID covers it all) with tight
    control limits, its control socket reachable by uid nobody (the ACL, not the file mode,
    must be what refuses it)."""
    gen = start_daemon(
        pair,
        f"[limits]\ncontrol_connections = {CONTROL_CONNECTIONS}\n"
        f"control_message_bytes = {CONTROL_MESSAGE_BYTES}\n"
        f"control_burst = {CONTROL_BURST}\n",
    )
    daemon = next(gen)
    try:
        os.chmod(daemon.workdir, 0o755)
        os.chmod(daemon.control, 0o666)
        yield daemon
    finally:
        gen.close()


@dataclass(frozen=True)
class Usage:
    """What the daemon process holds; compared before and after a hostile round."""

    fds: int
    rss_kib: int
    free_slots: int
    connections: int
    fd_targets: tuple[str, ...] = ()  # what the FDs are (for the failure message)


def daemon_pid(daemon: Daemon) -> int:
    """The steerd process (nsenter execs it in place: same PID, checked)."""
    pid = daemon.proc.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"steerd" in part for part in cmdline), cmdline
    return pid


def fd_targets(pid: int) -> list[str]:
    """What the process's descriptors point at, once."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    return targets


def stable_fds(pid: int) -> list[str]:
    """The daemon's descriptors as they stay: two listings in a row that agree. Its threads
    hold some for a moment only (the socket watchdog borrows each worker socket for a look
    and has /proc directories open while it scans for holders): not the daemon's to keep,
    not a leak."""
    last = sorted(fd_targets(pid))
    for _ in range(50):
        time.sleep(0.005)  # between two listings, to let a borrowed descriptor go
        now = sorted(fd_targets(pid))
        if now == last:
            return now
        last = now
    return last


def usage(daemon: Daemon, timeout: float = 10.0) -> Usage:
    """The daemon's resources, read while our status connection is open (so it is counted,
    always exactly once: earlier connections' ends were handled before this request was).
    A connection refused for the limit is retried: closes the daemon has not handled yet
    hold it for a moment."""
    pid = daemon_pid(daemon)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ControlClient(daemon.control) as c:
                status = c.status()
                targets = stable_fds(pid)
                rss = next(
                    int(line.split()[1])
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")
                )
            break
        except (ControlError, ConnectionError, BlockingIOError) as e:
            if isinstance(e, ControlError) and e.reason != "too_many_connections":
                raise
            assert time.monotonic() < deadline, f"status refused for {timeout} s: {e}"
    return Usage(
        fds=len(targets),
        fd_targets=tuple(sorted(targets)),
        rss_kib=rss,
        free_slots=int(status["slots"]["free"]),
        connections=int(status["control_connections"]),
    )


def settle(daemon: Daemon, want: Callable[[Usage], bool], timeout: float = 10.0) -> Usage:
    """Await a state of the daemon (it drops connections asynchronously), then return it."""
    deadline = time.monotonic() + timeout
    now = usage(daemon)
    while not want(now) and time.monotonic() < deadline:
        now = usage(daemon)
    return now


def no_leak(daemon: Daemon, before: Usage) -> Usage:
    """The daemon is back to ``before`` in FDs, slots and connections (RSS is reported)."""
    after = settle(
        daemon,
        lambda u: (u.fds, u.free_slots, u.connections)
        == (before.fds, before.free_slots, before.connections),
    )
    assert (after.fds, after.free_slots, after.connections) == (
        before.fds, before.free_slots, before.connections
    ), (
        f"leak: FDs {before.fds} -> {after.fds}, free slots {before.free_slots} -> "
        f"{after.free_slots}, connections {before.connections} -> {after.connections}; new "
        f"FDs: {sorted(set(after.fd_targets) - set(before.fd_targets))}"
    )
    return after


# ---------------------------------------------------------------------------------------
# The flood sender (bench/flood/spoof.c), run in rounds

SPOOF_BATCH = 64  # records per sendmmsg
FLOOD_DEADLINE = 120.0  # s of flood after which what a test waits for is a hang, not slowness


class Flood:
    """bench/flood/spoof.c in the client namespace, sending ``records`` (fixed-size records)
    from random addresses of ``net``/``bits``, in rounds. A round sends as fast as the sender
    can for a given time; how fast that was is a figure (``figures()``), never a gate: a test
    floods for its nominal time, then on in short rounds until what it must see happened
    (``until``), and fails only if that has not happened ``FLOOD_DEADLINE`` s after the start
    (a hang: even a sender slowed tenfold by a loaded machine gets there long before)."""

    def __init__(self, pair: NetnsPair, spoof: Path, server: str, port: int, net: str,
                 bits: int, records: Path, record: int, *mode: str) -> None:
        self.argv = ["nsenter", f"--net={netns_path(pair.client)}", str(spoof), server,
                     str(port), net, str(bits), str(records), str(record)]
        self.mode = list(mode)  # e.g. "frag"
        self.proc: subprocess.Popen[str] | None = None
        self.started: float | None = None  # time.monotonic() of the first round's start
        self.ended: float | None = None  # and of the last round's end
        self.sent = self.failed = self.rounds = 0
        self.send_seconds = 0.0

    def start(self, seconds: float) -> None:
        """Start a round of ``seconds`` (the previous one must have ended)."""
        assert self.proc is None, "a round is running"
        if self.started is None:
            self.started = time.monotonic()
        self.proc = subprocess.Popen([*self.argv, str(seconds), str(SPOOF_BATCH), *self.mode],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.rounds += 1

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> bool:
        """Await the running round's end, at most ``timeout`` s: True once it ended (and its
        figures are counted)."""
        if self.proc is None:
            return True
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        assert self.proc.returncode == 0, f"spoof exited {self.proc.returncode}: {err}"
        sent, failed, elapsed = out.split()
        self.sent += int(sent)
        self.failed += int(failed)
        self.send_seconds += float(elapsed)
        self.proc = None
        self.ended = time.monotonic()
        return True

    def until(self, enough: Callable[[], bool], what: str, *, round_seconds: float = 1.0,
              sample: Callable[[], None] | None = None, every: float = 0.1) -> None:
        """Let the running round end, then flood on in rounds of ``round_seconds``, doubling
        up to 8 s (few checks for a slow sender, little overshoot for a fast one), until
        ``enough()`` (checked between rounds). ``sample`` is called every ``every`` s while a
        round runs (e.g. to sample the daemon's RSS)."""
        assert self.started is not None, "start() first"
        round_seconds /= 2
        while True:
            while not self.wait(None if sample is None else every):
                assert sample is not None
                sample()
            if enough():
                return
            assert time.monotonic() - self.started < FLOOD_DEADLINE, (
                f"{what}: not reached after {FLOOD_DEADLINE:.0f} s of flood: {self.figures()}")
            round_seconds = min(8.0, 2 * round_seconds)
            self.start(round_seconds)

    def wall_seconds(self) -> float:
        """From the first round's start to the last one's end (what a rate bound needs)."""
        assert self.started is not None and self.ended is not None
        return self.ended - self.started

    def figures(self) -> dict[str, object]:
        return {"sent": self.sent, "send_failed": self.failed, "rounds": self.rounds,
                "send_seconds": round(self.send_seconds, 2),
                "pps": round(self.sent / self.send_seconds) if self.send_seconds else None}

    def stop(self) -> None:
        """Kill a running round (cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.communicate(timeout=10)
            self.proc = None
