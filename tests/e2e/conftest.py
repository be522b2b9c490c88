"""A daemon in a server namespace, apps beside it, real QUIC clients in a client namespace.

The daemon runs as its own process (``steerd run``) entered into the server namespace with
``nsenter --net`` (not ``ip netns exec``, which remounts /sys and so hides the bpffs the data
plane pins into). Apps are ``probe_app.py`` processes in the same namespace that register over
the control socket and report each datagram their worker sockets receive. Clients are the
aioquic client stack driven from the test, on sockets that live in the client namespace.
Everything is torn down in ``finally`` paths: processes, pin dir, namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from deploy.netns import NetnsPair, netns_pair
from deploy.proclines import Lines
from steerd.daemon.dataplane.netns import netns_path, run_in_netns

ROOT = Path(__file__).resolve().parents[2]
STEERD = str(ROOT / ".venv" / "bin" / "steerd")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
PROBE = str(Path(__file__).with_name("probe_app.py"))
PORT = 4433
METRICS_PORT = 19443


_readers: dict[int, Lines] = {}


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """One stdout line of ``proc`` within ``timeout`` seconds, else None (no sleeping)."""
    reader = _readers.get(proc.pid)
    if reader is None:
        reader = _readers[proc.pid] = Lines(proc)
    return reader.get(timeout)


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class Daemon:
    pair: NetnsPair
    workdir: Path
    pin_dir: str
    proc: subprocess.Popen[str]
    stderr_path: Path

    @property
    def control(self) -> str:
        return str(self.workdir / "control.sock")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        return run_in_netns(
            self.pair.server, lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            ["nsenter", f"--net={netns_path(self.pair.server)}", STEERD, "status", "--json",
             "--control", self.control],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        return json.loads(out)

    def log(self) -> str:
        return self.stderr_path.read_text()


@dataclass
class App:
    proc: subprocess.Popen[str]
    registered: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    def next_datagram(self, timeout: float = 5.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = _read_line(self.proc, left)
            if line is None:
                return None
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == "datagram":
                return event
        return None

    def wait_event(self, kind: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """The first event of ``kind`` (already seen or still to come) within ``timeout``."""
        for event in self.events:
            if event["event"] == kind:
                self.events.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = _read_line(self.proc, left)
            if line is None:
                return None
            event = json.loads(line)
            if event["event"] == kind:
                return event
            self.events.append(event)
        return None

    def datagrams(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        got = []
        for _ in range(count):
            d = self.next_datagram(timeout)
            if d is None:
                break
            got.append(d)
        return got

    def close(self) -> None:
        """Disconnect: closing stdin makes the app close its control connection and exit."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def write_config(path: Path, pair: NetnsPair, extra: str = "") -> None:
    path.write_text(
        f"""
[listen]
addresses = ["{pair.server_v4}", "{pair.server_v6}"]
port = {PORT}
[control]
path = "{path.parent / 'control.sock'}"
[metrics]
address = "127.0.0.1"
port = {METRICS_PORT}
[[acl]]
uids = [0]
alpn = ["*"]
server_names = ["*"]
{extra}
"""
    )


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    if os.geteuid() != 0:
        pytest.fail("the daemon tests need root (network namespaces, BPF)")
    with netns_pair("e") as made:
        yield made


def spawn_daemon(daemon: Daemon, until: str = "ready") -> None:
    """(Re)start ``steerd run`` for ``daemon``'s config and pin dir; wait for its stdout line
    ``steerd: UNTIL`` ("classifying": sockets and control up; "ready": programs loaded)."""
    with open(daemon.stderr_path, "a") as err:
        daemon.proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "run", "-v",
             "-c", str(daemon.workdir / "steerd.toml"), "--pin-dir", daemon.pin_dir],
            stdout=subprocess.PIPE, stderr=err, text=True,
        )
    deadline = time.monotonic() + 60
    while True:
        line = _read_line(daemon.proc, deadline - time.monotonic())
        assert line is not None, f"daemon did not start:\n{daemon.log()}"
        if line.strip() == f"steerd: {until}":
            return


def start_daemon(pair: NetnsPair, extra_config: str = "") -> Iterator[Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="steerd-e2e-"))
    pin_dir = f"/sys/fs/bpf/steerd-t-{uuid.uuid4().hex[:8]}"
    write_config(workdir / "steerd.toml", pair, extra_config)
    daemon = Daemon(pair, workdir, pin_dir, None, workdir / "daemon.log")  # type: ignore[arg-type]
    try:
        spawn_daemon(daemon)
        yield daemon
    finally:
        code = _stop(daemon.proc) if daemon.proc is not None else 0
        # A stopped daemon leaves its data plane for the next run; purge is how it goes.
        purged = subprocess.run(
            ["nsenter", f"--net={netns_path(pair.server)}", STEERD, "purge",
             "-c", str(workdir / "steerd.toml"), "--pin-dir", pin_dir],
            capture_output=True, text=True, timeout=60,
        )
        left = os.path.exists(pin_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        assert code == 0, f"daemon exited {code}"
        assert purged.returncode == 0, purged.stderr
        assert not left, f"purge left the pin dir {pin_dir}"


@pytest.fixture(
    scope="module", params=[(1, "auto"), (2, "tc")], ids=["1-classifier-xdp", "2-classifiers-tc"]
)
def daemon(pair: NetnsPair, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """The daemon with one classifier (in its main process) and the guard at XDP, and with
    two classifier processes (sharded by the BPF program's DCID hash) and the guard at TC
    ingress: everything must behave the same."""
    classifiers, mode = request.param
    yield from start_daemon(
        pair,
        f'[limits]\nclassifiers = {classifiers}\n'
        f'[xdp]\ninterfaces = ["{pair.server_if}"]\nmode = "{mode}"\n',
    )


def start_app(
    daemon: Daemon, name: str, alpns: list[str], workers: int = 1, resume: bool = False,
    server_names: list[str] | None = None,
) -> App:
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", PYTHON, PROBE, daemon.control,
         name, ",".join(alpns), str(workers), *(["--resume"] if resume else []),
         *([f"--names={','.join(server_names)}"] if server_names else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    line = _read_line(proc, 20)
    if line is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"app {name} did not register")
    return App(proc, json.loads(line))


@pytest.fixture
def apps(daemon: Daemon) -> Iterator[list[App]]:
    """Apps a test starts with start_app() go in here and are disconnected afterwards."""
    made: list[App] = []
    try:
        yield made
    finally:
        for app in made:
            app.close()


@dataclass
class Client:
    """A real aioquic client connection on a socket in the client namespace."""

    conn: QuicConnection
    sock: socket.socket
    server: tuple[str, int]
    sent: int = 0
    datagrams: list[bytes] = field(default_factory=list)  # everything sent, in order

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def flush(self) -> int:
        n = 0
        for data, _ in self.conn.datagrams_to_send(now=time.time()):
            self.sock.sendto(data, self.server)
            self.datagrams.append(data)
            n += 1
        self.sent += n
        return n

    def receive(self, timeout: float = 5.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            data, addr = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        self.conn.receive_datagram(data, addr, now=time.time())
        return data

    def close(self) -> None:
        self.sock.close()


def quic_client(
    pair: NetnsPair,
    family: int,
    alpns: list[str],
    *,
    server_name: str | None = None,
    versions: list[int] | None = None,
    two_datagrams: bool = False,
) -> Client:
    """Connect (first flight sent) from the client namespace; bound to the client address so
    the test knows the true source to expect at the app."""
    config = QuicConfiguration(is_client=True, alpn_protocols=alpns, server_name=server_name,
                               verify_mode=0)
    if versions:
        config.supported_versions = versions
    if two_datagrams:
        config.quantum_readiness_test = True
    server = (pair.server_addr(family), PORT)
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    sock.bind((pair.client_addr(family), 0))
    conn = QuicConnection(configuration=config)
    conn.connect(server, now=time.time())
    client = Client(conn, sock, server)
    client.flush()
    return client


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


@pytest.fixture
def own_daemon() -> Iterator[tuple[NetnsPair, Daemon]]:
    """A namespace pair and a daemon of the test's own (for tests that kill or restart it)."""
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces, BPF)")
    with netns_pair("r") as pair:
        gen = start_daemon(pair)
        daemon = next(gen)
        try:
            yield pair, daemon
        finally:
            gen.close()


def await_resumed(daemon: Daemon, timeout: float = 15.0) -> dict[str, Any]:
    """The daemon's status once no slot awaits its app's resume and some app is registered
    (or the last status seen when ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    status = daemon.status()
    while time.monotonic() < deadline and (
        status["slots"]["awaiting_resume"] or not status["apps"]
    ):
        status = daemon.status()
    return status
