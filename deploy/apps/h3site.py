"""A small HTTP/3 site served behind steerd (aioquic's h3), for demos and load tests.

Run as the site's own (unprivileged) user; the sockets come from the daemon::

    python deploy/apps/h3site.py --control /run/steerd/control.sock --cert-dir ~/h3cert \\
        --server-name www.example.com --workers 2

Paths:
- ``/``            a small HTML page;
- ``/count``       JSON naming the worker that answered (app, generation, slot, pid) and how
                   many requests that worker has served: load tests and the tests use it to
                   see which worker and which generation served a request;
- ``/slow?ms=N``   the same JSON after N milliseconds (N <= 10000): a request that is still
                   in flight when a restart begins.
Anything else is 404. SIGTERM drains (see steerd.app.sdk): open connections get an HTTP/3 GOAWAY
(no new requests on them), finish their requests and are then closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certs import ensure_cert

from steerd.app import sdk
from steerd.app.protocol import DEFAULT_CONTROL_PATH

H3_NO_ERROR = 0x100
MAX_SLOW_MS = 10_000
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>steerd h3 site</title></head>
<body><h1>Served over HTTP/3 behind steerd</h1>
<p>This connection was steered to its worker by the ALPN in your ClientHello.</p></body></html>
"""

served = 0  # requests this worker process has answered


def whoami() -> dict[str, Any]:
    w = sdk.current_worker()
    return {
        "app": w.app if w else None, "generation": w.generation if w else None,
        "slot": w.slot if w else None, "pid": w.pid if w else None, "count": served,
    }


class H3Site(QuicConnectionProtocol):
    """One connection: answers each request stream as its headers arrive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: H3Connection | None = None
        self._in_flight: set[int] = set()
        self._draining = False
        self._last_request = -4  # highest request stream id received
        self._tasks: set[asyncio.Future[None]] = set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._http = H3Connection(self._quic)
        if self._http is not None:
            for h3_event in self._http.handle_event(event):
                self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            headers = dict(event.headers)
            method = headers.get(b":method", b"").decode()
            path = headers.get(b":path", b"/").decode()
            self._in_flight.add(event.stream_id)
            self._last_request = max(self._last_request, event.stream_id)
            task = asyncio.ensure_future(self._answer(event.stream_id, method, path))
            self._tasks.add(task)  # keep a reference until done (the loop holds weak ones)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, DataReceived):
            pass  # request bodies are ignored

    async def _answer(self, stream_id: int, method: str, path: str) -> None:
        global served
        url = urlsplit(path)
        status, kind, body = 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            status, body = 405, b"method not allowed\n"
        elif url.path == "/":
            status, kind, body = 200, "text/html; charset=utf-8", PAGE
        elif url.path in ("/count", "/slow"):
            if url.path == "/slow":
                ms = int(parse_qs(url.query).get("ms", ["100"])[0])
                await asyncio.sleep(min(max(ms, 0), MAX_SLOW_MS) / 1000)
            served += 1
            status, kind = 200, "application/json"
            body = json.dumps(whoami()).encode() + b"\n"
        assert self._http is not None
        self._http.send_headers(stream_id, [
            (b":status", str(status).encode()), (b"content-type", kind.encode()),
            (b"content-length", str(len(body)).encode()), (b"server", b"steerd-h3site"),
        ])
        self._http.send_data(stream_id, b"" if method == "HEAD" else body, end_stream=True)
        self._in_flight.discard(stream_id)
        self.transmit()
        self._close_if_drained()

    def drain(self) -> None:
        """steerd.app.sdk calls this when the worker drains: GOAWAY now (RFC 9114 §5.2: the
        client sends no new requests here), close once the requests in flight are answered."""
        self._draining = True
        if self._http is not None:
            # requests on streams below this id were received and will be answered
            self._quic.send_stream_data(
                self._http._local_control_stream_id,
                encode_frame(FrameType.GOAWAY, encode_uint_var(self._last_request + 4)),
            )
            self.transmit()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self._draining and not self._in_flight:
            self._quic.close(error_code=H3_NO_ERROR, reason_phrase="server draining")
            self.transmit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control", default=DEFAULT_CONTROL_PATH)
    p.add_argument("--app", default="web")
    p.add_argument("--server-name", action="append", default=[],
                   help="claim only these names (default: all); also the certificate's names")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cert-dir", required=True, help="where this app's cert and key live")
    p.add_argument("--replace", action="store_true", help="start a new generation")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--retry", action="store_true", help="validate addresses with Retry")
    p.add_argument("--session-tickets", action="store_true",
                   help="issue session tickets: resumption and 0-RTT (each worker redeems "
                   "only its own tickets)")
    args = p.parse_args(argv)
    cert, key = ensure_cert(args.cert_dir, args.server_name or ["localhost"])
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(cert, key)
    spec = sdk.AppSpec(
        app=args.app, alpn=H3_ALPN[:1], server_names=args.server_name, workers=args.workers,
        control=args.control, replace=args.replace, drain_timeout=args.drain_timeout,
        retry=args.retry,
        ticket_store=sdk.MemoryTicketStore() if args.session_tickets else None,
    )
    return sdk.run(spec, config, create_protocol=H3Site)


if __name__ == "__main__":
    sys.exit(main())
