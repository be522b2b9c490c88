"""``steerd classify FILE``: what did each client ask for, and why did it go where it went?

An operator's tool. It replays the client datagrams of a pcap/pcapng capture through the very
first-flight assembler the daemon uses (``quic.flight``), with the capture's own timestamps as
the assembler's clock, and prints one JSON object per line, as soon as each answer is known.

Which datagrams are fed, and why: the classifier only ever sees the client side of a first
flight, so only client->server long-header datagrams are fed. The client side is the
destination ``--port`` when given; without it, whoever sent the first QUIC-looking long-header
datagram of a UDP flow (the pair of endpoints) is its client. Passed over without a line, as
the daemon's data path would route them elsewhere: server->client datagrams (their Source
CIDs are remembered, see below), short-header datagrams, Handshake packets, datagrams whose
DCID a server chose (the client switches to it after the server's first Initial), and later
datagrams (retransmissions, 0-RTT) of a connection already classified under the same DCID.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from quic.errors import QuicError
from quic.flight import (
    AssemblerConfig,
    FirstFlightAssembler,
    NeedMore,
    Ready,
    Rejected,
    VersionNegotiationNeeded,
)
from quic.packet import PacketType, parse_long_header
from steerd.tools.pcap import CaptureError, Datagram, read_datagrams

Endpoint = tuple[str, int]

EPILOG = """\
output, one JSON object per line:
  {"dcid": HEX, "version": "0x00000001", "sni": STR|null, "alpn": [STR, ...],
   "datagrams": N, "verdict": "classified", ...}   a complete ClientHello
  {"dcid": HEX, "version": ..., "verdict": "version_negotiation", ...}
                                     a datagram in a version steerd does not speak
  {"verdict": "rejected", "reason": STR, "dcid": HEX (when known), ...}
                                     a datagram the classifier refuses, and why
  {"dcid": HEX, "version": ..., "datagrams": N, "verdict": "incomplete",
   "reason": "end_of_capture"|"ttl_expired", ...}
                                     a first flight whose ClientHello never completed
  Every line also names the client ("client": "ADDR:PORT") and the capture frame numbers
  ("frames" or "frame"). "sni_is_outer": true means the ClientHello carried ECH (GREASE or
  real): the SNI is then the outer public name.

which datagrams count: only client->server long-header datagrams (Initial, 0-RTT) are fed.
The client side is the destination --port, or without it whoever sent the first QUIC long
header of a UDP flow (give --port for a capture that starts mid-conversation). Not printed:
server->client datagrams, short headers, Handshake packets, datagrams to a CID the server
chose, and retransmissions of a connection already classified.
The capture's timestamps are the clock (the pending-flight TTL runs on them).

exit status: 0 when the whole file was read (whatever the verdicts), 1 when it cannot be read
(missing, not pcap/pcapng, unsupported link type, truncated, corrupt), with one line on
stderr; lines for what was read before a cut or corrupt record are still printed.
"""


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "classify",
        help="replay a pcap/pcapng capture through the first-flight classifier",
        description="Replay the client first flights in a pcap or pcapng capture through "
        "steerd's first-flight assembler and print what each client asked for.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="pcap or pcapng capture")
    p.add_argument(
        "--port",
        type=_port,
        default=None,
        help="the server's UDP port (datagrams to it are client->server); default: any port, "
        "the first speaker of each flow is its client",
    )
    p.set_defaults(func=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _endpoint(e: Endpoint) -> str:
    host, port = e
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _version(v: int) -> str:
    return f"0x{v:08x}"


@dataclass
class _Flight:
    """The classify-side record of one pending connection (the assembler keeps the bytes)."""

    version: int
    client: Endpoint
    created: float
    frames: list[int] = field(default_factory=list)


class Classifier:
    """Feeds a capture's client first flights to a ``FirstFlightAssembler``; yields lines.

    The bookkeeping here (who is the client, which CIDs the server chose, which connections
    are decided) only decides what to feed; every verdict comes from the assembler.
    """

    def __init__(self, port: int | None = None, config: AssemblerConfig | None = None) -> None:
        self.port = port
        self.config = config or AssemblerConfig()
        self.assembler = FirstFlightAssembler(self.config)
        self.clients: dict[frozenset[Endpoint], Endpoint] = {}  # flow -> its client endpoint
        self.server_cids: set[bytes] = set()
        self.decided: set[tuple[Endpoint, bytes]] = set()
        self.pending: dict[tuple[Endpoint, bytes], _Flight] = {}  # as the assembler keys them
        self.last_time: float | None = None  # the capture's clock, for the end-of-file TTL

    def _direction(self, d: Datagram) -> str | None:
        """'client', 'server' or None (not part of a QUIC flow we can place)."""
        if self.port is not None:
            if d.dst[1] == self.port:
                return "client"
            return "server" if d.src[1] == self.port else None
        flow = frozenset((d.src, d.dst))
        client = self.clients.get(flow)
        if client is None:
            p = d.payload
            # A client's first datagram is a long header with the fixed bit set and a nonzero
            # version (0 would be a server's Version Negotiation): anything else starts no flow.
            if len(p) < 5 or p[0] & 0xC0 != 0xC0 or p[1:5] == b"\0\0\0\0":
                return None
            self.clients[flow] = client = d.src
        return "client" if d.src == client else "server"

    def datagram(self, d: Datagram) -> list[dict[str, Any]]:
        """Process one captured datagram; return the lines it produces (often none)."""
        self.last_time = d.time if self.last_time is None else max(self.last_time, d.time)
        direction = self._direction(d)
        p = d.payload
        if direction is None or not p or not p[0] & 0x80:
            return []  # not placed, or a short header: never part of a first flight
        try:
            header = parse_long_header(p)
        except QuicError:
            header = None  # the assembler will say why it refuses it
        if direction == "server":
            if header is not None:
                self.server_cids.add(header.scid)
            return []
        client = d.src
        if header is not None:
            if header.dcid in self.server_cids or header.packet_type is PacketType.HANDSHAKE:
                return []
            if (client, header.dcid) in self.decided:
                return []
        if not d.complete:
            line: dict[str, Any] = {"verdict": "rejected", "reason": "capture_incomplete"}
            if header is not None:
                line["dcid"] = header.dcid.hex()
            line["detail"] = "the capture does not hold the whole datagram (snaplen or fragment)"
            line.update(client=_endpoint(client), frame=d.frame)
            return [line]
        lines = self._expire(d.time)
        lines.extend(self._feed(d, client))
        return lines

    def _expire(self, now: float) -> list[dict[str, Any]]:
        """Mirror the assembler's TTL so expired flights are reported, not silently lost."""
        deadline = now - self.config.ttl
        gone = [key for key, f in self.pending.items() if f.created <= deadline]
        return [self._incomplete(key[1], self.pending.pop(key), "ttl_expired") for key in gone]

    def _feed(self, d: Datagram, client: Endpoint) -> list[dict[str, Any]]:
        result = self.assembler.feed(d.payload, client, d.time)
        if isinstance(result, NeedMore):
            flight = self.pending.get((client, result.dcid))
            if flight is None:
                version = int.from_bytes(d.payload[1:5], "big")
                flight = self.pending[(client, result.dcid)] = _Flight(version, client, d.time)
            flight.frames.append(d.frame)
            return []
        if isinstance(result, Ready):
            flight = self.pending.pop((client, result.dcid), None)
            frames = (flight.frames if flight is not None else []) + [d.frame]
            self.decided.add((client, result.dcid))
            hello = result.client_hello
            return [
                {
                    "dcid": result.dcid.hex(),
                    "version": _version(result.version),
                    "sni": hello.sni,
                    "alpn": list(hello.alpn),
                    "datagrams": len(result.datagrams),
                    "verdict": "classified",
                    "scid": result.scid.hex(),
                    "sni_is_outer": hello.sni_is_outer,
                    "client": _endpoint(client),
                    "frames": frames,
                }
            ]
        if isinstance(result, VersionNegotiationNeeded):
            return [
                {
                    "dcid": result.dcid.hex(),
                    "version": _version(result.version),
                    "verdict": "version_negotiation",
                    "scid": result.scid.hex(),
                    "client": _endpoint(client),
                    "frame": d.frame,
                }
            ]
        assert isinstance(result, Rejected)
        line: dict[str, Any] = {"verdict": "rejected", "reason": result.reason}
        if result.dcid is not None:
            line["dcid"] = result.dcid.hex()
        if result.detail:
            line["detail"] = result.detail
        line.update(client=_endpoint(client), frame=d.frame)
        if result.connection_dropped and result.dcid is not None:
            dropped = self.pending.pop((client, result.dcid), None)
            line["connection_dropped"] = True
            if dropped is not None:
                line["dropped_frames"] = dropped.frames
        return [line]

    def _incomplete(self, dcid: bytes, flight: _Flight, reason: str) -> dict[str, Any]:
        return {
            "dcid": dcid.hex(),
            "version": _version(flight.version),
            "datagrams": len(flight.frames),
            "verdict": "incomplete",
            "reason": reason,
            "client": _endpoint(flight.client),
            "frames": flight.frames,
        }

    def finish(self) -> list[dict[str, Any]]:
        """Flights still waiting for the rest of their ClientHello when the capture ended."""
        lines = [] if self.last_time is None else self._expire(self.last_time)
        lines += [self._incomplete(key[1], f, "end_of_capture")
                  for key, f in self.pending.items()]
        self.pending.clear()
        return lines


def classify_capture(path: str, port: int | None = None) -> Iterator[dict[str, Any]]:
    """Every line ``steerd classify`` prints for ``path``, as soon as it is known (raises
    ``CaptureError`` where the file cannot be read on, after the lines before it)."""
    c = Classifier(port)
    for d in read_datagrams(path):
        yield from c.datagram(d)
    yield from c.finish()


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        for line in classify_capture(args.file, args.port):
            out.write(json.dumps(line) + "\n")
            out.flush()
    except CaptureError as e:
        out.flush()
        print(f"steerd classify: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader (head, less) went away: not an error of ours, and no traceback. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return 0
