"""Serve an ASGI app over HTTP/3 with hypercorn behind steerd, with steerd's CIDs.

::

    steerd exec --app web --alpn h3 [--workers N] -- \\
        python -m steerd.app.asgi MODULE:ATTR --certfile CERT.pem --keyfile KEY.pem \\
            [--graceful-timeout S] [--access-log]

Why this module exists: hypercorn speaks HTTP/3 (through aioquic) and can serve inherited
sockets (``quic_bind = "fd://N"``), but a server behind steerd must also follow steerd's
rules (steerd/app/exec.py): every CID it issues in the daemon's layout naming its worker slot,
stateless-reset tokens HMAC'd with that slot's key, and no connection from an Initial whose
DCID is in the layout. Plain hypercorn follows none of them — and it parses every short
header with an 8-byte CID, so with steerd's default 9-byte CIDs it could not even find its
own connections. This is the supported way to run an unmodified ASGI app (Starlette,
FastAPI, Quart, ...) behind steerd without writing it against the SDK.

What it does: reads the sockets ``steerd exec`` passed
(``steerd.app.sdk.inherited_from_environment``:
``LISTEN_FDS``/``LISTEN_PID``, ``STEERD_SOCKETS`` with each slot's reset key,
``STEERD_CID_LAYOUT``), imports ``MODULE:ATTR`` once, then forks **one process per worker
slot** (``steerd exec --workers N`` gives N slots) — a slot's CIDs must name that slot, and
its sockets are told apart from the other slots' only by which process holds them. Each
process runs ``hypercorn.asyncio.serve`` with a hypercorn ``Config`` whose ``quic_bind`` is
``fd://N`` for each of its slot's sockets (no TCP binds).

The hook into hypercorn: ``hypercorn.asyncio.udp_server.UDPServer.run`` makes one
``hypercorn.protocol.quic.QuicProtocol`` per socket and builds ``QuicConnection``s inside
its ``handle``; hypercorn takes no protocol or connection factory. So each worker process
sets that one module attribute, ``hypercorn.protocol.quic.QuicProtocol``, to
``SteerdQuicProtocol`` bound to the slot's ``CidIssuer`` (``UDPServer.run`` imports the
name when it runs, so it picks the subclass up; the process serves nothing else, and the
name is restored when serving ends). ``SteerdQuicProtocol`` overrides only ``handle``'s
datagram path: headers parsed with the layout's CID length, and new connections accepted
by the SDK's rule (``CidIssuer.admit_initial``: refused when the DCID is in the layout,
original DCID and Retry SCID set from a daemon Retry token) and built as the SDK's
``SteerdQuicConnection`` (every CID and reset token minted by ``CidIssuer``). hypercorn
sends no Retry of its own, so every Initial naming the slot is refused. Layout mode only
(``steerd exec --cid-mode layout``, the default): in learned mode run plain hypercorn.

hypercorn internals relied on (hypercorn is pinned in pyproject.toml):
``hypercorn.protocol.quic.QuicProtocol`` (looked up by ``UDPServer.run``), its
``quic_config``, ``connections``, ``context``, ``send`` and ``_handle_events``, and
``hypercorn.protocol.quic._Connection``; ``serve`` awaiting ``shutdown_trigger`` only once
its sockets serve (that is when a worker reports ready).

Process model and signals: the parent prints one JSON line on stdout when every worker
serves, ``{"event": "ready", "app", "generation", "slots", "pids", "cid"}`` (the SDK's ready
line), then waits. SIGTERM or SIGINT (``steerd exec`` sends SIGTERM when the app drains or
is replaced) is passed to the workers: hypercorn accepts no new connection, lets open ones
finish for ``--graceful-timeout`` seconds, then exits (clients of connections still open
get the daemon's stateless reset). SIGHUP, SIGUSR1 and SIGUSR2 are ignored. A worker that
dies closes its slot's sockets (the parent keeps no copies), the others serve on. Exit
status: 0 if every worker exited 0, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.protocol.quic as hypercorn_quic
from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from hypercorn.asyncio import serve
from hypercorn.config import Config, Sockets
from hypercorn.events import Event, RawData

from quic.cid import CidLayout
from steerd.app import sdk
from steerd.app.sdk import CidIssuer, SteerdQuicConnection

log = logging.getLogger("steerd.app.asgi")

_TERMINATE = (signal.SIGTERM, signal.SIGINT)
_IGNORED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class SteerdQuicProtocol(hypercorn_quic.QuicProtocol):
    """hypercorn's per-socket QUIC protocol, with CIDs in steerd's layout for one slot.

    Only the datagram path of ``handle`` is ours (see the module docstring); events,
    timers and HTTP/3 stay hypercorn's.
    """

    def __init__(self, *args: Any, issuer: CidIssuer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.issuer = issuer
        # aioquic reads short headers' DCIDs at this length (and hypercorn's own parse is 8)
        self.quic_config.connection_id_length = issuer.layout.cid_len
        self.accepted = 0
        self.refused_layout_initials = 0  # Initials naming our slot that no classifier decided

    async def handle(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().handle(event)
            return
        data = event.data
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=self.quic_config.connection_id_length)
        except ValueError:
            return
        versions = self.quic_config.supported_versions
        if header.version is not None and header.version not in versions:
            await self.send(RawData(data=encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=versions), address=event.address))
            return
        connection = self.connections.get(header.destination_cid)
        if (
            connection is None
            and header.packet_type == QuicPacketType.INITIAL
            and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE
            and not self.context.terminated.is_set()
        ):
            connection = self._accept(header.destination_cid, header.token, event.address)
        if connection is not None:
            connection.quic.receive_datagram(data, event.address, now=self.context.time())
            await self._handle_events(connection, event.address)

    def _accept(self, dcid: bytes, token: bytes, addr: Any) -> hypercorn_quic._Connection | None:
        """A new connection for a client Initial, or None when the SDK's rule refuses it."""
        admitted = self.issuer.admit_initial(dcid, token)
        if admitted is None:  # no Retry of ours exists that could justify it
            self.refused_layout_initials += 1
            log.debug("refused an Initial from %s naming slot %d (DCID %s): not decided by "
                      "a classifier", addr, self.issuer.slot, dcid.hex())
            return None
        odcid, retry_scid = admitted
        quic = SteerdQuicConnection(
            issuer=self.issuer, configuration=self.quic_config,
            original_destination_connection_id=odcid, retry_source_connection_id=retry_scid,
        )
        connection = hypercorn_quic._Connection(
            cids={dcid, quic.host_cid}, quic=quic, task=self.context.single_task_class())
        self.connections[dcid] = connection
        self.connections[quic.host_cid] = connection
        self.accepted += 1
        return connection


class _Config(Config):
    """hypercorn's Config, except that the inherited sockets stay non-inheritable.

    hypercorn marks every socket it opens inheritable (for its own multi-process mode, not
    used here); a worker's sockets must not outlive it in a program the app runs, or the
    daemon would not see the slot die."""

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in sockets.quic_sockets:
            sock.set_inheritable(False)
        return sockets


def load_app(spec: str) -> Any:
    """``MODULE:ATTR`` (ATTR may be dotted) imported from sys.path (``python -m`` puts the
    working directory first)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def hypercorn_config(args: argparse.Namespace, fds: list[int]) -> Config:
    """A hypercorn Config serving HTTP/3 on ``fds`` only (hypercorn's default TCP bind on
    127.0.0.1:8000 removed)."""
    config = _Config()
    config.bind = []
    config.quic_bind = [f"fd://{fd}" for fd in fds]
    config.certfile, config.keyfile = args.certfile, args.keyfile
    config.graceful_timeout = args.graceful_timeout
    config.accesslog = "-" if args.access_log else None
    return config


async def _serve(app: Any, config: Config, ready_fd: int) -> None:
    """hypercorn's ``serve`` until SIGTERM/SIGINT; ``ready`` on ``ready_fd`` once serving."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _TERMINATE:
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERMINATE)  # blocked by the parent

    async def serving() -> None:
        # hypercorn awaits its shutdown trigger once lifespan startup is done and every
        # socket has its endpoint
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        await stop.wait()

    await serve(app, config, shutdown_trigger=serving)


def _worker(app: Any, args: argparse.Namespace, issuer: CidIssuer,
            sockets: list[socket.socket], ready_fd: int) -> int:
    """One worker process: hypercorn on ``sockets`` (one slot's), CIDs from ``issuer``."""
    fds = [sock.detach() for sock in sockets]  # hypercorn's sockets own the fds from now on
    original = hypercorn_quic.QuicProtocol
    hypercorn_quic.QuicProtocol = partial(SteerdQuicProtocol, issuer=issuer)  # type: ignore[misc,assignment]
    try:
        asyncio.run(_serve(app, hypercorn_config(args, fds), ready_fd))
    finally:
        hypercorn_quic.QuicProtocol = original  # type: ignore[misc]
    return 0


@dataclass
class _Child:
    slot: int
    pid: int
    pipe: int
    pidfd: int
    ready: bool = False
    exit_code: int | None = None
    buffer: bytes = field(default=b"")


def _fork(app: Any, args: argparse.Namespace, layout: CidLayout, slot: int, key: bytes,
          inherited: sdk.Inherited, children: list[_Child]) -> _Child:
    pid, pipe = sdk.fork_worker_process()
    if pid:
        return _Child(slot, pid, pipe, os.pidfd_open(pid))
    code = 1
    try:  # the worker: only its own slot's sockets, no other worker's pipe
        for child in children:
            os.close(child.pipe)
            os.close(child.pidfd)
        for other, socks in inherited.slots.items():
            if other != slot:
                for sock in socks:
                    sock.close()
        code = _worker(app, args, CidIssuer(layout, slot, key), inherited.slots[slot], pipe)
    except BaseException:  # a forked child must never return into the caller
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Parent:
    """Waits for the workers: the ready line, signals passed on, exit statuses."""

    def __init__(self, inherited: sdk.Inherited, children: list[_Child]) -> None:
        self.inherited, self.children = inherited, children
        self.stopping = False
        self.done = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in _TERMINATE:
            loop.add_signal_handler(sig, self.stop, sig.name)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERMINATE)
        for child in self.children:
            loop.add_reader(child.pipe, self._read, child)
            loop.add_reader(child.pidfd, self._reap, child)
        await self.done.wait()
        return 0 if all(c.exit_code == 0 for c in self.children) else 1

    def stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            print(f"steerd.app.asgi: stopping the workers ({why})", file=sys.stderr, flush=True)
        for child in self.children:
            if child.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)

    def _read(self, child: _Child) -> None:
        read = sdk.read_worker_lines(child.pipe, child.buffer)
        if read is None:
            return
        lines, child.buffer = read
        if "ready" in lines and not child.ready:
            child.ready = True
            if all(c.ready for c in self.children):
                i = self.inherited
                sdk.print_ready_line(i.app, i.generation,
                                     {c.slot: c.pid for c in self.children}, i.layout)

    def _reap(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.pidfd)
        loop.remove_reader(child.pipe)
        _, status = os.waitpid(child.pid, 0)
        child.exit_code = os.waitstatus_to_exitcode(status)
        os.close(child.pidfd)
        os.close(child.pipe)
        if not self.stopping:
            print(f"steerd.app.asgi: worker of slot {child.slot} (pid {child.pid}) exited with "
                  f"{child.exit_code}", file=sys.stderr, flush=True)
            if not child.ready:  # it never served: the app cannot start, stop the rest
                self.stop("a worker failed to start")
        if all(c.exit_code is not None for c in self.children):
            self.done.set()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m steerd.app.asgi", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("app", metavar="MODULE:ATTR", help="the ASGI app, e.g. mysite.main:app")
    p.add_argument("--certfile", required=True, help="PEM certificate chain")
    p.add_argument("--keyfile", required=True, help="PEM private key")
    p.add_argument("--graceful-timeout", type=float, default=3.0,
                   help="seconds open connections may finish after SIGTERM (default 3)")
    p.add_argument("--access-log", action="store_true", help="log each request to stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    inherited = sdk.inherited_from_environment()
    if inherited is None:
        print("steerd.app.asgi: no sockets from steerd exec; run it as: steerd exec --app NAME "
              "--alpn h3 -- python -m steerd.app.asgi MODULE:ATTR --certfile C --keyfile K",
              file=sys.stderr)
        return 2
    refusal = inherited.layout_refusal("steerd.app.asgi")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        inherited.close()
        return 2
    try:
        app = load_app(args.app)
        # fail here, once, rather than in every worker's first socket
        QuicConfiguration(is_client=False).load_cert_chain(args.certfile, args.keyfile)
    except Exception as exc:
        print(f"steerd.app.asgi: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        inherited.close()
        return 2
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    # blocked until each process's handlers are in place: a SIGTERM from steerd exec is
    # never lost, and never kills the parent before it passed it on
    signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATE)
    children: list[_Child] = []
    for slot, key in sorted(inherited.reset_keys.items()):
        children.append(_fork(app, args, inherited.layout, slot, key, inherited, children))
    inherited.close()  # the workers own them: a worker's death must close its sockets
    return asyncio.run(_Parent(inherited, children).run())


if __name__ == "__main__":
    sys.exit(main())
