"""steerd/daemon/dataplane/compiled.py: one compile of bpf/*.c per deployment, loaded many
times. The relocation is pure (bytes in, bytes out); the rest loads real programs into the
kernel from a cache directory of the test's own."""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from steerd.daemon.dataplane import Dataplane, DataplaneConfig, compiled
from steerd.daemon.dataplane.compiled import Entry, relocate
from steerd.daemon.dataplane.errors import DataplaneError
from steerd.daemon.dataplane.learn import LEARN
from steerd.daemon.dataplane.programs import PROG_XDP


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def ld_imm64(dst: int, src: int, value: int) -> bytes:
    return (insn(0x18, dst, src, imm=struct.unpack("<i", struct.pack("<I", value & 0xFFFFFFFF))[0])
            + insn(0, imm=struct.unpack("<i", struct.pack("<I", value >> 32))[0]))


def test_placeholders_become_the_descriptors_and_words_of_this_run() -> None:
    fd_mark, word_mark = compiled._FD_BASE + 1, compiled._WORD_BASE
    program = (ld_imm64(1, 1, fd_mark)  # a map reference
               + ld_imm64(2, 0, word_mark)  # the netns cookie
               + ld_imm64(3, 0, fd_mark)  # the same number as a plain constant: not a map
               + insn(0xB7, 0, imm=fd_mark)  # mov r0, imm: not a 64-bit load
               + insn(0x95))
    out = relocate(program, {fd_mark: 7}, {word_mark: 0x1122334455667788})
    assert out == (ld_imm64(1, 1, 7) + ld_imm64(2, 0, 0x1122334455667788)
                   + program[32:])
    assert len(out) == len(program)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "bpf"
    monkeypatch.setattr(compiled, "CACHE_DIR", d)
    yield d


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources bcc actually compiled during the test."""
    seen: list[str] = []
    real = compiled.compile_now

    def counting(source: str, *args: object) -> compiled.Compiled:
        seen.append(source)
        return real(source, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(compiled, "compile_now", counting)
    return seen


@pytest.fixture
def dataplane() -> Iterator[Dataplane]:
    """A group's maps (no programs): what learn.c is compiled against."""
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    dp = Dataplane(DataplaneConfig(pin_dir=f"/sys/fs/bpf/steerd-t-{uuid.uuid4().hex[:8]}"))
    dp.open_maps()
    try:
        yield dp
    finally:
        dp.destroy()


@pytest.mark.root
def test_a_second_load_compiles_nothing_and_gets_the_same_program(
        cache: Path, compiles: list[str], dataplane: Dataplane) -> None:
    flags, fds = dataplane.cflags(), dataplane.fd_macros()
    first = compiled.load("learn.c", flags, [LEARN], fds)[LEARN.name]
    second = compiled.load("learn.c", flags, [LEARN], fds)[LEARN.name]
    try:
        assert compiles == ["learn.c"]
        assert len(list(cache.glob("*.json"))) == 1
        assert os.stat(cache).st_mode & 0o777 == 0o700
        assert prog_tag(first) == prog_tag(second)  # the kernel's hash of the instructions
    finally:
        os.close(first)
        os.close(second)


@pytest.mark.root
def test_a_damaged_entry_is_compiled_again(cache: Path, compiles: list[str],
                                           dataplane: Dataplane) -> None:
    flags, fds = dataplane.cflags(), dataplane.fd_macros()
    os.close(compiled.load("learn.c", flags, [LEARN], fds)[LEARN.name])
    (entry,) = cache.glob("*.json")
    damaged = '{"license": "GPL", "insns": {"steerd_learn": "AAAA"}}'  # 3 bytes: no program
    entry.write_text(damaged)
    os.close(compiled.load("learn.c", flags, [LEARN], fds)[LEARN.name])
    assert compiles == ["learn.c", "learn.c"]
    assert entry.read_text() != damaged


@pytest.mark.root
def test_a_cache_others_can_write_is_not_used(cache: Path, compiles: list[str],
                                              dataplane: Dataplane) -> None:
    """Instructions from a directory another user could write would run in the kernel."""
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    flags, fds = dataplane.cflags(), dataplane.fd_macros()
    for _ in range(2):
        os.close(compiled.load("learn.c", flags, [LEARN], fds)[LEARN.name])
    assert compiles == ["learn.c", "learn.c"]
    assert list(cache.iterdir()) == []


@pytest.mark.root
def test_the_verifier_says_why_a_program_was_refused() -> None:
    exit_without_r0 = insn(0x95)
    refused = r"(?s)steerd_bad from bpf/x\.c failed: .*\n.*R0 !read_ok"
    with pytest.raises(DataplaneError, match=refused):
        compiled.prog_load(Entry("steerd_bad", PROG_XDP), exit_without_r0, "GPL", "x.c")


def prog_tag(fd: int) -> str:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        return next(line.split()[1] for line in info if line.startswith("prog_tag:"))
