"""Fixtures for the daemon tests (the harness itself is in harness.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from steerd.daemon.config import AclRule, Config, ControlConfig, LimitsConfig, ListenConfig
from tests.daemon.harness import NOBODY, Daemon, free_udp_port


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory another uid can reach (pytest's tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix="steerd-test-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_daemon(sockdir: str) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(**limits: Any) -> Daemon:
        config = Config(
            listen=ListenConfig(addresses=("127.0.0.1", "::1"), port=free_udp_port()),
            control=ControlConfig(path=os.path.join(sockdir, "control.sock"), mode=0o666),
            acl=(
                AclRule(uids=(NOBODY,), alpn=("nb",), server_names=("nobody.example",)),
            ),
            limits=dataclasses.replace(
                LimitsConfig(worker_slots=8, workers_per_app=4, control_message_bytes=1024,
                             control_rate=1000.0, control_burst=1000),
                **limits,
            ),
        )
        d = Daemon(config)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()
