"""Loading, pinning, reloading and failing clearly."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from quic.cid import CidLayout
from steerd.app.protocol import socket_cookie as protocol_socket_cookie
from steerd.daemon.dataplane import Dataplane, DataplaneConfig, DataplaneError
from steerd.daemon.dataplane.programs import check_prerequisites

pytestmark = pytest.mark.root

def socket_cookie(sock: socket.socket) -> int:
    return protocol_socket_cookie(sock.fileno())


@pytest.fixture
def pin_dir() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF")
    path = f"/sys/fs/bpf/steerd-test-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        Dataplane(DataplaneConfig(pin_dir=path)).destroy()
        assert not os.path.exists(path)


def test_load_pins_maps_and_programs(pin_dir: str) -> None:
    dp = Dataplane(DataplaneConfig(port=4500, pin_dir=pin_dir))
    dp.load()
    try:
        assert sorted(os.listdir(pin_dir)) == sorted([
            "workers", "classifiers", "initial_routes", "counters", "guard_config",
            "flood_buckets", "ghash_tables", "guard_scratch", "prog_steer", "prog_guard",
            "prog_guard_tc",
            "learned_cids", "learned_peers", "learn_sockets", "learn_config", "learn_counts",
            "slot_stats",
        ])
    finally:
        dp.close()


def test_restarted_dataplane_finds_routes_and_sockets(pin_dir: str) -> None:
    """A daemon restart must not lose first-flight routes or the worker sockets apps hold."""
    cfg = DataplaneConfig(port=4501, pin_dir=pin_dir)
    worker = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("::1", 0))
        first = Dataplane(cfg)
        first.load()
        first.add_route(b"\x01" * 8, 9, ttl=None)
        first.set_worker(9, worker)
        first.attach_reuseport(worker)
        first.close()
        second = Dataplane(cfg)
        second.load()
        try:
            assert second.routes() == {b"\x01" * 8: (9, 0)}
            assert second.worker_cookie(9) == socket_cookie(worker)
            assert second.worker_cookie(8) is None
        finally:
            second.close()
    finally:
        worker.close()


def test_pinned_maps_of_another_layout_are_refused(pin_dir: str) -> None:
    first = Dataplane(DataplaneConfig(pin_dir=pin_dir, classifier_slots=2))
    first.load()
    try:
        other = Dataplane(DataplaneConfig(pin_dir=pin_dir, classifier_slots=3))
        with pytest.raises(DataplaneError, match=r"classifiers has layout .* remove"):
            other.load()
    finally:
        first.close()


def test_missing_bpffs_is_one_clear_error(tmp_path: os.PathLike[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    dp = Dataplane(DataplaneConfig(pin_dir=os.path.join(tmp_path, "pins")))
    with pytest.raises(DataplaneError) as err:
        dp.load()
    message = str(err.value)
    assert "bpffs" in message and "mount -t bpf bpf /sys/fs/bpf" in message
    assert "Traceback" not in message


def test_prerequisites_hold_here() -> None:
    checks = {c.name: c for c in check_prerequisites()}
    assert set(checks) == {"root", "bcc", "kernel headers", "bpffs", "bpf syscall"}
    if os.geteuid() == 0:
        assert all(c.ok for c in checks.values()), checks


def test_unsupported_layout_and_unloaded_use_are_errors() -> None:
    with pytest.raises(DataplaneError, match="classifier_slots"):
        Dataplane(DataplaneConfig(classifier_slots=17))
    dp = Dataplane(DataplaneConfig(layout=CidLayout(slot_len=1)))
    assert dp.config.effective_worker_slots() == 256
    with pytest.raises(DataplaneError, match="not loaded"):
        dp.add_route(b"x" * 8, 1)
