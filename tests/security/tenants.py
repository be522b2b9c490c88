"""The tenants of the attacker tests: a real daemon whose control socket every uid reaches, the
demo's HTTP/3 site and file service registered as their own uids, real clients loading them,
and what the tests read from the daemon.

Why one module: each attack (test_isolation.py, test_watchdog.py, test_non_unicast.py,
test_tenant_limits.py, test_hostile_descriptors.py; the learned-mode ones use the daemon
and the helpers) is shown against the same bystanders, who must be served with 0 failures
throughout; the world they live in, and the check that they were served, are written once.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tests.e2e.conftest as e2e
from deploy.netns import NetnsPair
from tests.e2e.conftest import Daemon, start_daemon
from tests.sdk.harness import Loader, RunningApp, start_demo_app, start_loader

WEB_UID, FILES_UID, NOBODY = 64111, 64112, 65534

ConfigWriter = Callable[[Path, NetnsPair, str], None]


def acl_entry(uid: int, *alpns: str, names: Sequence[str] = ("*",)) -> str:
    """One ``[[acl]]`` table of the daemon's config: ``uid`` may claim ``alpns`` for
    ``names``."""
    return (f"[[acl]]\nuids = [{uid}]\nalpn = {json.dumps(list(alpns))}\n"
            f"server_names = {json.dumps(list(names))}\n")


# What the two tenants start_tenants() registers need: every world has them.
TENANTS_ACL = acl_entry(WEB_UID, "h3") + acl_entry(FILES_UID, "smb")
# What the intruder (uid nobody) of the isolation worlds may claim: h3 for all names (which
# must not let it shadow web's claim) and, explicitly, granted.example.
ACL = acl_entry(NOBODY, "doq", "h3") + acl_entry(NOBODY, "h3", names=("granted.example",))


def open_to_tenants(daemon: Daemon) -> None:
    """Let every uid reach the daemon's control socket (the tests' tenants are not root)."""
    os.chmod(daemon.workdir, 0o711)
    os.chmod(daemon.control, 0o666)


def listening_on(addresses: Sequence[str], write: ConfigWriter) -> ConfigWriter:
    """A config writer like ``write`` (tests/e2e's), listening on ``addresses`` instead of
    the server's own."""

    def write_config(path: Path, pair: NetnsPair, extra: str = "") -> None:
        write(path, pair, extra)
        text = path.read_text()
        listen = f'addresses = ["{pair.server_v4}", "{pair.server_v6}"]'
        assert listen in text
        path.write_text(text.replace(listen, f"addresses = {json.dumps(list(addresses))}"))

    return write_config


@contextlib.contextmanager
def tenant_daemon(pair: NetnsPair, config: str,
                  listen: Sequence[str] | None = None) -> Iterator[Daemon]:
    """tests/e2e's daemon with ``config``, its control socket open to every uid; on ``listen``
    addresses if given. Stopped, and its data plane purged, on the way out."""
    daemons = start_daemon(pair, config)
    if listen is None:
        daemon = next(daemons)
    else:  # start_daemon writes its config with the module's write_config: swap it for ours
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(e2e, "write_config", listening_on(listen, e2e.write_config))
            daemon = next(daemons)
    try:
        open_to_tenants(daemon)
        yield daemon
    finally:
        daemons.close()  # stops the daemon and purges its data plane (and checks both)


@dataclass
class Tenants:
    """The daemon and its two tenants: the demo's HTTP/3 site (``web``, 2 workers, as
    WEB_UID) and file service (``files``, as FILES_UID)."""

    pair: NetnsPair
    daemon: Daemon
    web: RunningApp
    files: RunningApp


@contextlib.contextmanager
def start_tenants(pair: NetnsPair, extra_config: str = "",
                  listen: Sequence[str] | None = None) -> Iterator[Tenants]:
    """A :func:`tenant_daemon` whose config is :data:`TENANTS_ACL` and ``extra_config``, with
    web and files registered. The apps stopped at the end are the ones ``web`` and ``files``
    name then: a test that replaces one assigns the new one there."""
    with tenant_daemon(pair, TENANTS_ACL + extra_config, listen) as daemon:
        started: list[RunningApp] = []
        tenants: Tenants | None = None
        try:
            started.append(start_demo_app(daemon, "h3", uid=WEB_UID, workers=2))
            started.append(start_demo_app(daemon, "file", uid=FILES_UID))
            tenants = Tenants(pair, daemon, *started)
            yield tenants
        finally:
            if tenants is not None:  # whichever apps they are now
                started = [tenants.web, tenants.files]
            for app in reversed(started):
                app.stop()


@contextlib.contextmanager
def served_loaders(pair: NetnsPair, ipv6: bool = True) -> Iterator[list[Loader]]:
    """Real aioquic clients of both tenants for the whole test: web's over IPv4 (and IPv6 with
    ``ipv6``), files' over IPv4. The test's last step is :func:`assert_served`."""
    made: list[Loader] = []
    try:
        made.append(start_loader(pair, "aioquic", "h3", "/count"))
        if ipv6:
            made.append(start_loader(pair, "aioquic", "h3", "/count", family=socket.AF_INET6))
        made.append(start_loader(pair, "aioquic", "file", "INFO"))
        yield made
    finally:
        for loader in made:
            loader.kill()


def tenants_world(extra_config: str = "", listen: Sequence[str] | None = None) -> Any:
    """The module-scoped ``world`` fixture of a test module whose world is just
    :func:`start_tenants` (``world = tenants_world(ACL)``)."""

    @pytest.fixture(scope="module")
    def world(pair: NetnsPair) -> Iterator[Tenants]:
        with start_tenants(pair, extra_config, listen) as tenants:
            yield tenants

    return world


def served_fixture(ipv6: bool = True) -> Any:
    """The ``served`` fixture of a test module (``served = served_fixture()``): the
    :func:`served_loaders` of its ``world``, for the whole test."""

    @pytest.fixture
    def served(world: Tenants) -> Iterator[list[Loader]]:
        with served_loaders(world.pair, ipv6) as made:
            yield made

    return served


def assert_served(loaders: list[Loader]) -> None:
    """Every loader's clients were served: none failed, and each got some answers."""
    for loader in loaders:
        totals = loader.finish()
        assert totals["failed"] == 0 and totals["ok"] >= 2, totals


def counters(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.status()["counters"])


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)
