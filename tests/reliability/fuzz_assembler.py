"""Coverage-guided fuzzing of quic.flight.FirstFlightAssembler with validly encrypted Initials.

Why a structured harness: random datagrams die at the AEAD (an attacker can do better: Initial
keys derive from the DCID the attacker picked, RFC 9001 §5.2). Here fuzz bytes are read as a
small program that *builds* first flights — CRYPTO frames at any offset and length, PADDING,
PING, ACK, CONNECTION_CLOSE, raw (forbidden or truncated) frame bytes, coalesced Initial and
0-RTT packets, eight DCIDs, v1 or v2, clock steps past the TTL, now and then a flipped bit in
the sealed datagram — and seals every Initial with the real client keys
(quic.crypto.seal_initial), padding the datagram to 1200 bytes. So inputs reach the frame
walker, the CRYPTO reassembler, the ClientHello parser and the assembler's budgets and
evictions, and libFuzzer's coverage feedback steers mutation there.

Each feed must give one of the four documented results (a Rejected with a documented reason),
never raise, keep ``pending_count``/``pending_bytes`` and ``early_count``/``early_bytes``
within the configured caps and return within ``FEED_DEADLINE`` seconds.

Run by hand (libFuzzer flags pass through; the first corpus directory receives new inputs)::

    .venv/bin/python -m tests.reliability.fuzz_assembler -max_total_time=60 NEW_DIR SEED_DIR
    .venv/bin/python -m tests.reliability.fuzz_assembler --seeds SEED_DIR   # write the seeds
    .venv/bin/python -m tests.reliability.fuzz_assembler --soak SECONDS DIR...  # memory soak
    .venv/bin/python -m tests.reliability.fuzz_assembler --lines DIR...  # lines reached

Program format (a byte source that yields zeros once exhausted, so every input is valid):
byte 0 = flags (bit 0: QUIC v2, bit 1: default limits instead of the tight ones), then ops,
``op & 7`` the kind and ``op >> 3`` its argument (see ``datagrams``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from quic.crypto import derive_initial_keys, open_packet, seal_initial
from quic.errors import QuicError
from quic.flight import (
    REJECT_REASONS,
    AssemblerConfig,
    FeedResult,
    FirstFlightAssembler,
    NeedMore,
    Ready,
    Rejected,
    VersionNegotiationNeeded,
)
from quic.frames import parse_initial_frames
from quic.packet import (
    VERSION_1,
    VERSION_2,
    PacketType,
    encode_varint_fixed,
    long_header_type_bits,
    parse_long_header,
)
from quic.varint import MAX_VARINT, encode_varint

RESULTS = (NeedMore, Ready, Rejected, VersionNegotiationNeeded)


def _dcids(salt: int) -> tuple[bytes, ...]:
    return tuple(bytes([0xD0 + i]) + salt.to_bytes(7, "big") for i in range(8))


SCID = bytes.fromhex("5c1d5c1d")
MIN_DATAGRAM = 1200
MAX_PAYLOAD = 8000  # per packet: keeps a 2-byte Length field and the run fast
FEED_DEADLINE = 0.5  # seconds; a feed is microseconds to a few ms even instrumented
# Tight limits so that one short input already fills the table and forces evictions.
TIGHT = AssemblerConfig(
    crypto_cap=4096,
    max_crypto_ranges=8,
    max_pending=4,
    max_bytes_per_connection=8192,
    max_bytes_total=16384,
    ttl=1.0,
)
DEFAULT = AssemblerConfig()
# The soak's limits: small enough that a 10-second replay hits both caps again and again.
SOAK = AssemblerConfig(max_pending=128, max_bytes_total=256 * 1024)

# op kinds
OP_DATAGRAM, OP_CRYPTO, OP_PADDING, OP_PING, OP_ACK, OP_RAW, OP_CLOSE, OP_PACKET = range(8)


class _Source:
    """Fuzz bytes read front to back; zeros once exhausted (so no input is 'invalid')."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n).ljust(n, b"\0"), "big")


class _Packet:
    __slots__ = ("dcid", "frames", "pn", "zero_rtt")

    def __init__(self, dcid: bytes, pn: int, zero_rtt: bool) -> None:
        self.dcid = dcid
        self.pn = pn
        self.zero_rtt = zero_rtt
        self.frames: list[bytes] = []

    def payload(self) -> bytes:
        return b"".join(self.frames)[:MAX_PAYLOAD]


def _zero_rtt(version: int, dcid: bytes, pn: int, body: bytes) -> bytes:
    """A 0-RTT packet: opaque to the classifier (it only keeps it), well-formed header."""
    first = 0xC0 | (long_header_type_bits(version, PacketType.ZERO_RTT) << 4) | 0x03
    body = body.ljust(20, b"\x5a")
    return b"".join(
        (
            bytes((first, *version.to_bytes(4, "big"), len(dcid))),
            dcid,
            bytes((len(SCID),)),
            SCID,
            encode_varint_fixed(4 + len(body), 2),
            pn.to_bytes(4, "big"),
            body,
        )
    )


def _seal(version: int, pkt: _Packet, pad: int = 0) -> bytes:
    keys = derive_initial_keys(pkt.dcid, version, server=False)
    return seal_initial(keys, version, pkt.dcid, SCID, b"", pkt.pn, pkt.payload() + bytes(pad))


def build_datagram(version: int, packets: list[_Packet], pad_to: int) -> bytes:
    """Seal the packets, the last Initial padded so the datagram reaches ``pad_to`` bytes."""
    sealed = [
        _zero_rtt(version, p.dcid, p.pn, p.payload()) if p.zero_rtt else _seal(version, p)
        for p in packets
    ]
    short = pad_to - sum(map(len, sealed))
    if short > 0:
        last = max((i for i, p in enumerate(packets) if not p.zero_rtt), default=None)
        if last is None:
            sealed.append(bytes(short))  # trailing zeros: not a long header, ignored
        else:
            sealed[last] = _seal(version, packets[last], short)
    return b"".join(sealed)


def datagrams(data: bytes, salt: int = 0) -> Iterator[tuple[bytes, int, float]]:
    """Decode one fuzz input into ``(datagram, dcid_index, clock_step)`` triples; ``salt``
    renames the eight DCIDs (a soak replays inputs as ever new connections)."""
    dcids = _dcids(salt)
    src = _Source(data)
    flags = src.int(1)
    version = VERSION_2 if flags & 1 else VERSION_1
    dcid_index = 0
    packets: list[_Packet] = [_Packet(dcids[0], 0, False)]
    flips: list[tuple[int, int]] = []  # (position, xor) applied to the sealed datagram
    while not src.done:
        op = src.int(1)
        kind, arg = op & 7, op >> 3
        frames = packets[-1].frames
        if kind == OP_DATAGRAM:
            # arg bits 0-2: DCID of the next datagram; bit 3: no padding; bit 4: clock step
            pad_to = 0 if arg & 8 else MIN_DATAGRAM
            step = src.int(1) / 20 if arg & 16 else 0.0
            if any(p.frames or p.zero_rtt for p in packets):
                yield _flip(build_datagram(version, packets, pad_to), flips), dcid_index, step
            dcid_index = arg & 7
            packets = [_Packet(dcids[dcid_index], 0, False)]
            flips = []
        elif kind == OP_CRYPTO:
            # offset: 3 bytes, or near the varint ceiling (arg bit 0); length: 2 bytes; then
            # the data itself; arg bit 1: declare a length other than the data carried
            offset = src.int(3)
            if arg & 1:
                offset = MAX_VARINT - offset
            length = src.int(2)
            chunk = src.take(length)
            declared = length if arg & 2 else len(chunk)
            frames.append(b"\x06" + encode_varint(offset) + encode_varint(declared) + chunk)
        elif kind == OP_PADDING:
            frames.append(bytes(arg + 1))
        elif kind == OP_PING:
            frames.append(b"\x01")
        elif kind == OP_ACK:
            ecn = bool(arg & 1)
            count = (arg >> 1) & 3
            fields = [src.int(1) for _ in range(3 + 2 * count + (3 if ecn else 0))]
            fields.insert(2, count)
            frames.append(bytes((3 if ecn else 2,)) + b"".join(map(encode_varint, fields)))
        elif kind == OP_RAW and arg == 0:
            # flip bits of the sealed datagram (header, protected PN, ciphertext or tag): what
            # fails to open or to parse must cost the pending connection nothing
            flips.append((src.int(2), src.int(1) or 1))
        elif kind == OP_RAW:
            frames.append(src.take(arg))
        elif kind == OP_CLOSE:
            frames.append(b"\x1c" + encode_varint(src.int(1)) + b"\x00" + encode_varint(arg))
        else:  # OP_PACKET: coalesce another packet into this datagram
            # arg bit 0: 0-RTT; bit 1: another DCID (RFC 9000 §12.2: ignored); bits 2-4: PN
            dcid = dcids[(dcid_index + 1) % 8] if arg & 2 else dcids[dcid_index]
            packets.append(_Packet(dcid, arg >> 2, bool(arg & 1)))
    if any(p.frames or p.zero_rtt for p in packets):
        yield _flip(build_datagram(version, packets, MIN_DATAGRAM), flips), dcid_index, 0.0


def _flip(datagram: bytes, flips: list[tuple[int, int]]) -> bytes:
    if not flips:
        return datagram
    out = bytearray(datagram)
    for pos, mask in flips:
        out[pos % len(out)] ^= mask
    return bytes(out)


def check_result(asm: FirstFlightAssembler, result: FeedResult, elapsed: float) -> None:
    """The contract every feed must keep, whatever the input."""
    if not isinstance(result, RESULTS):
        raise AssertionError(f"undocumented result {result!r}")
    if isinstance(result, Rejected) and result.reason not in REJECT_REASONS:
        raise AssertionError(f"undocumented reason {result.reason!r}")
    cfg = asm.config
    if asm.pending_count > cfg.max_pending:
        raise AssertionError(f"{asm.pending_count} pending > {cfg.max_pending}")
    if not 0 <= asm.pending_bytes <= cfg.max_bytes_total:
        raise AssertionError(f"{asm.pending_bytes} pending bytes > {cfg.max_bytes_total}")
    # the early table (0-RTT before any Initial) has caps of its own
    if asm.early_count > cfg.max_early:
        raise AssertionError(f"{asm.early_count} early entries > {cfg.max_early}")
    if not 0 <= asm.early_bytes <= cfg.max_early_bytes:
        raise AssertionError(f"{asm.early_bytes} early bytes > {cfg.max_early_bytes}")
    if elapsed > FEED_DEADLINE:
        raise AssertionError(f"feed took {elapsed:.3f} s")


def run_input(
    data: bytes,
    asm: FirstFlightAssembler | None = None,
    now: float = 0.0,
    salt: int = 0,
    clock: bool = True,
    slowest: list[float] | None = None,
) -> float:
    """Feed every datagram the input describes; return the clock after the last one
    (``clock=False``: the input's clock steps are ignored; ``slowest``: a one-element list
    that keeps the longest feed, in seconds)."""
    if asm is None:
        asm = FirstFlightAssembler(DEFAULT if data[:1] and data[0] & 2 else TIGHT)
    for datagram, index, step in datagrams(data, salt):
        now += step if clock else 0.0
        t0 = time.perf_counter()
        result = asm.feed(datagram, ("192.0.2.1", 1024 + index), now)
        elapsed = time.perf_counter() - t0
        check_result(asm, result, elapsed)
        if slowest is not None and elapsed > slowest[0]:
            slowest[0] = elapsed
    if asm.pending_count == 0 and asm.pending_bytes != 0:
        raise AssertionError(f"{asm.pending_bytes} bytes charged to no pending connection")
    if asm.early_count == 0 and asm.early_bytes != 0:
        raise AssertionError(f"{asm.early_bytes} bytes charged to no early entry")
    return now


# -- seeds: real first flights re-expressed as harness programs ---------------------------


def encode_program(version: int, flights: Iterable[list[list[tuple[int, bytes]]]]) -> bytes:
    """A program for ``datagrams`` that replays flights: per flight, per datagram, its
    CRYPTO frames. Each flight gets its own DCID (so a seed also exercises the table)."""
    out = bytearray([1 if version == VERSION_2 else 0])
    for i, flight in enumerate(flights):
        for dgram in flight:
            out.append(OP_DATAGRAM | ((i % 8) << 3))
            for offset, data in dgram:
                for start in range(0, len(data), 0xFFFF):
                    part = data[start : start + 0xFFFF]
                    out.append(OP_CRYPTO)
                    out += (offset + start).to_bytes(3, "big") + len(part).to_bytes(2, "big")
                    out += part
    return bytes(out)


def fixture_flights(path: Path) -> dict[int, list[list[list[tuple[int, bytes]]]]]:
    """The client first flights of a capture, by version: per connection (original DCID),
    per datagram, the CRYPTO frames of its Initials (decrypted with the real keys)."""
    from steerd.tools.pcap import read_datagrams  # steerd is only needed for seeding

    conns: dict[tuple[int, bytes], list[list[tuple[int, bytes]]]] = {}
    for d in read_datagrams(path):
        raw = d.payload
        if not raw or not raw[0] & 0x80:
            continue
        try:
            first = parse_long_header(raw, 0)
        except QuicError:
            continue
        if first.version not in (VERSION_1, VERSION_2):
            continue
        if first.packet_type is not PacketType.INITIAL:
            continue
        try:
            keys = derive_initial_keys(first.dcid, first.version, server=False)
            _pn, payload = open_packet(raw, first, keys)
            frames = parse_initial_frames(payload).crypto
        except QuicError:
            continue  # a server Initial, or another DCID than the original
        if frames:
            conns.setdefault((first.version, first.dcid), []).append(frames)
    by_version: dict[int, list[list[list[tuple[int, bytes]]]]] = {}
    for (version, _dcid), flight in conns.items():
        by_version.setdefault(version, []).append(flight)
    return by_version


def write_seeds(fixtures: Path, out: Path) -> int:
    """One seed per capture and version (all its flights; each flight alone too when there
    are several); return how many were written."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for cap in sorted([*fixtures.glob("*.pcapng"), *fixtures.glob("*.pcap")]):
        for version, flights in fixture_flights(cap).items():
            programs = [encode_program(version, flights)]
            if len(flights) > 1:
                programs += [encode_program(version, [f]) for f in flights[:4]]
            for prog in programs:
                (out / f"{cap.stem}-{version:08x}-{n}").write_bytes(prog)
                n += 1
    return n


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def soak(corpus: list[Path], seconds: float) -> dict[str, float]:
    """Replay the corpus, round after round, into ONE assembler (``SOAK`` limits), every
    round under fresh DCIDs (so the table fills up and evicts), for ``seconds``; measure
    the Python heap (tracemalloc) and process RSS peaks."""
    import tracemalloc

    inputs = [p.read_bytes() for p in corpus if p.is_file()]
    asm = FirstFlightAssembler(SOAK)
    rss_before = _rss_kib("VmRSS")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.monotonic()
    now, rounds, feeds, most_pending = 0.0, 0, 0, 0
    slowest = [0.0]
    # for ``seconds``, and on (up to 3x as long, on a slow machine) until the caps were hit
    while (elapsed := time.monotonic() - t0) < seconds or (
        asm.stats.evicted == 0 and elapsed < 3 * seconds
    ):
        for i, data in enumerate(inputs):
            before = asm.stats.ready + asm.stats.rejected + asm.stats.version_negotiation
            # the clock stands still: nothing expires, only the caps bound the table
            now = run_input(data, asm, now, salt=rounds * len(inputs) + i, clock=False,
                            slowest=slowest)
            feeds += asm.stats.ready + asm.stats.rejected + asm.stats.version_negotiation
            feeds -= before
            most_pending = max(most_pending, asm.pending_count)
        rounds += 1
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {
        "seconds": round(time.monotonic() - t0, 1),
        "inputs": len(inputs),
        "rounds": rounds,
        "decided_feeds": feeds,
        "evicted": asm.stats.evicted,
        "expired": asm.stats.expired,
        "max_pending_seen": most_pending,
        "max_pending_cap": SOAK.max_pending,
        "max_bytes_total_cap": SOAK.max_bytes_total,
        "heap_peak_bytes": peak,
        "slowest_feed_ms": round(slowest[0] * 1000, 2),
        "rss_before_kib": rss_before,
        "pending_bytes_end": asm.pending_bytes,
        "rss_peak_kib": _rss_kib("VmHWM"),
    }


def _function_lines(module: object) -> set[int]:
    """Lines of the bodies of a module's functions and methods (import-time lines, which no
    input can reach or miss, are left out)."""
    import dis
    import inspect
    import types

    def lines(code: types.CodeType) -> set[int]:
        out = {line for _, line in dis.findlinestarts(code) if line is not None}
        out.discard(code.co_firstlineno)  # the def line: no line event when called
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                out |= lines(const)
        return out

    found: set[int] = set()
    name = getattr(module, "__name__", "")
    for obj in vars(module).values():
        members = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
        for m in members:
            fn = getattr(m, "fget", m)  # properties too
            code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
            if code is not None and getattr(fn, "__module__", None) == name:
                found |= lines(code)
    return found


def line_coverage(corpus: list[Path]) -> dict[str, str]:
    """Function-body lines of the quic modules the corpus executes (stdlib ``trace``: no
    extra package), "executed/total" per module: how deep the fuzzer got."""
    import importlib
    import trace

    tracer = trace.Trace(count=1, trace=0)
    for p in corpus:
        if p.is_file():
            tracer.runfunc(run_input, p.read_bytes())
    counts = tracer.results().counts
    out = {}
    for name in ("flight", "frames", "reassembly", "tls", "packet", "crypto", "varint"):
        module = importlib.import_module(f"quic.{name}")
        body = _function_lines(module)
        hit = {line for (f, line) in counts if f == module.__file__} & body
        out[f"quic/{name}.py"] = f"{len(hit)}/{len(body)}"
    return out


def _test_one_input(data: bytes) -> None:
    run_input(data)


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[1] == "--soak":
        import json

        files = sorted(p for d in argv[3:] for p in Path(d).iterdir())
        print(json.dumps(soak(files, float(argv[2]))))
        return
    if len(argv) >= 3 and argv[1] == "--lines":
        import json

        files = sorted(p for d in argv[2:] for p in Path(d).iterdir())
        print(json.dumps(line_coverage(files)))
        return
    if len(argv) == 3 and argv[1] == "--seeds":
        root = Path(__file__).resolve().parents[2]
        print(write_seeds(root / "tests" / "fixtures", Path(argv[2])), "seeds")
        return
    import atheris

    # Run as __main__, this file has already imported quic uninstrumented: import the quic
    # modules afresh under instrumentation, and the harness with them (as its package name,
    # a module distinct from __main__), so coverage feedback sees every quic branch.
    for name in [n for n in sys.modules if n == "quic" or n.startswith("quic.")]:
        del sys.modules[name]
    with atheris.instrument_imports(include=["quic"]):
        from tests.reliability import fuzz_assembler as harness
    atheris.Setup(argv, harness._test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
