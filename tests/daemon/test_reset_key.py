"""The daemon's master secret file: created private, and refused when anyone else could
have planted or read it (a known key forges resets and Retry tokens for every app)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from steerd.daemon.control import RESET_KEY_LEN
from steerd.daemon.service import load_reset_key

NOBODY = 65534


def test_created_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "reset.key"
    key = load_reset_key(str(path))
    st = path.stat()
    assert len(key) == RESET_KEY_LEN and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert load_reset_key(str(path)) == key  # the next run gets the same one


def test_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"k" * RESET_KEY_LEN)
    os.chmod(target, 0o600)
    (tmp_path / "reset.key").symlink_to(target)
    with pytest.raises(OSError, match="is a symbolic link: refusing it"):
        load_reset_key(str(tmp_path / "reset.key"))
    assert target.read_bytes() == b"k" * RESET_KEY_LEN  # untouched


@pytest.mark.parametrize(("mode", "owner", "message"), [
    (0o644, None, r"readable by group or others \(mode 0644\)"),
    (0o666, None, r"writable by group or others \(mode 0666\)"),
    (0o600, NOBODY, f"owned by uid {NOBODY}"),
])
def test_planted_or_exposed_key_is_refused(tmp_path: Path, mode: int, owner: int | None,
                                           message: str) -> None:
    if owner is not None and os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = tmp_path / "reset.key"
    path.write_bytes(b"p" * RESET_KEY_LEN)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, owner)
    with pytest.raises(OSError, match=message):
        load_reset_key(str(path))


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    with pytest.raises(OSError, match=r"directory of .* writable by group or others"):
        load_reset_key(str(tmp_path / "reset.key"))


def test_truncated_key_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "reset.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    key = load_reset_key(str(path))
    assert len(key) == RESET_KEY_LEN and path.read_bytes() == key
