"""A plain HTTP/3 server, written against aioquic's or qh3's own public API and nothing of
steerd's: what a user brings to ``steerd exec`` unchanged. It serves the sockets ``steerd
exec`` passes (LISTEN_FDS, from fd 3) with the library's QuicServer, so every CID is the
library's own random one: the learned-mode tests' unmodified server.

    plain_h3_server.py --stack aioquic|qh3 --cert-dir DIR --name NAME

``GET /...`` answers ``NAME <path>``; ``GET /bytes/N`` answers N bytes. Prints ``ready``
once serving. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy.apps.certs import ensure_cert


def _modules(stack: str) -> dict[str, Any]:
    return {
        "config": importlib.import_module(f"{stack}.quic.configuration").QuicConfiguration,
        "server": importlib.import_module(f"{stack}.asyncio.server").QuicServer,
        "protocol": importlib.import_module(f"{stack}.asyncio.protocol").QuicConnectionProtocol,
        "h3": importlib.import_module(f"{stack}.h3.connection"),
        "h3events": importlib.import_module(f"{stack}.h3.events"),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stack", choices=("aioquic", "qh3"), required=True)
    p.add_argument("--cert-dir", required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    mods = _modules(args.stack)
    h3 = mods["h3"]
    events = mods["h3events"]
    name = args.name.encode()

    class Site(mods["protocol"]):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self._h3: Any = None

        def quic_event_received(self, event: Any) -> None:
            if self._h3 is None:
                self._h3 = h3.H3Connection(self._quic)
            for ev in self._h3.handle_event(event):
                if isinstance(ev, events.HeadersReceived):
                    headers = dict(ev.headers)
                    path = headers.get(b":path", b"/")
                    if path.startswith(b"/bytes/"):
                        body = bytes(int(path[7:]))
                    else:
                        body = name + b" " + path
                    self._h3.send_headers(ev.stream_id, [
                        (b":status", b"200"), (b"content-length", str(len(body)).encode())])
                    self._h3.send_data(ev.stream_id, body, end_stream=True)
            self.transmit()

    cert, key = ensure_cert(args.cert_dir, ["localhost"])
    # qh3's H3Connection always announces HTTP/3 datagrams, which needs the transport
    # parameter (clients close with H3_SETTINGS_ERROR otherwise); aioquic's does not mind
    config = mods["config"](is_client=False, alpn_protocols=["h3"],
                            max_datagram_frame_size=65536)
    config.load_cert_chain(str(cert), str(key))
    count = int(os.environ.get("LISTEN_FDS", "0"))
    socks = [socket.socket(fileno=3 + i) for i in range(count)]

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        for sock in socks:
            await loop.create_datagram_endpoint(
                lambda: mods["server"](configuration=config, create_protocol=Site), sock=sock)
        print("ready", flush=True)
        await stop.wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
