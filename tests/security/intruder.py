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
import json
import os
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


def handle(cmd: dict[str, Any], sock: socket.socket, key: bytes, control: str,
           client: ControlClient) -> dict[str, Any]:
    op = cmd["op"]
    if op == "socket_calls":
        return socket_calls(sock, tuple(cmd["service"]), tuple(cmd["client"]))  # type: ignore[arg-type]
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
