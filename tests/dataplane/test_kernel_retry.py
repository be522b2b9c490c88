"""The guard's kernel Retry and token check (bpf/guard.c, docs/DATAPLANE.md "Kernel
Retry"), with real packets: aioquic-built client Initials (v1 and v2, IPv4 and IPv6) into the
guard on the server veth (XDP native and TC, the ``loaded`` fixture's two runs).

What must hold: a token-less Initial comes back as a Retry that aioquic accepts (it checks the
integrity tag), that our own cryptography-based tag check accepts, that tshark decodes as a
Retry with a good UDP checksum, and whose token validates in Python (quic/token.py) for the
client's address and the Retry's SCID; the client's next Initial, carrying that token, passes
(``xdp_token_valid``); forged, expired and other-address tokens are dropped and counted; the
per-prefix Retry budget holds. Oracle: the frames as the client's veth saw them, written to a
pcap and read by tshark.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from deploy.netns import NetnsPair
from quic.builders import _retry_tag
from quic.cid import CONFIG_ROTATION_SHIFT, CR_UNROUTABLE
from quic.packet import VERSION_1, VERSION_2, PacketType, parse_long_header
from quic.token import build_retry_token, derive_token_key, validate_retry_token
from steerd.daemon.dataplane import guard
from tests.dataplane.conftest import PORT, Loaded
from tests.linkframes import ETH_P_ALL
from tests.tshark import require_tshark

KEY = derive_token_key(b"kernel retry test secret, 32 byt")
LIFETIME = 10.0
FAMILIES = (socket.AF_INET, socket.AF_INET6)
VERSIONS = (VERSION_1, VERSION_2)


@pytest.fixture(scope="module")
def retry_on(pair: NetnsPair, loaded: Loaded) -> Iterator[Loaded]:
    """Retry mode always on, the key set, a generous Retry budget. On veth, XDP_TX hands the
    frame to the peer's receive queue, which takes frames only while the peer runs NAPI: an
    XDP program on the peer turns it on (GRO alone did not here), as a NIC's driver would."""
    import bcc

    peer = bcc.BPF(text=b"int steerd_test_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = peer.load_func(b"steerd_test_pass", bcc.BPF.XDP)
    dev = pair.client_if.encode()
    pair.run_client(lambda: bcc.BPF.attach_xdp(dev, fn, 1 << 2))
    loaded.dp.set_retry(KEY, LIFETIME, rate=1000.0, burst=1000)
    loaded.dp.set_retry_until(guard.RETRY_ALWAYS)
    try:
        yield loaded
    finally:
        loaded.dp.disable_retry()
        pair.run_client(lambda: bcc.BPF.remove_xdp(dev, 1 << 2))
        peer.cleanup()


def set_gro(ifname: str, on: bool) -> None:
    """``ethtool -K IF gro on`` through the SIOCETHTOOL ioctl (ETHTOOL_SGRO), in the caller's
    network namespace (ethtool itself need not be installed)."""
    import ctypes
    import fcntl

    value = ctypes.create_string_buffer(struct.pack("II", 0x0000002C, int(on)))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), 0x8946, ifreq)


def client_conn(version: int, token: bytes = b"") -> QuicConnection:
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                               supported_versions=[version], server_name="retry.test")
    config.token = token
    return QuicConnection(configuration=config)


def first_datagram(conn: QuicConnection, server: tuple[str, int]) -> bytes:
    conn.connect(server, now=time.monotonic())
    datagrams = conn.datagrams_to_send(now=time.monotonic())
    assert datagrams and len(datagrams[0][0]) >= 1200
    return datagrams[0][0]


def server_addr(pair: NetnsPair, family: int) -> tuple[str, int]:
    return (pair.server_addr(family), PORT)


def client_ip(pair: NetnsPair, family: int) -> str:
    return pair.client_v4 if family == socket.AF_INET else pair.client_v6


def exchange(sock: socket.socket, data: bytes, to: tuple[str, int],
             timeout: float = 3.0) -> bytes | None:
    """Send ``data`` and return the first datagram back, or None after ``timeout``."""
    sock.settimeout(timeout)
    sock.sendto(data, to)
    try:
        return sock.recv(65535)
    except TimeoutError:
        return None


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


class FrameTap:
    """Every frame on the client's veth end (both directions), for a pcap tshark reads."""

    def __init__(self, pair: NetnsPair) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((pair.client_if, ETH_P_ALL))
            sock.setblocking(False)
            return sock

        self.sock = pair.run_client(make)

    def drain(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.sock.recv(65535))
            except BlockingIOError:
                return frames

    def close(self) -> None:
        self.sock.close()


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for frame in frames:
            f.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)


def tshark_retries(path: Path) -> list[dict[str, list[str]]]:
    """tshark's view of every QUIC long-header packet from the server port: type, version,
    CIDs, token, tag, UDP checksum status, and any expert message (a bad Retry tag is one)."""
    import json

    cmd = [require_tshark(), "-n", "-r", str(path), "-T", "json", "-d", f"udp.port=={PORT},quic",
           "-o", "udp.check_checksum:TRUE", "-Y", f"udp.srcport=={PORT}"]
    for f in ("quic.long.packet_type", "quic.long.packet_type_v2", "quic.version", "quic.dcid",
              "quic.scid", "quic.retry_token", "quic.retry_integrity_tag", "udp.checksum.status",
              "_ws.expert.message"):
        cmd += ["-e", f]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return [p["_source"]["layers"] for p in json.loads(proc.stdout or "[]")]


@pytest.mark.parametrize("family", FAMILIES, ids=["v4", "v6"])
@pytest.mark.parametrize("version", VERSIONS, ids=["quic1", "quic2"])
def test_token_less_initial_gets_a_valid_retry_and_the_token_passes(
    pair: NetnsPair, retry_on: Loaded, family: int, version: int, tmp_path: Path
) -> None:
    dp = retry_on.dp
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    tap = FrameTap(pair)
    try:
        to = server_addr(pair, family)
        conn = client_conn(version)
        initial = first_datagram(conn, to)
        odcid = parse_long_header(initial, 0).dcid
        client_scid = parse_long_header(initial, 0).scid
        before = dp.counters()
        retry = exchange(sock, initial, to)
        assert retry is not None, (
            f"no Retry came back: {delta(before, dp.counters())}; frames on the client's "
            f"veth: {[f[:64].hex() for f in tap.drain()]}")
        got = delta(before, dp.counters())
        assert got.get("xdp_retry_sent") == 1, got
        assert "xdp_initial" not in got, "a retried Initial must not pass up"

        header = parse_long_header(retry, 0)
        assert header.packet_type is PacketType.RETRY and header.version == version
        assert header.dcid == client_scid
        assert len(header.scid) == 16 and header.scid[0] >> CONFIG_ROTATION_SHIFT == CR_UNROUTABLE
        assert len(retry) < len(initial)
        # our own tag check (cryptography's AES-GCM), then the token in Python
        assert retry[-16:] == _retry_tag(version, odcid, retry[:-16])
        token = retry[len(retry) - 16 - (18 + len(odcid)) : -16]
        assert validate_retry_token(KEY, token, client_ip(pair, family), header.scid,
                                    time.monotonic(), LIFETIME) == odcid

        # aioquic takes the Retry (it checks the tag) and its next Initial carries the token
        conn.receive_datagram(retry, to, now=time.monotonic())
        again = conn.datagrams_to_send(now=time.monotonic())
        assert again, "aioquic refused the kernel's Retry"
        retried = again[0][0]
        assert parse_long_header(retried, 0).token == token
        assert parse_long_header(retried, 0).dcid == header.scid
        before = dp.counters()
        sock.sendto(retried, to)
        wait_for(lambda: delta(before, dp.counters()).get("xdp_token_valid") == 1,
                 lambda: delta(before, dp.counters()))
        got = delta(before, dp.counters())
        assert got.get("xdp_initial") == 1 and "xdp_retry_sent" not in got, got

        pcap = tmp_path / "retry.pcap"
        write_pcap(pcap, tap.drain())
        seen = tshark_retries(pcap)
        assert len(seen) == 1, seen
        layers = seen[0]
        ptype = layers.get("quic.long.packet_type") or layers.get("quic.long.packet_type_v2")
        assert ptype == ["3" if version == VERSION_1 else "0"], layers
        assert int(layers["quic.version"][0], 0) == version
        assert bytes.fromhex(layers["quic.scid"][0].replace(":", "")) == header.scid
        assert bytes.fromhex(layers["quic.retry_token"][0].replace(":", "")) == token
        assert layers["udp.checksum.status"] == ["1"], layers  # 1 = good
        assert not any("retry" in m.lower() for m in layers.get("_ws.expert.message", [])), layers
    finally:
        tap.close()
        sock.close()


def wait_for(cond, describe, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``cond`` (counters move when the kernel has judged the packet)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met: {describe()}")
        time.sleep(0.01)


@pytest.mark.parametrize("family", FAMILIES, ids=["v4", "v6"])
def test_bad_tokens_are_dropped_and_counted(pair: NetnsPair, retry_on: Loaded,
                                            family: int) -> None:
    dp = retry_on.dp
    sock = pair.client_socket(family, socket.SOCK_DGRAM)
    to = server_addr(pair, family)
    me = client_ip(pair, family)
    try:
        cases = []
        for name in ("forged", "expired", "other_address", "python_minted"):
            conn = client_conn(VERSION_1)
            dcid = conn._peer_cid.cid  # the DCID its Initial will carry (the token's binding)
            now = time.monotonic()
            if name == "forged":
                token = bytearray(build_retry_token(KEY, me, os.urandom(8), dcid, now))
                token[-1] ^= 1
                token = bytes(token)
            elif name == "expired":
                token = build_retry_token(KEY, me, os.urandom(8), dcid, now - LIFETIME - 2)
            elif name == "other_address":
                other = "198.18.0.99" if family == socket.AF_INET else "fd00:5eed::99"
                token = build_retry_token(KEY, other, os.urandom(8), dcid, now)
            else:
                token = build_retry_token(KEY, me, os.urandom(8), dcid, now)
            conn._peer_token = token
            cases.append((name, first_datagram(conn, to)))
        expect = {"forged": "xdp_drop_token_invalid", "expired": "xdp_drop_token_expired",
                  "other_address": "xdp_drop_token_invalid", "python_minted": "xdp_token_valid"}
        for name, datagram in cases:
            assert parse_long_header(datagram, 0).token, name
            before = dp.counters()
            sock.sendto(datagram, to)
            counter = expect[name]
            wait_for(lambda c=counter, b=before: delta(b, dp.counters()).get(c) == 1,
                     lambda b=before: delta(b, dp.counters()))
            got = delta(before, dp.counters())
            assert "xdp_retry_sent" not in got, (name, got)
            assert ("xdp_initial" in got) == (name == "python_minted"), (name, got)
    finally:
        sock.close()


def test_other_tokens_pass_with_retry_off_and_get_a_retry_with_it_on(
    pair: NetnsPair, retry_on: Loaded
) -> None:
    dp = retry_on.dp
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    to = server_addr(pair, socket.AF_INET)
    try:
        conn = client_conn(VERSION_1, token=b"\x01app-new-token" + os.urandom(20))
        datagram = first_datagram(conn, to)
        dp.set_retry_until(0)
        before = dp.counters()
        sock.sendto(datagram, to)
        wait_for(lambda: delta(before, dp.counters()).get("xdp_initial") == 1,
                 lambda: delta(before, dp.counters()))
        assert delta(before, dp.counters()).get("xdp_token_other") == 1
        dp.set_retry_until(guard.RETRY_ALWAYS)
        before = dp.counters()
        retry = exchange(sock, datagram, to)
        assert retry is not None and parse_long_header(retry, 0).packet_type is PacketType.RETRY
        got = delta(before, dp.counters())
        assert got.get("xdp_token_other") == 1 and got.get("xdp_retry_sent") == 1, got
    finally:
        dp.set_retry_until(guard.RETRY_ALWAYS)
        sock.close()


def test_retries_per_prefix_are_bounded(pair: NetnsPair, retry_on: Loaded) -> None:
    """Burst 3 at 0.1 Retry/s per prefix: of 8 token-less Initials from one /24, 3 are
    answered (4 if the test took over 10 s), the rest dropped and counted; none passes up."""
    dp = retry_on.dp
    dp.set_retry(KEY, LIFETIME, rate=0.1, burst=3)
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    to = server_addr(pair, socket.AF_INET)
    try:
        datagrams = [first_datagram(client_conn(VERSION_1), to) for _ in range(8)]
        before = dp.counters()
        for d in datagrams:
            sock.sendto(d, to)
        wait_for(lambda: sum(delta(before, dp.counters()).get(k, 0) for k in
                             ("xdp_retry_sent", "xdp_retry_rate_limited")) == 8,
                 lambda: delta(before, dp.counters()))
        got = delta(before, dp.counters())
        assert 3 <= got["xdp_retry_sent"] <= 4, got
        assert got["xdp_retry_rate_limited"] == 8 - got["xdp_retry_sent"]
        assert "xdp_initial" not in got
    finally:
        dp.set_retry(KEY, LIFETIME, rate=1000.0, burst=1000)
        sock.close()


def test_auto_mode_turns_retry_on_in_the_guard_when_initials_exceed_the_rate(
    pair: NetnsPair, retry_on: Loaded
) -> None:
    """"auto" with a rate of 0.5 token-less Initials per second and a burst of 3: the first 3
    pass to the classifier (Retry mode off), the 4th is over the rate and turns Retry mode
    on in the guard itself (no daemon in the loop), so it and the rest get Retries; with the
    hold at 0 nothing turns it on."""
    dp = retry_on.dp
    sock = pair.client_socket(socket.AF_INET, socket.SOCK_DGRAM)
    to = server_addr(pair, socket.AF_INET)
    try:
        dp.set_retry_until(0)
        dp.set_retry_auto(0.5, 3, hold=0.0)  # measuring, but never turning it on
        datagrams = [first_datagram(client_conn(VERSION_1), to) for _ in range(8)]
        before = dp.counters()
        for d in datagrams[:5]:
            sock.sendto(d, to)
        wait_for(lambda: delta(before, dp.counters()).get("xdp_initial") == 5,
                 lambda: delta(before, dp.counters()))
        assert dp.guard_config().retry_until_ns == 0
        dp.set_retry_auto(0.5, 3, hold=60.0)
        before = dp.counters()
        for d in datagrams[:3]:
            sock.sendto(d, to)
        wait_for(lambda: delta(before, dp.counters()).get("xdp_initial") == 3,
                 lambda: delta(before, dp.counters()))
        assert "xdp_retry_sent" not in delta(before, dp.counters())
        retry = exchange(sock, datagrams[3], to)
        assert retry is not None and parse_long_header(retry, 0).packet_type is PacketType.RETRY
        assert dp.guard_config().retry_until_ns > time.monotonic_ns() + 50 * 10**9
        for d in datagrams[4:]:
            assert exchange(sock, d, to) is not None
        got = delta(before, dp.counters())
        assert got.get("xdp_retry_sent") == 5 and got.get("xdp_initial") == 3, got
        assert got.get("xdp_retry_auto", 0) >= 1, got
    finally:
        dp.set_retry_auto(1.0, 1, hold=0.0)
        dp.set_retry_until(guard.RETRY_ALWAYS)
        sock.close()


def test_a_proven_address_skips_retry_mode_within_its_budget(
    pair: NetnsPair, retry_on: Loaded
) -> None:
    """A valid token proves its source address (``proven_ttl``): that address's next
    token-less Initial passes on to the flood guard instead of paying a Retry round trip
    again; past the address's own budget (here one, then one per 100 s) it is retried as
    before, and another address (the same client's IPv6 one) was never proven."""
    dp = retry_on.dp
    dp.set_retry(KEY, LIFETIME, rate=1000.0, burst=1000, proven_ttl=30.0, proven_rate=0.01)
    socks = {f: pair.client_socket(f, socket.SOCK_DGRAM) for f in FAMILIES}
    v4 = server_addr(pair, socket.AF_INET)
    try:
        conn = client_conn(VERSION_1)
        retry = exchange(socks[socket.AF_INET], first_datagram(conn, v4), v4)
        assert retry is not None and parse_long_header(retry, 0).packet_type is PacketType.RETRY
        conn.receive_datagram(retry, v4, now=time.monotonic())
        before = dp.counters()
        socks[socket.AF_INET].sendto(conn.datagrams_to_send(now=time.monotonic())[0][0], v4)
        wait_for(lambda: delta(before, dp.counters()).get("xdp_token_valid") == 1,
                 lambda: delta(before, dp.counters()))

        before = dp.counters()  # proven: passes up, no Retry
        socks[socket.AF_INET].sendto(first_datagram(client_conn(VERSION_1), v4), v4)
        wait_for(lambda: delta(before, dp.counters()).get("xdp_initial") == 1,
                 lambda: delta(before, dp.counters()))
        got = delta(before, dp.counters())
        assert got.get("xdp_retry_proven") == 1 and "xdp_retry_sent" not in got, got

        before = dp.counters()  # its budget spent: a Retry again
        again = exchange(socks[socket.AF_INET], first_datagram(client_conn(VERSION_1), v4), v4)
        assert again is not None and parse_long_header(again, 0).packet_type is PacketType.RETRY
        got = delta(before, dp.counters())
        assert got.get("xdp_retry_sent") == 1 and "xdp_retry_proven" not in got, got

        v6 = server_addr(pair, socket.AF_INET6)  # never proven
        before = dp.counters()
        other = exchange(socks[socket.AF_INET6], first_datagram(client_conn(VERSION_1), v6), v6)
        assert other is not None and parse_long_header(other, 0).packet_type is PacketType.RETRY
        assert "xdp_retry_proven" not in delta(before, dp.counters())
    finally:
        dp.set_retry(KEY, LIFETIME, rate=1000.0, burst=1000)
        for s in socks.values():
            s.close()
