"""The live steerd demo (run by ./demo.sh, as root): real clients, two apps, one UDP port.

What it does, all inside two network namespaces it makes and deletes (no traffic leaves them):

1. a client namespace and a server namespace joined by a veth pair, IPv4 and IPv6;
2. ``steerd run`` in the server namespace, with the guard on the server's veth;
3. two apps behind it on UDP 443, both from deploy/apps, each as its own unprivileged user
   that the daemon's [[acl]] allows only its ALPN: the HTTP/3 site (ALPN ``h3``, www-data)
   and the file service on ALPN ``smb`` (nobody; a made-up protocol that is NOT SMB: it
   stands in for an SMB-over-QUIC server so that two apps with different ALPNs share the
   port);
4. real, independently written clients from the client namespace: Chromium (headless,
   HTTP/3), ngtcp2's gtlsclient, qh3 (HTTP/3) and aioquic (ALPN ``smb``). Each asks the app
   which worker answered (``/count`` or ``INFO``: app, slot, pid). One more aioquic client
   asks for ALPN ``doq``, which no app owns: steerd itself must refuse it
   (no_application_protocol);
5. a table of who asked for what and who served it, and an excerpt of the daemon's
   Prometheus metrics;
6. teardown, also on failure and Ctrl-C: apps SIGTERM (they drain), daemon SIGTERM,
   ``steerd purge`` (the data plane outlives a stopped daemon on purpose), namespaces deleted.

Exit status 0 only if every client was served by the app that owns its ALPN.

Why ``nsenter --net`` and not ``ip netns exec`` for the daemon and apps: the latter remounts
/sys, which hides the bpffs the data plane pins its maps into.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import grp
import hashlib
import html
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find deploy/

from deploy.netns import NetnsPair, netns_pair
from deploy.proclines import Lines
from deploy.quicclient import RequestFailed, Session, one_request
from quic.builders import NO_APPLICATION_PROTOCOL
from steerd.daemon.dataplane.netns import netns_path, run_in_netns

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
STEERD = str(ROOT / ".venv" / "bin" / "steerd")
APPS = ROOT / "deploy" / "apps"
PORT = 443
METRICS_PORT = 9443
SITE = "www.example.test"  # the HTTP/3 site's name (resolved by Chromium's resolver rules)
FILES = "files.example.test"  # the name the file-service client asks for
PREFIX = "steerd-demo-"
CONTROL_GID = 65534  # nogroup: the control socket's group, which both app users get
REFUSED = "(refused)"
APP_ALPN = {"web": "HTTP/3 site, ALPN h3", "files": "file service, ALPN smb, NOT SMB"}


def log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


@dataclass
class Proc:
    """A process the demo started in its own session (Ctrl-C reaches only the demo, which
    then stops everything in order)."""

    name: str
    proc: subprocess.Popen[str]
    lines: Lines
    ready: dict[str, Any] = field(default_factory=dict)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (apps drain, the daemon shuts down cleanly); SIGKILL the group if late."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f} s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind, if any
        self.proc.wait(5)
        return self.proc.returncode


class _Interrupts:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt (an orderly teardown), except inside
    ``held()``, which defers them to its end: a signal between starting a process and
    recording it would leave that process running. (Blocking the signals instead would be
    inherited by the children, which then could not be stopped with SIGTERM.)"""

    holding = False
    pending = False

    def handler(self, signum: int, frame: object) -> None:
        if self.holding:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


INTERRUPTS = _Interrupts()


def spawn(name: str, netns: str, cmd: list[str], stderr: Path, into: dict[str, Proc]) -> Proc:
    """Start ``cmd`` in ``netns`` and record it in ``into`` (so teardown stops it)."""
    with INTERRUPTS.held():
        with open(stderr, "a") as err:
            proc = subprocess.Popen(["nsenter", f"--net={netns_path(netns)}", *cmd],
                                    stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                    start_new_session=True)
        into[name] = Proc(name, proc, Lines(proc))
    return into[name]


@dataclass(frozen=True)
class AppUser:
    """Who an app runs as. Each demo app runs as its own unprivileged user, allowed by the
    daemon's [[acl]] to claim only its ALPN (and, for the site, its names); both reach the
    control socket through its group."""

    name: str
    uid: int
    gid: int

    def setpriv(self) -> list[str]:
        if self.uid == 0:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                f"--groups={CONTROL_GID}"]


def app_users() -> tuple[dict[str, AppUser], str]:
    """www-data for the site and nobody for the file service, or root for both (and why)
    when those users do not exist or cannot read the checkout and the venv (a clone in
    /root, say)."""
    root = AppUser("root", 0, 0)
    try:
        users = {"web": pwd.getpwnam("www-data"), "files": pwd.getpwnam("nobody")}
        grp.getgrgid(CONTROL_GID)
    except KeyError:
        return {"web": root, "files": root}, "users www-data/nobody or group nogroup missing"
    needed = [APPS / "h3site.py", APPS / "fileserve.py", APPS / "certs.py",
              ROOT / "steerd" / "app" / "sdk.py", Path(sysconfig.get_paths()["purelib"])]
    for path in needed:
        for part in [*reversed(path.parents), path]:
            mode = part.stat().st_mode
            if not mode & (stat.S_IXOTH if part.is_dir() else stat.S_IROTH):
                return {"web": root, "files": root}, f"{part} is not readable by other users"
    return {k: AppUser(u.pw_name, u.pw_uid, u.pw_gid) for k, u in users.items()}, ""


def write_config(path: Path, pair: NetnsPair, users: dict[str, AppUser]) -> None:
    web, files = users["web"], users["files"]
    path.write_text(f"""# written by deploy/demo.py
[listen]
addresses = ["{pair.server_v4}", "{pair.server_v6}"]
port = {PORT}
[xdp]
interfaces = ["{pair.server_if}"]
[control]
path = "{path.parent / 'control.sock'}"
group = {CONTROL_GID}
[metrics]
address = "127.0.0.1"
port = {METRICS_PORT}
[[acl]]
uids = [{web.uid}]
alpn = ["h3"]
server_names = ["{SITE}", "localhost"]
[[acl]]
uids = [{files.uid}]
alpn = ["smb"]
server_names = ["*"]
""")


@dataclass
class Row:
    client: str
    family: str
    alpn: str
    server_name: str
    want_app: str
    served: dict[str, Any] | None = None
    error: str = ""

    def check(self, apps: dict[str, Proc]) -> None:
        """Served by the right app, by one of its workers (the pid the app reported for the
        slot), or an error saying why not. ``want_app`` REFUSED: nobody owns the ALPN, so
        steerd must refuse the connection with no_application_protocol."""
        if self.served is None:
            return
        if self.want_app == REFUSED:
            if "refused" not in self.served:
                self.error = f"not refused: {self.served}"
            return
        app, slot, pid = self.served.get("app"), self.served.get("slot"), self.served.get("pid")
        if app != self.want_app:
            self.error = f"served by {app!r}, expected {self.want_app!r}"
            return
        pids = apps[self.want_app].ready.get("pids", {})
        if pids.get(str(slot)) != pid:
            self.error = f"slot {slot} pid {pid} is not a worker of {app} ({pids})"

    @property
    def ok(self) -> bool:
        return self.served is not None and not self.error


def spki_pin(cert_pem: Path) -> str:
    """Chromium accepts the site's self-signed certificate by its key's SHA-256 pin."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def worker_json(text: str) -> dict[str, Any]:
    """The /count JSON out of a page (Chromium wraps it in <pre>, HTML-escaped)."""
    found = re.search(r"\{[^{}]*\}", html.unescape(text))
    if found is None:
        raise RequestFailed(f"no worker JSON in the answer: {text[:200]!r}")
    return dict(json.loads(found.group(0)))


CLIENT_PROGRAMS: set[subprocess.Popen[str]] = set()  # running, for kill_client_programs()


def run_client_program(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Like subprocess.run, but in its own session and known to kill_client_programs():
    Chromium outlives a Ctrl-C, and its renderer processes outlive a kill of the browser."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    CLIENT_PROGRAMS.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        CLIENT_PROGRAMS.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_client_programs() -> None:
    for proc in list(CLIENT_PROGRAMS):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_chromium(pair: NetnsPair, work: Path, cert: Path) -> dict[str, Any]:
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=work))
    out = run_client_program(
        ["nsenter", f"--net={netns_path(pair.client)}", "chromium", "--headless=new",
         "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         f"--origin-to-force-quic-on={SITE}:{PORT}",
         f"--host-resolver-rules=MAP {SITE} {pair.server_v4}",
         f"--ignore-certificate-errors-spki-list={spki_pin(cert)}",
         "--dump-dom", f"https://{SITE}/count"], timeout=40)
    if '"app"' not in out.stdout:
        raise RequestFailed(f"chromium exited {out.returncode}: "
                            f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return worker_json(out.stdout)


def run_gtlsclient(pair: NetnsPair, work: Path) -> dict[str, Any]:
    download = Path(tempfile.mkdtemp(prefix="ngtcp2-", dir=work))
    out = run_client_program(
        ["nsenter", f"--net={netns_path(pair.client)}", "gtlsclient", "--quiet",
         f"--download={download}", "--exit-on-all-streams-close", pair.server_v6, str(PORT),
         f"https://{SITE}/count"], timeout=30)
    saved = download / "count"
    if out.returncode != 0 or not saved.exists():
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RequestFailed(f"gtlsclient exited {out.returncode}: {tail}")
    return worker_json(saved.read_text())


def run_python_client(pair: NetnsPair, stack: str, kind: str, family: int,
                      server_name: str) -> dict[str, Any]:
    """aioquic or qh3 (deploy.quicclient) on a socket made inside the client namespace: the
    connection runs in a thread that entered that namespace."""
    host = pair.server_addr(family)
    what = "/count" if kind == "h3" else "INFO"
    return run_in_netns(pair.client, lambda: one_request(
        stack, kind, host, PORT, what, timeout=10.0, server_name=server_name))


def run_unowned(pair: NetnsPair, alpn: str) -> dict[str, Any]:
    """An aioquic client asking for an ALPN no app registered: steerd itself must answer
    with an Initial CONNECTION_CLOSE, no_application_protocol (policy no_owner = "close")."""

    def go() -> dict[str, Any]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        session = Session("aioquic", sock, (pair.server_v4, PORT), alpn,
                          server_name=SITE, timeout=10.0)
        try:
            session.handshake()
        except RequestFailed:
            pass
        finally:
            session.close()
        closed = session.terminated
        if closed is not None and closed.error_code == NO_APPLICATION_PROTOCOL:
            return {"refused": "no_application_protocol"}
        if session.connected:
            return {"app": "(some app: the handshake completed)"}
        raise RequestFailed(f"neither refused nor served: {closed}")

    return run_in_netns(pair.client, go)


def scrape(pair: NetnsPair) -> str:
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    return run_in_netns(pair.server,
                        lambda: urllib.request.urlopen(url, timeout=5).read().decode())


def metrics_excerpt(pair: NetnsPair, flights: int, timeout: float = 5.0) -> list[str]:
    """The interesting lines of a scrape, once the daemon has counted ``flights`` first
    flights: classifiers hand their tallies to the metrics on a timer, so a scrape right
    after the last client may not show it yet."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(pair)
        counted = sum(float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("steerd_first_flights_total{"))
        if counted >= flights or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # the tally timer has no event to wait on from here
    keep: list[str] = []
    bpf: list[str] = []
    for line in text.splitlines():
        if line.startswith(("steerd_first_flights_total", "steerd_decision_seconds_count",
                            "steerd_decision_seconds_sum", "steerd_workers ", "steerd_apps ")):
            keep.append(line)
        elif line.startswith("steerd_bpf_events_total") and not line.endswith(" 0.0"):
            bpf.append(line)
    return keep + bpf[:8]


def print_table(rows: list[Row], apps: dict[str, Proc], users: dict[str, AppUser]) -> None:
    head = ("CLIENT", "IP", "ALPN", "SERVER NAME", "SERVED BY (app slot/pid)", "RESULT")
    lines = [head]
    for r in rows:
        s = r.served
        if s and "refused" in s:
            by = f"(refused: {s['refused']})"
        else:
            by = f"{s.get('app')} {s.get('slot')}/{s.get('pid')}" if s else "-"
        lines.append((r.client, r.family, r.alpn, r.server_name, by,
                      "ok" if r.ok else f"FAILED: {r.error}"))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    print()
    for x in lines:
        print("  ".join([*(c.ljust(w) for c, w in zip(x, widths, strict=False)), x[-1]]))
    print()
    for name, app in apps.items():
        pids = ", ".join(f"slot {k} pid {v}" for k, v in sorted(app.ready["pids"].items()))
        print(f"  app {name!r} as user {users[name].name} ({APP_ALPN[name]}): {pids}")


def demo(verbose: bool) -> int:
    started = time.monotonic()
    status = 1
    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        pair = cleanup.enter_context(netns_pair(prefix=PREFIX))
        log(f"namespaces {pair.client} (client {pair.client_v4}, {pair.client_v6}) and "
            f"{pair.server} (server {pair.server_v4}, {pair.server_v6}), veth {pair.server_if}")
        users, why_root = app_users()
        if why_root:
            log(f"apps run as root: {why_root}")
        os.chmod(work, 0o711)  # the apps' users reach the control socket and their dirs
        config = work / "steerd.toml"
        write_config(config, pair, users)
        pin_dir = f"/sys/fs/bpf/{PREFIX}{uuid.uuid4().hex[:8]}"
        log(f"work dir {work}, BPF pin dir {pin_dir}")
        interrupted = False
        procs: dict[str, Proc] = {}  # what to stop, in start order: the daemon first
        apps: dict[str, Proc] = {}
        try:
            log("starting steerd (compiling its BPF programs takes a few seconds)")
            daemon = spawn("steerd", pair.server, [STEERD, "run", "-v", "-c", str(config),
                                                   "--pin-dir", pin_dir], work / "steerd.log",
                           procs)
            if daemon.lines.wait_for(lambda s: s.strip() == "steerd: ready", 60) is None:
                raise RuntimeError("steerd did not become ready")
            files = work / "files"
            files.mkdir(mode=0o755)
            (files / "hello.txt").write_text("hello from the file service (not SMB)\n")
            os.chmod(files / "hello.txt", 0o644)
            control = str(work / "control.sock")
            for name, script, extra in (
                ("web", "h3site.py", ["--server-name", SITE, "--server-name", "localhost"]),
                ("files", "fileserve.py", ["--root", str(files)]),
            ):
                user = users[name]
                cert_dir = work / f"{name}-cert"
                cert_dir.mkdir(mode=0o700)
                os.chown(cert_dir, user.uid, user.gid)  # its key is readable by it alone
                log(f"starting app {name!r} as {user.name} ({script}, 2 workers)")
                apps[name] = app = spawn(name, pair.server, [
                    *user.setpriv(), PYTHON, str(APPS / script), "--app", name,
                    "--control", control, "--cert-dir", str(cert_dir), "--workers", "2", *extra,
                ], work / f"{name}.log", procs)
                line = app.lines.wait_for(lambda s: '"ready"' in s, 30)
                if line is None:
                    raise RuntimeError(f"app {name} did not become ready")
                app.ready = json.loads(line)
            rows = [
                Row("Chromium (headless)", "v4", "h3", SITE, "web"),
                Row("ngtcp2 gtlsclient", "v6", "h3", "localhost", "web"),
                Row("qh3", "v6", "h3", SITE, "web"),
                Row("aioquic", "v4", "smb", FILES, "files"),
                Row("aioquic", "v4", "doq", SITE, REFUSED),
            ]
            runs: list[Callable[[], dict[str, Any]]] = [
                lambda: run_chromium(pair, work, work / "web-cert" / "cert.pem"),
                lambda: run_gtlsclient(pair, work),
                lambda: run_python_client(pair, "qh3", "h3", socket.AF_INET6, SITE),
                lambda: run_python_client(pair, "aioquic", "file", socket.AF_INET, FILES),
                lambda: run_unowned(pair, "doq"),
            ]
            print(f"steerd demo: two QUIC apps share UDP port {PORT} behind steerd\n"
                  f"  server namespace {pair.server}: {pair.server_v4}, {pair.server_v6}\n"
                  f"  client namespace {pair.client}: real clients, each asking for an ALPN "
                  "and a server name", flush=True)
            guard = re.search(r"guard on (\S+ \(\w+\))", (work / "steerd.log").read_text())
            print(f"  XDP guard on the server's veth: {guard[1] if guard else 'none'}")
            log("running the clients from the client namespace")
            with ThreadPoolExecutor(len(runs)) as pool:
                futures = [pool.submit(run) for run in runs]
                try:
                    for row, fut in zip(rows, futures, strict=True):
                        try:
                            row.served = fut.result()
                        except (RequestFailed, OSError, ValueError,
                                subprocess.TimeoutExpired) as exc:
                            row.error = str(exc) or type(exc).__name__
                        row.check(apps)
                except KeyboardInterrupt:
                    kill_client_programs()  # else the pool waits for them to time out
                    raise
            print_table(rows, apps, users)
            print(f"\nPrometheus scrape (http://127.0.0.1:{METRICS_PORT}/metrics in the "
                  "server namespace), excerpt:")
            for line in metrics_excerpt(pair, len(rows)):
                print(f"  {line}")
            status = 0 if all(r.ok for r in rows) else 1
        except (RuntimeError, OSError, ValueError) as exc:
            log(f"FAILED: {exc}")
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut it
                signal.signal(sig, signal.SIG_IGN)
            log("tearing down: apps (SIGTERM: drain), steerd (SIGTERM), steerd purge, "
                "namespaces")
            for proc in reversed(procs.values()):  # apps drain first, then the daemon goes
                if (code := proc.stop()) != 0:
                    log(f"{proc.name} exited {code}")
                    status = 1
            if status != 0 and not interrupted:  # what the daemon and the apps said
                for name in procs:
                    logfile = work / f"{name}.log"
                    if logfile.exists() and (tail := logfile.read_text().strip().splitlines()):
                        log(f"last lines of {name}'s log:\n  " + "\n  ".join(tail[-15:]))
            if verbose and (work / "steerd.log").exists():
                print((work / "steerd.log").read_text(), file=sys.stderr)
            purge = subprocess.run(
                ["nsenter", f"--net={netns_path(pair.server)}", STEERD, "purge",
                 "-c", str(config), "--pin-dir", pin_dir],
                capture_output=True, text=True, timeout=60, check=False)
            if purge.returncode != 0 or os.path.exists(pin_dir):
                log(f"steerd purge failed ({purge.returncode}): {purge.stderr.strip()}")
                status = 1
    elapsed = time.monotonic() - started
    print(f"\n{'every client was served by the right app' if status == 0 else 'FAILED'} "
          f"({elapsed:.1f} s, everything torn down)")
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="print steerd's log at the end")
    p.add_argument("--hosts", type=int, metavar="N",
                   help="N steerd hosts behind a load balancer instead (deploy/multihost.py)")
    args = p.parse_args(argv)
    if args.hosts is not None:
        from deploy.multihost import main as multihost_main
        return multihost_main(argv)
    if os.geteuid() != 0:
        log("needs root (network namespaces, BPF): sudo ./demo.sh")
        return 1

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM: the same teardown as Ctrl-C
        signal.signal(sig, INTERRUPTS.handler)
    try:
        return demo(args.verbose)
    except KeyboardInterrupt:
        log("interrupted: torn down")
        return 130


if __name__ == "__main__":
    sys.exit(main())
