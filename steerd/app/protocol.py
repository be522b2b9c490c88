"""The control protocol: what an app and the daemon say over the control socket.

Why one module for both sides: the message format, the constants and the few types an app
gets back (a Registration, a ControlError) are the contract; the daemon's server
(steerd/daemon/control/) and the app's client (steerd/app/client.py) both import them from
here, so the two cannot drift, and an app imports nothing of the daemon.

Protocol (one JSON object per packet, UTF-8; every request may carry an ``"id"`` (string or
integer) that the reply echoes; only a resuming register carries file descriptors):

=========== ================================================== ================================
op          request fields                                     reply (besides ok, op, id)
=========== ================================================== ================================
register    app, alpn [..], server_names [..] (default: all),  app, generation, workers [{slot,
            workers (default 1), replace (default false)       server_id, reset_key (hex: the
                                                               slot's key), sockets [{address,
                                                               port, fd_index}]}], cid {...};
                                                               FDs attached
register    the same, plus resume [slots], carrying the app's  the same, plus resumed: true;
 (resume)   worker sockets as FDs (one per listen address per  no FDs (the app keeps its own)
            slot): after a daemon restart
deregister  app                                                app, slots (freed)
drain       app                                                app, generations (now draining)
load        app, workers [{slot, load}]                        app
status      (none)                                             status {...}
=========== ================================================== ================================

A worker's ``reset_key`` is ``quic.reset.slot_reset_key(master, slot)``: it advertises
``reset_token(reset_key, cid)`` for each CID, and the daemon recomputes it from its master key
to reset a dead worker's clients. An app gets only its own slots' keys (never the master, from
which the Retry token key also derives), so it cannot forge resets for other apps'
connections nor mint Retry tokens.

A reply is sent once what it reports is in force: with several classifier processes, a
register's (or deregister's, drain's) reply waits until every process holds the new registry
(at most 2 s), so a client the app tells about itself at once is not refused by a process
still deciding on the old one. Requests on one connection are answered in order.

Errors: ``{"ok": false, "op": OP or null, "reason": TOKEN, "error": MESSAGE}``; the daemon
carries on, and the connection stays open (except when the daemon cannot reply at all).
Reasons: bad_json, bad_message, unknown_op, bad_request, too_large, unexpected_fds, bad_resume,
rate_limited (the message is not even parsed, so no id is echoed), acl_denied, conflict,
unjailed (worker sockets would go to another uid while the socket jail is not attached),
not_ready (no steering program is attached to the groups yet: the daemon is starting),
exists, not_owner, not_registered, no_slots, socket_error, internal_error,
too_many_connections (then the connection is closed).

A zero-length message is indistinguishable from the end of the connection on SEQPACKET and is
treated as one. A reply the app does not read (its receive queue full) disconnects the app
rather than block the daemon.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quic.cid import CidLayout
from quic.packet import MAX_CID_LEN

DEFAULT_CONTROL_PATH = "/run/steerd/control.sock"
# The kernel passes at most SCM_MAX_FD (253) descriptors in one message; a register reply
# carries one per listen address per worker, so workers * addresses must stay within it.
SCM_MAX_FD = 253
OPS = ("deregister", "drain", "load", "register", "status")
SO_COOKIE = getattr(socket, "SO_COOKIE", 57)  # Linux >= 4.12
FD_SIZE = array.array("i").itemsize
CID_MODES = ("layout", "learned")
# RFC 9000 allows 0..20 bytes; below 4 a CID is guessable by brute force
LEARNED_CID_LEN = (4, MAX_CID_LEN)


@dataclass(frozen=True, slots=True)
class Steering:
    """How an app's packets find its workers: ``layout`` (every CID it issues is in steerd's
    CID layout: stateless, survives migration, steerd can reset its connections) or
    ``learned`` (it picks its own CIDs, all ``cid_len`` bytes long; the kernel learns them
    from its packets, see bpf/learn.c and docs/DATAPLANE.md for what that gives up)."""

    mode: str = "layout"
    cid_len: int = 0  # learned mode only

    @property
    def learned(self) -> bool:
        return self.mode == "learned"


LAYOUT = Steering()


def socket_cookie(fd: int) -> int:
    """The kernel's unique, never reused id of a socket (what REUSEPORT_SOCKARRAY stores)."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)  # ENOTSOCK for a pipe or file: the dup is ours to close
    except OSError:
        os.close(dup)
        raise
    with sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def layout_dict(layout: CidLayout) -> dict[str, int]:
    return {
        "config_id": layout.config_id, "host_id": layout.host_id,
        "host_id_len": layout.host_id_len, "slot_len": layout.slot_len,
        "nonce_len": layout.nonce_len, "cid_len": layout.cid_len,
    }


def fds_from(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % FD_SIZE])
            fds.extend(a)
    return fds


class ControlError(Exception):
    """The daemon refused a request: ``reason`` is its stable token, ``str()`` its message."""

    def __init__(self, reason: str, message: str, reply: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.reason = reason
        self.reply = dict(reply)


@dataclass
class Registration:
    """A successful register: the worker sockets (one per listen address per worker, in the
    reply's fd_index order), the CID layout to issue CIDs in, and each worker's
    stateless-reset key (in its ``workers`` entry; see :meth:`reset_key_of`)."""

    app: str
    generation: int
    workers: list[dict[str, Any]]
    sockets: list[socket.socket]
    layout: CidLayout
    reply: dict[str, Any]
    steering: Steering = LAYOUT

    @classmethod
    def from_reply(cls, reply: dict[str, Any], sockets: list[socket.socket]) -> Registration:
        cid = {k: v for k, v in reply["cid"].items() if k != "cid_len"}
        mode = reply.get("cid_mode", "layout")
        return cls(
            app=reply["app"], generation=reply["generation"], workers=reply["workers"],
            sockets=sockets, layout=CidLayout(**cid), reply=reply,
            steering=Steering(mode, reply.get("cid_len", 0)) if mode != "layout" else LAYOUT,
        )

    def reset_key_of(self, slot: int) -> bytes:
        """The stateless-reset key of worker ``slot`` (each slot has its own, so an app can
        reset only its own connections)."""
        for w in self.workers:
            if w["slot"] == slot:
                return bytes.fromhex(w["reset_key"])
        raise KeyError(slot)

    def worker_sockets(self, slot: int) -> list[socket.socket]:
        for w in self.workers:
            if w["slot"] == slot:
                return [self.sockets[s["fd_index"]] for s in w["sockets"]]
        raise KeyError(slot)

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def steering_fields(steering: Steering) -> dict[str, Any]:
    """A register message's steering fields (none for the default, layout mode)."""
    if not steering.learned:
        return {}
    return {"cid_mode": steering.mode, "cid_len": steering.cid_len}
