"""A small Starlette (ASGI) site, served over HTTP/3 by hypercorn behind steerd.

Why it exists: steerd's own demo apps are written against the SDK, but most Python web apps
are ASGI apps that know nothing of QUIC, CID layouts or steerd. This one is such an app —
plain Starlette, no steerd import — so the demo and the tests can show that
``steerd.app.asgi`` (hypercorn with steerd's CIDs) serves an unmodified ASGI app beside the SDK
apps on the same port::

    steerd exec --app asgi --alpn h3 --workers 2 -- \\
        python -m steerd.app.asgi deploy.apps.asgi_site:app --certfile cert.pem --keyfile key.pem

(from the repository root, so ``deploy.apps.asgi_site`` imports; make a demo certificate
with ``deploy/apps/certs.py``'s ``ensure_cert``).

Paths:
- ``/``            text naming this app (``PAGE_MARK``);
- ``/bytes?n=N``   N bytes of ``pattern(N)`` (N <= ``MAX_BYTES``): bodies spanning many
                   packets, checked byte for byte by the tests;
- ``/whoami``      JSON: this app's name, the steerd app it was registered as, the pid of the
                   worker process that answered, how many requests it served, and the
                   request's HTTP version (``"3"`` over HTTP/3).
"""

from __future__ import annotations

import os
from itertools import islice

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

NAME = "asgi_site"
PAGE_MARK = f"{NAME}: an unmodified ASGI app (Starlette) on HTTP/3 behind steerd"
MAX_BYTES = 16 << 20
_PATTERN = bytes(range(256))

served = 0  # requests this worker process has answered


def pattern(n: int) -> bytes:
    """The body of ``/bytes?n=N``: 0, 1, ..., 255, 0, 1, ... (n bytes), so a response that
    lost, repeated or reordered a chunk does not compare equal."""
    reps, rest = divmod(n, len(_PATTERN))
    return _PATTERN * reps + bytes(islice(_PATTERN, rest))


def _count() -> None:
    global served
    served += 1


async def index(request: Request) -> Response:
    _count()
    return PlainTextResponse(PAGE_MARK + "\n")


async def some_bytes(request: Request) -> Response:
    _count()
    try:
        n = int(request.query_params.get("n", "1024"))
    except ValueError:
        return PlainTextResponse("n must be an integer\n", status_code=400)
    if not 0 <= n <= MAX_BYTES:
        return PlainTextResponse(f"n must be 0..{MAX_BYTES}\n", status_code=400)
    return Response(pattern(n), media_type="application/octet-stream")


async def whoami(request: Request) -> Response:
    _count()
    return JSONResponse({
        "app": NAME, "steerd_app": os.environ.get("STEERD_APP"), "pid": os.getpid(),
        "served": served, "http_version": request.scope.get("http_version"),
    })


app = Starlette(routes=[
    Route("/", index), Route("/bytes", some_bytes), Route("/whoami", whoami),
])
