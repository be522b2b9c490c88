"""``steerd exec``: sockets passed the systemd way, documented variables, a real server on them.

The command under test runs in the server namespace against a real daemon. A small Python
program reports what it inherited (pid, environment, every open fd and what it is bound to);
the HTTP/3 demo site then serves the inherited sockets (steerd.app.sdk recognises them) and a real
client fetches a page through the daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from deploy.netns import NetnsPair
from deploy.quicclient import Session
from quic.cid import CidLayout
from steerd.app.exec import environment
from steerd.app.protocol import Registration
from steerd.app.sdk import inherited_from_environment
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, PYTHON, ROOT, STEERD, Daemon, _read_line
from tests.sdk.harness import H3SITE, kill_group

pytestmark = pytest.mark.root

REPORT = r"""
import json, os, socket, sys
links = {}
for name in os.listdir("/proc/self/fd"):
    try:
        links[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass  # the directory fd listdir used, closed by now
fds = {}
for fd, link in links.items():
    if not link.startswith("socket:"):
        fds[fd] = {"link": link}
        continue
    s = socket.socket(fileno=os.dup(fd))
    fds[fd] = {"link": link, "family": int(s.family), "type": int(s.type),
               "addr": list(s.getsockname()[:2]), "inheritable": os.get_inheritable(fd)}
    s.close()
print(json.dumps({"pid": os.getpid(), "env": {k: v for k, v in os.environ.items()
                  if k.startswith(("LISTEN_", "STEERD_"))}, "fds": fds}), flush=True)
sys.exit(7)
"""


def _exec(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "exec",
         "--control", daemon.control, *args],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )


def test_exec_passes_sockets_systemd_way(daemon: Daemon) -> None:
    proc = _exec(daemon, "--app", "probe", "--alpn", "doq", "--alpn", "dot", "--workers", "2",
                 "--", PYTHON, "-c", REPORT)
    try:
        line = _read_line(proc, 20)
        assert proc.wait(20) == 7, "steerd exec passes on CMD's exit status"
    finally:
        kill_group(proc.pid)
        proc.wait(5)
    assert line is not None
    got = json.loads(line)
    env, fds = got["env"], {int(k): v for k, v in got["fds"].items()}
    assert env["LISTEN_PID"] == str(got["pid"])
    n = int(env["LISTEN_FDS"])
    assert n == 2 * 2  # two workers x the daemon's two listen addresses
    slots = [int(s) for s in env["STEERD_WORKER_SLOTS"].split(",")]
    assert len(slots) == 2
    described = json.loads(env["STEERD_SOCKETS"])
    assert [d["fd"] for d in described] == list(range(3, 3 + n))
    names = env["LISTEN_FDNAMES"].split(":")
    assert len(names) == n
    for i, d in enumerate(described):
        assert names[i] == f"slot{d['slot']}-{i % 2}"
        assert d["slot"] == slots[i // 2]
        sock = fds[d["fd"]]
        assert sock is not None and sock["type"] == socket.SOCK_DGRAM
        assert sock["addr"] == [d["address"], PORT]
        assert sock["inheritable"]
    # nothing else leaked into CMD (the control connection stays with steerd exec)
    extra = {fd: v for fd, v in fds.items() if fd > 2 + n}
    assert not extra, f"unexpected fds passed: {extra}"
    layout = json.loads(env["STEERD_CID_LAYOUT"])
    assert set(layout) == {"config_id", "host_id", "host_id_len", "slot_len", "nonce_len",
                           "cid_len"}
    # each slot its own reset key (the same on each of its sockets), no daemon-wide key
    assert "STEERD_RESET_KEY" not in env
    keys = {d["slot"]: d["reset_key"] for d in described}
    assert all(d["reset_key"] == keys[d["slot"]] for d in described)
    assert len(set(keys.values())) == 2 and all(len(bytes.fromhex(k)) == 32 for k in keys.values())
    assert env["STEERD_APP"] == "probe" and int(env["STEERD_GENERATION"]) >= 1
    # the registration ended with steerd exec
    assert "probe" not in {a["app"] for a in daemon.status()["apps"]}


def test_sdk_reads_each_slots_key_from_the_environment() -> None:
    """What ``environment`` writes, ``inherited_from_environment`` reads back: each slot's
    sockets and its own reset key (no daemon-wide key exists to pass)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    keys = {4: os.urandom(32), 9: os.urandom(32)}
    reg = Registration(
        app="envtest", generation=3, sockets=socks, layout=CidLayout(), reply={},
        workers=[{"slot": slot, "server_id": slot.to_bytes(2, "big").hex(),
                  "reset_key": keys[slot].hex(),
                  "sockets": [{"address": "127.0.0.1", "port": 443, "fd_index": i}]}
                 for i, slot in enumerate(keys)],
    )
    inherited = None
    try:
        env, ordered = environment(reg)
        assert "STEERD_RESET_KEY" not in env
        described = json.loads(env["STEERD_SOCKETS"])
        assert [bytes.fromhex(d["reset_key"]) for d in described] == list(keys.values())
        for d, sock in zip(described, ordered, strict=True):  # as if inherited at these fds
            d["fd"] = os.dup(sock.fileno())
        env["STEERD_SOCKETS"] = json.dumps(described)
        env["LISTEN_PID"] = str(os.getpid())
        inherited = inherited_from_environment(env)
        assert inherited is not None
        assert (inherited.app, inherited.generation) == ("envtest", 3)
        assert inherited.reset_keys == keys and sorted(inherited.slots) == sorted(keys)
    finally:
        for sock in socks:
            sock.close()
        if inherited is not None:
            for group in inherited.slots.values():
                for sock in group:
                    sock.close()


def test_exec_runs_the_h3_site(daemon: Daemon, pair: NetnsPair) -> None:
    certdir = Path(tempfile.mkdtemp(prefix="steerd-exec-cert-"))
    proc = _exec(daemon, "--app", "execweb", "--alpn", "h3", "--workers", "2", "--",
                 PYTHON, H3SITE, "--cert-dir", str(certdir / "c"))
    try:
        line = _read_line(proc, 30)
        assert line is not None and '"ready"' in line, line
        ready = json.loads(line)
        assert ready["app"] == "execweb" and len(ready["slots"]) == 2
        sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((pair.client_v4, 0))
        s = Session("aioquic", sock, (pair.server_v4, PORT), "h3")
        try:
            status, body = s.get("/count")
            info = json.loads(body)
            assert status == 200 and info["app"] == "execweb" and info["slot"] in ready["slots"]
            layout = ready["cid"]
            cid = s.conn._peer_cid.cid
            assert len(cid) == layout["cid_len"]
            assert int.from_bytes(cid[1:3], "big") == info["slot"]  # host_id_len 0, slot_len 2
        finally:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        kill_group(proc.pid)
        proc.wait(5)
        shutil.rmtree(certdir)


def test_exec_replaced_generation_drains(daemon: Daemon, pair: NetnsPair) -> None:
    """A second ``steerd exec --replace`` takes over; the first notices, passes SIGTERM to its
    server, and exits 0 once the server has drained."""
    certdir = Path(tempfile.mkdtemp(prefix="steerd-exec-cert-"))
    procs = []
    try:
        for extra in ([], ["--replace"]):
            proc = _exec(daemon, "--app", "execre", "--alpn", "h3", *extra, "--",
                         PYTHON, H3SITE, "--cert-dir", str(certdir / "c"))
            procs.append(proc)
            line = _read_line(proc, 30)
            assert line is not None and '"ready"' in line, line
        first, second = procs
        assert first.wait(20) == 0
        sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((pair.client_v4, 0))
        s = Session("aioquic", sock, (pair.server_v4, PORT), "h3")
        try:
            assert json.loads(s.get("/count")[1])["generation"] == 2  # only this test uses it
        finally:
            s.close()
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    finally:
        for proc in procs:
            kill_group(proc.pid)
            proc.wait(5)
        shutil.rmtree(certdir)


@pytest.mark.parametrize("who", ["steerd.app.sdk", "steerd.app.asgi"])
def test_layout_servers_refuse_learned_mode(daemon: Daemon, who: str) -> None:
    """The SDK and steerd.app.asgi issue layout CIDs, which the kernel never learns: registered
    in learned mode they would serve nobody, so they refuse to start, saying why."""
    certdir = Path(tempfile.mkdtemp(prefix="steerd-exec-cert-"))
    if who == "steerd.app.sdk":
        cmd = [PYTHON, H3SITE, "--cert-dir", str(certdir / "c")]
    else:
        from deploy.apps.certs import ensure_cert

        cert, key = ensure_cert(certdir / "c", ["localhost"])
        cmd = [PYTHON, "-m", "steerd.app.asgi", "deploy.apps.asgi_site:app",
               "--certfile", str(cert), "--keyfile", str(key)]
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path(daemon.pair.server)}", STEERD, "exec",
         "--control", daemon.control, "--app", "wrongmode", "--alpn", "h3",
         "--cid-mode", "learned", "--cid-len", "8", "--", *cmd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert (f"{who}: registered with --cid-mode learned, but {who} issues CIDs in "
                "steerd's layout: register with --cid-mode layout (the default)") in err
    finally:
        kill_group(proc.pid)
        proc.wait(5)
        shutil.rmtree(certdir)
