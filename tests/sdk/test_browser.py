"""Real browsers and real non-Python clients load the HTTP/3 demo site through steerd.

Chromium (headless) sends a ClientHello spread over two datagrams with its CRYPTO frames
scrambled; ngtcp2's gtlsclient uses an 18-byte client DCID. Both must reach the SDK worker
through the daemon and get the page: the whole chain with peers that are not ours.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deploy.netns import NetnsPair
from tests.e2e.conftest import Daemon
from tests.sdk.harness import RunningApp, chromium_get, gtlsclient_get, start_demo_app

pytestmark = pytest.mark.root

HOST = "www.example.test"
PAGE_MARK = "Served over HTTP/3 behind steerd"


@pytest.fixture(scope="module")
def site(daemon: Daemon) -> Iterator[RunningApp]:
    # this gtlsclient (ngtcp2 0.12) sends SNI "localhost" for a numeric host and ignores --sni
    app = start_demo_app(daemon, "h3", "--server-name", HOST, "--server-name", "localhost",
                         workers=2, name="browsersite")
    try:
        yield app
    finally:
        assert app.stop() == 0


def test_chromium_loads_the_page(pair: NetnsPair, site: RunningApp) -> None:
    out = chromium_get(pair, HOST, site)
    assert PAGE_MARK in out.stdout, out.stderr[-2000:]


def test_ngtcp2_client_gets_the_page(pair: NetnsPair, site: RunningApp) -> None:
    out, saved = gtlsclient_get(pair, HOST, ["/"])
    page = saved.get("index.html", b"").decode()
    assert out.returncode == 0, out.stderr[-2000:]
    assert PAGE_MARK in page, out.stderr[-2000:]


def _vn_sent(daemon: Daemon) -> float:
    for line in daemon.metrics().splitlines():
        if line.startswith("steerd_version_negotiation_sent_total "):
            return float(line.split()[1])
    return 0.0


def test_ngtcp2_unknown_version_negotiates_then_gets_the_page(
    pair: NetnsPair, daemon: Daemon, site: RunningApp
) -> None:
    """gtlsclient starts in a version nobody speaks: the daemon answers Version Negotiation,
    the client retries in QUIC v1 (its preferred version) and gets the page from the site."""
    before = _vn_sent(daemon)
    out, saved = gtlsclient_get(pair, HOST, ["/"], "--version=0x1a2a3a4a",
                                "--preferred-versions=v1")
    page = saved.get("index.html", b"").decode()
    assert out.returncode == 0, out.stderr[-2000:]
    assert PAGE_MARK in page, out.stderr[-2000:]
    deadline = time.monotonic() + 5  # the daemon folds its counts in every 0.5 s
    while _vn_sent(daemon) == before and time.monotonic() < deadline:
        pass
    assert _vn_sent(daemon) >= before + 1
