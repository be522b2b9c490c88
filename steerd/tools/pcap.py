"""UDP datagrams out of pcap and pcapng capture files, for ``steerd classify``.

dpkt decodes every on-disk structure (pcap file and record headers, pcapng blocks and their
options, Ethernet/SLL/SLL2/loopback, IPv4, IPv6, UDP). Only the record loop is ours, because
dpkt's own readers are too forgiving for an operator's tool: they stop silently at a truncated
record (so a cut-short file would look complete), drop the original packet length (so a
snapped datagram would look whole) and use the first pcapng interface's link type for every
packet. Here a truncated or corrupt file raises ``CaptureError`` with one clear sentence, and a
datagram the capture did not keep whole is marked ``complete=False``.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dpkt
from dpkt import ethernet, ip, ip6, loopback, pcap, pcapng, sll, sll2, udp

# Link types (https://www.tcpdump.org/linktypes.html) that carry IP in a way we can decode.
LINKTYPE_NULL = 0  # BSD loopback, host byte order family
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6 (also seen as DLT 12 and 14)
LINKTYPE_LOOP = 108  # OpenBSD loopback, network byte order family
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
RAW_LINKTYPES = frozenset({LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6})
SUPPORTED_LINKTYPES = RAW_LINKTYPES | {
    LINKTYPE_NULL,
    LINKTYPE_ETHERNET,
    LINKTYPE_LOOP,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
}

# No sane record is this large (the pcap snaplen maximum is 256 KiB); a larger length field
# means a corrupt file, and reading it would only allocate memory for nothing.
MAX_RECORD = 1 << 20

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class CaptureError(Exception):
    """The file cannot be read as a capture; the message is one sentence for the operator."""


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP datagram of the capture."""

    frame: int  # 1-based record number in the file, as Wireshark counts frames
    time: float  # capture timestamp, seconds since the epoch
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes
    complete: bool  # False: snapped by the capture's snaplen, or an IP fragment


@dataclass(frozen=True, slots=True)
class _Frame:
    number: int
    time: float
    linktype: int
    data: bytes
    wire_len: int


def read_datagrams(path: str | Path) -> Iterator[Datagram]:
    """Every UDP datagram in the capture, in file order; other packets are passed over.

    Raises ``CaptureError`` for a missing or unreadable file, a file that is not pcap or
    pcapng, an unsupported link type, or a truncated or corrupt record (possibly after some
    datagrams were already yielded: the caller decides what a partial result is worth).
    """
    try:
        f = open(path, "rb")  # closed by the with below
    except OSError as e:
        raise CaptureError(f"cannot open {path}: {e.strerror or e}") from None
    with f:
        head = f.read(4)
        f.seek(0)
        if len(head) < 4:
            raise CaptureError(f"{path}: empty or too short to be a pcap or pcapng file")
        if head == PCAPNG_MAGIC:
            frames = _pcapng_frames(f, str(path))
        elif int.from_bytes(head, "big") in pcap.MAGIC_TO_PKT_HDR:
            frames = _pcap_frames(f, str(path))
        else:
            raise CaptureError(f"{path}: not a pcap or pcapng file (magic {head.hex()})")
        try:
            for frame in frames:
                d = _udp(frame)
                if d is not None:
                    yield d
        except OSError as e:
            raise CaptureError(f"{path}: read error: {e.strerror or e}") from None


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) < n:
        raise CaptureError(f"{path}: truncated {what} (file cut short?)")
    return buf


def _pcap_frames(f: BinaryIO, path: str) -> Iterator[_Frame]:
    magic = int.from_bytes(f.read(4), "big")
    f.seek(0)
    try:
        reader = pcap.Reader(f)  # parses and checks the file header
    except (dpkt.UnpackError, ValueError):
        raise CaptureError(f"{path}: truncated or invalid pcap file header") from None
    linktype = reader.datalink()
    if linktype not in SUPPORTED_LINKTYPES:
        raise CaptureError(f"{path}: unsupported link type {linktype}")
    hdr_cls = pcap.MAGIC_TO_PKT_HDR[magic]
    nano = magic in (pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC_NANO)
    number = 0
    while True:
        buf = f.read(hdr_cls.__hdr_len__)
        if not buf:
            return
        if len(buf) < hdr_cls.__hdr_len__:
            raise CaptureError(f"{path}: truncated record header after frame {number}")
        hdr = hdr_cls(buf)
        number += 1
        if hdr.caplen > MAX_RECORD:
            raise CaptureError(f"{path}: corrupt record {number} (length {hdr.caplen})")
        data = _read_exact(f, hdr.caplen, path, f"record {number}")
        frac = hdr.tv_usec / (1e9 if nano else 1e6)
        yield _Frame(number, hdr.tv_sec + frac, linktype, data, hdr.len)


@dataclass
class _Interface:
    linktype: int
    divisor: float
    offset: int


def _pcapng_frames(f: BinaryIO, path: str) -> Iterator[_Frame]:
    """Walk blocks: sections (each with its own byte order), interfaces, packets."""
    le = True
    interfaces: list[_Interface] = []
    number = 0
    first = True
    while True:
        head = f.read(8)
        if not head:
            if first:
                raise CaptureError(f"{path}: empty pcapng file")
            return
        if len(head) < 8:
            raise CaptureError(f"{path}: truncated pcapng block after frame {number}")
        if head[:4] == PCAPNG_MAGIC:
            bom = _read_exact(f, 4, path, "section header")
            head += bom
            if bom == b"\x4d\x3c\x2b\x1a":
                le = True
            elif bom == b"\x1a\x2b\x3c\x4d":
                le = False
            else:
                raise CaptureError(f"{path}: corrupt pcapng section header (byte order)")
            interfaces = []  # interface ids are per section
        elif first:
            raise CaptureError(f"{path}: pcapng file does not start with a section header")
        first = False
        btype, blen = struct.unpack("<II" if le else ">II", head[:8])
        if blen < 12 or blen % 4 or blen > MAX_RECORD:
            raise CaptureError(f"{path}: corrupt pcapng block (length {blen})")
        buf = head + _read_exact(f, blen - len(head), path, "pcapng block")
        try:
            if btype == pcapng.PCAPNG_BT_SHB:
                shb = (pcapng.SectionHeaderBlockLE if le else pcapng.SectionHeaderBlock)(buf)
                if shb.v_major != pcapng.PCAPNG_VERSION_MAJOR:
                    raise CaptureError(f"{path}: unsupported pcapng version {shb.v_major}")
            elif btype == pcapng.PCAPNG_BT_IDB:
                cls = pcapng.InterfaceDescriptionBlockLE if le else pcapng.InterfaceDescriptionBlock
                interfaces.append(_interface(cls(buf), le))
            elif btype in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
                if btype == pcapng.PCAPNG_BT_EPB:
                    pcls = pcapng.EnhancedPacketBlockLE if le else pcapng.EnhancedPacketBlock
                else:
                    pcls = pcapng.PacketBlockLE if le else pcapng.PacketBlock
                pkt = pcls(buf)
                number += 1
                if pkt.iface_id >= len(interfaces):
                    raise CaptureError(f"{path}: frame {number} names an undeclared interface")
                iface = interfaces[pkt.iface_id]
                if iface.linktype not in SUPPORTED_LINKTYPES:
                    raise CaptureError(f"{path}: unsupported link type {iface.linktype}")
                ts = iface.offset + ((pkt.ts_high << 32) | pkt.ts_low) / iface.divisor
                yield _Frame(number, ts, iface.linktype, bytes(pkt.pkt_data), pkt.pkt_len)
            # Other blocks (name resolution, statistics, simple packets without a
            # timestamp, custom blocks) carry nothing classify needs.
        except (dpkt.UnpackError, struct.error, ValueError, IndexError):
            raise CaptureError(f"{path}: corrupt pcapng block after frame {number}") from None


def _interface(idb: pcapng.InterfaceDescriptionBlock, le: bool) -> _Interface:
    divisor, offset = 1e6, 0  # pcapng default resolution: microseconds
    for opt in idb.opts:
        if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
            v = opt.data[0]
            divisor = float((2 if v & 0x80 else 10) ** (v & 0x7F))
        elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) == 8:
            offset = struct.unpack("<q" if le else ">q", opt.data)[0]
    return _Interface(idb.linktype, divisor, offset)


def _network_layer(frame: _Frame) -> dpkt.Packet | bytes | None:
    """The IP packet of a frame (dpkt object), or None for a frame that is not IP."""
    data, lt = frame.data, frame.linktype
    try:
        if lt == LINKTYPE_ETHERNET:
            return ethernet.Ethernet(data).data
        if lt == LINKTYPE_LINUX_SLL:
            return sll.SLL(data).data
        if lt == LINKTYPE_LINUX_SLL2:
            return sll2.SLL2(data).data
        if lt in (LINKTYPE_NULL, LINKTYPE_LOOP):
            return loopback.Loopback(data).data
        if data and data[0] >> 4 == 4:
            return ip.IP(data)
        if data and data[0] >> 4 == 6:
            return ip6.IP6(data)
    except (dpkt.UnpackError, struct.error, ValueError, IndexError):
        return None
    return None


def _udp(frame: _Frame) -> Datagram | None:
    net = _network_layer(frame)
    snapped = frame.wire_len > len(frame.data)
    if isinstance(net, ip.IP):
        if net.p != ip.IP_PROTO_UDP:
            return None
        if net.offset:
            return None  # a later fragment: no UDP header in it
        fragment = bool(net.mf)
        src, dst = _ip4(net.src), _ip4(net.dst)
    elif isinstance(net, ip6.IP6):
        if net.p != ip.IP_PROTO_UDP:
            return None
        frag = net.extension_hdrs.get(ip.IP_PROTO_FRAGMENT) if net.extension_hdrs else None
        if frag is not None and frag.frag_off:
            return None
        fragment = frag is not None
        src, dst = _ip6(net.src), _ip6(net.dst)
    else:
        return None
    seg = net.data
    if not isinstance(seg, udp.UDP):
        return None  # too short to hold a UDP header
    payload = bytes(seg.data)
    complete = not (fragment or snapped) and len(payload) == seg.ulen - 8
    return Datagram(
        frame.number, frame.time, (src, seg.sport), (dst, seg.dport), payload, complete
    )


def _ip4(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def _ip6(raw: bytes) -> str:
    return str(ipaddress.IPv6Address(raw))
