"""The kernel Retry's cost per packet, against the classifier's Python Retry (issue 19 item 5).

Kernel: the guard's XDP program run by BPF_PROG_TEST_RUN (one run per call, many calls)
on one real aioquic Initial frame (Ethernet, IPv4 or IPv6, UDP): the kernel reports the mean
run time per packet, which for a token-less Initial in Retry mode is the whole Retry: parse,
SipHash token, GHASH tag, rewrite, checksums. Also the same Initial with Retry mode off (the
guard's plain verdict) and carrying a valid token (the kernel check). Python: the classifier's
Retry path on the same datagram (parse the header, mint the token, build and tag the Retry;
socket I/O excluded), per call, one core. Retries per CPU-second = 1e9 / ns per Retry.

Run as root: ``.venv/bin/python bench/kernel_retry/run.py``. Prints one JSON object.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from quic.builders import build_retry
from quic.cid import CidLayout
from quic.packet import parse_long_header
from quic.token import build_retry_token, derive_token_key
from steerd.daemon.classifier import Classifier
from steerd.daemon.dataplane import Dataplane, DataplaneConfig, guard
from steerd.daemon.reinject import build_ipv4_udp, build_ipv6_udp

PORT = 4433
RUNS = 20_000
KEY = derive_token_key(os.urandom(32))
CLIENT = {4: ("198.18.0.1", 50000), 6: ("fd00:5eed::1", 50000)}
SERVER = {4: ("198.18.0.2", PORT), 6: ("fd00:5eed::2", PORT)}


def initial(token: bytes = b"") -> bytes:
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="bench")
    config.token = token
    conn = QuicConnection(configuration=config)
    if token:
        conn._peer_cid.cid = bytes(8)
    conn.connect(SERVER[4], now=0.0)
    return conn.datagrams_to_send(now=0.0)[0][0]


def frame(family: int, payload: bytes) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + (b"\x08\x00" if family == 4 else b"\x86\xdd")
    build = build_ipv4_udp if family == 4 else build_ipv6_udp
    return eth + build(CLIENT[family], SERVER[family], payload)


class _TestRun(ctypes.Structure):
    """union bpf_attr, the BPF_PROG_TEST_RUN member (uapi/linux/bpf.h)."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 64)]


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_BPF, _BPF_PROG_TEST_RUN = 321, 10  # x86_64


def prog_run(prog_fd: int, data: bytes, runs: int = RUNS) -> tuple[int, float]:
    """(XDP return code, mean ns per run): ``runs`` BPF_PROG_TEST_RUN calls of repeat 1 each,
    because with repeat > 1 the kernel reuses the buffer the first run rewrote (the Retry)."""
    buf_in = ctypes.create_string_buffer(data, len(data))
    buf_out = ctypes.create_string_buffer(len(data) + 256)
    total = 0
    rc = -1
    for _ in range(runs):
        attr = _TestRun(prog_fd=prog_fd, data_size_in=len(data), data_size_out=len(buf_out),
                        data_in=ctypes.addressof(buf_in), data_out=ctypes.addressof(buf_out),
                        repeat=1)
        if _LIBC.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr),
                         ctypes.sizeof(attr)) != 0:
            raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
        total += attr.duration
        rc = attr.retval
    return rc, total / runs


def python_retry_ns(datagram: bytes, n: int = 20_000) -> float:
    """The classifier's Retry work per token-less Initial (Classifier._retry_gate minus I/O)."""
    start = time.process_time_ns()
    for _ in range(n):
        header = parse_long_header(datagram, 0)
        scid = Classifier._retry_cid(None)  # type: ignore[arg-type]
        token = build_retry_token(KEY, CLIENT[4][0], header.dcid, scid, time.monotonic())
        build_retry(header.version, header.scid, scid, header.dcid, token)
    return (time.process_time_ns() - start) / n


def main() -> None:
    pin_dir = f"/sys/fs/bpf/steerd-bench-{uuid.uuid4().hex[:8]}"
    dp = Dataplane(DataplaneConfig(layout=CidLayout(), port=PORT, pin_dir=pin_dir))
    figures: dict[str, float] = {"runs": RUNS}
    try:
        dp.load()
        prog = dp.guard_prog_fd
        dp.set_retry(KEY, 10.0, rate=0.0, burst=1)  # no budget: every run builds a Retry
        plain = initial()
        for family in (4, 6):
            dp.set_retry_until(guard.RETRY_ALWAYS)
            rc, ns = prog_run(prog, frame(family, plain))
            assert rc == 3, f"XDP_TX expected, got {rc}"
            figures[f"kernel_retry_ns_v{family}"] = round(ns)
            dp.set_retry_until(0)
            rc, ns = prog_run(prog, frame(family, plain))
            assert rc == 2, rc  # XDP_PASS
            figures[f"kernel_pass_ns_v{family}"] = round(ns)
        token = build_retry_token(KEY, CLIENT[4][0], os.urandom(8), bytes(8), time.monotonic())
        rc, ns = prog_run(prog, frame(4, initial(token)))
        assert rc == 2, rc
        figures["kernel_token_check_ns_v4"] = round(ns)
        counters = dp.counters()
        assert counters["xdp_token_valid"] >= RUNS, counters["xdp_token_valid"]
        assert counters["xdp_retry_sent"] >= 2 * RUNS, counters["xdp_retry_sent"]
    finally:
        dp.destroy()
    py = python_retry_ns(plain)
    figures["python_retry_ns"] = round(py)
    figures["kernel_retries_per_cpu_second_v4"] = round(1e9 / figures["kernel_retry_ns_v4"])
    figures["python_retries_per_cpu_second"] = round(1e9 / py)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
