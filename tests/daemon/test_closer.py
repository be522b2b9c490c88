"""steerd/daemon/closer.py: what a peer hands the daemon is closed off the loop, and defused
first so that the close itself returns.

The hostile descriptor is the one of issue 18 (tests/security/intruder.py builds it): a TCP
socket whose peer never reads, its send queue full, SO_LINGER {1, 2^31-1}. Each test checks
the outcome on the far end of that connection: it is reset (TCP_CLOSE) once the closer has
really closed it, and stays established while nobody has. All on 127.0.0.1 of the test's
own process; every socket is closed, and every stuck close unblocked, in ``finally``.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from steerd.daemon.closer import Closer, is_socket
from tests.security.intruder import TCP_CLOSE, await_reset, lingering_tcp, tcp_state

RESET = struct.pack("ii", 1, 0)
WAIT = 30.0  # generous: a loaded 2-core machine


def hard_reset(peer: socket.socket) -> None:
    """End the connection from the far side (RST): a close waiting on it returns."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
    peer.close()


@pytest.fixture
def closer() -> Iterator[Closer]:
    made = Closer()
    try:
        yield made
    finally:
        assert made.stop(WAIT), "the closer did not finish"


def test_a_plain_close_of_the_lingering_socket_blocks() -> None:
    """The threat is real on this kernel: the last close() of such a socket does not return
    while its peer neither reads nor resets."""
    sock, peer = lingering_tcp()
    closing = threading.Thread(target=os.close, args=(sock.detach(),), daemon=True)
    try:
        closing.start()
        closing.join(1.0)
        assert closing.is_alive(), "close() returned: the socket did not linger"
        assert tcp_state(peer) != TCP_CLOSE
    finally:
        hard_reset(peer)
        closing.join(WAIT)
    assert not closing.is_alive()


def test_closer_resets_a_lingering_socket(closer: Closer) -> None:
    sock, peer = lingering_tcp()
    try:
        closer.close([sock.detach()])  # returns at once: it only queues
        assert await_reset([peer], WAIT) == [TCP_CLOSE]
    finally:
        peer.close()


def test_closer_drains_the_daemons_own_unix_sockets(closer: Closer) -> None:
    """A lingering socket in flight inside one of the daemon's AF_UNIX sockets (a control
    connection a peer filled), and inside a connection still waiting on its listener: the
    closer takes each out and resets it; the far end of the connection sees its end."""
    peers: list[socket.socket] = []
    keep: list[socket.socket] = []
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep.append(b)
        sock, peer = lingering_tcp()
        peers.append(peer)
        socket.send_fds(b, [b"request"], [sock.fileno()])
        sock.close()

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(f"\0steerd-closer-test-{os.getpid()}")
        listener.listen(1)
        pending = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep.append(pending)
        pending.connect(listener.getsockname())
        sock, peer = lingering_tcp()
        peers.append(peer)
        socket.send_fds(pending, [b"request"], [sock.fileno()])  # before any accept
        sock.close()

        closer.close_socket(a)
        closer.close_socket(listener)
        assert await_reset(peers, WAIT) == [TCP_CLOSE, TCP_CLOSE]
        b.settimeout(WAIT)
        assert b.recv(16) == b""  # the daemon's end is shut and closed
    finally:
        for s in peers + keep:
            s.close()


def test_non_sockets_are_closed_and_told_apart(closer: Closer) -> None:
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert is_socket(udp.fileno()) and not is_socket(r) and not is_socket(w)
        with open(__file__, "rb") as f:
            assert not is_socket(f.fileno())
        closer.close([r])
        r = -1
        poller = select.poll()
        poller.register(w, 0)  # POLLERR once no reader is left
        assert poller.poll(WAIT * 1000), "the read end was not closed"
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)
        udp.close()


def test_a_stuck_closer_leaves_the_rest_open_and_says_so() -> None:
    """A peer's AF_UNIX socket, the last holder of a lingering socket in its queue, is not
    drained (it could be shared with its sender), so its close holds the closer thread, and
    only it; what then does not fit in the bounded queue is left open and reported, never
    closed on the caller's thread. Once the far end resets, the closer carries on and
    closes what it queued."""
    left_open: list[int] = []
    closer = Closer(backlog=1, on_overflow=left_open.append)
    sock, peer = lingering_tcp()
    pipes: list[int] = []
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        socket.send_fds(b, [b"x"], [sock.fileno()])
        sock.close()
        b.close()
        closer.close([a.detach()])  # as received from a peer
        while not left_open:  # the first pipe may fit the queue; one soon will not
            r, w = os.pipe()
            pipes += [r, w]
            closer.close([r])
            assert len(pipes) <= 8, "the closer's queue never filled"
        assert all(os.fstat(fd) for fd in left_open)  # still open, not closed here
        assert tcp_state(peer) != TCP_CLOSE  # not reset: the close waits on it
    finally:
        hard_reset(peer)
        assert closer.stop(WAIT)
        for fd in left_open:
            os.close(fd)
        for fd in pipes[1::2]:  # the write ends
            os.close(fd)
