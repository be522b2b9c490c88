"""A daemon restart under a learned-mode app: what the kernel learned outlives the daemon.

Why: the point of pinning the egress program and the learned tables is that a daemon
restart (an upgrade, a crash) breaks no connection of an app that picks its own CIDs, and
that the app's new connections are learned again once it resumed. The plain aioquic server
runs under ``steerd exec --cid-mode learned``; a client's connection keeps working while the
daemon is down and after it is back; ``steerd exec`` resumes the app (in learned mode, as
status shows) and a new client connects.
"""

from __future__ import annotations

import signal
import socket

import pytest

from deploy.netns import NetnsPair
from deploy.quicclient import Session
from tests.e2e.conftest import PORT, Daemon, await_resumed, spawn_daemon
from tests.e2e.test_learned_mode import start_plain

pytestmark = pytest.mark.root


def _session(pair: NetnsPair) -> Session:
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((pair.client_v4, 0))
    return Session("aioquic", sock, (pair.server_v4, PORT), "h3")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "clean"])
def test_learned_connections_survive_a_daemon_restart(
    own_daemon: tuple[NetnsPair, Daemon], how: signal.Signals,
) -> None:
    pair, daemon = own_daemon
    plain = start_plain(daemon, "aioquic", "plain", "--alpn", "h3", "--cid-mode", "learned",
                        "--cid-len", "8")
    s = _session(pair)
    fresh: Session | None = None
    try:
        assert s.get("/before") == (200, b"plain /before")
        daemon.proc.send_signal(how)
        assert daemon.proc.wait(10) in (0, -signal.SIGKILL)
        # the daemon is gone: the kernel still steers by the learned CID
        assert s.get("/during") == (200, b"plain /during")

        spawn_daemon(daemon)
        status = await_resumed(daemon)
        (app,) = [a for a in status["apps"] if a["app"] == "plain"]
        (gen,) = app["generations"]
        assert (gen["cid_mode"], gen["cid_len"]) == ("learned", 8)
        assert s.get("/after") == (200, b"plain /after")
        learned = daemon.status()["counters"]["learn_cid"]
        fresh = _session(pair)  # learned by the new run's egress program
        assert fresh.get("/new") == (200, b"plain /new")
        assert daemon.status()["counters"]["learn_cid"] == learned + 1
    finally:
        s.close()
        if fresh is not None:
            fresh.close()
        plain.stop()
