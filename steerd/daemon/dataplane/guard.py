"""The guard (steerd/bpf/guard.c) on an interface: attaching it at XDP or TC ingress,
removing it (also what an earlier run left), and its flood guard settings (``guard_config``).

Why two hooks: XDP sees packets before an skb exists (the cheapest place to drop), but on
veth any native XDP program makes the kernel copy every locally built skb (see
docs/PERFORMANCE.md), so virtual interfaces get the same verdicts at TC ingress (tcx).

Why removal goes by pin: a restarted daemon must take off the guard the previous run attached
(found through the pinned program) before attaching its own, and must never remove another
tool's XDP program.
"""

from __future__ import annotations

import ctypes as ct
import errno
import json
import os
import socket
import struct
import subprocess
from typing import Any

from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import header_constants
from steerd.daemon.dataplane.maps import clear_map, detach_pinned, libbcc
from steerd.daemon.dataplane.netns import run_in_netns
from steerd.daemon.dataplane.programs import GUARD_PIN, GUARD_TC_PIN

BPF_TCX_INGRESS = 46  # uapi enum bpf_attach_type (kernel 6.6+; newer than Debian 12's headers)
XDP_FLAGS_SKB_MODE = 1 << 1  # if_link.h
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_MODES = {"auto": ("native", "generic"), "native": ("native",), "generic": ("generic",)}
_XDP_FLAG_OF = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


# ---------------------------------------------------------------------------------------
# XDP


def attach_xdp(guard_fn: Any, ifname: str, mode: str = "auto",
               netns: str | None = None) -> tuple[str, int]:
    """Attach the XDP guard ``guard_fn`` (a bcc function) to ``ifname`` in ``netns``.

    mode "native" (driver), "generic" (SKB) or "auto" (native if the driver has it, else
    generic). Returns the mode used and its XDP flags (detach_xdp needs them).
    """
    import bcc

    if mode not in XDP_MODES:
        raise DataplaneError(f"unknown XDP mode {mode!r}")
    errors: list[str] = []
    dev = ifname.encode()
    for m in XDP_MODES[mode]:
        flags = _XDP_FLAG_OF[m]
        try:
            run_in_netns(netns, lambda f=flags: bcc.BPF.attach_xdp(dev, guard_fn, f))
        except Exception as exc:
            errors.append(f"{m}: {exc}")
            continue
        return m, flags
    raise DataplaneError(f"attaching XDP to {ifname} failed: {'; '.join(errors)}")


def detach_xdp(ifname: str, flags: int = XDP_FLAGS_DRV_MODE, netns: str | None = None) -> None:
    """Remove whatever XDP program is attached to ``ifname`` in the mode ``flags`` names."""
    import bcc

    try:
        run_in_netns(netns, lambda: bcc.BPF.remove_xdp(ifname.encode(), flags))
    except Exception as exc:
        raise DataplaneError(f"detaching XDP from {ifname} failed: {exc}") from exc


# ---------------------------------------------------------------------------------------
# TC ingress (tcx)


def attach_tc(prog_fd: int, ifname: str, netns: str | None = None) -> None:
    """Attach the TC guard ``prog_fd`` at tcx ingress of ``ifname``."""
    lib = libbcc()

    def attach() -> int:
        index = socket.if_nametoindex(ifname)
        if lib.bpf_prog_attach(prog_fd, index, BPF_TCX_INGRESS, 0) != 0:
            return ct.get_errno() or errno.EINVAL
        return 0

    try:
        err = run_in_netns(netns, attach)
    except OSError as exc:
        raise DataplaneError(f"attaching the TC guard to {ifname} failed: {exc}") from exc
    if err:
        raise DataplaneError(
            f"attaching the TC guard to {ifname} failed: {os.strerror(err)} "
            "(tcx needs kernel 6.6 or later)"
        )


def detach_tc(prog_fd: int, ifname: str, netns: str | None = None) -> None:
    """Detach the TC guard ``prog_fd`` from tcx ingress of ``ifname``."""
    lib = libbcc()

    def detach() -> int:
        index = socket.if_nametoindex(ifname)
        if lib.bpf_prog_detach2(prog_fd, index, BPF_TCX_INGRESS) != 0:
            return ct.get_errno() or errno.EINVAL
        return 0

    try:
        err = run_in_netns(netns, detach)
    except OSError as exc:
        raise DataplaneError(f"detaching the TC guard from {ifname} failed: {exc}") from exc
    if err:
        raise DataplaneError(f"detaching the TC guard from {ifname} failed: "
                             f"{os.strerror(err)}")


# ---------------------------------------------------------------------------------------
# What an earlier run attached


def detach_stale_tc(pin_dir: str, ifname: str, netns: str | None = None) -> bool:
    """Detach the TC guard a previous run pinned in ``pin_dir`` (before attaching this
    run's), so a restart does not leave two guards on one interface. True if one was
    removed."""
    return detach_pinned(os.path.join(pin_dir, GUARD_TC_PIN), BPF_TCX_INGRESS,
                         lambda: socket.if_nametoindex(ifname), netns)


def remove_pinned_guard(pin_dir: str, ifname: str, netns: str | None = None) -> list[str]:
    """Take the guard ``pin_dir``'s programs put on ``ifname`` off it, whichever run
    attached it: TC by its pinned program, XDP only if the attached program is ours (the
    pinned one), never another tool's. Returns what was removed."""
    removed = ["tc"] if detach_stale_tc(pin_dir, ifname, netns) else []
    pinned = os.path.join(pin_dir, GUARD_PIN)
    if not os.path.exists(pinned):
        return removed
    ours = json.loads(subprocess.run(
        ["bpftool", "-j", "prog", "show", "pinned", pinned],
        capture_output=True, text=True, check=False).stdout or "{}").get("id")
    ip = ["ip", *(["-n", netns] if netns else []), "-j", "link", "show", "dev", ifname]
    links = json.loads(subprocess.run(ip, capture_output=True, text=True,
                                      check=False).stdout or "[]")
    xdp = links[0].get("xdp", {}) if links else {}
    if ours is not None and xdp.get("prog", {}).get("id") == ours:
        detach_xdp(ifname, XDP_FLAGS_SKB_MODE if xdp.get("mode") == 2 else XDP_FLAGS_DRV_MODE,
                   netns)
        removed.append("xdp")
    return removed


# ---------------------------------------------------------------------------------------
# The flood guard (guard_config, flood_buckets)


def set_flood_guard(config_fd: int, buckets_fd: int, rate: float, burst: int,
                    v4_prefix_len: int = 24, v6_prefix_len: int = 48,
                    total_rate: float = 0.0, total_burst: int = 1) -> None:
    """Allow each source prefix ``rate`` new Initials (and 0-RTT) per second, ``burst``
    at once; and all prefixes together ``total_rate`` (0: no total cap). Forgets the
    buckets of the previous setting."""
    if (rate <= 0 or burst < 1 or not 0 <= v4_prefix_len <= 32
            or not 0 <= v6_prefix_len <= 128 or total_rate < 0 or total_burst < 1):
        raise DataplaneError("flood guard: rate > 0, burst >= 1, prefix lengths in range, "
                             "total_rate >= 0, total_burst >= 1")
    interval = int(1e9 / rate)
    total = int(1e9 / total_rate) if total_rate else 0
    _write_guard_config(config_fd, 1, v4_prefix_len, v6_prefix_len, interval,
                        (burst - 1) * interval, total, (total_burst - 1) * total)
    clear_map(buckets_fd)


def disable_flood_guard(config_fd: int) -> None:
    """Let every Initial through the flood guard (the guard's other checks stay)."""
    _write_guard_config(config_fd, 0, 24, 48, 0, 0, 0, 0)


def _write_guard_config(fd: int, on: int, v4: int, v6: int, interval: int, burst: int,
                        total: int, total_burst: int) -> None:
    """struct steerd_guard_config (steerd/bpf/steerd.h), GCRA numbers in nanoseconds."""
    key = ct.c_uint32(0)
    value = ct.create_string_buffer(struct.pack(
        "=IBBHQQQQQ", on, v4, v6, 0, interval, burst, total, total_burst, 0),
        header_constants()["STEERD_GUARD_CONFIG_SIZE"])
    if libbcc().bpf_update_elem(fd, ct.byref(key), value, 0) != 0:
        raise DataplaneError(f"writing guard_config failed: {os.strerror(ct.get_errno())}")
