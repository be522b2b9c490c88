"""tshark as the independent oracle for what a capture holds (tests only).

Why: expected values copied from our own classifier's earlier output would prove nothing.
Wireshark has its own, independently written QUIC and TLS dissectors: it derives the Initial
keys, reassembles CRYPTO data across datagrams and parses the ClientHello. So the tests ask
tshark what each connection's DCID, version, SNI and ALPN list are, and in which datagram the
ClientHello became complete, and compare our answers with its answers.

tshark is required, never optional: CI installs it, and a missing tshark must fail the tests
that need it (``require_tshark`` raises), not skip them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = (
    "frame.number",
    "udp.dstport",
    "quic.dcid",
    "quic.version",
    "quic.frame_type",
    "quic.crypto.offset",
    "quic.crypto.length",
    "tls.handshake.type",
    "tls.handshake.extensions_server_name",
    "tls.handshake.extensions_alpn_str",
    "tls.handshake.extensions_key_share_group",
    "tls.handshake.extensions.supported_version",
)
CRYPTO_FRAME_TYPE = 6
CLIENT_HELLO = 1


class TsharkMissing(AssertionError):
    """tshark is part of the test environment; its absence is a failure, not a skip."""


def require_tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        raise TsharkMissing("tshark not found: install Debian's tshark (deploy/setup.sh does)")
    return path


@dataclass
class Connection:
    """What tshark says about one client connection (one client-chosen DCID) in a file."""

    dcid: bytes
    version: int | None  # None when tshark saw only short-header packets for this DCID
    sni: str | None = None
    alpn: list[str] = field(default_factory=list)
    key_share_groups: list[int] = field(default_factory=list)
    supported_versions: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # every datagram carrying this DCID
    crypto_frames: list[int] = field(default_factory=list)  # those carrying CRYPTO frames
    hello_frame: int | None = None  # the datagram in which the ClientHello became complete

    @property
    def hello_datagrams(self) -> int | None:
        """How many of this connection's datagrams it took to complete the ClientHello."""
        if self.hello_frame is None:
            return None
        return sum(1 for f in self.frames if f <= self.hello_frame)


def packets(path: Path, port: int | None = None) -> list[dict[str, list[str]]]:
    """Every packet's ``FIELDS`` as lists of strings (tshark's JSON field output).

    Two passes (``-2``) so that reassembly results are attached to the frame that completes
    them. ``-d`` decodes a non-standard port as QUIC; QUIC's UDP heuristic also finds it.
    """
    cmd = [require_tshark(), "-2", "-n", "-r", str(path), "-T", "json"]
    if port is not None:
        cmd += ["-d", f"udp.port=={port},quic"]
    for f in FIELDS:
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"tshark failed on {path}: {proc.stderr.strip()}")
    return [p["_source"]["layers"] for p in json.loads(proc.stdout or "[]")]


def connections(path: Path, port: int | None = None) -> dict[bytes, Connection]:
    """Client connections in ``path`` keyed by DCID, in order of first appearance.

    With ``port``, only datagrams sent to it (client->server) count. A datagram's first
    packet names its connection: coalesced packets of one datagram share the DCID. A client's
    packets to a CID the server chose appear as connections without a ClientHello.
    """
    conns: dict[bytes, Connection] = {}
    for layers in packets(path, port):
        if "quic.dcid" not in layers:
            continue
        if port is not None and int(layers["udp.dstport"][0]) != port:
            continue
        frame = int(layers["frame.number"][0])
        dcid = bytes.fromhex(layers["quic.dcid"][0].replace(":", ""))
        # Short-header (1-RTT) packets have no version field.
        version = int(layers["quic.version"][0], 16) if "quic.version" in layers else None
        conn = conns.setdefault(dcid, Connection(dcid, version))
        conn.frames.append(frame)
        types = [int(t) for t in layers.get("quic.frame_type", [])]
        if CRYPTO_FRAME_TYPE in types:
            conn.crypto_frames.append(frame)
        hs_types = [int(t) for t in layers.get("tls.handshake.type", [])]
        if CLIENT_HELLO in hs_types and conn.hello_frame is None:
            conn.hello_frame = frame
            names = layers.get("tls.handshake.extensions_server_name", [])
            conn.sni = names[0] if names else None
            conn.alpn = list(layers.get("tls.handshake.extensions_alpn_str", []))
            groups = layers.get("tls.handshake.extensions_key_share_group", [])
            conn.key_share_groups = [int(g, 0) for g in groups]
            versions = layers.get("tls.handshake.extensions.supported_version", [])
            conn.supported_versions = [int(v, 0) for v in versions]
    return conns
