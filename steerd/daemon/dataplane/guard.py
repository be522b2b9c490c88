"""The guard (bpf/guard.c) on an interface: attaching it at XDP or TC ingress,
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
from dataclasses import dataclass

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


def attach_xdp(guard_fd: int, ifname: str, mode: str = "auto",
               netns: str | None = None) -> tuple[str, int]:
    """Attach the XDP guard (program descriptor ``guard_fd``) to ``ifname`` in ``netns``.

    mode "native" (driver), "generic" (SKB) or "auto" (native if the driver has it, else
    generic). Returns the mode used and its XDP flags (detach_xdp needs them).
    """
    if mode not in XDP_MODES:
        raise DataplaneError(f"unknown XDP mode {mode!r}")
    errors: list[str] = []
    dev = ifname.encode()
    for m in XDP_MODES[mode]:
        flags = _XDP_FLAG_OF[m]
        res = run_in_netns(netns, lambda f=flags: _attach_xdp_fd(dev, guard_fd, f))
        if res == 0:
            return m, flags
        errors.append(f"{m}: {os.strerror(res)}")
    raise DataplaneError(f"attaching XDP to {ifname} failed: {'; '.join(errors)}")


def _attach_xdp_fd(dev: bytes, fd: int, flags: int) -> int:
    """libbcc's netlink attach: 0, or the errno."""
    if libbcc().bpf_attach_xdp(dev, fd, flags) < 0:
        return ct.get_errno() or errno.EIO
    return 0


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


# struct steerd_guard_config (bpf/steerd.h), field by field; GCRA numbers in ns.
_CONFIG = struct.Struct("=IBBHQQQQQ" "QQQQII" "QQQQQ" "QQQQ" "QQQ")
RETRY_ALWAYS = (1 << 64) - 1  # STEERD_RETRY_ALWAYS: retry_until_ns that never passes


@dataclass(slots=True)
class GuardConfig:
    """The guard's one ``guard_config`` entry. Read, changed and written back as a whole
    (an ARRAY value is written at once), so the flood guard's and the kernel Retry's settings,
    set at different moments, never clobber each other."""

    flood_enabled: int = 0
    v4_prefix_len: int = 24
    v6_prefix_len: int = 48
    interval_ns: int = 0
    burst_ns: int = 0
    total_interval_ns: int = 0
    total_burst_ns: int = 0
    total_tat_ns: int = 0
    retry_until_ns: int = 0
    token_k0: int = 0
    token_k1: int = 0
    token_lifetime_ms: int = 0
    token_check: int = 0
    retry_interval_ns: int = 0
    retry_burst_ns: int = 0
    retry_total_interval_ns: int = 0
    retry_total_burst_ns: int = 0
    retry_total_tat_ns: int = 0
    auto_interval_ns: int = 0
    auto_burst_ns: int = 0
    auto_hold_ns: int = 0
    auto_tat_ns: int = 0
    proven_ttl_ns: int = 0
    proven_interval_ns: int = 0
    proven_burst_ns: int = 0

    def pack(self) -> bytes:
        return _CONFIG.pack(
            self.flood_enabled, self.v4_prefix_len, self.v6_prefix_len, 0, self.interval_ns,
            self.burst_ns, self.total_interval_ns, self.total_burst_ns, self.total_tat_ns,
            self.retry_until_ns, self.token_k0, self.token_k1, self.token_lifetime_ms,
            self.token_check, 0, self.retry_interval_ns, self.retry_burst_ns,
            self.retry_total_interval_ns, self.retry_total_burst_ns, self.retry_total_tat_ns,
            self.auto_interval_ns, self.auto_burst_ns, self.auto_hold_ns, self.auto_tat_ns,
            self.proven_ttl_ns, self.proven_interval_ns, self.proven_burst_ns)

    @classmethod
    def unpack(cls, raw: bytes) -> GuardConfig:
        v = _CONFIG.unpack_from(raw)
        return cls(v[0], v[1], v[2], *v[4:13], *v[13:14], *v[15:])


def read_guard_config(fd: int) -> GuardConfig:
    """The ``guard_config`` entry as it is now."""
    size = header_constants()["STEERD_GUARD_CONFIG_SIZE"]
    key = ct.c_uint32(0)
    value = ct.create_string_buffer(size)
    if libbcc().bpf_lookup_elem(fd, ct.byref(key), value) != 0:
        raise DataplaneError(f"reading guard_config failed: {os.strerror(ct.get_errno())}")
    return GuardConfig.unpack(value.raw)


def write_guard_config(fd: int, config: GuardConfig) -> None:
    """Write the whole ``guard_config`` entry."""
    size = header_constants()["STEERD_GUARD_CONFIG_SIZE"]
    if _CONFIG.size != size:
        raise DataplaneError(f"guard_config is {size} bytes in steerd.h, {_CONFIG.size} here")
    key = ct.c_uint32(0)
    value = ct.create_string_buffer(config.pack(), size)
    if libbcc().bpf_update_elem(fd, ct.byref(key), value, 0) != 0:
        raise DataplaneError(f"writing guard_config failed: {os.strerror(ct.get_errno())}")


def set_flood_guard(config_fd: int, buckets_fd: int, rate: float, burst: int,
                    v4_prefix_len: int = 24, v6_prefix_len: int = 48,
                    total_rate: float = 0.0, total_burst: int = 1) -> None:
    """Allow each source prefix ``rate`` new Initials (and 0-RTT) per second, ``burst``
    at once; and all prefixes together ``total_rate`` (0: no total cap). Forgets the
    buckets of the previous setting. The prefix lengths also key the Retries' buckets."""
    if (rate <= 0 or burst < 1 or not 0 <= v4_prefix_len <= 32
            or not 0 <= v6_prefix_len <= 128 or total_rate < 0 or total_burst < 1):
        raise DataplaneError("flood guard: rate > 0, burst >= 1, prefix lengths in range, "
                             "total_rate >= 0, total_burst >= 1")
    interval = int(1e9 / rate)
    total = int(1e9 / total_rate) if total_rate else 0
    cfg = read_guard_config(config_fd)
    cfg.flood_enabled, cfg.v4_prefix_len, cfg.v6_prefix_len = 1, v4_prefix_len, v6_prefix_len
    cfg.interval_ns, cfg.burst_ns = interval, (burst - 1) * interval
    cfg.total_interval_ns, cfg.total_burst_ns, cfg.total_tat_ns = (
        total, (total_burst - 1) * total, 0)
    write_guard_config(config_fd, cfg)
    clear_map(buckets_fd)


def disable_flood_guard(config_fd: int) -> None:
    """Let every Initial through the flood guard (the guard's other checks, the kernel
    Retry and the token check stay as they are)."""
    cfg = read_guard_config(config_fd)
    cfg.flood_enabled, cfg.interval_ns, cfg.burst_ns = 0, 0, 0
    cfg.total_interval_ns, cfg.total_burst_ns, cfg.total_tat_ns = 0, 0, 0
    write_guard_config(config_fd, cfg)


# ---------------------------------------------------------------------------------------
# The kernel Retry and token check (guard_config, ghash_tables)


def set_retry(config_fd: int, *, token_key: bytes, token_lifetime: float,
              rate: float = 0.0, burst: int = 1, total_rate: float = 0.0,
              total_burst: int = 1, v4_prefix_len: int | None = None,
              v6_prefix_len: int | None = None, buckets_fd: int | None = None,
              proven_ttl: float = 0.0, proven_rate: float = 1000.0) -> None:
    """Give the guard the token key (from now on it checks every token of ours) and the
    Retries' budget: ``rate`` Retries per second per source prefix, ``burst`` at once (0: no
    per-prefix bound), ``total_rate`` for all prefixes together (0: none); with
    ``buckets_fd`` the prefixes' bucket states of the old budget are forgotten (as
    :func:`set_flood_guard` does). Retry mode itself is :func:`set_retry_until`. Prefix
    lengths, when given, replace the flood guard's (both budgets key buckets by them).
    ``proven_ttl``: seconds a source address that presented a valid token skips Retry mode
    (0: never), with at most ``proven_rate`` such Initials per second per address (a quarter
    second of it at once); steerd.h ``proven_ttl_ns``."""
    from quic.token import token_key_words

    if (rate < 0 or burst < 1 or total_rate < 0 or total_burst < 1 or token_lifetime <= 0
            or proven_ttl < 0 or proven_rate <= 0):
        raise DataplaneError("kernel Retry: rate >= 0, burst >= 1, total_rate >= 0, "
                             "total_burst >= 1, token_lifetime > 0, proven_ttl >= 0, "
                             "proven_rate > 0")
    try:
        k0, k1 = token_key_words(token_key)
    except Exception as exc:
        raise DataplaneError(f"kernel Retry: {exc}") from exc
    cfg = read_guard_config(config_fd)
    cfg.token_k0, cfg.token_k1, cfg.token_check = k0, k1, 1
    cfg.token_lifetime_ms = int(token_lifetime * 1000)
    interval = int(1e9 / rate) if rate else 0
    total = int(1e9 / total_rate) if total_rate else 0
    cfg.retry_interval_ns, cfg.retry_burst_ns = interval, (burst - 1) * interval
    cfg.retry_total_interval_ns, cfg.retry_total_burst_ns = total, (total_burst - 1) * total
    cfg.retry_total_tat_ns = 0
    cfg.proven_ttl_ns = int(proven_ttl * 1e9)
    proven_interval = int(1e9 / proven_rate)
    cfg.proven_interval_ns = proven_interval
    cfg.proven_burst_ns = (max(1, int(proven_rate / 4)) - 1) * proven_interval
    if v4_prefix_len is not None:
        cfg.v4_prefix_len = v4_prefix_len
    if v6_prefix_len is not None:
        cfg.v6_prefix_len = v6_prefix_len
    write_guard_config(config_fd, cfg)
    if buckets_fd is not None:  # states of the old budget mean nothing under the new one
        clear_map(buckets_fd)


def set_retry_until(config_fd: int, until_ns: int) -> None:
    """Retry mode: the guard answers token-less Initials with a Retry while CLOCK_MONOTONIC
    is below ``until_ns`` (:data:`RETRY_ALWAYS`: always; 0: off). Read-modify-write: the
    GCRA state the guard keeps in the same entry may lose a moment's update, which a flood
    budget tolerates."""
    cfg = read_guard_config(config_fd)
    cfg.retry_until_ns = until_ns
    write_guard_config(config_fd, cfg)


def set_retry_auto(config_fd: int, initial_rate: float, burst: int, hold: float) -> None:
    """Automatic Retry mode in the guard: when token-less Initials arrive faster than
    ``initial_rate`` per second (``burst`` at once), Retry mode goes on for ``hold`` seconds,
    renewed while the rate lasts. ``hold`` 0 turns it off (the daemon may still turn Retry
    mode on with :func:`set_retry_until`)."""
    if initial_rate <= 0 or burst < 1 or hold < 0:
        raise DataplaneError("kernel Retry auto: initial_rate > 0, burst >= 1, hold >= 0")
    cfg = read_guard_config(config_fd)
    interval = int(1e9 / initial_rate)
    cfg.auto_interval_ns, cfg.auto_burst_ns = interval, (burst - 1) * interval
    cfg.auto_hold_ns, cfg.auto_tat_ns = int(hold * 1e9), 0
    write_guard_config(config_fd, cfg)


def disable_retry(config_fd: int) -> None:
    """No kernel Retry and no token check (tokens then reach the classifier unchecked)."""
    cfg = read_guard_config(config_fd)
    cfg.retry_until_ns = cfg.token_check = cfg.token_k0 = cfg.token_k1 = 0
    cfg.auto_hold_ns = 0
    write_guard_config(config_fd, cfg)


def write_ghash_tables(fd: int) -> None:
    """The Retry integrity tag's GHASH tables (quic/ghash.py) into ``ghash_tables``: constant,
    written at every load (64 KiB per version)."""
    from quic.ghash import TABLE_VALUE_SIZE, retry_ghash_tables

    for index, table in retry_ghash_tables().items():
        key = ct.c_uint32(index)
        value = ct.create_string_buffer(table, TABLE_VALUE_SIZE)
        if libbcc().bpf_update_elem(fd, ct.byref(key), value, 0) != 0:
            raise DataplaneError(f"writing ghash_tables failed: {os.strerror(ct.get_errno())}")
