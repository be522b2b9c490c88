"""A tiny file service on ALPN ``smb`` behind steerd. IT IS NOT SMB.

It stands in for an SMB-over-QUIC server (which claims ALPN ``smb`` on UDP 443) so that two
real apps with different ALPNs share the port in demos and tests. It speaks no SMB at all:
the protocol is a made-up request/response exchange, one request per client-initiated
bidirectional QUIC stream:

    request  (client, then FIN):  ``GET <name>\\n``  |  ``LIST\\n``  |  ``INFO\\n``
    response (server, then FIN):  ``OK <length>\\n`` followed by <length> bytes,
                                  or ``ERR <reason>\\n``

``GET`` returns a regular file directly inside the served directory (no paths, no dot
files, no symlinks out); ``LIST`` the names, one per line; ``INFO`` JSON naming the worker
that answered (app, generation, slot, pid, count). Reasons: ``bad_request``, ``not_found``,
``too_large``.

Run as the file service's own (unprivileged) user::

    python deploy/apps/fileserve.py --root /srv/files --cert-dir ~/smbcert --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certs import ensure_cert

from steerd.app import sdk
from steerd.app.protocol import DEFAULT_CONTROL_PATH

ALPN = "smb"
MAX_REQUEST = 1024
MAX_FILE = 64 << 20
APPLICATION_NO_ERROR = 0

served = 0


class FileService(QuicConnectionProtocol):
    """One connection; ``root`` is set on the class by ``main`` before the workers fork."""

    root: Path = Path(".")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._requests: dict[int, bytes] = {}
        self._draining = False

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived):
            return
        buf = self._requests.get(event.stream_id, b"") + event.data
        if len(buf) > MAX_REQUEST:
            self._reply(event.stream_id, b"ERR bad_request\n")
            return
        if not event.end_stream:
            self._requests[event.stream_id] = buf
            return
        self._reply(event.stream_id, self._answer(buf))

    def _answer(self, request: bytes) -> bytes:
        global served
        line = request.decode("utf-8", "replace").rstrip("\n")
        verb, _, name = line.partition(" ")
        served += 1
        if verb == "INFO" and not name:
            w = sdk.current_worker()
            body = json.dumps({
                "app": w.app if w else None, "generation": w.generation if w else None,
                "slot": w.slot if w else None, "pid": os.getpid(), "count": served,
            }).encode()
            return b"OK %d\n" % len(body) + body
        if verb == "LIST" and not name:
            names = sorted(p.name for p in self.root.iterdir()
                           if p.is_file() and not p.name.startswith("."))
            body = "".join(n + "\n" for n in names).encode()
            return b"OK %d\n" % len(body) + body
        if verb != "GET" or not name or "/" in name or name.startswith(".") or "\0" in name:
            return b"ERR bad_request\n"
        path = self.root / name
        if path.is_symlink() or not path.is_file():
            return b"ERR not_found\n"
        if path.stat().st_size > MAX_FILE:
            return b"ERR too_large\n"
        body = path.read_bytes()
        return b"OK %d\n" % len(body) + body

    def _reply(self, stream_id: int, data: bytes) -> None:
        self._requests.pop(stream_id, None)
        self._quic.send_stream_data(stream_id, data, end_stream=True)
        self.transmit()
        self._close_if_drained()

    def drain(self) -> None:
        """steerd.app.sdk calls this when the worker drains: close once no request is open."""
        self._draining = True
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self._draining and not self._requests:
            self._quic.close(error_code=APPLICATION_NO_ERROR, reason_phrase="server draining")
            self.transmit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A tiny file service on ALPN smb (NOT SMB)")
    p.add_argument("--control", default=DEFAULT_CONTROL_PATH)
    p.add_argument("--app", default="files")
    p.add_argument("--root", required=True, help="the directory whose files are served")
    p.add_argument("--server-name", action="append", default=[])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cert-dir", required=True, help="where this app's cert and key live")
    p.add_argument("--replace", action="store_true", help="start a new generation")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    FileService.root = Path(args.root).resolve()
    cert, key = ensure_cert(args.cert_dir, args.server_name or ["localhost"])
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.load_cert_chain(cert, key)
    spec = sdk.AppSpec(
        app=args.app, alpn=[ALPN], server_names=args.server_name, workers=args.workers,
        control=args.control, replace=args.replace, drain_timeout=args.drain_timeout,
    )
    return sdk.run(spec, config, create_protocol=FileService)


if __name__ == "__main__":
    sys.exit(main())
