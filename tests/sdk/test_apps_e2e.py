"""Both demo apps behind one daemon on one port, real clients, real requests.

Issue 5 §3: the HTTP/3 site and the file service (ALPN smb, not SMB) served at once through
the daemon, by aioquic and qh3 clients; a connection survives NAT rebinding and migration to a
new client address and stays on its worker.
"""

from __future__ import annotations

import json
import socket

import pytest

from deploy.netns import NetnsPair, ip
from tests.e2e.conftest import Daemon
from tests.sdk.harness import FILE_TEXT, RunningApp, Session, session

pytestmark = pytest.mark.root


@pytest.mark.parametrize("stack", ["aioquic", "qh3"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_both_apps_at_once(pair: NetnsPair, both_apps: tuple[RunningApp, RunningApp],
                           sessions: list[Session], stack: str, family: int) -> None:
    web, files = both_apps
    h3 = session(pair, "h3", stack, family)
    sessions.append(h3)
    fs = session(pair, "smb", stack, family)
    sessions.append(fs)
    # both connections open before either request: the two apps serve at the same time
    h3.handshake()
    fs.handshake()
    status, page = h3.get("/")
    assert status == 200 and b"Served over HTTP/3 behind steerd" in page
    status, body = h3.get("/count")
    assert status == 200
    info = json.loads(body)
    assert info["app"] == "web" and info["slot"] in web.slots
    assert info["pid"] == web.pids[info["slot"]]
    assert fs.fetch("GET hello.txt") == FILE_TEXT
    assert fs.fetch("GET big.bin") == bytes(range(256)) * 1024
    assert b"hello.txt" in fs.fetch("LIST")
    finfo = json.loads(fs.fetch("INFO"))
    assert finfo["app"] == "files" and finfo["slot"] in files.slots
    if stack == "aioquic":  # qh3 keeps its CIDs in Rust; test_wire checks them on the wire
        # the CID the client talks to names the worker that answered
        assert web.layout.decode(h3.conn._peer_cid.cid) == info["slot"]


def test_file_service_refuses_bad_requests(pair: NetnsPair,
                                           both_apps: tuple[RunningApp, RunningApp],
                                           sessions: list[Session]) -> None:
    from deploy.quicclient import RequestFailed

    fs = session(pair, "smb")
    sessions.append(fs)
    for request, reason in (("GET ../etc/passwd", "bad_request"), ("GET nope", "not_found"),
                            ("GET .hidden", "bad_request"), ("PUT x", "bad_request")):
        with pytest.raises(RequestFailed, match=f"ERR {reason}"):
            fs.fetch(request)


def _bpf_counters(daemon: Daemon) -> dict[str, float]:
    """The steering program's event counters, summed over the daemon's groups."""
    counts: dict[str, float] = {}
    for line in daemon.metrics().splitlines():
        if line.startswith('steerd_bpf_events_total{counter="'):
            name = line.split('"')[1]
            counts[name] = counts.get(name, 0.0) + float(line.split()[-1])
    return counts


@pytest.mark.parametrize("stack", ["aioquic", "qh3"])
def test_rebinding_and_migration_stay_on_worker(
    pair: NetnsPair, daemon: Daemon, both_apps: tuple[RunningApp, RunningApp],
    sessions: list[Session], stack: str,
) -> None:
    """One connection: requests before, after a NAT rebinding (new source port) and after a
    migration to a new client address with a new CID; the same worker answers all, the
    client's new paths really carried them (the old sockets are closed), and the kernel
    steered every packet by CID alone (nothing reached the classifier)."""
    web, _ = both_apps
    s = session(pair, "h3", stack)
    sessions.append(s)
    first = json.loads(s.get("/count")[1])
    old_port = s.sock.getsockname()[1]
    before = _bpf_counters(daemon)

    rebound = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    rebound.bind((pair.client_v4, 0))
    assert rebound.getsockname()[1] != old_port
    s.swap_socket(rebound)
    second = json.loads(s.get("/count")[1])

    new_addr = "198.18.0.77"
    ip("addr", "add", f"{new_addr}/24", "dev", pair.client_if, netns=pair.client)
    try:
        moved = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
        moved.bind((new_addr, 0))
        s.swap_socket(moved)
        s.conn.change_connection_id()
        third = json.loads(s.get("/count")[1])
        cid = s.conn._peer_cid.cid if stack == "aioquic" else None
    finally:
        ip("addr", "del", f"{new_addr}/24", "dev", pair.client_if, netns=pair.client)
    after = _bpf_counters(daemon)
    assert s.terminated is None
    for info in (second, third):
        assert (info["slot"], info["pid"]) == (first["slot"], first["pid"])
    assert third["count"] > second["count"] > first["count"]
    if cid is not None:
        assert web.layout.decode(cid) == first["slot"]
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert delta.get("steer_to_classifier", 0.0) == 0, delta
    assert sum(v for k, v in delta.items() if "short" in k) > 0, delta
