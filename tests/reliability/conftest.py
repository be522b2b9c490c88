"""Fixtures of the reliability tests: a real daemon (``steerd run``) in a server namespace, as
tests/e2e starts it (its helpers are reused, not copied), and a look at the daemon process's
own resources (FDs, RSS) from /proc, so a test can prove that hostile input leaked nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.netns import NetnsPair, netns_pair
from steerd.app.client import ControlClient
from steerd.app.protocol import ControlError
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
                targets = []
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    except OSError:
                        continue  # closed meanwhile
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
