"""The control socket: apps claim ALPNs and server names and receive their worker sockets.

Why this shape:
- AF_UNIX SOCK_SEQPACKET keeps message boundaries (one JSON object per packet, no framing
  code) and, unlike a datagram socket, is connection-oriented: the daemon learns at once when
  an app dies (its end closes) and removes its routes, and SO_PEERCRED names the peer's uid
  and gid as the kernel saw them at connect time, which the ACL trusts.
- The daemon (root) creates every socket of the reuseport group, because all members of a
  group must have the same owner; it hands worker sockets to apps by SCM_RIGHTS, so apps need
  no privilege to serve port 443, and different users share it. The daemon closes its own
  copies right after the hand-over: when the app exits, its sockets are really closed and
  leave the group (the data plane only keeps them in its BPF map).
- The data plane is reached through the narrow ``SocketSink`` protocol, so this module can be
  tested end to end with real sockets without BPF (the BPF side has its own tests).

The protocol itself (messages, fields, errors) is documented in steerd/app/protocol.py, the
module both sides share; this is the daemon's side of it.

Where each part lives: sockets.py (group sockets, the ``SocketSink`` protocol, peer
credentials), connections.py (accept, read, reply, drop), requests.py (decode, check,
dispatch, refuse), register.py (the register op: where worker sockets are made and handed
out, and resumes checked), ops.py (deregister, drain, load, status), server.py (the
``ControlServer`` facade that mixes them in).
"""

from __future__ import annotations

from steerd.daemon.control.connections import ACCEPT_BACKOFF
from steerd.daemon.control.server import CLOSER_STOP, RESET_KEY_LEN, ControlServer
from steerd.daemon.control.sockets import (
    IP_MULTICAST_ALL,
    IP_PKTINFO,
    IPV6_MULTICAST_ALL,
    SO_PEERGROUPS,
    SocketSink,
    bind_group_socket,
    peer_credentials,
)

__all__ = [
    "ACCEPT_BACKOFF",
    "CLOSER_STOP",
    "IPV6_MULTICAST_ALL",
    "IP_MULTICAST_ALL",
    "IP_PKTINFO",
    "RESET_KEY_LEN",
    "SO_PEERGROUPS",
    "ControlServer",
    "SocketSink",
    "bind_group_socket",
    "peer_credentials",
]
