"""``steerd classify FILE``, run as an operator runs it: a subprocess, its stdout and exit code.

Fixture values come from tshark (tests/tshark.py), never from our earlier output. Capture
variants (classic pcap, nanosecond pcap, Linux cooked SLL/SLL2, raw IP, IPv6, snapped, cut
short) are built here around the fixtures' real client payloads with dpkt, and the well-formed
ones are read back by tshark too, so a variant our reader accepts is one tshark accepts.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dpkt
import pytest
import tshark
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quic.packet import parse_long_header
from steerd.tools.classify import classify_capture
from steerd.tools.pcap import CaptureError, Datagram, read_datagrams

FIXTURES = Path(__file__).parent / "fixtures"
PORT = 4433
CLASSIFIED = sorted(p.name for p in FIXTURES.glob("*.pcapng") if "version-" not in p.name)
VN_FIXTURE = "ngtcp2-version-1a2a3a4a.pcapng"


def classify(*args: str | Path) -> tuple[int, list[dict[str, Any]], str]:
    """Run the CLI; return (exit code, stdout JSON lines, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "steerd.cli", "classify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc.returncode, lines, proc.stderr


def _strip_client(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in line.items() if k != "client"} for line in lines]


# ---- capture writers (dpkt) ---------------------------------------------------------------


def _udp(d: Datagram, v6: bool) -> dpkt.Packet:
    udp = dpkt.udp.UDP(sport=d.src[1], dport=d.dst[1], data=d.payload)
    udp.ulen = 8 + len(d.payload)
    if v6:
        return dpkt.ip6.IP6(
            src=socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
            dst=socket.inet_pton(socket.AF_INET6, "2001:db8::2"),
            nxt=dpkt.ip.IP_PROTO_UDP,
            p=dpkt.ip.IP_PROTO_UDP,
            hlim=64,
            plen=len(udp),
            data=udp,
        )
    return dpkt.ip.IP(
        src=socket.inet_aton(d.src[0]),
        dst=socket.inet_aton(d.dst[0]),
        p=dpkt.ip.IP_PROTO_UDP,
        ttl=64,
        len=20 + len(udp),
        data=udp,
    )


def _ethertype(v6: bool) -> int:
    return dpkt.ethernet.ETH_TYPE_IP6 if v6 else dpkt.ethernet.ETH_TYPE_IP


LINKS: dict[str, tuple[int, Callable[[dpkt.Packet, bool], bytes]]] = {
    "ethernet": (
        dpkt.pcap.DLT_EN10MB,
        lambda ip, v6: bytes(dpkt.ethernet.Ethernet(type=_ethertype(v6), data=ip)),
    ),
    "sll": (
        dpkt.pcap.DLT_LINUX_SLL,
        lambda ip, v6: bytes(dpkt.sll.SLL(hrd=772, hdr=b"\0" * 8, ethtype=_ethertype(v6), data=ip)),
    ),
    "sll2": (
        276,
        lambda ip, v6: bytes(
            dpkt.sll2.SLL2(ethtype=_ethertype(v6), intindex=1, hrd=772, hdr=b"\0" * 8, data=ip)
        ),
    ),
    "raw": (dpkt.pcap.DLT_RAW, lambda ip, v6: bytes(ip)),
}


def write_pcap(
    path: Path,
    datagrams: Iterable[Datagram],
    link: str = "ethernet",
    v6: bool = False,
    nano: bool = False,
) -> Path:
    linktype, wrap = LINKS[link]
    with path.open("wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, linktype=linktype, nano=nano)
        for d in datagrams:
            w.writepkt(wrap(_udp(d, v6), v6), ts=d.time)
    return path


def _fixture(name: str) -> list[Datagram]:
    return list(read_datagrams(FIXTURES / name))


def _expected(name: str) -> dict[str, Any]:
    """The classified line's core fields, from tshark."""
    (conn,) = tshark.connections(FIXTURES / name, PORT).values()
    return {
        "dcid": conn.dcid.hex(),
        "version": f"0x{conn.version:08x}",
        "sni": conn.sni.lower() if conn.sni else None,
        "alpn": conn.alpn,
        "datagrams": conn.hello_datagrams,
        "verdict": "classified",
    }


def _core(line: dict[str, Any]) -> dict[str, Any]:
    keys = ("dcid", "version", "sni", "alpn", "datagrams", "verdict")
    return {k: line[k] for k in keys}


# ---- the fixtures through the CLI ---------------------------------------------------------


@pytest.mark.tshark
@pytest.mark.parametrize("name", CLASSIFIED)
@pytest.mark.parametrize("port", [None, PORT])
def test_fixture_prints_one_classified_line(name: str, port: int | None) -> None:
    args: list[str | Path] = [FIXTURES / name] + (["--port", str(port)] if port else [])
    code, lines, err = classify(*args)
    assert (code, err) == (0, "")
    assert len(lines) == 1, lines  # retransmissions of a classified DCID print nothing
    assert _core(lines[0]) == _expected(name)
    (conn,) = tshark.connections(FIXTURES / name, PORT).values()
    assert lines[0]["frames"] == conn.frames[: conn.hello_datagrams]
    assert lines[0]["client"].startswith("127.0.0.1:")


@pytest.mark.tshark
def test_unknown_version_prints_version_negotiation() -> None:
    code, lines, err = classify(FIXTURES / VN_FIXTURE)
    (conn,) = tshark.connections(FIXTURES / VN_FIXTURE, PORT).values()
    assert (code, err) == (0, "")
    assert len(lines) == 1
    line = lines[0]
    assert line["verdict"] == "version_negotiation"
    assert line["dcid"] == conn.dcid.hex()
    assert line["version"] == "0x1a2a3a4a" == f"0x{conn.version:08x}"
    assert line["frame"] == 1


@pytest.mark.tshark
@pytest.mark.parametrize("port", [None, PORT])
def test_whole_conversation_prints_only_the_first_flight(port: int | None) -> None:
    """Server replies, Handshake and 1-RTT packets, and the client's Initial ACKs to the
    server's CID are all in this capture; none of them is a first flight or a rejection."""
    name = "aioquic-conversation.pcap"
    args: list[str | Path] = [FIXTURES / name] + (["--port", str(port)] if port else [])
    code, lines, err = classify(*args)
    assert (code, err) == (0, "")
    conns = tshark.connections(FIXTURES / name, PORT)
    (want,) = [c for c in conns.values() if c.hello_frame is not None]
    assert [_core(x) for x in lines] == [
        {
            "dcid": want.dcid.hex(),
            "version": f"0x{want.version:08x}",
            "sni": want.sni,
            "alpn": want.alpn,
            "datagrams": want.hello_datagrams,
            "verdict": "classified",
        }
    ]


def test_console_script_is_installed() -> None:
    """The operator runs ``steerd``, not ``python -m``: the entry point must work too."""
    exe = Path(sys.executable).parent / "steerd"
    assert exe.exists(), "steerd console script missing: pip install -e . (deploy/setup.sh)"
    proc = subprocess.run(
        [exe, "classify", FIXTURES / "aioquic-v1-smb.pcapng"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["alpn"] == ["smb"]


def test_help_explains_the_verdicts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "steerd.cli", "classify", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for word in ("classified", "version_negotiation", "rejected", "incomplete", "--port"):
        assert word in proc.stdout


# ---- capture formats and link types -------------------------------------------------------


@pytest.mark.tshark
@pytest.mark.parametrize("link", sorted(LINKS))
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_pcap_link_types_and_ip_versions(tmp_path: Path, link: str, v6: bool) -> None:
    name = "chromium-h3.pcapng"
    path = write_pcap(tmp_path / f"{link}.pcap", _fixture(name), link, v6, nano=(link == "raw"))
    # tshark reads the variant and finds the same ClientHello: the file is a real capture.
    (conn,) = tshark.connections(path, PORT).values()
    assert (conn.sni, conn.alpn) == ("www.example.test", ["h3"])
    code, lines, err = classify(path)
    assert (code, err) == (0, "")
    assert [_core(x) for x in lines] == [_expected(name)]
    client = "[2001:db8::1]:" if v6 else "127.0.0.1:"
    assert lines[0]["client"].startswith(client)


def test_nanosecond_timestamps_are_read(tmp_path: Path) -> None:
    datagrams = _fixture("qh3-h3.pcapng")
    path = write_pcap(tmp_path / "nano.pcap", datagrams, nano=True)
    times = [d.time for d in read_datagrams(path)]
    assert times == pytest.approx([d.time for d in datagrams], abs=1e-6)


@pytest.mark.tshark
def test_many_clients_in_one_capture(tmp_path: Path) -> None:
    """Every fixture's flight, interleaved in time order, each from its own client port."""
    merged: list[Datagram] = []
    for i, name in enumerate([*CLASSIFIED, VN_FIXTURE]):
        for d in _fixture(name):
            merged.append(
                Datagram(d.frame, d.time, ("127.0.0.1", 40000 + i), d.dst, d.payload, True)
            )
    merged.sort(key=lambda d: d.time)
    path = write_pcap(tmp_path / "merged.pcap", merged)
    code, lines, err = classify(path, "--port", str(PORT))
    assert (code, err) == (0, "")
    classified = {x["dcid"]: _core(x) for x in lines if x["verdict"] == "classified"}
    assert classified == {e["dcid"]: e for e in map(_expected, CLASSIFIED)}
    vn = [x for x in lines if x["verdict"] == "version_negotiation"]
    assert len(vn) == 1 and len(lines) == len(CLASSIFIED) + 1


def test_server_to_client_datagrams_are_not_fed(tmp_path: Path) -> None:
    """A server's reply, and the client's packets to the CID the server chose, print nothing."""
    client = _fixture("aioquic-v1-smb.pcapng")[0]
    reply_bytes = bytearray(client.payload)  # a long header; what matters is its SCID
    server_cid = bytes(range(1, 9))
    # Server Initial: DCID = client's SCID, SCID = server_cid (header only needs to parse).
    (dcid_len,) = struct.unpack_from("B", reply_bytes, 5)
    c_scid_at = 6 + dcid_len + 1
    c_scid = bytes(reply_bytes[c_scid_at : c_scid_at + reply_bytes[c_scid_at - 1]])
    hdr = bytes([0xC0]) + b"\0\0\0\1" + bytes([len(c_scid)]) + c_scid + bytes([8]) + server_cid
    reply = Datagram(2, client.time + 0.001, client.dst, client.src, hdr + b"\0\x01\0", True)
    # The client's next datagram goes to server_cid: part of an established handshake.
    follow = hdr[:5] + bytes([8]) + server_cid + bytes([len(c_scid)]) + c_scid
    follow_dgram = Datagram(
        3, client.time + 0.002, client.src, client.dst, follow + b"\0" * 1200, True
    )
    path = write_pcap(tmp_path / "conversation.pcap", [client, reply, follow_dgram])
    for args in ([], ["--port", str(PORT)]):
        code, lines, err = classify(path, *args)
        assert (code, err) == (0, "")
        assert [x["verdict"] for x in lines] == ["classified"], lines


# ---- verdicts other than classified -------------------------------------------------------


def test_half_a_flight_is_incomplete(tmp_path: Path) -> None:
    first = _fixture("chromium-h3.pcapng")[0]
    path = write_pcap(tmp_path / "half.pcap", [first])
    code, lines, err = classify(path)
    assert (code, err) == (0, "")
    assert _strip_client(lines) == [
        {
            "dcid": first.payload[6 : 6 + first.payload[5]].hex(),
            "version": "0x00000001",
            "datagrams": 1,
            "verdict": "incomplete",
            "reason": "end_of_capture",
            "frames": [1],
        }
    ]


def test_flight_split_by_more_than_the_ttl_is_two_incomplete_flights(tmp_path: Path) -> None:
    """The capture's timestamps are the clock: 60 s between halves expires the first half."""
    a, b = _fixture("chromium-h3.pcapng")[:2]
    late = Datagram(b.frame, a.time + 60, b.src, b.dst, b.payload, True)
    code, lines, err = classify(write_pcap(tmp_path / "slow.pcap", [a, late]))
    assert (code, err) == (0, "")
    assert [(x["verdict"], x["reason"], x["frames"]) for x in lines] == [
        ("incomplete", "ttl_expired", [1]),
        ("incomplete", "end_of_capture", [2]),
    ]


def test_flight_older_than_the_ttl_at_the_end_of_the_capture_expired(tmp_path: Path) -> None:
    """Half a flight, then 60 s later unrelated UDP (fed to nothing): by the capture's clock
    the flight expired before the file ended, and the line says so."""
    a = _fixture("chromium-h3.pcapng")[0]
    dns = Datagram(2, a.time + 60, ("127.0.0.1", 50000), ("127.0.0.1", 53), b"\x12\x34" * 20, True)
    code, lines, err = classify(write_pcap(tmp_path / "stale.pcap", [a, dns]))
    assert (code, err) == (0, "")
    assert [(x["verdict"], x["reason"], x["frames"]) for x in lines] == [
        ("incomplete", "ttl_expired", [1])
    ]


def test_rejected_datagrams_say_why(tmp_path: Path) -> None:
    good = _fixture("aioquic-v1-smb.pcapng")[0]
    p = good.payload
    header = parse_long_header(p)
    dcid = header.dcid.hex()
    assert header.end < 1200  # aioquic pads the datagram after its Initial packet
    corrupt = p[:200] + bytes([p[200] ^ 0x01]) + p[201:]  # one bit inside the AEAD payload
    small = p[: header.end]  # the same, valid Initial, but in a datagram below 1200 bytes
    cut = p[: header.end - 10]  # the Initial's Length field now runs past the datagram
    datagrams = [
        Datagram(n, good.time + n, good.src, good.dst, payload, True)
        for n, payload in enumerate([corrupt, small, cut], 1)
    ]
    code, lines, err = classify(write_pcap(tmp_path / "bad.pcap", datagrams), "--port", str(PORT))
    assert (code, err) == (0, "")
    assert [(x["verdict"], x["reason"], x.get("dcid"), x["frame"]) for x in lines] == [
        ("rejected", "decrypt_failed", dcid, 1),
        ("rejected", "short_initial", dcid, 2),
        ("rejected", "bad_length", None, 3),
    ]


def test_snapped_datagram_is_rejected_not_misread(tmp_path: Path) -> None:
    """A capture with a small snaplen keeps only part of a datagram: say so."""
    d = _fixture("aioquic-v1-smb.pcapng")[0]
    frame = bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=_udp(d, False)))
    path = tmp_path / "snapped.pcap"
    with path.open("wb") as f:
        dpkt.pcap.Writer(f, snaplen=256, linktype=dpkt.pcap.DLT_EN10MB)
        f.write(struct.pack("<IIII", int(d.time), 0, 256, len(frame)) + frame[:256])
    code, lines, err = classify(path)
    assert (code, err) == (0, "")
    assert [(x["verdict"], x["reason"]) for x in lines] == [("rejected", "capture_incomplete")]


# ---- unreadable input: exit 1, exactly one line on stderr, no traceback -------------------


def _assert_one_line_error(code: int, lines: list[dict[str, Any]], err: str, *words: str) -> None:
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("steerd classify: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


def test_missing_file(tmp_path: Path) -> None:
    code, lines, err = classify(tmp_path / "nope.pcap")
    _assert_one_line_error(code, lines, err, "cannot open", "No such file")
    assert lines == []


def test_directory(tmp_path: Path) -> None:
    code, lines, err = classify(tmp_path)
    _assert_one_line_error(code, lines, err, "cannot open")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    path.write_bytes(b"")
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "empty")
    assert lines == []


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pcap"
    path.write_bytes(b"this is not a capture at all\n" * 50)
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "not a pcap or pcapng file")
    assert lines == []


@pytest.mark.parametrize("cut", [10, 30, 100, -1])
def test_truncated_pcap(tmp_path: Path, cut: int) -> None:
    """Cut in the file header, a record header, or a record's data: all say truncated."""
    whole = write_pcap(tmp_path / "whole.pcap", _fixture("aioquic-v1-smb.pcapng")).read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(whole[:cut])
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "truncated")
    assert lines == []


@pytest.mark.parametrize(("cut", "classified"), [(20, 0), (200, 0), (600, 0), (-1, 1)])
def test_truncated_pcapng(tmp_path: Path, cut: int, classified: int) -> None:
    """Cut in the section header, interface block, packet block, or the statistics block
    that dumpcap writes after the last packet (then the packet itself was read whole)."""
    data = (FIXTURES / "aioquic-v1-smb.pcapng").read_bytes()
    path = tmp_path / "cut.pcapng"
    path.write_bytes(data[:cut])
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "truncated")
    assert [x["verdict"] for x in lines] == ["classified"] * classified


def test_truncated_after_a_classified_flight_reports_both(tmp_path: Path) -> None:
    """What was read before the cut is printed; the cut still fails the run."""
    whole = write_pcap(
        tmp_path / "two.pcap", _fixture("aioquic-v1-smb.pcapng") + _fixture("qh3-h3.pcapng")
    ).read_bytes()
    path = tmp_path / "cut.pcap"
    path.write_bytes(whole[:-10])
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "truncated")
    assert [x["alpn"] for x in lines] == [["smb"]]


def test_unsupported_link_type(tmp_path: Path) -> None:
    path = tmp_path / "wifi.pcap"
    with path.open("wb") as f:
        w = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_IEEE802_11)
        w.writepkt(b"\0" * 40, ts=1.0)
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "unsupported link type 105")


def test_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    code, _lines, err = classify(FIXTURES / "aioquic-v1-smb.pcapng", "--port", "70000")
    assert code == 2 and "port out of range" in err


def test_output_is_streamed_and_survives_a_closed_pipe() -> None:
    """``steerd classify big.pcap | head -1`` must not end in a traceback."""
    if shutil.which("head") is None:
        pytest.fail("coreutils head missing")
    cmd = f"{sys.executable} -m steerd.cli classify {FIXTURES / 'qh3-h3.pcapng'} | head -c 1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "{"
    assert "Traceback" not in proc.stderr


# ---- IP fragments, pcapng details, and corrupt files ---------------------------------------


def _write_raw_ip_pcap(path: Path, packets: list[bytes]) -> Path:
    with path.open("wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, linktype=dpkt.pcap.DLT_RAW)
        for i, pkt in enumerate(packets):
            w.writepkt(pkt, ts=1000.0 + i)
    return path


def test_ipv4_fragments_are_reported_not_misread(tmp_path: Path) -> None:
    """Without IP reassembly the first fragment holds only part of the datagram."""
    d = _fixture("aioquic-v1-smb.pcapng")[0]
    udp = bytes(_udp(d, False).data)
    head, tail = udp[:800], udp[800:]
    src, dst = socket.inet_aton(d.src[0]), socket.inet_aton(d.dst[0])

    def frag(data: bytes, offset: int, more: bool) -> bytes:
        flags = (0x2000 if more else 0) | (offset // 8)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), 7, flags, 64, 17, 0, src, dst)
        return hdr + data

    path = _write_raw_ip_pcap(
        tmp_path / "frag4.pcap", [frag(head, 0, True), frag(tail, 800, False)]
    )
    code, lines, err = classify(path)
    assert (code, err) == (0, "")
    assert [(x["verdict"], x["reason"], x["frame"]) for x in lines] == [
        ("rejected", "capture_incomplete", 1)
    ]


def test_ipv6_fragments_are_reported_not_misread(tmp_path: Path) -> None:
    d = _fixture("aioquic-v1-smb.pcapng")[0]
    udp = bytes(_udp(d, False).data)
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::2")

    def frag(data: bytes, offset: int, more: bool) -> bytes:
        fh = struct.pack("!BBHI", 17, 0, offset | int(more), 7)  # offset is a multiple of 8
        return struct.pack("!IHBB16s16s", 6 << 28, 8 + len(data), 44, 64, src, dst) + fh + data

    path = _write_raw_ip_pcap(
        tmp_path / "frag6.pcap", [frag(udp[:800], 0, True), frag(udp[800:], 800, False)]
    )
    code, lines, err = classify(path)
    assert (code, err) == (0, "")
    assert [(x["verdict"], x["reason"], x["frame"]) for x in lines] == [
        ("rejected", "capture_incomplete", 1)
    ]


def _pcapng_block(btype: int, body: bytes, endian: str) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(f"{endian}II", btype, n) + body + struct.pack(f"{endian}I", n)


def _pcapng(endian: str, interfaces: list[int], packets: list[tuple[int, float, bytes]]) -> bytes:
    """A pcapng written from the spec, independently of dpkt (tshark checks it is valid)."""
    shb = struct.pack(f"{endian}IHHq", 0x1A2B3C4D, 1, 0, -1)
    out = _pcapng_block(0x0A0D0D0A, shb, endian)
    for linktype in interfaces:
        tsresol = struct.pack(f"{endian}HH", 9, 1) + b"\x09\0\0\0"  # nanoseconds
        end = struct.pack(f"{endian}HH", 0, 0)
        idb = struct.pack(f"{endian}HHI", linktype, 0, 65535) + tsresol + end
        out += _pcapng_block(1, idb, endian)
    for iface, ts, data in packets:
        t = round(ts * 1e9)
        epb = struct.pack(f"{endian}IIIII", iface, t >> 32, t & 0xFFFFFFFF, len(data), len(data))
        out += _pcapng_block(6, epb + data, endian)
    return out


@pytest.mark.tshark
@pytest.mark.parametrize("endian", ["<", ">"], ids=["little-endian", "big-endian"])
def test_pcapng_with_two_link_types_and_either_byte_order(tmp_path: Path, endian: str) -> None:
    """Interface 0 is Ethernet, interface 1 raw IP: each packet uses its own interface's type."""
    chromium = _fixture("chromium-h3.pcapng")
    qh3 = _fixture("qh3-h3.pcapng")
    eth = LINKS["ethernet"][1]
    packets = [(0, d.time, eth(_udp(d, False), False)) for d in chromium[:2]]
    packets += [(1, d.time, bytes(_udp(d, True))) for d in qh3]
    path = tmp_path / "two-interfaces.pcapng"
    path.write_bytes(_pcapng(endian, [dpkt.pcap.DLT_EN10MB, dpkt.pcap.DLT_RAW], packets))
    assert len(tshark.connections(path, PORT)) == 2  # tshark reads the file as we do
    code, lines, err = classify(path)
    assert (code, err) == (0, "")
    assert [_core(x) for x in lines] == [
        _expected("chromium-h3.pcapng"),
        _expected("qh3-h3.pcapng"),
    ]
    times = [d.time for d in read_datagrams(path)]
    assert times == pytest.approx([t for _, t, _ in packets], abs=1e-6)


def test_pcapng_packet_on_an_undeclared_interface(tmp_path: Path) -> None:
    d = _fixture("aioquic-v1-smb.pcapng")[0]
    path = tmp_path / "bad-iface.pcapng"
    path.write_bytes(_pcapng("<", [dpkt.pcap.DLT_RAW], [(3, d.time, bytes(_udp(d, False)))]))
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "undeclared interface")


def test_pcapng_block_with_an_impossible_length(tmp_path: Path) -> None:
    data = bytearray((FIXTURES / "aioquic-v1-smb.pcapng").read_bytes())
    shb_len = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<I", data, shb_len + 4, 7)  # the IDB's length: not a multiple of 4
    path = tmp_path / "corrupt.pcapng"
    path.write_bytes(bytes(data))
    code, lines, err = classify(path)
    _assert_one_line_error(code, lines, err, "corrupt pcapng block")


# ---- arbitrary damage: only CaptureError, never a crash ------------------------------------

_SEEDS = [
    (FIXTURES / "chromium-h3.pcapng").read_bytes(),
    (FIXTURES / "aioquic-conversation.pcap").read_bytes(),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_damaged_captures_raise_only_capture_error(
    tmp_path_factory: pytest.TempPathFactory,
    seed: bytes,
    flips: list[tuple[int, int]],
    cut: int | None,
) -> None:
    """Flipped bytes anywhere (headers, lengths, link layer, QUIC) and cuts anywhere: the
    classifier either reads the file or says why it cannot; it never raises anything else."""
    data = bytearray(seed)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path_factory.mktemp("damaged") / "x"
    path.write_bytes(bytes(data))
    try:
        lines = list(classify_capture(str(path)))
    except CaptureError as e:
        assert str(e) and "\n" not in str(e)
        return
    for line in lines:
        assert line["verdict"] in {"classified", "version_negotiation", "rejected", "incomplete"}
        json.dumps(line)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_capture_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("random") / "x"
    path.write_bytes(data)
    try:
        list(classify_capture(str(path)))
    except CaptureError:
        pass
