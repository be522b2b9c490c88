"""Issue 11 §7: junk floods stay in the kernel, measured side by side in one run.

One daemon (guard at TC with its per-prefix bucket, Retry ``auto``, the real h3 demo app
behind it). Real qh3 clients (post-quantum key share: a two-datagram ClientHello) make one
connection and request after another from the client's own address, first with no flood,
then during each flood from the C sender (bench/flood/spoof.c, raw socket):

(a) random short headers (DCIDs in no worker's layout), (b) random-DCID 0-RTT, (c) client
Initials as IPv4 fragments, all three from one spoofed /24; (d) the spoofed Initial flood of
issues 7 and 19, from 256 prefixes of a /16. Beside "none", a second baseline, "sender_only":
the same sender sending (d)'s datagrams as fast, to an address whose packets the client
veth's egress drops, so that none reaches the server. On this 2-core machine the sender takes
a core the clients and the server otherwise have; the ratio of a flood's rate to
"sender_only" is what the flood costs the server, the ratio to "none" what it costs the
machine. For each: the legitimate rate (requests completed per second, and both ratios), the
junk sent, the share of it that reached a classifier socket
(Python) — an upper bound: legitimate first flights are in the count too — and the daemon's
peak RSS. Each flood lasts SECONDS and on, in short rounds, until its own counter shows
MIN_JUNK of it stopped in the kernel (conftest.Flood): what the assertions need to mean
anything, however slow the sender is on a loaded machine; the sender's speed and the
legitimate rate are figures, never gates. Asserted: for (a) and (c) under 1% of what arrived
reached Python, for (b) no more than the guard's bucket lets through (burst + rate x time: the
share of the flood that is depends on how fast the sender was), no legitimate request failed
beyond the issue-7 floor, Chromium served, memory within the caps. The figures are printed
(``-s``) and recorded in docs/RELIABILITY.md §6.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.netns import NetnsPair
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, Daemon, start_daemon
from tests.reliability.conftest import Flood
from tests.reliability.test_flood import (  # one sender, one way to build its records
    MIN_SUCCESS,
    RECORD,
    SPOOF_C,
    SPOOF_NET,
    metric,
    pair,  # noqa: F401 - the fixture (spoofed sources routed back into the client namespace)
    proc_status,
    spoofed_flights,
)
from tests.sdk.harness import chromium_get, start_demo_app, start_loader

pytestmark = [pytest.mark.root, pytest.mark.serial]

SECONDS = 5.0
JUNK_NET, JUNK_BITS = "198.19.7.0", 24  # one prefix: what a single attacking host has
# (d) from the 256 /24 prefixes of issue 19's /16: in Retry mode (on by itself at this rate)
# the guard answers token-less Initials in the kernel, within each prefix's Retry budget, so
# the number of prefixes no longer decides what reaches Python.
SPOOF_BITS = 16
# "sender_only": (d)'s datagrams to this address, sent out of the client veth and dropped at
# its egress: the sender's whole send path, no packet at the server.
DISCARD_V4, DISCARD_TABLE = "192.0.2.99", "steerd_discard"
JUNK_RECORDS = 1024
BROWSER_HOST = "www.example.test"  # Chromium needs a name for its forced-QUIC origin
MAX_PYTHON_SHARE = 0.01
MIN_JUNK = 10_000  # junk stopped in the kernel, by the flood's own counter (STOPPED_BY)
PENDING_CONNECTIONS, PENDING_BYTES = 2048, 17584
# Per source prefix: above what the legitimate client's /24 sends when it loads as fast as it
# can (about 250 connections/s here, 3 Initials each), so the unflooded rate is the daemon's,
# not the bucket's; a single attacking prefix still gets at most this many through.
GUARD_RATE, GUARD_BURST = 1000, 1000


def short_records(path: Path) -> int:
    """Short headers with random DCIDs whose first octet is never the layout's (0x08)."""
    out = bytearray()
    for _ in range(JUNK_RECORDS):
        dcid = bytes([0x80 | os.urandom(1)[0] & 0x7F]) + os.urandom(8)
        out += bytes([0x40 | os.urandom(1)[0] & 0x3F]) + dcid + os.urandom(90)
    path.write_bytes(bytes(out))
    return 100


def zero_rtt_records(path: Path) -> int:
    """v1 0-RTT packets (type 0b01) with random DCIDs, each in a 1200-byte datagram."""
    out = bytearray()
    for _ in range(JUNK_RECORDS):
        head = bytes([0xD0]) + struct.pack("!I", 1) + bytes([8]) + os.urandom(8) + bytes([8])
        head += os.urandom(8)
        rest = RECORD - len(head) - 2
        out += head + struct.pack("!H", 0x4000 | rest) + os.urandom(rest)
    path.write_bytes(bytes(out))
    return RECORD


# The guard's own count of each flood's packets that reached the server (the sender can
# outrun the veth: what never arrived proves nothing either way).
ARRIVED = {
    "a_short_headers": ("steer_drop_short_not_ours", "steer_short_dead_slot"),
    "b_0rtt": ("xdp_0rtt", "xdp_drop_rate_limited_0rtt"),
    "c_fragments": ("xdp_drop_fragment",),
    "d_spoofed_initials": ("xdp_initial", "xdp_drop_rate_limited", "xdp_retry_sent",
                           "xdp_retry_rate_limited", "xdp_retry_rate_limited_total"),
}


# What of each flood reached a classifier socket: for (a) and (b) a counter that only junk
# moves (a short header for a slot nobody holds; a 0-RTT the guard let through: the
# legitimate qh3 clients send none); for (c) and (d) the first-flight datagrams the steering
# program handed to a classifier beyond what the legitimate clients' connections made in the
# unflooded run (per connection): an estimate.
JUNK_TO_PYTHON = {"a_short_headers": "steer_short_dead_slot", "b_0rtt": "xdp_0rtt"}

# What keeps each flood in the kernel, by its own counter: the steering program's drop of a
# short header in no worker's layout, the guard's bucket (0-RTT before its Initial spends
# the same budget), the guard's drop of a first fragment. (d) is not flooded until a count:
# from 16 prefixes its bucket passes 16 x GUARD_RATE a second, which a sender slowed enough
# by a loaded machine might not exceed; what (d) shows is the legitimate rate beside it.
STOPPED_BY = {
    "a_short_headers": "steer_drop_short_not_ours",
    "b_0rtt": "xdp_drop_rate_limited_0rtt",
    "c_fragments": "xdp_drop_fragment",
}


def counters(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.status()["counters"])


def kernel_stopped(daemon: Daemon, before: dict[str, int], counter: str | None) -> bool:
    """The flood's own counter has moved by MIN_JUNK since ``before`` (None: none to await).
    Read from /metrics: cheaper than a ``steerd status`` process on a loaded machine."""
    if counter is None:
        return True
    now = metric(daemon, f'steerd_bpf_events_total{{counter="{counter}"}}')
    return now - before.get(counter, 0) >= MIN_JUNK


def reassembled(netns: NetnsPair) -> int:
    """IPv4 datagrams the server namespace reassembled from fragments (ReasmOKs), a figure."""
    out = subprocess.run(["nsenter", f"--net={netns_path(netns.server)}", "cat", "/proc/net/snmp"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    names, values = (line.split()[1:] for line in out.splitlines() if line.startswith("Ip:"))
    return int(dict(zip(names, values, strict=True))["ReasmOKs"])


@contextlib.contextmanager
def discard_route(netns: NetnsPair) -> Iterator[None]:
    """DISCARD_V4 routed out of the client veth, towards the server, and dropped at the
    veth's egress (nftables' netdev egress hook), for "sender_only": the sender's whole send
    path up to the wire, not a packet at the server."""
    client = ["ip", "-n", netns.client]
    subprocess.run([*client, "route", "add", f"{DISCARD_V4}/32", "via", netns.server_v4],
                   check=True, timeout=20)
    ruleset = (f"table netdev {DISCARD_TABLE} {{\n chain egress {{\n"
               f"  type filter hook egress device {netns.client_if} priority 0;\n"
               f"  ip daddr {DISCARD_V4} drop\n }}\n}}\n")
    nft = ["ip", "netns", "exec", netns.client, "nft"]
    try:
        subprocess.run([*nft, "-f", "-"], input=ruleset, text=True, check=True, timeout=20)
        yield
    finally:
        subprocess.run([*nft, "delete", "table", "netdev", DISCARD_TABLE], check=False,
                       timeout=20)
        subprocess.run([*client, "route", "del", f"{DISCARD_V4}/32"], check=False, timeout=20)


def test_junk_floods_stay_in_the_kernel(pair: NetnsPair) -> None:  # noqa: F811
    work = Path(tempfile.mkdtemp(prefix="steerd-junk-"))
    spoof = work / "spoof"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(spoof), str(SPOOF_C)], check=True,
                   timeout=60)
    initials = work / "initials.bin"
    spoofed_flights(initials)
    floods: dict[str, tuple[list[str], str, int]] = {
        "none": ([], "", 0),
        "sender_only": ([str(initials)], SPOOF_NET, SPOOF_BITS),
        "a_short_headers": ([str(work / "short.bin")], JUNK_NET, JUNK_BITS),
        "b_0rtt": ([str(work / "zero_rtt.bin")], JUNK_NET, JUNK_BITS),
        "c_fragments": ([str(initials), "frag"], JUNK_NET, JUNK_BITS),
        "d_spoofed_initials": ([str(initials)], SPOOF_NET, SPOOF_BITS),
    }
    sizes = {"a_short_headers": short_records(work / "short.bin"),
             "b_0rtt": zero_rtt_records(work / "zero_rtt.bin")}
    config = (
        f"[limits]\npending_connections = {PENDING_CONNECTIONS}\n"
        f"pending_bytes = {PENDING_BYTES}\n"
        f'[xdp]\ninterfaces = ["{pair.server_if}"]\nmode = "tc"\n'
        f'[flood]\nretry = "auto"\nguard_rate = {GUARD_RATE}\nguard_burst = {GUARD_BURST}\n'
    )
    figures: dict[str, dict[str, object]] = {}
    with contextlib.contextmanager(start_daemon)(pair, config) as daemon, discard_route(pair):
        app = start_demo_app(daemon, "h3", "--server-name", BROWSER_HOST, "--server-name",
                             "localhost")
        try:
            pid = daemon.proc.pid
            for name, (args, net, bits) in floods.items():
                print(f"\nflood {name}", flush=True)
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                rss_before = proc_status(pid, "VmRSS")
                before = counters(daemon)
                reasm_before = reassembled(pair)
                flood = None
                if args:
                    to = DISCARD_V4 if name == "sender_only" else pair.server_v4
                    flood = Flood(pair, spoof, to, PORT, net, bits, Path(args[0]),
                                  sizes.get(name, RECORD), *args[1:])
                    flood.start(SECONDS)
                started = time.monotonic()
                loader = start_loader(pair, "qh3", "h3", "/count")
                try:
                    # one Chromium page load inside the window (a real browser's first flight:
                    # two datagrams, CRYPTO scrambled), timed
                    browser_started = time.monotonic()
                    page = chromium_get(pair, BROWSER_HOST, app)
                    browser = {"served": "behind steerd" in page.stdout,
                               "seconds": round(time.monotonic() - browser_started, 2)}
                    if flood is not None:
                        stopped_by = STOPPED_BY.get(name)
                        flood.until(functools.partial(kernel_stopped, daemon, before, stopped_by),
                                    f"{name}: {MIN_JUNK} stopped by {stopped_by}")
                    else:
                        # the rest of the measuring window itself, not a wait
                        time.sleep(max(0.0, SECONDS - (time.monotonic() - started)))
                    elapsed = time.monotonic() - started
                    totals = loader.finish()
                finally:
                    loader.kill()
                    if flood is not None:
                        flood.stop()
                after = counters(daemon)
                reasm = reassembled(pair) - reasm_before
                # the window in which the guard's bucket counted this flood: from before its
                # first round to now (after every counter read)
                bucket_window = time.monotonic() - flood.started if flood and flood.started else 0
                delta = {k: v - before.get(k, 0) for k, v in after.items()
                         if v != before.get(k, 0)}
                to_python = delta.get("steer_to_classifier", 0)
                arrived = sum(delta.get(k, 0) for k in ARRIVED.get(name, ()))
                if name == "none":
                    per_connection = delta.get("steer_long_new", 0) / max(1, totals["ok"])
                estimate = max(0, round(delta.get("steer_long_new", 0)
                                        - per_connection * totals["ok"]))
                junk_to_python = (delta.get(JUNK_TO_PYTHON[name], 0) if name in JUNK_TO_PYTHON
                                  else estimate)
                # what the guard's bucket lets one prefix pass in that window (2%: the
                # bucket's race across CPUs, bpf/guard.c)
                bucket_bound = round((GUARD_BURST + 1 + GUARD_RATE * bucket_window) * 1.02)
                figures[name] = {
                    # the sender's speed: a figure, never a gate
                    "junk_sent": flood.sent if flood else 0,
                    "junk_pps": (round(flood.sent / flood.send_seconds)
                                 if flood and flood.send_seconds else 0),
                    "flood_rounds": flood.rounds if flood else 0,
                    "flood_seconds": round(flood.wall_seconds(), 2) if flood else 0,
                    "junk_arrived": arrived,
                    "bucket_bound": bucket_bound,
                    "legit_ok": totals["ok"], "legit_failed": totals["failed"],
                    "legit_errors": totals["errors"][:2],
                    "legit_rate": round(totals["ok"] / elapsed, 1),
                    "chromium": browser,
                    "to_python": to_python,  # everything a classifier got, legitimate too
                    "junk_to_python": junk_to_python,
                    "first_flight_estimate": estimate,  # the (c)/(d) estimate, for every phase
                    # datagrams the server namespace reassembled from fragments (reported)
                    "reassembled": reasm,
                    "python_share": round(junk_to_python / arrived, 5) if arrived else None,
                    "rss_before_kib": rss_before, "rss_peak_kib": proc_status(pid, "VmHWM"),
                    "counters": delta,
                }
            base = figures["none"]["legit_rate"]
            busy = figures["sender_only"]["legit_rate"]
            for fig in figures.values():
                fig["rate_ratio"] = round(fig["legit_rate"] / base, 3) if base else None  # type: ignore[operator]
                # what the flood costs the server, the sender's own CPU set aside
                fig["rate_ratio_to_sender_only"] = (  # type: ignore[operator]
                    round(fig["legit_rate"] / busy, 3) if busy else None)  # type: ignore[operator]
            print("\njunk flood figures:", json.dumps(figures, indent=1))
            for name, fig in figures.items():
                ok, failed = fig["legit_ok"], fig["legit_failed"]
                assert ok / max(1, ok + failed) >= MIN_SUCCESS, (name, fig)  # type: ignore[operator]
                assert fig["chromium"]["served"], (name, fig)  # type: ignore[index]
                if name in STOPPED_BY:
                    # What kept it in the kernel, by its own counter (the flood went on until
                    # it had: the sender's speed decides only how long that took).
                    assert fig["counters"].get(STOPPED_BY[name], 0) >= MIN_JUNK, (name, fig)  # type: ignore[attr-defined]
                if name in ("a_short_headers", "c_fragments"):
                    # nothing of these needs the classifier: under 1% of what arrived (the
                    # estimate for (c) includes the legitimate clients' extra datagrams)
                    assert fig["python_share"] < MAX_PYTHON_SHARE, (name, fig)  # type: ignore[operator]
            # (b): what passed the guard is the bucket's budget for one prefix, however many
            # arrived (its share of the flood, reported, is that budget over the sender's speed)
            zero_rtt = figures["b_0rtt"]
            assert zero_rtt["junk_to_python"] <= zero_rtt["bucket_bound"], zero_rtt  # type: ignore[operator]
            # (d): with Retry mode on, the legitimate clients paid the Retry round trip once:
            # their address, proven by its token, skipped it afterwards (retry_proven_ttl).
            # Without that, this phase's rate ratio was 0.46 in a run where it is 0.73 with it.
            spoofed = figures["d_spoofed_initials"]["counters"]
            if spoofed.get("xdp_retry_sent"):  # type: ignore[attr-defined]
                assert spoofed.get("xdp_retry_proven", 0) > 0, spoofed  # type: ignore[attr-defined]
            cap_kib = (PENDING_CONNECTIONS * (PENDING_BYTES + 4096) + 131072 * 2 * 200) // 1024
            for name, fig in figures.items():
                assert fig["rss_peak_kib"] <= fig["rss_before_kib"] + cap_kib, (name, fig)  # type: ignore[operator]
        finally:
            assert app.stop() == 0
            subprocess.run(["rm", "-rf", str(work)], check=False)
