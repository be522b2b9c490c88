"""Issue 12: the classifier pool and the operator's mistakes break no new connection.

A daemon with two classifier processes (``[limits] classifiers = 2``) and the h3 demo app
(real SDK workers); a real aioquic load generator makes one new connection after another
while a classifier process is SIGKILLed, while the daemon restarts cleanly, and after 1000
``replace`` cycles. Each time: 0 failed requests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from deploy.netns import NetnsPair, netns_pair
from steerd.app.client import ControlClient
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import (
    STEERD,
    Daemon,
    quic_client,
    spawn_daemon,
    start_daemon,
)
from tests.sdk.harness import start_demo_app, start_loader

pytestmark = pytest.mark.root

HANDSHAKES_BETWEEN = 3  # handshakes the new daemon carries before the next restart


@pytest.fixture
def pooled() -> Iterator[tuple[NetnsPair, Daemon]]:
    with netns_pair("p") as pair:
        gen = start_daemon(pair, "[limits]\nclassifiers = 2\n")
        daemon = next(gen)
        try:
            yield pair, daemon
        finally:
            gen.close()


def classifier_pids(daemon: Daemon) -> set[int]:
    """The daemon's forked classifier processes (its children running steerd)."""
    out = subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True,
                         text=True).stdout
    return {int(p) for p in out.split()}


def await_status(daemon: Daemon, predicate: object, timeout: float = 10.0) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    status = daemon.status()
    while not predicate(status):  # type: ignore[operator]
        assert time.monotonic() < deadline, status
        status = daemon.status()
    return status


def test_killed_classifier_is_replaced_and_no_connection_fails(
    pooled: tuple[NetnsPair, Daemon],
) -> None:
    """SIGKILL one classifier process under load: its sockets leave the data plane at once
    (the steering program sends its share to the other one), a replacement is forked on the
    same sockets and put back, the loss is counted; no new connection fails."""
    pair, daemon = pooled
    app = start_demo_app(daemon, "h3", workers=2)
    loader = None
    try:
        loader = start_loader(pair, "aioquic", "h3", "/count")
        before = classifier_pids(daemon)
        assert len(before) == 2
        victim = min(before)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        status = await_status(daemon, lambda s: s["classifier_restarts"] == 1
                              and s["classifier_processes"] == 2)
        back_after = time.monotonic() - killed_at
        after = classifier_pids(daemon)
        assert victim not in after and len(after) == 2
        assert 'steerd_classifier_restarts_total 1.0' in daemon.metrics()
        # the replacement classifies: with its sockets back, every new connection works
        # whichever classifier its DCID hashes to
        for _ in range(8):
            client = quic_client(pair, socket.AF_INET, ["h3"])
            client.close()
        totals = loader.finish()
        loader = None
        print(f"\nclassifier replaced {back_after:.2f} s after SIGKILL; load: {totals}")
        assert totals["failed"] == 0 and totals["ok"] > 0, totals
        assert status["classifier_drops"].get("internal_error", 0) == 0
    finally:
        if loader is not None:
            loader.kill()
        assert app.stop() == 0


def test_clean_restart_under_load_refuses_nothing(pooled: tuple[NetnsPair, Daemon]) -> None:
    """SIGTERM (a clean stop) with two classifier processes while connections start: the
    control socket's closing empties the registry, which must never reach the classifiers
    still working (they would refuse flights in progress with no_application_protocol).

    A connection that starts while no daemon runs loses its Initial (steer_drop_no_classifier,
    docs/OPERATIONS.md) and is served on its retransmission; each restart waits until the
    new daemon has carried HANDSHAKES_BETWEEN handshakes, so no client meets more gaps than
    a real restart gives it (the loader's clients come one after another: those handshakes
    come after the one that met the gap has finished)."""
    pair, daemon = pooled
    app = start_demo_app(daemon, "h3", workers=2)
    loader = None
    try:
        loader = start_loader(pair, "aioquic", "h3", "/count")
        for _ in range(3):
            daemon.proc.terminate()
            assert daemon.proc.wait(20) == 0
            spawn_daemon(daemon, until="classifying")
            status = await_status(
                daemon, lambda s: not s["slots"]["awaiting_resume"] and s["apps"])
            carried = status["counters"].get("steer_long_ours_worker", 0) + HANDSHAKES_BETWEEN
            await_status(daemon,
                         lambda s, n=carried: s["counters"].get("steer_long_ours_worker", 0) >= n)
        totals = loader.finish()
        loader = None
        assert totals["failed"] == 0 and totals["ok"] > 0, totals
    finally:
        if loader is not None:
            loader.kill()
        assert app.stop() == 0


def test_a_thousand_replacements(pooled: tuple[NetnsPair, Daemon]) -> None:
    """Every replace used to keep the whole chain of replaced generations: past ~300 the
    push to the classifier processes failed (RecursionError) and the ALPN went dark. After
    1000 cycles (each generation replaced, then its connection closed, as an SDK app
    restarting does) a new client's first flight still reaches the newest generation."""
    pair, daemon = pooled
    holders: list[tuple[ControlClient, object]] = []
    try:
        for _ in range(1000):
            client = ControlClient(daemon.control)
            reg = client.register("churn", ["h3"], replace=bool(holders))
            holders.append((client, reg))
            if len(holders) > 1:
                old_client, old_reg = holders.pop(0)
                old_reg.close()  # type: ignore[attr-defined]
                old_client.close()
        status = daemon.status()
        [churn] = [a for a in status["apps"] if a["app"] == "churn"]
        assert churn["generations"][-1]["generation"] == 1000
        _, reg = holders[-1]
        worker = reg.sockets[0]  # type: ignore[attr-defined]
        worker.settimeout(10)
        client = quic_client(pair, socket.AF_INET, ["h3"])
        try:
            data, _ = worker.recvfrom(65535)  # routed and re-injected to the newest one
            assert data[0] & 0x80
        finally:
            client.close()
        assert "RecursionError" not in daemon.log()
    finally:
        for client, reg in holders:
            reg.close()  # type: ignore[attr-defined]
            client.close()


def test_second_daemon_with_its_own_control_socket_is_refused(
    pooled: tuple[NetnsPair, Daemon],
) -> None:
    """A second daemon with its own control socket but the same pin dir would take over
    classification (and then black-hole it when it stops): one daemon per pin dir."""
    pair, daemon = pooled
    other = daemon.workdir / "other.toml"
    other.write_text((daemon.workdir / "steerd.toml").read_text().replace(
        "control.sock", "other-control.sock"))
    second = subprocess.run(
        ["nsenter", f"--net={netns_path(pair.server)}", STEERD, "run", "-c", str(other),
         "--pin-dir", daemon.pin_dir], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another steerd (pid {daemon.proc.pid}) serves pin dir" in second.stderr
    assert not (daemon.workdir / "other-control.sock").exists()
    client = quic_client(pair, socket.AF_INET, ["h3"])  # still classified by the first one
    try:
        assert client.receive() is not None  # CONNECTION_CLOSE: nobody owns h3 here
    finally:
        client.close()
