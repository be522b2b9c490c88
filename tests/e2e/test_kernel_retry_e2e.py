"""The kernel Retry end to end (issue 19 items 1 and 2): the real daemon with the guard at TC
ingress and ``[flood] retry = "always"``; real aioquic and qh3 clients (QUIC v1, IPv4 and
IPv6; v2 is covered by tests/dataplane/test_kernel_retry.py) complete HTTP/3 requests to the
SDK's demo app through a Retry the guard built.

What must hold: every client receives a Retry and completes; the Retries came from the kernel
(``xdp_retry_sent`` counts them, the classifier's ``steerd_retries_sent_total`` stays 0) and
the classifier accepted the kernel-minted tokens (``steerd_retry_tokens_total{result=
"accepted"}``), after the guard checked them (``xdp_token_valid``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time

import pytest

from deploy.netns import NetnsPair, netns_pair
from quic.packet import PacketType, parse_long_header
from tests.e2e.conftest import PORT, Daemon, start_daemon
from tests.sdk.harness import Session, start_demo_app


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    with netns_pair("k") as made:
        yield made


def metric(daemon: Daemon, name: str, label: str = "") -> float:
    """Sum of the samples of ``name`` whose labels contain ``label``."""
    total = 0.0
    for line in daemon.metrics().splitlines():
        if re.match(rf"{re.escape(name)}(\{{|\s)", line) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def session(pair: NetnsPair, stack: str, family: int) -> Session:
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    sock.bind((pair.client_v4 if family == socket.AF_INET else pair.client_v6, 0))
    return Session(stack, sock, (pair.server_addr(family), PORT), "h3")


def test_real_clients_complete_through_the_kernel_retry(pair: NetnsPair) -> None:
    config = (f'[xdp]\ninterfaces = ["{pair.server_if}"]\nmode = "tc"\n'
              '[flood]\nretry = "always"\n')
    with contextlib.contextmanager(start_daemon)(pair, config) as daemon:
        app = start_demo_app(daemon, "h3")
        done = 0
        try:
            for stack in ("aioquic", "qh3"):
                for family in (socket.AF_INET, socket.AF_INET6):
                    s = session(pair, stack, family)
                    try:
                        status, body = s.get("/count")
                    finally:
                        s.close()
                    assert status == 200, (stack, family, body)
                    retries = [d for d in s.received if d[0] & 0x80
                               and parse_long_header(d).packet_type is PacketType.RETRY]
                    assert retries, f"{stack}/{family}: no Retry"
                    done += 1
            deadline = time.monotonic() + 5
            while metric(daemon, "steerd_retry_tokens_total", 'result="accepted"') < done:
                assert time.monotonic() < deadline, daemon.metrics()
                time.sleep(0.05)  # the classifier reports every 0.5 s
            assert metric(daemon, "steerd_retries_sent_total") == 0, "Python sent a Retry"
            assert metric(daemon, "steerd_bpf_events_total", '"xdp_retry_sent"') >= done
            assert metric(daemon, "steerd_bpf_events_total", '"xdp_token_valid"') >= done
        finally:
            assert app.stop() == 0
