"""A client host and a server host in two network namespaces joined by a veth pair.

Why: steering and XDP must be proven with real packets crossing a real interface, and demo
and test traffic must stay inside namespaces they made. ``netns_pair()`` (used by the demo,
the tests and the benches) builds both namespaces with unique names (runs and parallel
sessions never collide), IPv4 and IPv6 addresses on the veth ends (IPv6 without DAD so it
is usable at once), and always deletes them, even when the body fails. Code and sockets run
inside a namespace through steerd.daemon.dataplane.netns.run_in_netns (a thread that setns()es),
so the calling process itself owns every socket it creates; no pyroute2 and no
``ip netns exec`` for sockets.

Use::

    with netns_pair() as pair:
        sock = pair.server_socket(socket.AF_INET6, socket.SOCK_DGRAM)
        pair.ip("link", "show", netns=pair.server)
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from steerd.daemon.dataplane.netns import netns_path, run_in_netns

T = TypeVar("T")

NETNS_PREFIX = "steerd-t-"  # the tests' default; the demo uses its own
# TEST-NET style ranges that route nowhere: RFC 2544 benchmarking and a ULA prefix.
CLIENT_V4, SERVER_V4 = "198.18.0.1", "198.18.0.2"
CLIENT_V6, SERVER_V6 = "fd00:5eed::1", "fd00:5eed::2"


# Names of the namespaces this process made and has not deleted yet: a leak check can look
# at its own namespaces only, even while other test runs share the machine.
LIVE: set[str] = set()


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n NETNS] ARGS`` and return its stdout; raise with stderr on failure."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def list_netns() -> list[str]:
    """Names from ``ip netns list`` (for leak checks)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


@dataclass(frozen=True, slots=True)
class NetnsPair:
    """Names and addresses of one client/server namespace pair."""

    client: str
    server: str
    client_if: str
    server_if: str
    client_v4: str = CLIENT_V4
    server_v4: str = SERVER_V4
    client_v6: str = CLIENT_V6
    server_v6: str = SERVER_V6

    def run_client(self, fn: Callable[[], T]) -> T:
        return run_in_netns(self.client, fn)

    def run_server(self, fn: Callable[[], T]) -> T:
        return run_in_netns(self.server, fn)

    def client_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket that lives in the client namespace (usable from any thread)."""
        return self.run_client(lambda: socket.socket(family, kind, proto))

    def server_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket that lives in the server namespace (usable from any thread)."""
        return self.run_server(lambda: socket.socket(family, kind, proto))

    def server_addr(self, family: int) -> str:
        return self.server_v4 if family == socket.AF_INET else self.server_v6

    def client_addr(self, family: int) -> str:
        return self.client_v4 if family == socket.AF_INET else self.client_v6

    def exec_client(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a program in the client namespace (e.g. ping, a traffic generator)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.client, *cmd],
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def exec_server(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.server, *cmd],
            capture_output=True, text=True, timeout=timeout, check=False,
        )


def _delete_netns(name: str) -> None:
    if os.path.exists(netns_path(name)):
        ip("netns", "del", name, check=False)
    if not os.path.exists(netns_path(name)):
        LIVE.discard(name)


@contextmanager
def netns_pair(tag: str = "", prefix: str = NETNS_PREFIX) -> Iterator[NetnsPair]:
    """Build a client and a server namespace joined by veth; delete both on exit.

    Deleting a namespace destroys the veth end inside it (and so its peer and any XDP
    program attached to either), so teardown cannot leave interfaces behind.
    """
    suffix = uuid.uuid4().hex[:8]
    pair = NetnsPair(
        client=f"{prefix}{tag}c-{suffix}",
        server=f"{prefix}{tag}s-{suffix}",
        client_if=f"vc{suffix}",  # interface names are limited to 15 bytes
        server_if=f"vs{suffix}",
    )
    try:
        for name in (pair.client, pair.server):
            LIVE.add(name)
            ip("netns", "add", name)
        ip("link", "add", pair.client_if, "netns", pair.client, "type", "veth",
           "peer", "name", pair.server_if, "netns", pair.server)
        for ns, dev, v4, v6 in (
            (pair.client, pair.client_if, pair.client_v4, pair.client_v6),
            (pair.server, pair.server_if, pair.server_v4, pair.server_v6),
        ):
            ip("link", "set", "lo", "up", netns=ns)
            ip("addr", "add", f"{v4}/24", "dev", dev, netns=ns)
            ip("addr", "add", f"{v6}/64", "dev", dev, "nodad", netns=ns)
            ip("link", "set", dev, "up", netns=ns)
        yield pair
    finally:
        _delete_netns(pair.client)
        _delete_netns(pair.server)
