"""The control client an app uses: one request, one reply, over the control socket.

The protocol (messages, errors, the Registration a register returns) is in
steerd/app/protocol.py; steerd.app.sdk and ``steerd exec`` are built on this client.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from steerd.app.protocol import (
    FD_SIZE,
    LAYOUT,
    SCM_MAX_FD,
    ControlError,
    Registration,
    Steering,
    fds_from,
    steering_fields,
)


class ControlClient:
    """A blocking client: one request, one reply. Keep it open as long as the app serves:
    closing it (or exiting) withdraws the app's routes."""

    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def receive(self) -> tuple[dict[str, Any], list[socket.socket]]:
        """The next reply and the sockets attached to it (owned by the caller)."""
        # recvmsg, not socket.recv_fds: in Python 3.11 recv_fds drops its flags argument, and
        # without MSG_CMSG_CLOEXEC the worker sockets would leak into programs the app runs.
        data, ancdata, _, _ = self.sock.recvmsg(
            1 << 20, socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE), socket.MSG_CMSG_CLOEXEC
        )
        fds = fds_from(ancdata)
        sockets = [socket.socket(fileno=fd) for fd in fds]
        if not data:
            for s in sockets:
                s.close()
            raise ConnectionError("steerd closed the control connection")
        return json.loads(data), sockets

    def call(
        self, message: Mapping[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[socket.socket]]:
        """Send a request; return the successful reply or raise ControlError."""
        self.send_raw(json.dumps(message).encode(), fds)
        reply, sockets = self.receive()
        if not reply.get("ok"):
            for s in sockets:
                s.close()
            raise ControlError(reply.get("reason", ""), reply.get("error", ""), reply)
        return reply, sockets

    def register(
        self, app: str, alpn: Sequence[str], server_names: Sequence[str] = (), workers: int = 1,
        replace: bool = False, steering: Steering = LAYOUT,
    ) -> Registration:
        reply, sockets = self.call({
            "op": "register", "app": app, "alpn": list(alpn),
            "server_names": list(server_names), "workers": workers, "replace": replace,
            **steering_fields(steering),
        })
        return Registration.from_reply(reply, sockets)

    def resume(
        self, app: str, alpn: Sequence[str], server_names: Sequence[str],
        previous: Registration, slots: Sequence[int] | None = None,
    ) -> Registration:
        """After a daemon restart: take back ``previous``'s slots (or those of ``slots``
        still served) with the sockets it holds. The returned Registration shares
        ``previous``'s sockets."""
        if slots is None:
            slots = [w["slot"] for w in previous.workers]
        socks = [s for slot in slots for s in previous.worker_sockets(slot)]
        reply, _ = self.call({
            "op": "register", "app": app, "alpn": list(alpn),
            "server_names": list(server_names), "resume": list(slots),
            **steering_fields(previous.steering),
        }, [s.fileno() for s in socks])
        return Registration.from_reply(reply, socks)

    def deregister(self, app: str) -> list[int]:
        return list(self.call({"op": "deregister", "app": app})[0]["slots"])

    def drain(self, app: str) -> list[int]:
        return list(self.call({"op": "drain", "app": app})[0]["generations"])

    def load(self, app: str, loads: Mapping[int, float]) -> None:
        self.call({"op": "load", "app": app,
                   "workers": [{"slot": s, "load": v} for s, v in loads.items()]})

    def status(self) -> dict[str, Any]:
        return dict(self.call({"op": "status"})[0]["status"])


RESUME_RETRY = 0.1  # seconds between resume attempts while the daemon restarts


def resume_once(
    path: str, previous: Registration, alpn: Sequence[str], server_names: Sequence[str],
    slots: Sequence[int] | None = None,
) -> tuple[ControlClient, Registration] | None:
    """One attempt to hand ``previous``'s slots (or those of ``slots``) to a restarted daemon:
    the new connection and registration, or None while the daemon is not back (retry every
    RESUME_RETRY). Raises ControlError if the daemon refused: for good, there is nothing to
    resume into. The one resume loop of the SDK and ``steerd exec``."""
    client = None
    try:
        client = ControlClient(path, timeout=5)
        return client, client.resume(previous.app, alpn, server_names, previous, slots)
    except (ControlError, OSError) as exc:
        if client is not None:
            client.close()
        if isinstance(exc, ControlError):
            raise
        return None


def own_generation(status: Mapping[str, Any], app: str, generation: int) -> dict[str, Any] | None:
    """Our generation's entry in a ``status`` reply (None: gone), where an app reads whether
    it was replaced (``state`` "draining") and how its packets are steered."""
    for entry in status.get("apps", []):
        if entry["app"] == app:
            for g in entry["generations"]:
                if g["generation"] == generation:
                    return dict(g)
    return None
