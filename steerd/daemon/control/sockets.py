"""The sockets of the reuseport groups and the peer on a control connection.

``bind_group_socket`` makes every group socket, a worker's (handed to an app) or a
classifier's; ``SocketSink`` is what the control server needs from the data plane to put a
worker's sockets in (the daemon implements it); ``peer_credentials`` is who the ACL sees."""

from __future__ import annotations

import array
import contextlib
import grp
import pwd
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

from steerd.app.protocol import (
    Steering,
)
from steerd.daemon.registry import Peer

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; CPython only exports it lately


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux >= 2.6.31


IPV6_MULTICAST_ALL = getattr(socket, "IPV6_MULTICAST_ALL", 29)  # Linux >= 4.20


class SocketSink(Protocol):
    """What the control server needs from the data plane: put a worker's sockets in the BPF
    sockarray under its slot, and take them out.

    ``sockets`` has one socket per listen address, in the config's order (each address is its
    own reuseport group). The sink must not close them; it may keep references (or dups) until
    ``remove_worker``. ``remove_worker`` must be idempotent: a slot whose socket the kernel
    already dropped (the app closed it) is simply cleared.
    """

    def add_worker(self, slot: int, sockets: Sequence[socket.socket]) -> None: ...

    def remove_worker(self, slot: int) -> None: ...

    def worker_cookies(self, slot: int) -> list[int | None]:
        """The SO_COOKIE of the socket in ``slot`` of each group (None: empty), so a resuming
        app can prove the sockets it presents are the ones steering its connections."""
        ...

    def set_steering(self, slot: int, steering: Steering, fresh: bool) -> None:
        """``slot``'s sockets (already added) are steered as ``steering`` says; ``fresh``:
        a new registration (its per-slot statistics start from zero), not a resume."""
        ...

    def steering_stats(self, slot: int) -> dict[str, int]:
        """How ``slot``'s packets were steered and what its egress showed (``steerd
        status``): the data plane's per-slot statistics."""
        ...


def bind_group_socket(address: str, port: int, *, classifier: bool = False) -> socket.socket:
    """A UDP socket of the reuseport group on ``address``:``port``, owned by the daemon: a
    worker's (handed to an app), or with ``classifier`` one of the daemon's own classifier
    sockets (non-blocking, a large receive buffer, each datagram's local address reported).
    One function, so both always join the same group.

    IPv6 sockets are v6-only so that "0.0.0.0" and "::" are two separate groups, each with
    its own steering, instead of one IPv6 socket silently taking IPv4-mapped traffic.

    Multicast "all" is off: by default a wildcard-bound socket gets every multicast datagram
    to its port for any group some socket of the host joined (224.0.0.1 and ff02::1 always
    are), one clone per socket, bypassing the steering program. Off, it gets only the groups
    it joins itself (none). The ingress filter (bpf/unicast.c) drops what an app lets
    in again, and broadcasts.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    flags = socket.SOCK_CLOEXEC | (socket.SOCK_NONBLOCK if classifier else 0)
    sock = socket.socket(family, socket.SOCK_DGRAM | flags)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        if classifier:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def peer_credentials(sock: socket.socket) -> Peer:
    """The peer as the ACL sees it: SO_PEERCRED uid/gid, supplementary groups, names.

    Supplementary groups come from SO_PEERGROUPS (captured at connect time, like
    SO_PEERCRED); a peer in more groups than one getsockopt buffer holds is read from
    /proc/PID/status instead. Names are resolved here, once per connection, so the registry
    stays free of system calls.
    """
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: set[int] = set()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups.update(array.array("I", raw[: len(raw) - len(raw) % 4]))
    except OSError:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            pass  # primary gid only: fewer rights, never more
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    names = set()
    for g in groups | {gid}:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    return Peer(uid=uid, gid=gid, groups=frozenset(groups), user=user,
                group_names=frozenset(names))
