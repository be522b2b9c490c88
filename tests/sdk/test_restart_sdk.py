"""Issue 7 §2 with a real app: an h3 site built on the SDK and a real aioquic client keep
their connection through a daemon SIGKILL and restart; the app resumes by itself, and new
connections reach it again."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from steerd.netns import NetnsPair, netns_pair
from tests.e2e.conftest import Daemon, spawn_daemon, start_daemon
from tests.sdk.harness import RunningApp, session, start_demo_app

pytestmark = pytest.mark.root


@pytest.fixture
def world() -> Iterator[tuple[NetnsPair, Daemon]]:
    if os.geteuid() != 0:
        pytest.fail("needs root")
    with netns_pair("q") as pair:
        gen = start_daemon(pair)
        daemon = next(gen)
        try:
            yield pair, daemon
        finally:
            gen.close()


def test_sdk_app_keeps_connections_and_resumes_through_a_daemon_kill(
    world: tuple[NetnsPair, Daemon],
) -> None:
    pair, daemon = world
    app: RunningApp = start_demo_app(daemon, "h3", workers=2)
    client = session(pair, "h3")
    try:
        first = json.loads(client.get("/count")[1])
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        during = json.loads(client.get("/count")[1])  # no daemon at all: the kernel steers
        assert during["pid"] == first["pid"]
        spawn_daemon(daemon, until="classifying")
        deadline = time.monotonic() + 15
        status = daemon.status()
        while time.monotonic() < deadline and (
            status["slots"]["awaiting_resume"] or not status["apps"]
        ):
            status = daemon.status()
        assert status["slots"]["awaiting_resume"] == []
        (web,) = status["apps"]
        assert web["app"] == "web"
        assert sorted(w["slot"] for w in web["generations"][-1]["workers"]) == sorted(
            app.slots)
        after = json.loads(client.get("/count")[1])
        assert after["pid"] == first["pid"]
        fresh = session(pair, "h3", family=socket.AF_INET6)
        try:
            assert json.loads(fresh.get("/count")[1])["app"] == "web"
        finally:
            fresh.close()
    finally:
        client.close()
        assert app.stop() == 0
