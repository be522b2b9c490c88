"""Real QUIC clients (aioquic or qh3): an HTTP/3 GET and a file-service fetch.

Used by the demo (deploy/demo.py), the SDK tests and the benches. Why sans-IO over a plain
socket instead of the stacks' asyncio clients: the tests must swap the
client's UDP socket mid-connection (NAT rebinding: a new source port; migration: a new source
address) and must create sockets inside the client namespace, which needs control of the
socket. Both stacks expose the same sans-IO surface (connect, datagrams_to_send,
receive_datagram, next_event, get_timer, handle_timer), so one driver serves both.

Also a command-line load generator, run in the client namespace by the tests and the bench::

    python -m deploy.quicclient load --stack aioquic --kind h3 --host 198.18.0.2 --port 4433 \\
        --path /count --duration 5   # or --until-stdin-closes

It prints one JSON line: ok, failed, errors (first few), generations and slots seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class RequestFailed(Exception):
    pass


# Held while a stack is imported: client threads that imported qh3 at once have met it
# half-initialised (ImportError on a name its package had not bound yet); with one lock the
# first import finishes before any other thread looks.
_IMPORT_LOCK = threading.Lock()


def _stack(name: str) -> dict[str, Any]:
    """The stack's classes, imported on first use (the demo needs neither stack to start),
    under a lock so client threads may call it at once."""
    with _IMPORT_LOCK:
        return _import_stack(name)


def _import_stack(name: str) -> dict[str, Any]:
    if name == "aioquic":
        from aioquic.h3 import events as h3e
        from aioquic.h3.connection import H3Connection
        from aioquic.quic import events as qe
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
    elif name == "qh3":
        from qh3.h3 import events as h3e
        from qh3.h3.connection import H3Connection
        from qh3.quic import events as qe
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import QuicConnection
    else:
        raise ValueError(name)
    return {"conn": QuicConnection, "config": QuicConfiguration, "h3": H3Connection,
            "qe": qe, "h3e": h3e}


@dataclass
class Session:
    """One client connection on ``sock`` to ``server``; ``swap_socket`` moves it."""

    stack: str
    sock: socket.socket
    server: tuple[str, int]
    alpn: str
    server_name: str = "localhost"
    timeout: float = 5.0
    mod: dict[str, Any] = field(init=False)
    conn: Any = field(init=False)
    h3: Any = None
    received: list[bytes] = field(default_factory=list)  # every datagram, raw
    versions: list[int] | None = None  # QUIC versions to offer, first used (default: stack's)

    def __post_init__(self) -> None:
        self.mod = _stack(self.stack)
        config = self.mod["config"](is_client=True, alpn_protocols=[self.alpn],
                                    server_name=self.server_name, verify_mode=0)
        if self.versions:
            config.supported_versions = list(self.versions)
        self.conn = self.mod["conn"](configuration=config)
        self.conn.connect(self.server, now=time.time())
        self._events: list[Any] = []
        self.connected = False
        self.terminated: Any = None
        self.flush()

    def flush(self) -> None:
        for data, _ in self.conn.datagrams_to_send(now=time.time()):
            self.sock.sendto(data, self.server)

    def _step(self, deadline: float) -> None:
        """Wait for one datagram or the next timer, whichever comes first."""
        timer = self.conn.get_timer()
        wake = deadline if timer is None else min(deadline, timer)
        ready, _, _ = select.select([self.sock], [], [], max(0.0, wake - time.time()))
        if ready:
            data, addr = self.sock.recvfrom(65535)
            self.received.append(data)
            self.conn.receive_datagram(data, addr[:2], now=time.time())
        elif timer is not None and time.time() >= timer:
            self.conn.handle_timer(now=time.time())
        while (event := self.conn.next_event()) is not None:
            qe = self.mod["qe"]
            if isinstance(event, qe.HandshakeCompleted):
                self.connected = True
                if self.alpn == "h3":
                    self.h3 = self.mod["h3"](self.conn)
            elif isinstance(event, qe.ConnectionTerminated):
                self.terminated = event
            self._events.append(event)
        self.flush()

    def wait(self, cond: Any, what: str) -> None:
        deadline = time.time() + self.timeout
        while not cond():
            if self.terminated is not None:
                raise RequestFailed(f"{what}: connection closed: {self.terminated}")
            if time.time() >= deadline:
                raise RequestFailed(f"{what}: timed out")
            self._step(deadline)

    def wait_closed(self) -> Any:
        """Run until the connection ends; its ConnectionTerminated event, or None on timeout."""
        deadline = time.time() + self.timeout
        while self.terminated is None and time.time() < deadline:
            self._step(deadline)
        return self.terminated

    def handshake(self) -> None:
        self.wait(lambda: self.connected, "handshake")

    def get(self, path: str) -> tuple[int, bytes]:
        """An HTTP/3 GET on this connection: (status, body)."""
        return self.response(self.send_get(path), path)

    def send_get(self, path: str) -> int:
        """Send a GET; returns its stream id (see ``response``)."""
        self.handshake()
        sid = int(self.conn.get_next_available_stream_id())
        self.h3.send_headers(sid, [
            (b":method", b"GET"), (b":scheme", b"https"),
            (b":authority", self.server_name.encode()), (b":path", path.encode()),
        ], end_stream=True)
        self.flush()
        return sid

    def response(self, sid: int, path: str = "") -> tuple[int, bytes]:
        status, body, done = 0, bytearray(), [False]
        h3e = self.mod["h3e"]

        def finished() -> bool:
            nonlocal status
            while self._events:
                event = self._events.pop(0)
                for h in self.h3.handle_event(event):
                    if getattr(h, "stream_id", None) != sid:
                        continue
                    if isinstance(h, h3e.HeadersReceived):
                        status = int(dict(h.headers)[b":status"])
                    elif isinstance(h, h3e.DataReceived):
                        body.extend(h.data)
                    if getattr(h, "stream_ended", False):
                        done[0] = True
            return done[0]

        self.wait(finished, f"GET {path}")
        return status, bytes(body)

    def fetch(self, request: str) -> bytes:
        """One file-service request: the response's payload (``OK n`` stripped)."""
        self.handshake()
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_stream_data(sid, request.encode() + b"\n", end_stream=True)
        self.flush()
        data, done = bytearray(), [False]
        qe = self.mod["qe"]

        def finished() -> bool:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, qe.StreamDataReceived) and event.stream_id == sid:
                    data.extend(event.data)
                    done[0] = done[0] or event.end_stream
            return done[0]

        self.wait(finished, request)
        head, _, payload = bytes(data).partition(b"\n")
        if not head.startswith(b"OK "):
            raise RequestFailed(f"{request}: {head.decode()}")
        if int(head[3:]) != len(payload):
            raise RequestFailed(f"{request}: {len(payload)} bytes of {int(head[3:])}")
        return payload

    def swap_socket(self, sock: socket.socket) -> None:
        """Continue the connection from another socket (new source port or address)."""
        self.sock.close()
        self.sock = sock

    def close(self) -> None:
        if self.connected and self.terminated is None:
            self.conn.close()
            with contextlib.suppress(OSError):  # e.g. the path's address is gone
                self.flush()
        self.sock.close()


def one_request(stack: str, kind: str, host: str, port: int, what: str,
                timeout: float = 5.0, server_name: str = "localhost") -> dict[str, Any]:
    """A fresh connection, one request, closed: the JSON the server returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    alpn = "h3" if kind == "h3" else "smb"
    s = Session(stack, sock, (host, port), alpn, server_name=server_name, timeout=timeout)
    try:
        if kind == "h3":
            status, body = s.get(what)
            if status != 200:
                raise RequestFailed(f"GET {what}: status {status}")
        else:
            body = s.fetch(what)
        return dict(json.loads(body))
    finally:
        s.close()


def load(args: argparse.Namespace) -> int:
    """Requests back to back, each on a new connection, until the duration ends or stdin
    closes; then one JSON line of totals."""
    ok = failed = 0
    errors: list[str] = []
    generations: dict[str, int] = {}
    slots: dict[str, int] = {}
    end = time.time() + args.duration if args.duration else None
    what = args.path if args.kind == "h3" else "INFO"
    while True:
        if end is not None and time.time() >= end:
            break
        if args.until_stdin_closes and select.select([sys.stdin], [], [], 0)[0]:
            if not sys.stdin.readline():
                break
        try:
            info = one_request(args.stack, args.kind, args.host, args.port, what,
                               server_name=args.server_name)
            ok += 1
            g, sl = str(info.get("generation")), str(info.get("slot"))
            generations[g] = generations.get(g, 0) + 1
            slots[sl] = slots.get(sl, 0) + 1
        except (RequestFailed, OSError, ValueError) as exc:
            failed += 1
            if len(errors) < 10:
                errors.append(str(exc))
        if ok == 1 and failed == 0 and args.until_stdin_closes:
            print(json.dumps({"event": "first_ok"}), flush=True)
    print(json.dumps({"ok": ok, "failed": failed, "errors": errors,
                      "generations": generations, "slots": slots}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("one", "load"):
        c = sub.add_parser(name)
        c.add_argument("--stack", default="aioquic", choices=["aioquic", "qh3"])
        c.add_argument("--kind", default="h3", choices=["h3", "file"])
        c.add_argument("--host", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--path", default="/count", help="h3 path, or file request line")
        c.add_argument("--server-name", default="localhost")
    sub.choices["load"].add_argument("--duration", type=float, default=0.0)
    sub.choices["load"].add_argument("--until-stdin-closes", action="store_true")
    args = p.parse_args()
    if args.cmd == "one":
        print(json.dumps(one_request(args.stack, args.kind, args.host, args.port, args.path,
                                     server_name=args.server_name)))
        return 0
    return load(args)


if __name__ == "__main__":
    sys.exit(main())
