"""The two demo apps (deploy/apps) behind a real daemon, with real clients.

Builds on tests/e2e/conftest.py (namespace pair, daemon process). Apps run as their own
process groups in the server namespace (``nsenter --net``), each with its own certificate
directory, and report readiness with the SDK's JSON "ready" line. Teardown SIGTERMs each app
(the drain path) and checks it exits 0; a group that does not is SIGKILLed, so no worker
outlives a test even when the test fails.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from deploy.netns import NetnsPair, netns_pair
from deploy.quicclient import RequestFailed, Session  # noqa: F401 - for the tests
from quic.cid import CidLayout
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, PYTHON, ROOT, Daemon, _read_line, start_daemon

H3SITE = str(ROOT / "deploy" / "apps" / "h3site.py")
FILESERVE = str(ROOT / "deploy" / "apps" / "fileserve.py")
FILE_TEXT = b"hello from the file service, which is not SMB\n"

_STAGED: dict[str, Path] = {}


def staged_tree() -> Path:
    """A world-readable copy of what an app needs (the project's packages, the demo apps, the
    venv's site-packages), for apps that run as other users.

    Why: a checkout may sit where only root can enter (CI clones into a private temp dir;
    many people clone into /root), and an unprivileged app could then read neither the code
    nor the venv. The copy leaves out the editable-install hooks, which point back into the
    checkout. Made once per test session, removed at exit.
    """
    if "root" in _STAGED:
        return _STAGED["root"]
    import atexit

    top = Path(tempfile.mkdtemp(prefix="steerd-staged-"))
    os.chmod(top, 0o755)
    for package in ("steerd", "quic", "deploy", "bpf"):
        shutil.copytree(ROOT / package, top / "src" / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    site = Path(subprocess.run(
        [PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    shutil.copytree(site, top / "site", ignore=shutil.ignore_patterns(
        "__editable__*", "steerd-*.dist-info", "__pycache__"))
    for path in [top, *top.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    atexit.register(shutil.rmtree, top, True)
    _STAGED["root"] = top
    return top


def staged_command(script: str) -> tuple[list[str], dict[str, str]]:
    """``/usr/bin/python3 STAGED/src/<script>`` and the environment that finds everything."""
    top = staged_tree()
    env = {"PYTHONPATH": f"{top / 'src'}:{top / 'site'}", "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return ["/usr/bin/python3", str(top / "src" / Path(script).relative_to(ROOT))], env


@dataclass
class RunningApp:
    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, Any]
    workdir: Path
    stopped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> list[int]:
        return list(self.ready["slots"])

    @property
    def layout(self) -> CidLayout:
        return CidLayout(**{k: v for k, v in self.ready["cid"].items() if k != "cid_len"})

    @property
    def pids(self) -> dict[int, int]:
        return {int(k): v for k, v in self.ready["pids"].items()}

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), wait; SIGKILL the whole group if it does not exit in time."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.proc.pid)
        self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_demo_app(daemon: Daemon, kind: str, *args: str, workers: int = 1,
                   name: str | None = None, workdir: Path | None = None,
                   uid: int | None = None) -> RunningApp:
    """Start deploy/apps/h3site.py (kind "h3") or fileserve.py (kind "file"), as ``uid``
    (and gid ``uid``, no supplementary groups) if given: its work directory is then its own."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"steerd-sdk-{kind}-"))
    user: list[str] = []
    script = H3SITE if kind == "h3" else FILESERVE
    python, env, cwd = [PYTHON, script], None, ROOT
    if uid is not None:
        os.chown(workdir, uid, uid)
        user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        python, staged_env = staged_command(script)
        env, cwd = {**os.environ, **staged_env}, Path("/")
    if kind == "h3":
        cmd = ["--app", name or "web"]
    else:
        root = workdir / "files"
        root.mkdir(exist_ok=True)
        (root / "hello.txt").write_bytes(FILE_TEXT)
        (root / "big.bin").write_bytes(bytes(range(256)) * 1024)
        os.chmod(root, 0o755)
        cmd = ["--app", name or "files", "--root", str(root)]
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", *user, *python, *cmd,
         "--control", daemon.control, "--cert-dir", str(workdir / "cert"),
         "--workers", str(workers), *args],
        stdout=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True, env=env,
    )
    line = _read_line(proc, 30)
    if line is None or '"ready"' not in line:
        kill_group(proc.pid)
        proc.wait(5)
        raise AssertionError(f"{kind} app did not become ready: {line!r}")
    return RunningApp(name or kind, proc, json.loads(line), workdir)


@pytest.fixture(scope="module")
def pair() -> Iterator[NetnsPair]:
    if os.geteuid() != 0:
        pytest.fail("the SDK end-to-end tests need root (network namespaces, BPF)")
    with netns_pair("k") as made:
        yield made


@pytest.fixture(scope="module")
def daemon(pair: NetnsPair) -> Iterator[Daemon]:
    yield from start_daemon(pair)


@pytest.fixture(scope="module")
def both_apps(daemon: Daemon) -> Iterator[tuple[RunningApp, RunningApp]]:
    web = start_demo_app(daemon, "h3", workers=2)
    try:
        files = start_demo_app(daemon, "file", workers=2)
    except BaseException:
        web.stop()
        raise
    try:
        yield web, files
    finally:
        codes = (web.stop(), files.stop())
        assert codes == (0, 0), f"apps exited {codes} after SIGTERM (drain)"


def session(pair: NetnsPair, alpn: str, stack: str = "aioquic",
            family: int = socket.AF_INET) -> Session:
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    sock.bind((pair.client_addr(family), 0))
    return Session(stack, sock, (pair.server_addr(family), PORT), alpn)


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    """Client sessions a test opens go in here; closed afterwards, even those whose
    connection was reset or whose socket is gone."""
    made: list[Session] = []
    try:
        yield made
    finally:
        for s in made:
            with contextlib.suppress(Exception):
                s.close()


@dataclass
class Loader:
    """A load generator process in the client namespace (python -m deploy.quicclient load)."""

    proc: subprocess.Popen[str]

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop it (close its stdin) and return its totals."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        deadline = timeout
        while (line := _read_line(self.proc, deadline)) is not None:
            if line.startswith('{"ok"'):
                self.proc.wait(10)
                return dict(json.loads(line))
        raise AssertionError("load generator ended without totals")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_loader(pair: NetnsPair, stack: str, kind: str, path: str,
                 family: int = socket.AF_INET) -> Loader:
    """Requests back to back (each on a new connection) until finish(); returns once the
    first one succeeded."""
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(pair.client)}", PYTHON, "-m", "deploy.quicclient", "load",
         "--until-stdin-closes", "--stack", stack, "--kind", kind, "--path", path,
         "--host", pair.server_addr(family), "--port", str(PORT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    loader = Loader(proc)
    line = _read_line(proc, 20)
    if line is None or "first_ok" not in line:
        loader.kill()
        raise AssertionError(f"load generator's first request failed: {line!r}")
    return loader


@pytest.fixture
def loaders() -> Iterator[list[Loader]]:
    made: list[Loader] = []
    try:
        yield made
    finally:
        for loader in made:
            loader.kill()


def gtlsclient_get(pair: NetnsPair, host: str, paths: list[str],
                   *options: str) -> tuple[subprocess.CompletedProcess[str], dict[str, bytes]]:
    """ngtcp2's gtlsclient GETs ``paths`` from ``host`` (its SNI) on one connection, from the
    client namespace to the server's IPv4 address: its run, and the files it saved by name
    (``/`` is saved as index.html). ``options``: more gtlsclient flags (e.g. --version=)."""
    download = Path(tempfile.mkdtemp(prefix="steerd-ngtcp2-"))
    try:
        out = subprocess.run(
            ["nsenter", f"--net={netns_path(pair.client)}", "gtlsclient",
             f"--download={download}", "--exit-on-all-streams-close", *options,
             pair.server_v4, str(PORT), *[f"https://{host}:{PORT}{p}" for p in paths]],
            capture_output=True, text=True, timeout=60,
        )
        return out, {f.name: f.read_bytes() for f in download.iterdir()}
    finally:
        shutil.rmtree(download, ignore_errors=True)


def chromium_get(pair: NetnsPair, host: str, app: RunningApp, path: str = "/",
                 timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Headless Chromium in the client namespace, forced onto HTTP/3 for ``host`` (mapped to
    the server address), trusting ``app``'s certificate by its SPKI hash: ``--dump-dom`` of
    ``https://host:PORT/path`` (its ClientHello spans two datagrams, CRYPTO scrambled)."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium is part of the test environment (deploy/setup.sh installs it)")
    cert = x509.load_pem_x509_certificate((app.workdir / "cert" / "cert.pem").read_bytes())
    spki = base64.b64encode(hashlib.sha256(cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()).decode()
    profile = Path(tempfile.mkdtemp(prefix="steerd-chromium-"))
    try:
        return subprocess.run(
            ["nsenter", f"--net={netns_path(pair.client)}", "chromium", "--headless=new",
             "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}",
             f"--origin-to-force-quic-on={host}:{PORT}",
             f"--host-resolver-rules=MAP {host} {pair.server_v4}",
             f"--ignore-certificate-errors-spki-list={spki}",
             "--dump-dom", f"https://{host}:{PORT}{path}"],
            capture_output=True, text=True, timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
