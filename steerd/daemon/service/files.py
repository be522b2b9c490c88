"""The daemon's files outside bpffs: the pin dir lock, the runtime directory, the master
secret (``reset.key``), the claims records (``claims.json``) and each group's pin dir."""

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
from typing import Any

from steerd.daemon.config import (
    Config,
)
from steerd.daemon.control import RESET_KEY_LEN

log = logging.getLogger("steerd")


# How long after start-up the claims of a previous run's apps stay reserved for them (their
# slots' sockets still steer their connections) against registrations by anyone else: the
# program compile (seconds) plus RESUME_GRACE, with room to spare.
CLAIM_RESERVATION = 30.0


def claims_path(config: Config) -> str:
    """Beside the master secret: who claimed what, for the next run to reserve."""
    return os.path.join(os.path.dirname(config.control.path) or ".", "claims.json")


def save_claims(path: str, records: list[dict[str, Any]]) -> None:
    """Write the registry's claims atomically (a new private file renamed over the old one,
    never following a planted link)."""
    tmp = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(records, f)
    os.replace(tmp, path)


def load_claims(path: str) -> list[Any]:
    """The previous run's claim records, [] when there are none or they are unreadable
    (the registry checks each record anyway). A file anyone else could have written is
    ignored: reserving claims on its word would let its author hold other apps' names."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            log.warning("%s is not a private file of uid %d: ignoring it", path, os.geteuid())
            return []
        try:
            records = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("%s is not valid JSON (%s): no claims reserved", path, exc)
            return []
    return records if isinstance(records, list) else []


# Root's runtime directory: the pin dir locks always, and by default the control socket,
# reset.key and claims.json. Never a world-writable one (/run/lock, /tmp): anyone could plant
# a lock there and keep `steerd run` and `steerd purge` from starting.
RUN_DIR = "/run/steerd"


def runtime_dir(path: str = RUN_DIR) -> str:
    """``path``, made (mode 0755, so apps can reach a control socket in it) if missing, and
    refused unless it is a directory of the daemon's uid that group and others cannot
    write: whoever could write in it could plant or swap the daemon's runtime files."""
    try:
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)  # whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"runtime directory {path} is not a directory: refusing it (remove it)")
    _check_private(st, f"runtime directory {path}")
    return path


def _lock_path(pin_dir: str, run_dir: str = RUN_DIR) -> str:
    """A regular file naming ``pin_dir`` (bpffs holds no regular files), in ``run_dir``."""
    return os.path.join(run_dir, "pin" + os.path.abspath(pin_dir).replace("/", "_") + ".lock")


def lock_pin_dir(pin_dir: str, run_dir: str = RUN_DIR) -> int:
    """Take the one-daemon-per-pin-dir lock (held for the daemon's life: the returned fd).

    Why: a second daemon on the same pin dir, even one about to be refused, would rewrite
    what the running one relies on (its classifier sockets in the maps, its pids in the
    socket jail). The lock comes before anything touches them; the message names the live
    daemon. It lives in the root-only :data:`RUN_DIR` (checked by :func:`runtime_dir`), so
    no other user can hold it."""
    fd = os.open(_lock_path(pin_dir, runtime_dir(run_dir)),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(f"another steerd (pid {holder}) serves pin dir {pin_dir}: one daemon "
                      "per pin dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def reset_key_path(config: Config) -> str:
    """Beside the control socket (root's runtime directory, gone at reboot with the pins)."""
    return os.path.join(os.path.dirname(config.control.path) or ".", "reset.key")


def _check_private(st: os.stat_result, what: str) -> None:
    """Refuse a key file or its directory that anyone but the daemon's uid could have
    written: a key an attacker planted would let them forge resets and Retry tokens."""
    if st.st_uid != os.geteuid():
        raise OSError(f"{what} is owned by uid {st.st_uid}, not {os.geteuid()}: refusing it "
                      "(remove it, or fix its owner)")
    if st.st_mode & 0o022:
        raise OSError(f"{what} is writable by group or others (mode "
                      f"{stat.S_IMODE(st.st_mode):04o}): refusing it")


def load_reset_key(path: str) -> bytes:
    """The master secret of earlier runs (apps' per-slot reset keys and the Retry token key
    derive from it), or a new one saved for later runs.

    The file is opened with O_NOFOLLOW and must be a regular file of the daemon's uid that
    nobody else can read or write (mode 0600); its directory must not be writable by
    others. A new one is created with O_EXCL|O_NOFOLLOW, so a planted file or symlink is
    refused, never followed or overwritten."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _check_private(os.stat(directory), f"the directory of {path}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link: refusing it (remove it)") from None
        raise
    if fd >= 0:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file: refusing it (remove it)")
            _check_private(st, path)
            if st.st_mode & 0o077:
                raise OSError(f"{path} is readable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): refusing it (chmod 600)")
            key = f.read(RESET_KEY_LEN + 1)
        if len(key) == RESET_KEY_LEN:
            return key
        log.warning("%s is not a %d-byte key: making a new one", path, RESET_KEY_LEN)
        os.unlink(path)
    key = os.urandom(RESET_KEY_LEN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def group_pin_dir(pin_dir: str, address: str) -> str:
    """Where the group of listen address ``address`` pins its maps: keyed by the address,
    so editing ``[listen] addresses`` never hands one address's routes and sockets to
    another."""
    return os.path.join(pin_dir, "g-" + address.replace(":", "-").replace(".", "_"))  # bpffs
