"""The runtime directory (steerd/daemon/service/files.py ``runtime_dir``, ``lock_pin_dir``): made
root's and 0755 when missing, refused with an exact error when anyone else could write in it.

Run against directories under pytest's tmp_path (as root, to chown them), never the live
/run/steerd that other daemons on this machine use; tests/security/test_hostile_descriptors.py
plants lock files against the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from steerd.daemon.service import lock_pin_dir, runtime_dir

NOBODY = 65534


def test_a_missing_runtime_dir_is_made_0755_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "run"
    old = os.umask(0o077)
    try:
        assert runtime_dir(str(path)) == str(path)
    finally:
        os.umask(old)
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o755)
    assert runtime_dir(str(path)) == str(path)  # and an existing good one is taken as it is


def test_a_runtime_dir_others_could_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o777)
    with pytest.raises(OSError) as refused:
        runtime_dir(str(path))
    assert str(refused.value) == (f"runtime directory {path} is writable by group or others "
                                  "(mode 0777): refusing it")


def test_a_runtime_dir_of_another_uid_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (chown)")
    path = tmp_path / "run"
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(OSError) as refused:
        runtime_dir(str(path))
    assert str(refused.value) == (f"runtime directory {path} is owned by uid {NOBODY}, not 0: "
                                  "refusing it (remove it, or fix its owner)")


def test_a_runtime_dir_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "run"
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError) as refused:
        runtime_dir(str(path))
    assert str(refused.value) == (f"runtime directory {path} is not a directory: refusing it "
                                  "(remove it)")


def test_the_pin_dir_lock_lives_in_the_runtime_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fd = lock_pin_dir("/sys/fs/bpf/steerd-x", str(run))
    try:
        lock = run / "pin_sys_fs_bpf_steerd-x.lock"
        assert lock.read_text() == f"{os.getpid()}\n"
        assert lock.stat().st_mode & 0o777 == 0o600
        with pytest.raises(OSError) as refused:
            lock_pin_dir("/sys/fs/bpf/steerd-x", str(run))
        assert str(refused.value) == (f"another steerd (pid {os.getpid()}) serves pin dir "
                                      "/sys/fs/bpf/steerd-x: one daemon per pin dir")
    finally:
        os.close(fd)
