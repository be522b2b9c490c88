"""Every server CID on the wire names the worker that served the connection (tshark's view).

A capture is taken in the server namespace on its veth while aioquic and qh3 clients talk to
both apps and switch to CIDs the server issued in NEW_CONNECTION_ID frames. tshark (the
independent oracle) names every packet's header form, DCID and SCID. Checked per connection
(client address and port): every SCID the server sends in long headers, every DCID the client
sends except the client-chosen original one, and every short-header DCID, decodes to the slot
the server reported for that connection. Short-header DCIDs tshark could not attribute (CIDs
from encrypted NEW_CONNECTION_ID frames are unknown to it) are read at the fixed CID length,
which is what the kernel's steering program does too.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.netns import NetnsPair
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT
from tests.sdk.harness import RunningApp, Session, session
from tests.tshark import require_tshark

pytestmark = [pytest.mark.root, pytest.mark.tshark]


class Capture:
    """dumpcap in the server namespace; ``stop()`` ends it so the file is complete."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        self.proc, self.path = proc, path

    def stop(self) -> Path:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # like ^C: dumpcap writes out all it has
        assert self.proc.wait(10) == 0, "dumpcap failed"
        return self.path


@pytest.fixture
def capture(pair: NetnsPair) -> Iterator[Capture]:
    require_tshark()
    workdir = Path(tempfile.mkdtemp(prefix="steerd-wire-"))
    path = workdir / "wire.pcapng"
    err = workdir / "dumpcap.err"
    with open(err, "w") as errf:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path(pair.server)}", "dumpcap", "-i", pair.server_if,
             "-f", f"udp port {PORT}", "-w", str(path)],
            stdout=subprocess.DEVNULL, stderr=errf,
        )
    try:
        deadline = time.monotonic() + 15
        while "File:" not in err.read_text():  # dumpcap prints it once capturing
            assert proc.poll() is None, f"dumpcap failed: {err.read_text()}"
            assert time.monotonic() < deadline, "dumpcap did not start"
            time.sleep(0.05)
        yield Capture(proc, path)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()


def _packets(path: Path) -> list[dict[str, list[str]]]:
    cmd = [require_tshark(), "-n", "-r", str(path), "-d", f"udp.port=={PORT},quic", "-T",
           "json"]
    for f in ("frame.number", "ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "udp.srcport",
              "udp.dstport", "quic.header_form", "quic.long.packet_type", "quic.dcid",
              "quic.scid", "udp.payload"):
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [p["_source"]["layers"] for p in json.loads(proc.stdout or "[]")]


def _clients_seen(path: Path) -> set[tuple[str, int]]:
    """Client (address, port) pairs in a capture still being written (a torn last packet
    is fine: tshark reads up to it)."""
    proc = subprocess.run(
        [require_tshark(), "-n", "-r", str(path), "-T", "fields", "-e", "ip.src", "-e",
         "ipv6.src", "-e", "udp.srcport", "-Y", f"udp.dstport == {PORT}"],
        capture_output=True, text=True, timeout=60,
    )
    seen = set()
    for line in proc.stdout.splitlines():
        v4, v6, port = [*line.split("\t"), "", "", ""][:3]
        if port:
            seen.add((v4 or v6, int(port)))
    return seen


def _hex(v: str) -> bytes:
    return bytes.fromhex(v.replace(":", ""))


def test_every_cid_on_the_wire_names_its_worker(
    pair: NetnsPair, both_apps: tuple[RunningApp, RunningApp], capture: Capture,
    sessions: list[Session],
) -> None:
    web, files = both_apps
    layout = web.layout
    expected: dict[tuple[str, int], int] = {}  # client (address, port) -> serving slot
    for stack in ("aioquic", "qh3"):
        for family in (socket.AF_INET, socket.AF_INET6):
            for alpn in ("h3", "smb"):
                s = session(pair, alpn, stack, family)
                sessions.append(s)
                for _ in range(3):  # requests on fresh server-issued CIDs
                    if alpn == "h3":
                        info = json.loads(s.get("/count")[1])
                    else:
                        info = json.loads(s.fetch("INFO"))
                    s.conn.change_connection_id()
                host, port = s.sock.getsockname()[:2]
                expected[(host, port)] = info["slot"]
                assert info["slot"] in (web.slots if alpn == "h3" else files.slots)
                s.close()
    # dumpcap writes in batches and drops what it has not written when stopped: wait until
    # the file holds a packet of every connection, then stop it and read the whole file
    deadline = time.monotonic() + 15
    while not _clients_seen(capture.path) >= set(expected):
        assert time.monotonic() < deadline, "the capture never showed every connection"
        time.sleep(0.1)
    packets = _packets(capture.stop())

    checked = {"server_scid": 0, "client_dcid": 0, "short_dcid": 0}
    original: dict[tuple[str, int], bytes] = {}
    short: dict[tuple[str, int], set[bytes]] = {}
    for layers in packets:
        src = (layers.get("ip.src") or layers["ipv6.src"])[0]
        dst = (layers.get("ip.dst") or layers["ipv6.dst"])[0]
        sport, dport = int(layers["udp.srcport"][0]), int(layers["udp.dstport"][0])
        from_client = dport == PORT
        client = (src, sport) if from_client else (dst, dport)
        slot = expected.get(client)
        assert slot is not None, f"a packet of an unknown client {client}"
        payload = _hex(layers["udp.payload"][0])
        forms = layers.get("quic.header_form", [])
        dcids = [_hex(d) for d in layers.get("quic.dcid", [])]
        scids = [_hex(d) for d in layers.get("quic.scid", [])]
        if from_client and client not in original:
            assert payload[0] & 0x80, "a connection's first packet is a long-header Initial"
            original[client] = dcids[0]
        if not from_client:
            for scid in scids:
                assert layout.decode(scid) == slot, f"server SCID {scid.hex()} for {client}"
                checked["server_scid"] += 1
        if payload[0] & 0x80:  # long header first: tshark's DCIDs are authoritative
            for dcid in dcids if from_client else []:
                if dcid != original[client]:
                    assert layout.decode(dcid) == slot, f"client DCID {dcid.hex()}"
                    checked["client_dcid"] += 1
        elif from_client:
            dcid = payload[1 : 1 + layout.cid_len]
            if dcids and "0" in forms:  # tshark attributed it: it must agree
                assert dcids[-1] == dcid
            assert layout.decode(dcid) == slot, f"short-header DCID {dcid.hex()} for {client}"
            checked["short_dcid"] += 1
            short.setdefault(client, set()).add(dcid)
    missing = set(expected) - set(original)
    assert not missing, f"connections missing from the capture: {missing}"
    # the capture really held each kind of CID, including ones from NEW_CONNECTION_ID frames
    assert checked["server_scid"] >= 2 * len(expected)
    assert checked["client_dcid"] >= len(expected)
    assert checked["short_dcid"] >= 3 * len(expected)
    for client, cids in short.items():  # change_connection_id moved to NEW_CONNECTION_ID CIDs
        assert len(cids) >= 3, f"{client} used only {len(cids)} server CIDs"
