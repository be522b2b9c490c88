"""Issue 7 §2 with a real app: an h3 site built on the SDK and a real aioquic client keep
their connection through a daemon SIGKILL and restart; the app resumes by itself, and new
connections reach it again."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from deploy.netns import NetnsPair
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import (
    PYTHON,
    ROOT,
    STEERD,
    Daemon,
    _read_line,
    await_resumed,
    spawn_daemon,
)
from tests.sdk.harness import H3SITE, RunningApp, kill_group, session, start_demo_app

pytestmark = pytest.mark.root


def test_sdk_app_keeps_connections_and_resumes_through_a_daemon_kill(
    own_daemon: tuple[NetnsPair, Daemon],
) -> None:
    pair, daemon = own_daemon
    app: RunningApp = start_demo_app(daemon, "h3", workers=2)
    client = session(pair, "h3")
    try:
        first = json.loads(client.get("/count")[1])
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        during = json.loads(client.get("/count")[1])  # no daemon at all: the kernel steers
        assert during["pid"] == first["pid"]
        spawn_daemon(daemon, until="classifying")
        status = await_resumed(daemon)
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


def test_steerd_exec_app_resumes_through_a_daemon_restart(
    own_daemon: tuple[NetnsPair, Daemon],
) -> None:
    """`steerd exec` holds the app's registration: it too resumes with the restarted
    daemon, and the command (the h3 site) never notices."""
    pair, daemon = own_daemon
    certdir = Path(tempfile.mkdtemp(prefix="steerd-exec-cert-"))
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(pair.server)}", STEERD, "exec", "--control",
         daemon.control, "--app", "execweb", "--alpn", "h3", "--", PYTHON, H3SITE,
         "--cert-dir", str(certdir / "c")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )
    client = None
    try:
        line = _read_line(proc, 30)
        assert line is not None and '"ready"' in line, line
        client = session(pair, "h3")
        pid = json.loads(client.get("/count")[1])["pid"]
        daemon.proc.send_signal(signal.SIGTERM)  # a clean restart this time
        assert daemon.proc.wait(20) == 0
        spawn_daemon(daemon, until="classifying")
        status = await_resumed(daemon)
        assert status["slots"]["awaiting_resume"] == []
        assert [a["app"] for a in status["apps"]] == ["execweb"]
        assert json.loads(client.get("/count")[1])["pid"] == pid
    finally:
        if client is not None:
            client.close()
        kill_group(proc.pid)
        proc.wait(5)
        shutil.rmtree(certdir)
