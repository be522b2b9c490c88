"""The ASGI site on the stock hypercorn command, in learned mode, behind a real daemon.

Why: this is the issue's promise to Python's ASGI world, taken literally: ``steerd exec
--cid-mode learned --cid-len 8 -- hypercorn --quic-bind fd://3 ... app`` with nothing of
steerd's in the server process. hypercorn (aioquic inside) picks random 8-byte CIDs; the
kernel learns them from its packets. Beside it the SDK's file service (layout mode, ALPN smb)
serves on the same port. Real clients fetch: headless Chromium, ngtcp2's gtlsclient, aioquic
and qh3 over IPv4 and IPv6. A client that moves to a new source port keeps its connection (a
NAT rebinding: the learned CID finds the worker), and one that switches to a CID hypercorn
sent it encrypted keeps it too (the learned client address finds the worker); the daemon's
per-app statistics say both happened, and that hypercorn's packets matched its mode.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.apps.asgi_site import NAME, PAGE_MARK, pattern
from deploy.apps.certs import ensure_cert
from deploy.netns import NetnsPair
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import ROOT, STEERD, Daemon, _read_line
from tests.e2e.test_asgi_layout import HOST, _gtlsclient, _routed
from tests.sdk.harness import (  # noqa: F401 - daemon, pair, sessions: fixtures
    RunningApp,
    Session,
    chromium_get,
    daemon,
    kill_group,
    pair,
    session,
    sessions,
    start_demo_app,
)

pytestmark = pytest.mark.root

HYPERCORN = str(ROOT / ".venv" / "bin" / "hypercorn")
SITE, FILES = "asgi-learned", "files"
BIG = 300_000


def start_hypercorn(daemon: Daemon, name: str) -> RunningApp:  # noqa: F811
    """The stock hypercorn command under ``steerd exec`` in learned mode; returns once
    hypercorn logged that it serves QUIC (its only ready signal)."""
    workdir = Path(tempfile.mkdtemp(prefix="steerd-hypercorn-"))
    cert_file, key_file = ensure_cert(workdir / "cert", [HOST, "localhost"])
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "exec",
         "--control", daemon.control, "--app", name, "--alpn", "h3",
         "--server-name", HOST, "--server-name", "localhost",
         "--cid-mode", "learned", "--cid-len", "8", "--",
         HYPERCORN, "--quic-bind", "fd://3", "--quic-bind", "fd://4",
         "--bind", f"unix:{workdir / 'tcp.sock'}", "--graceful-timeout", "1",
         "--certfile", str(cert_file), "--keyfile", str(key_file),
         "deploy.apps.asgi_site:app"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,
    )
    seen: list[str] = []
    while not any("QUIC" in line and "Running on" in line for line in seen):
        line = _read_line(proc, 30)
        if line is None:
            kill_group(proc.pid)
            proc.wait(5)
            shutil.rmtree(workdir, ignore_errors=True)
            raise AssertionError(f"hypercorn did not start: {''.join(seen)}")
        seen.append(line)
    return RunningApp(name, proc, {"slots": []}, workdir, extra={"log": seen})


@pytest.fixture(scope="module")
def apps(daemon: Daemon) -> Iterator[tuple[RunningApp, RunningApp]]:  # noqa: F811
    site = start_hypercorn(daemon, SITE)
    try:
        files = start_demo_app(daemon, "file", workers=1, name=FILES)
    except BaseException:
        site.stop()
        raise
    try:
        yield site, files
    finally:
        site.stop()
        files.stop()


def _generation(daemon: Daemon, app: str) -> dict[str, Any]:  # noqa: F811
    (gen,) = [g for a in daemon.status()["apps"] if a["app"] == app
              for g in a["generations"]]
    return gen


def _steering(gen: dict[str, Any]) -> dict[str, int]:
    total: dict[str, int] = {}
    for w in gen["workers"]:
        for k, v in w["steering"].items():
            total[k] = total.get(k, 0) + v
    return total


def _whoami(body: bytes) -> dict[str, Any]:
    info = json.loads(body)
    assert info["app"] == NAME and info["steerd_app"] == SITE, info
    assert info["http_version"] == "3", info
    return info


def test_stock_hypercorn_serves_real_clients_in_learned_mode(
    pair: NetnsPair, daemon: Daemon, apps: tuple[RunningApp, RunningApp],  # noqa: F811
    sessions: list[Session],  # noqa: F811
) -> None:
    site, _files = apps
    gen = _generation(daemon, SITE)
    assert (gen["cid_mode"], gen["cid_len"]) == ("learned", 8)
    before = _steering(gen)
    routed_before = _routed(daemon)

    out = chromium_get(pair, HOST, site, "/whoami")
    found = re.search(r"\{[^<]*\}", out.stdout)
    assert found is not None, out.stderr[-2000:]
    _whoami(found[0].replace("&quot;", '"').encode())

    saved = _gtlsclient(pair, ["/", f"/bytes?n={BIG}"])
    assert saved.get("index.html") == (PAGE_MARK + "\n").encode(), sorted(saved)
    assert pattern(BIG) in saved.values(), {k: len(v) for k, v in saved.items()}

    clients = 2  # Chromium, ngtcp2
    for stack in ("aioquic", "qh3"):
        for family in (socket.AF_INET, socket.AF_INET6):
            h3 = session(pair, "h3", stack, family)
            sessions.append(h3)
            fs = session(pair, "smb", stack, family)
            sessions.append(fs)
            clients += 1
            assert h3.get("/") == (200, (PAGE_MARK + "\n").encode())
            status, body = h3.get(f"/bytes?n={BIG}")
            assert status == 200 and body == pattern(BIG)
            assert json.loads(fs.fetch("INFO"))["app"] == FILES
            # NAT rebinding: a new source port, the same CID
            moved = pair.client_socket(family, socket.SOCK_DGRAM)
            moved.bind((pair.client_addr(family), 0))
            h3.swap_socket(moved)
            status, body = h3.get("/whoami")
            assert status == 200
            pid = _whoami(body)["pid"]
            if stack == "aioquic":  # qh3 keeps its CIDs in Rust: no change_connection_id
                # a CID hypercorn sent encrypted (NEW_CONNECTION_ID): never learned, the
                # client's address finds the worker
                h3.conn.change_connection_id()
                status, body = h3.get("/whoami")
                assert status == 200 and _whoami(body)["pid"] == pid
            h3.close()
            fs.close()

    after = _steering(_generation(daemon, SITE))
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert gained.get("egress_learned", 0) >= clients, gained
    assert gained.get("steered_learned_cid", 0) > 0, gained
    assert gained.get("steered_learned_peer", 0) > 0, gained  # the two changed CIDs
    assert after.get("egress_off_mode", 0) == 0, after
    assert after.get("egress_refused", 0) == 0 and after.get("egress_conflict", 0) == 0, after
    # the same figures per app on /metrics (steerd_app_packets_total{app,what})
    exported = {m[1]: float(m[2]) for m in re.finditer(
        rf'^steerd_app_packets_total\{{app="{SITE}",what="(\w+)"\}} (\S+)$', daemon.metrics(),
        re.M)}
    assert exported.get("egress_learned", 0) >= after["egress_learned"] > 0, exported
    assert exported.get("steered_learned_cid", 0) >= after["steered_learned_cid"], exported
    files_gen = _generation(daemon, FILES)
    assert files_gen["cid_mode"] == "layout"
    assert _steering(files_gen).get("egress_off_mode", 0) == 0  # the SDK writes the layout

    # every first flight went to the app owning its ALPN (the daemon folds its counts in
    # every 0.5 s)
    want = {SITE: clients, FILES: 4}
    deadline = time.monotonic() + 5
    while True:
        after_routed = _routed(daemon)
        routed = {app: after_routed[app] - routed_before.get(app, 0.0) for app in after_routed
                  if after_routed[app] != routed_before.get(app, 0.0)}
        if routed == want or time.monotonic() > deadline:
            break
    assert routed == want
