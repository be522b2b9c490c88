"""Learned mode end to end: unmodified aioquic and qh3 servers (their own random CIDs) behind
``steerd exec --cid-mode learned``, beside an SDK app, reached by real clients."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from steerd.dataplane.netns import netns_path
from tests.e2e.conftest import PYTHON, ROOT, STEERD, Daemon, _read_line
from tests.sdk.harness import daemon, kill_group, pair, session  # noqa: F401

pytestmark = pytest.mark.root

PLAIN = str(Path(__file__).with_name("plain_h3_server.py"))


@dataclass
class Plain:
    name: str
    proc: subprocess.Popen[str]
    workdir: Path

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_plain(daemon: Daemon, stack: str, name: str, *exec_args: str) -> Plain:  # noqa: F811
    workdir = Path(tempfile.mkdtemp(prefix=f"steerd-plain-{stack}-"))
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "exec",
         "--control", daemon.control, "--app", name, *exec_args, "--",
         PYTHON, PLAIN, "--stack", stack, "--cert-dir", str(workdir), "--name", name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)
    line = _read_line(proc, 30)
    if line is None or "ready" not in line:
        kill_group(proc.pid)
        proc.wait(5)
        raise AssertionError(f"{name} did not start: {line!r} {proc.stderr.read()!r}")
    return Plain(name, proc, workdir)


@pytest.fixture(scope="module")
def plain_aioquic(daemon: Daemon) -> Iterator[Plain]:  # noqa: F811
    app = start_plain(daemon, "aioquic", "plain-aioquic", "--alpn", "h3",
                      "--cid-mode", "learned", "--cid-len", "8")
    yield app
    app.stop()


def test_plain_aioquic_serves_in_learned_mode(daemon: Daemon, plain_aioquic: Plain) -> None:  # noqa: F811
    s = session(daemon.pair, "h3")
    try:
        status, body = s.get("/hello")
    finally:
        s.close()
    assert (status, body) == (200, b"plain-aioquic /hello")
    print(daemon.status()["counters"])
