"""A hostile tenant: registers for real as whatever uid it runs as, then attacks the shared
port with what the daemon handed it, on command.

Run in the daemon's network namespace as ``intruder.py CONTROL APP ALPN [CID_LEN]`` (with
CID_LEN: registered in learned-CID mode, CIDs of that length); it prints one JSON line when
registered, then reads one JSON command per stdin line and answers each with one
JSON line. Everything it does is what any app could do with its registration: the worker
socket, the per-slot key, the control socket.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from quic.reset import build_stateless_reset, reset_token
from quic.token import build_retry_token, derive_token_key
from steerd.app.client import ControlClient
from steerd.app.protocol import ControlError

SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
SO_BINDTOIFINDEX = 62


def errno_of(call: Callable[[], object]) -> int:
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    return 0


def socket_calls(sock: socket.socket, service: tuple[str, int], client: tuple[str, int]
                 ) -> dict[str, int]:
    """Each call that would take the port from the other tenants, and its errno (0: done)."""
    # Classic BPF, one instruction, "return 0": every datagram of the group to socket 0.
    insn = (ctypes.c_uint64 * 1)(int.from_bytes(struct.pack("HBBI", 0x06, 0, 0, 0), "little"))
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(insn))
    results = {
        "attach_cbpf": errno_of(lambda: sock.setsockopt(
            socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)),
        # Any fd: the jail refuses before the kernel even looks at the program.
        "attach_ebpf": errno_of(lambda: sock.setsockopt(
            socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("i", sock.fileno()))),
        "detach": errno_of(lambda: sock.setsockopt(
            socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, struct.pack("i", 0))),
        "bindtodevice": errno_of(lambda: sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo\0")),
        "bindtoifindex": errno_of(lambda: sock.setsockopt(
            socket.SOL_SOCKET, SO_BINDTOIFINDEX, struct.pack("i", 1))),
        "connect": errno_of(lambda: sock.connect(client)),
    }
    fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        results["bind_new"] = errno_of(lambda: fresh.bind(service))
    finally:
        fresh.close()
    return results


def server_long_header(scid: bytes) -> bytes:
    """A v1 Handshake packet as a server sends it, with ``scid`` as its Source Connection ID:
    what the learned-mode egress program learns from (the payload is junk)."""
    dcid = os.urandom(8)
    return (bytes([0xE3]) + (1).to_bytes(4, "big") + bytes([len(dcid)]) + dcid
            + bytes([len(scid)]) + scid + b"\x40\x18" + os.urandom(24))


_SOCKS: list[socket.socket] = []  # the worker's sockets, one per listen address
TCP_CLOSE = 7  # tcpi_state: the connection is gone (here: reset by its peer)
_PEERS: list[socket.socket] = []  # the far ends of lingering sockets handed to the daemon
_LOCKS: dict[str, int] = {}  # planted lock files, held (flock) until release_locks


def lingering_tcp() -> tuple[socket.socket, socket.socket]:
    """A TCP socket whose last close waits forever, and its peer (keep it open): the peer
    never reads, so the socket's send queue stays full behind a zero window, and its
    SO_LINGER is {1, 2^31-1}. The descriptor that froze the daemon's loop (issue 18)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by peer
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.connect(listener.getsockname())
        peer, _ = listener.accept()
    finally:
        listener.close()
    sock.setblocking(False)
    while True:
        try:
            sock.send(b"x" * 65536)
        except BlockingIOError:
            break
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 2**31 - 1))
    return sock, peer


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (tcpi_state, the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def await_reset(peers: list[socket.socket], wait: float) -> list[int]:
    """The TCP states of ``peers`` once each was reset (the kernel reports POLLHUP/POLLERR,
    which poll() always watches), or when ``wait`` s have passed."""
    deadline = time.monotonic() + wait
    for peer in peers:
        poller = select.poll()
        poller.register(peer, 0)  # nothing but the events always reported: ERR, HUP
        left = deadline - time.monotonic()
        if left > 0:
            poller.poll(left * 1000)
    return [tcp_state(p) for p in peers]


def hostile_fd(kind: str) -> int:
    """A descriptor of ``kind`` for a request: lingering_tcp (its peer kept in _PEERS),
    pipe (a read end), file (a regular file), udp (an unbound socket)."""
    if kind == "lingering_tcp":
        sock, peer = lingering_tcp()
        _PEERS.append(peer)
        return sock.detach()
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "file":
        with open(__file__, "rb") as f:  # a regular file this user can read
            return os.dup(f.fileno())
    if kind == "udp":
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()
    raise ValueError(f"unknown descriptor kind {kind}")


def plant_lock(path: str) -> int:
    """Create and flock ``path`` as this user, writing pid 1 in it (the lock file the daemon
    once took in the world-writable /run/lock); the errno, 0 when planted."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        return exc.errno or -1
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"1\n")
    _LOCKS[path] = fd
    return 0


def handle(cmd: dict[str, Any], sock: socket.socket, key: bytes, control: str,
           client: ControlClient) -> dict[str, Any]:
    op = cmd["op"]
    if op == "socket_calls":
        return socket_calls(sock, tuple(cmd["service"]), tuple(cmd["client"]))  # type: ignore[arg-type]
    if op == "flags_off":
        # Clearing SO_REUSEPORT would make the socket win every lookup on the port (the
        # newest IPv4 socket heads the chain; a socket without the flag wins ties), on each
        # of the worker's sockets (IPv4 and IPv6); then what the flags read afterwards.
        out: dict[str, Any] = {}
        for held in _SOCKS:
            family = "v6" if held.family == socket.AF_INET6 else "v4"
            for name, opt in (("reuseport", socket.SO_REUSEPORT),
                              ("reuseaddr", socket.SO_REUSEADDR)):
                out[f"{name}_off_{family}"] = errno_of(lambda h=held, o=opt: h.setsockopt(
                    socket.SOL_SOCKET, o, 0))
            out[f"reuseport_{family}"] = held.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        return out
    if op == "status":
        return {"apps": [a["app"] for a in client.status()["apps"]]}
    if op == "reset":
        # A stateless reset for someone else's CID, keyed with what this app holds, sent from
        # the service port (the client cannot tell it from the real server's datagrams).
        token = reset_token(key, bytes.fromhex(cmd["cid"]))
        sock.sendto(build_stateless_reset(token, os.urandom(40)), tuple(cmd["to"]))
        return {"token": token.hex()}
    if op == "send":
        sock.sendto(bytes.fromhex(cmd["data"]), tuple(cmd["to"]))
        return {"sent": True}
    if op == "long":
        # Server long-header packets with chosen SCIDs (or ``count`` random ones of
        # ``cid_len`` bytes), for the learner to take as this app's CIDs.
        scids = [bytes.fromhex(c) for c in cmd.get("scids", [])]
        scids += [os.urandom(cmd["cid_len"]) for _ in range(cmd.get("count", 0))]
        for scid in scids:
            sock.sendto(server_long_header(scid), tuple(cmd["to"]))
        return {"sent": len(scids)}
    if op == "mint":
        # A Retry token minted the way a worker could when it held the daemon's key.
        token = build_retry_token(derive_token_key(key), cmd["client_ip"],
                                  bytes.fromhex(cmd["odcid"]), bytes.fromhex(cmd["scid"]),
                                  time.monotonic())
        return {"token": token.hex()}
    if op == "fd_request":
        # A request with descriptors attached on this app's own control connection; the
        # intruder closes its copies at once, so the daemon's close is the last one.
        fds = [hostile_fd(kind) for kind in cmd["kinds"]]
        try:
            client.send_raw(json.dumps(cmd["message"]).encode(), fds)
        finally:
            for fd in fds:
                os.close(fd)
        reply, socks = client.receive()
        for s in socks:
            s.close()
        return {"reply": reply}
    if op == "peers_reset":
        # Whether the daemon's close of each lingering socket reset it (its peer sees the
        # connection gone) within ``wait`` s; the peers are closed afterwards.
        states = await_reset(_PEERS, cmd["wait"])
        for peer in _PEERS:
            peer.close()
        _PEERS.clear()
        return {"states": states}
    if op == "plant_lock":
        return {"errno": plant_lock(cmd["path"])}
    if op == "release_locks":
        for path, fd in _LOCKS.items():
            os.close(fd)
            os.unlink(path)
        released = sorted(_LOCKS)
        _LOCKS.clear()
        return {"released": released}
    if op == "register":
        try:
            with ControlClient(control) as other:
                reply, socks = other.call(cmd["message"])
                for s in socks:
                    s.close()
                return {"ok": True, "reply": reply}
        except ControlError as exc:
            return {"ok": False, "reason": exc.reason, "message": str(exc)}
        except OSError as exc:
            return {"ok": False, "reason": "os_error", "message": str(exc)}
    return {"error": f"unknown op {op}"}


def main() -> int:
    control, app, alpn = sys.argv[1:4]
    message: dict[str, Any] = {"op": "register", "app": app, "alpn": [alpn]}
    if len(sys.argv) > 4:
        message.update(cid_mode="learned", cid_len=int(sys.argv[4]))
    client = ControlClient(control)
    reply, socks = client.call(message)
    _SOCKS.extend(socks)
    key = bytes.fromhex(reply["workers"][0]["reset_key"])
    print(json.dumps({"event": "registered", "uid": os.getuid(), "reply": reply}), flush=True)
    for line in sys.stdin:
        try:
            out = handle(json.loads(line), socks[0], key, control, client)
        except Exception as exc:  # report, keep taking commands
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
