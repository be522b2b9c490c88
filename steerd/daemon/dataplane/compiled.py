"""bpf/*.c compiled once per toolchain, source and deployment, loaded many times.

Why: bcc compiles a program with clang on every load, and the guard alone takes over a
second of CPU. A daemon restart (the zero-downtime path), ``steerd doctor`` and every test's
daemon paid that for byte-for-byte the same instructions. What makes two compiles of one
source differ, apart from the flags, is only which map descriptors and which network
namespace the process happens to have: those are compiled as placeholders and written into
the instructions at load time, so one compiled copy serves every run with the same flags.

The cache is a directory only root can write (``CACHE_DIR``); one that another user owns or
can write is not used (its instructions would run in the kernel), and any failure to read
or write it only costs the compile. Loading is the ``bpf(BPF_PROG_LOAD)`` call bcc makes,
without BTF line info (our programs have no subprograms, locks or kfuncs that need it).
"""

from __future__ import annotations

import base64
import ctypes as ct
import hashlib
import json
import logging
import os
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.header import BPF_DIR

log = logging.getLogger("steerd.dataplane")

CACHE_DIR = Path("/var/cache/steerd/bpf")
FORMAT = 1  # bump when what is stored or how it is keyed changes
MAX_ENTRIES = 256  # the oldest go first: the directory stays bounded however flags vary

# Placeholders, chosen so that no real descriptor or flag value looks like one: a map
# descriptor is the 32-bit immediate of a BPF_PSEUDO_MAP_FD load; a 64-bit word (a netns
# cookie) the immediate of a plain 64-bit load.
_FD_BASE = 0x5EED0000
_WORD_BASE = 0x5EEDC0DE5EED0000
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INSN = 8

_SYS_BPF = 321  # x86_64 (the machine class steerd supports)
_BPF_PROG_LOAD = 5
_ATTR_SIZE = 128  # room for every PROG_LOAD field we set; the rest must be zero
_LOG_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Entry:
    """One program (a function) of a source file and how the kernel must load it."""

    name: str
    prog_type: int
    attach_type: int = 0  # expected_attach_type (cgroup sockopt and sock_addr need it)


@dataclass(frozen=True, slots=True)
class Compiled:
    """What a compile produced: each entry's instructions (placeholders still in) and the
    license the source declares (GPL-only helpers need "GPL")."""

    license: str
    insns: dict[str, bytes]


def load(
    source: str,
    flags: Sequence[str],
    entries: Sequence[Entry],
    fds: Mapping[str, int] | None = None,
    words: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Load ``entries`` of bpf/``source`` compiled with ``flags``, the macros in ``fds``
    standing for those map descriptors and those in ``words`` for those 64-bit constants.
    Returns each entry's program descriptor (the caller closes them)."""
    fds, words = dict(fds or {}), dict(words or {})
    fd_marks = {name: _FD_BASE + i for i, name in enumerate(sorted(fds))}
    word_marks = {name: _WORD_BASE + i for i, name in enumerate(sorted(words))}
    all_flags = [*flags, *(f"-D{n}={v:#x}" for n, v in fd_marks.items()),
                 *(f"-D{n}={v:#x}ULL" for n, v in word_marks.items())]
    compiled = _compiled(source, all_flags, entries, set(word_marks.values()))
    fd_of = {mark: fds[name] for name, mark in fd_marks.items()}
    word_of = {mark: words[name] for name, mark in word_marks.items()}
    loaded: dict[str, int] = {}
    try:
        for entry in entries:
            insns = relocate(compiled.insns[entry.name], fd_of, word_of)
            loaded[entry.name] = prog_load(entry, insns, compiled.license, source)
    except BaseException:
        for fd in loaded.values():
            os.close(fd)
        raise
    return loaded


def relocate(insns: bytes, fd_of: Mapping[int, int], word_of: Mapping[int, int]) -> bytes:
    """``insns`` with every placeholder replaced by its real descriptor or word."""
    out = bytearray(insns)
    for at, src, value in _loads64(insns):
        lo = value & 0xFFFFFFFF
        if src == _PSEUDO_MAP_FD and lo in fd_of:
            struct.pack_into("<i", out, at + 4, fd_of[lo])
        elif src == 0 and value in word_of:
            new = word_of[value] & (1 << 64) - 1
            struct.pack_into("<I", out, at + 4, new & 0xFFFFFFFF)
            struct.pack_into("<I", out, at + _INSN + 4, new >> 32)
    return bytes(out)


def _loads64(insns: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, source register, 64-bit immediate) of each 64-bit load (two instructions)."""
    at = 0
    while at + 2 * _INSN <= len(insns):
        if insns[at] != _LD_IMM64:
            at += _INSN
            continue
        lo = struct.unpack_from("<I", insns, at + 4)[0]
        hi = struct.unpack_from("<I", insns, at + _INSN + 4)[0]
        yield at, insns[at + 1] >> 4, lo | hi << 32
        at += 2 * _INSN


def _compiled(source: str, flags: list[str], entries: Sequence[Entry],
              word_marks: set[int]) -> Compiled:
    key = cache_key(source, flags, entries)
    cache = usable_cache_dir()
    path = cache / f"{key}.json" if cache is not None else None
    if path is not None:
        found = _read(path, entries)
        if found is not None:
            return found
    compiled = compile_now(source, flags, entries)
    for mark in word_marks:  # a word the compiler folded away would stay a placeholder
        if not any(src == 0 and value == mark for insns in compiled.insns.values()
                   for _, src, value in _loads64(insns)):
            raise DataplaneError(f"bpf/{source}: a 64-bit constant macro was not compiled "
                                 "to a plain 64-bit load (cannot be filled in at load time)")
    if path is not None:
        _write(path, compiled)
    return compiled


def compile_now(source: str, flags: list[str], entries: Sequence[Entry]) -> Compiled:
    """bcc's clang run: the instructions of each entry, nothing loaded."""
    import bcc
    from bcc.libbcc import lib

    try:
        bpf = bcc.BPF(text=(BPF_DIR / source).read_bytes(), cflags=flags)
    except Exception as exc:
        raise DataplaneError(f"compiling bpf/{source} failed: {exc}") from exc
    try:
        insns = {e.name: bytes(bpf.dump_func(e.name.encode())) for e in entries}
        license = (lib.bpf_module_license(bpf.module) or b"").decode()
    except Exception as exc:
        raise DataplaneError(f"bpf/{source}: {exc}") from exc
    finally:
        try:
            bpf.cleanup()
        except Exception:  # bcc's cleanup is best effort; nothing was loaded
            pass
    return Compiled(license, insns)


def cache_key(source: str, flags: Sequence[str], entries: Sequence[Entry]) -> str:
    """Everything the instructions depend on: the sources (every file of bpf/: the headers
    are included), the flags, the toolchain (bcc's version, the kernel headers it compiles
    against) and the entries."""
    import bcc

    h = hashlib.sha256()
    parts = [f"format {FORMAT}", f"bcc {getattr(bcc, '__version__', '?')}",
             f"kernel {os.uname().release}",
             f"headers {os.environ.get('BCC_KERNEL_SOURCE', '')}", f"source {source}",
             *(f"flag {f}" for f in flags),
             *(f"entry {e.name} {e.prog_type}" for e in entries)]
    for part in parts:
        h.update(part.encode() + b"\0")
    for path in sorted(BPF_DIR.iterdir()):
        if path.suffix in (".c", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def usable_cache_dir() -> Path | None:
    """CACHE_DIR, made if missing, if only this (root) user can write it; else None."""
    try:
        CACHE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(CACHE_DIR)
    except OSError as exc:
        log.debug("BPF compile cache %s unusable: %s", CACHE_DIR, exc)
        return None
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        log.warning("BPF compile cache %s not used: not a directory only uid %d can write",
                    CACHE_DIR, os.geteuid())
        return None
    return CACHE_DIR


def _read(path: Path, entries: Sequence[Entry]) -> Compiled | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return None
            data = json.loads(f.read())
        insns = {e.name: base64.b64decode(data["insns"][e.name]) for e in entries}
        compiled = Compiled(str(data["license"]), insns)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: compiled again and rewritten
    if any(len(b) == 0 or len(b) % _INSN for b in insns.values()):
        return None
    return compiled


def _write(path: Path, compiled: Compiled) -> None:
    data = {"license": compiled.license,
            "insns": {n: base64.b64encode(b).decode() for n, b in compiled.insns.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # readers see the old file or the whole new one
        entries = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("BPF compile cache: writing %s failed: %s", path, exc)
        tmp.unlink(missing_ok=True)


_libc = ct.CDLL(None, use_errno=True)


def prog_load(entry: Entry, insns: bytes, license: str, source: str) -> int:
    """bpf(BPF_PROG_LOAD): the program's descriptor, or DataplaneError with the verifier's
    log (asked for on a second try only: the log costs the verifier time)."""
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(license.encode() or b"GPL")
    for log_level in (0, 1):
        buf = ct.create_string_buffer(_LOG_SIZE if log_level else 0)
        attr = ct.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<IIQQIIQII16sII", attr, 0, entry.prog_type, len(insns) // _INSN,
                         ct.addressof(code), ct.addressof(lic), log_level,
                         _LOG_SIZE if log_level else 0, ct.addressof(buf) if log_level else 0,
                         0, 0, entry.name.encode()[:15], 0, entry.attach_type)
        fd = _libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, _ATTR_SIZE)
        if fd >= 0:
            return int(fd)
        err = ct.get_errno()
        if log_level == 0:
            continue  # again, for the verifier's log
        verifier = buf.value.decode(errors="replace").strip().splitlines()[-12:]
        raise DataplaneError(
            f"loading {entry.name} from bpf/{source} failed: {os.strerror(err)}"
            + ("\n  " + "\n  ".join(verifier) if verifier else ""))
    raise AssertionError("unreachable")
