"""Issue 11 §7: junk floods stay in the kernel, measured side by side in one run.

One daemon (guard at TC with its per-prefix bucket, Retry ``auto``, the real h3 demo app
behind it). Real qh3 clients (post-quantum key share: a two-datagram ClientHello) make one
connection and request after another from the client's own address, first with no flood,
then during each flood from the C sender (bench/flood/spoof.c, raw socket):

(a) random short headers (DCIDs in no worker's layout), (b) random-DCID 0-RTT, (c) client
Initials as IPv4 fragments, all three from one spoofed /24; (d) the spoofed Initial flood of
issue 7, from a /16. For each: the legitimate rate (requests completed per second, and its
ratio to the unflooded one), the junk sent, the share of it that reached a classifier socket
(Python) — an upper bound: legitimate first flights are in the count too — and the daemon's
peak RSS. Asserted: under 1% reached Python for (a)-(c), no legitimate request failed
beyond the issue-7 floor, memory within the caps. Timings are reported, never asserted; the
figures are printed (``-s``) and recorded in docs/RELIABILITY.md §6.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from deploy.netns import NetnsPair
from steerd.daemon.dataplane.netns import netns_path
from tests.e2e.conftest import PORT, Daemon, start_daemon
from tests.reliability.test_flood import (  # one sender, one way to build its records
    MIN_SUCCESS,
    RECORD,
    SPOOF_C,
    SPOOF_NET,
    pair,  # noqa: F401 - the fixture (spoofed sources routed back into the client namespace)
    proc_status,
    spoofed_flights,
)
from tests.sdk.harness import chromium_get, start_demo_app, start_loader

pytestmark = pytest.mark.root

SECONDS = 5.0
JUNK_NET, JUNK_BITS = "198.19.7.0", 24  # one prefix: what a single attacking host has
# (d) from 16 prefixes: with this test's per-prefix budget (below), issue 7's /16 would let
# 256 x GUARD_RATE spoofed Initials a second through to Python, which is issue 7's Retry test,
# not this one.
SPOOF_BITS = 20
JUNK_RECORDS = 1024
BROWSER_HOST = "www.example.test"  # Chromium needs a name for its forced-QUIC origin
MAX_PYTHON_SHARE = 0.01
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
    "d_spoofed_initials": ("xdp_initial", "xdp_drop_rate_limited"),
}


# What of each flood reached a classifier socket: for (a) and (b) a counter that only junk
# moves (a short header for a slot nobody holds; a 0-RTT the guard let through: the
# legitimate qh3 clients send none); for (c) and (d) the first-flight datagrams the steering
# program handed to a classifier beyond what the legitimate clients' connections made in the
# unflooded run (per connection): an estimate.
JUNK_TO_PYTHON = {"a_short_headers": "steer_short_dead_slot", "b_0rtt": "xdp_0rtt"}


def counters(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.status()["counters"])


def test_junk_floods_stay_in_the_kernel(pair: NetnsPair) -> None:  # noqa: F811
    work = Path(tempfile.mkdtemp(prefix="steerd-junk-"))
    spoof = work / "spoof"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(spoof), str(SPOOF_C)], check=True,
                   timeout=60)
    initials = work / "initials.bin"
    spoofed_flights(initials)
    floods: dict[str, tuple[list[str], str, int]] = {
        "none": ([], "", 0),
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
    with contextlib.contextmanager(start_daemon)(pair, config) as daemon:
        app = start_demo_app(daemon, "h3", "--server-name", BROWSER_HOST, "--server-name",
                             "localhost")
        try:
            pid = daemon.proc.pid
            for name, (args, net, bits) in floods.items():
                print(f"\nflood {name}", flush=True)
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                rss_before = proc_status(pid, "VmRSS")
                before = counters(daemon)
                sender = None
                if args:
                    record = sizes.get(name, RECORD)
                    sender = subprocess.Popen(
                        ["nsenter", f"--net={netns_path(pair.client)}", str(spoof),
                         pair.server_v4, str(PORT), net, str(bits), args[0], str(record),
                         str(SECONDS), "64", *args[1:]],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                started = time.monotonic()
                loader = start_loader(pair, "qh3", "h3", "/count")
                try:
                    # one Chromium page load inside the window (a real browser's first flight:
                    # two datagrams, CRYPTO scrambled), timed
                    browser_started = time.monotonic()
                    page = chromium_get(pair, BROWSER_HOST, app)
                    browser = {"served": "behind steerd" in page.stdout,
                               "seconds": round(time.monotonic() - browser_started, 2)}
                    if sender is not None:
                        out, err = sender.communicate(timeout=SECONDS + 30)
                        assert sender.returncode == 0, err
                        sent = int(out.split()[0])
                    else:
                        # the rest of the measuring window itself, not a wait
                        time.sleep(max(0.0, SECONDS - (time.monotonic() - started)))
                        sent = 0
                    elapsed = time.monotonic() - started
                    totals = loader.finish()
                finally:
                    loader.kill()
                after = counters(daemon)
                delta = {k: v - before.get(k, 0) for k, v in after.items()
                         if v != before.get(k, 0)}
                to_python = delta.get("steer_to_classifier", 0)
                arrived = sum(delta.get(k, 0) for k in ARRIVED.get(name, ()))
                if name == "none":
                    per_connection = delta.get("steer_long_new", 0) / max(1, totals["ok"])
                if name in JUNK_TO_PYTHON:
                    junk_to_python = delta.get(JUNK_TO_PYTHON[name], 0)
                else:
                    junk_to_python = max(0, round(delta.get("steer_long_new", 0)
                                                  - per_connection * totals["ok"]))
                figures[name] = {
                    "junk_sent": sent,
                    "junk_pps": round(sent / SECONDS),
                    "junk_arrived": arrived,
                    "legit_ok": totals["ok"], "legit_failed": totals["failed"],
                    "legit_errors": totals["errors"][:2],
                    "legit_rate": round(totals["ok"] / elapsed, 1),
                    "chromium": browser,
                    "to_python": to_python,  # everything a classifier got, legitimate too
                    "junk_to_python": junk_to_python,
                    "python_share": round(junk_to_python / arrived, 5) if arrived else None,
                    "rss_before_kib": rss_before, "rss_peak_kib": proc_status(pid, "VmHWM"),
                    "counters": delta,
                }
            base = figures["none"]["legit_rate"]
            for fig in figures.values():
                fig["rate_ratio"] = round(fig["legit_rate"] / base, 3) if base else None  # type: ignore[operator]
            print("\njunk flood figures:", json.dumps(figures, indent=1))
            for name, fig in figures.items():
                ok, failed = fig["legit_ok"], fig["legit_failed"]
                assert ok / max(1, ok + failed) >= MIN_SUCCESS, (name, fig)  # type: ignore[operator]
                assert fig["chromium"]["served"], (name, fig)  # type: ignore[index]
                if name.startswith(("a_", "b_", "c_")):
                    assert fig["junk_arrived"] > 10000, (name, fig)  # type: ignore[operator]
                    assert fig["python_share"] < MAX_PYTHON_SHARE, (name, fig)  # type: ignore[operator]
            # What kept each one in the kernel, by its own counter.
            assert figures["a_short_headers"]["counters"]["steer_drop_short_not_ours"] > 10000  # type: ignore[index]
            assert figures["b_0rtt"]["counters"]["xdp_drop_rate_limited_0rtt"] > 10000  # type: ignore[index]
            assert figures["c_fragments"]["counters"]["xdp_drop_fragment"] > 10000  # type: ignore[index]
            cap_kib = (PENDING_CONNECTIONS * (PENDING_BYTES + 4096) + 131072 * 2 * 200) // 1024
            for name, fig in figures.items():
                assert fig["rss_peak_kib"] <= fig["rss_before_kib"] + cap_kib, (name, fig)  # type: ignore[operator]
        finally:
            assert app.stop() == 0
            subprocess.run(["rm", "-rf", str(work)], check=False)
