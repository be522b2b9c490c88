"""Real clients' first flights, read by our assembler and checked against tshark.

The fixtures (tests/fixtures/, see its README) are unmodified first flights of Chromium, qh3,
aioquic (v1 and v2) and ngtcp2. For each, tshark — an independent QUIC/TLS implementation —
says in this very test what the DCID, version, SNI, ALPN list, key shares and ClientHello
datagram count are; our assembler must give the same answers from the same bytes.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tshark

from quic.flight import FirstFlightAssembler, NeedMore, Ready, VersionNegotiationNeeded
from quic.packet import VERSION_1, VERSION_2
from steerd.tools.classify import classify_capture
from steerd.tools.pcap import Datagram, read_datagrams

FIXTURES = Path(__file__).parent / "fixtures"
PORT = 4433

# What each fixture is *for* (its reason to exist); the values themselves come from tshark.
CLASSIFIED = {
    "chromium-h3.pcapng": {"version": VERSION_1, "hello_datagrams": 2},
    "qh3-h3.pcapng": {"version": VERSION_1, "hello_datagrams": 2},
    "aioquic-v1-smb.pcapng": {"version": VERSION_1, "hello_datagrams": 1},
    "aioquic-v1-doq-h3.pcapng": {"version": VERSION_1, "hello_datagrams": 1},
    "aioquic-v2-h3-smb.pcapng": {"version": VERSION_2, "hello_datagrams": 1},
    "aioquic-v1-pq-retrans.pcapng": {"version": VERSION_1, "hello_datagrams": 2},
    "ngtcp2-h3.pcapng": {"version": VERSION_1, "hello_datagrams": 1},
}
VERSION_NEGOTIATION = {"ngtcp2-version-1a2a3a4a.pcapng": 0x1A2A3A4A}
CONVERSATION = "aioquic-conversation.pcap"  # both directions of a whole handshake
X25519MLKEM768 = 0x11EC

pytestmark = pytest.mark.tshark


def _datagrams(name: str) -> list[Datagram]:
    return list(read_datagrams(FIXTURES / name))


def _oracle(name: str) -> tshark.Connection:
    conns = tshark.connections(FIXTURES / name, PORT)
    assert len(conns) == 1, f"{name}: tshark sees {len(conns)} connections"
    return next(iter(conns.values()))


def _feed_until_ready(datagrams: list[Datagram]) -> tuple[Ready, int]:
    """Feed in the given order; return the Ready answer and how many datagrams it took."""
    asm = FirstFlightAssembler()
    for i, d in enumerate(datagrams, 1):
        result = asm.feed(d.payload, d.src, d.time)
        if isinstance(result, Ready):
            return result, i
        assert isinstance(result, NeedMore), f"datagram {d.frame}: {result}"
    raise AssertionError("the flight never became Ready")


def test_every_fixture_is_covered() -> None:
    """A fixture without a test, or a test without its fixture, is a mistake."""
    on_disk = {p.name for p in FIXTURES.glob("*.pcap*")}
    assert on_disk == set(CLASSIFIED) | set(VERSION_NEGOTIATION) | {CONVERSATION}


@pytest.mark.parametrize("name", sorted(CLASSIFIED))
def test_first_flight_matches_tshark(name: str) -> None:
    want = _oracle(name)
    datagrams = _datagrams(name)
    # Our capture reader sees the same client datagrams tshark sees.
    assert [d.frame for d in datagrams] == want.frames
    assert all(d.complete and d.dst[1] == PORT for d in datagrams)

    ready, used = _feed_until_ready(datagrams)
    assert ready.dcid == want.dcid
    assert ready.version == want.version == CLASSIFIED[name]["version"]
    # We lowercase server names (DNS is case-insensitive); tshark shows the wire bytes.
    assert ready.sni == (want.sni.lower() if want.sni is not None else None)
    assert list(ready.alpn) == want.alpn  # the client's order, not sorted
    assert want.alpn, "tshark found no ALPN: the fixture or the oracle is broken"
    assert list(ready.client_hello.key_share_groups) == want.key_share_groups
    assert list(ready.client_hello.supported_versions) == want.supported_versions
    assert len(ready.datagrams) == used == want.hello_datagrams
    assert want.hello_datagrams == CLASSIFIED[name]["hello_datagrams"]
    # The datagrams to forward are the client's, byte for byte, in arrival order.
    assert [b for b, _ in ready.datagrams] == [d.payload for d in datagrams[:used]]


@pytest.mark.parametrize("name", sorted(CLASSIFIED))
def test_any_arrival_order_gives_the_same_answer(name: str) -> None:
    """Reordering on the path must not change the answer (first flight datagrams only)."""
    want = _oracle(name)
    flight = _datagrams(name)[: want.hello_datagrams]
    for order in itertools.permutations(flight):
        ready, used = _feed_until_ready(list(order))
        assert (ready.dcid, ready.sni, list(ready.alpn)) == (
            want.dcid,
            want.sni.lower() if want.sni else None,
            want.alpn,
        )
        assert used == len(flight)


def test_chromium_clienthello_spans_two_scrambled_datagrams() -> None:
    """The case the in-kernel demux and udpgrm miss: CRYPTO in 2 datagrams, out of order."""
    want = _oracle("chromium-h3.pcapng")
    assert want.hello_datagrams == 2
    first, second = want.frames[:2]
    assert {first, second} <= set(want.crypto_frames)
    offsets = {
        int(p["frame.number"][0]): [int(o) for o in p.get("quic.crypto.offset", [])]
        for p in tshark.packets(FIXTURES / "chromium-h3.pcapng", PORT)
    }
    # Scrambled: the first datagram does not carry its CRYPTO data in offset order, and
    # offset 0 (the start of the ClientHello) is not its first CRYPTO frame.
    assert offsets[first] != sorted(offsets[first])
    assert offsets[first][0] != 0
    ready, _ = _feed_until_ready(_datagrams("chromium-h3.pcapng"))
    assert len(ready.datagrams) == 2
    assert ready.client_hello.length > 1200  # a ClientHello no single datagram could hold


def test_chromium_retransmissions_alone_give_the_same_answer() -> None:
    """Chromium re-packs its CRYPTO data differently when it retransmits (frames 3 and 4)."""
    want = _oracle("chromium-h3.pcapng")
    later = _datagrams("chromium-h3.pcapng")[2:]
    assert len(later) == 2
    ready, used = _feed_until_ready(later)
    assert (ready.dcid, ready.sni, list(ready.alpn)) == (want.dcid, want.sni, want.alpn)
    assert used == 2


def test_aioquic_retransmitted_flight_is_a_complete_flight_again() -> None:
    """The assembler forgets decided connections; a retransmitted flight decides again alike."""
    want = _oracle("aioquic-v1-pq-retrans.pcapng")
    datagrams = _datagrams("aioquic-v1-pq-retrans.pcapng")
    assert len(want.frames) == 4
    asm = FirstFlightAssembler()
    results = [asm.feed(d.payload, d.src, d.time) for d in datagrams]
    assert [type(r) for r in results] == [NeedMore, Ready, NeedMore, Ready]
    for r in results[1], results[3]:
        assert isinstance(r, Ready)
        assert (r.dcid, r.sni, list(r.alpn)) == (want.dcid, None, want.alpn)


def test_qh3_offers_post_quantum_key_share() -> None:
    want = _oracle("qh3-h3.pcapng")
    assert X25519MLKEM768 in want.key_share_groups
    ready, _ = _feed_until_ready(_datagrams("qh3-h3.pcapng"))
    assert X25519MLKEM768 in ready.client_hello.key_share_groups
    assert len(ready.datagrams) == 2


def test_ngtcp2_uses_an_18_byte_dcid() -> None:
    want = _oracle("ngtcp2-h3.pcapng")
    assert len(want.dcid) == 18
    ready, _ = _feed_until_ready(_datagrams("ngtcp2-h3.pcapng"))
    assert len(ready.dcid) == 18 and ready.dcid == want.dcid


def test_aioquic_sends_no_sni() -> None:
    for name in ("aioquic-v1-smb.pcapng", "aioquic-v1-doq-h3.pcapng", "aioquic-v2-h3-smb.pcapng"):
        want = _oracle(name)
        assert want.sni is None
        ready, _ = _feed_until_ready(_datagrams(name))
        assert ready.sni is None


@pytest.mark.parametrize("name", sorted(VERSION_NEGOTIATION))
def test_unknown_version_needs_version_negotiation(name: str) -> None:
    want = _oracle(name)
    assert want.version == VERSION_NEGOTIATION[name]
    (d,) = _datagrams(name)
    result = FirstFlightAssembler().feed(d.payload, d.src, d.time)
    assert isinstance(result, VersionNegotiationNeeded)
    assert result.version == want.version
    assert result.dcid == want.dcid


def test_whole_conversation_first_flight_matches_tshark() -> None:
    """A real handshake: our reader finds both directions; the client's flight is classified.

    The client's later datagrams go to the CID the server chose: tshark sees them as other
    DCIDs without a ClientHello, and they are no first flight.
    """
    conns = tshark.connections(FIXTURES / CONVERSATION, PORT)
    (want,) = [c for c in conns.values() if c.hello_frame is not None]
    assert len(conns) >= 2  # the original DCID and the server-chosen one
    datagrams = _datagrams(CONVERSATION)
    to_server = [d for d in datagrams if d.dst[1] == PORT]
    assert len(to_server) < len(datagrams)  # the server's replies are in the file too
    assert [d.frame for d in to_server] == sorted(f for c in conns.values() for f in c.frames)
    ready, used = _feed_until_ready(to_server[: want.hello_datagrams])
    assert (ready.dcid, ready.version, ready.sni, list(ready.alpn)) == (
        want.dcid,
        want.version,
        want.sni,
        want.alpn,
    )
    assert used == want.hello_datagrams == 1


def _free_port_pair() -> int:
    """A loopback UDP port whose successor is free too (capture.py uses port and port+1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no free pair of loopback UDP ports")


@pytest.mark.root
def test_capture_script_reruns_and_fresh_flights_match_tshark(tmp_path: Path) -> None:
    """Re-record every client now (the installed Chromium may have changed since the
    fixtures were made) on a free port, and check each fresh flight against tshark."""
    port = _free_port_pair()
    proc = subprocess.run(
        [sys.executable, str(FIXTURES / "capture.py"), "--out", str(tmp_path), "--port", str(port)],
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    fresh = {p.name for p in tmp_path.glob("*.pcap*")}
    assert fresh == {p.name for p in FIXTURES.glob("*.pcap*")}
    for name in sorted(fresh):
        path = tmp_path / name
        lines = list(classify_capture(str(path), port))
        conns = tshark.connections(path, port)
        if name in VERSION_NEGOTIATION:
            assert [x["verdict"] for x in lines] == ["version_negotiation"], name
            assert lines[0]["dcid"] == next(iter(conns)).hex()
            continue
        (want,) = [c for c in conns.values() if c.hello_frame is not None]
        assert [(x["verdict"], x["dcid"], x["sni"], x["alpn"], x["datagrams"]) for x in lines] == [
            ("classified", want.dcid.hex(), want.sni, want.alpn, want.hello_datagrams)
        ], name
        if name in CLASSIFIED:
            assert want.hello_datagrams == CLASSIFIED[name]["hello_datagrams"], name
            assert want.version == CLASSIFIED[name]["version"], name
