"""The worker SDK: serve an aioquic app behind steerd in a few lines.

Why this module exists: an app behind steerd must get three things right that aioquic gives no
public hook for. (1) Every connection ID a worker issues must name the worker's slot in the
daemon's CID layout, or the kernel cannot route the connection's later packets (after NAT
rebinding, migration, or any packet not matching the first flight's DCID). (2) The stateless-
reset token advertised for each CID must be ``quic.reset.reset_token(slot_key, cid)`` with
the key the daemon gave the worker's slot, so the daemon can reset the clients of a worker
that died instead of leaving them to an idle timeout. (3) Restarts must drop nothing: the old
generation stops getting new connections (the daemon's job), finishes the open ones and only
then exits (ours). And it must create connections only from Initials the daemon decided (see
``SteerdQuicServer``).

Use::

    from steerd.app import sdk

    config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    config.load_cert_chain(cert, key)
    sys.exit(sdk.run(sdk.AppSpec(app="web", alpn=["h3"], workers=2),
                     config, create_protocol=MyProtocol))

Session resumption and 0-RTT: give ``AppSpec(ticket_store=sdk.MemoryTicketStore())`` (each
worker keeps the tickets it issued) or a store of your own that the workers share.

Process model: the *parent* registers over the control socket (and so holds the app's routes:
its control connection is the app's life), then forks one *worker* process per worker slot
(so an app uses several cores). The parent closes its copies of the worker sockets, so a
worker that dies really closes its sockets and the daemon sees the slot as dead (and resets
its clients). Workers report their open-connection count to the parent over a pipe; the
parent forwards them as ``load`` reports (and reports a dead worker's slot as fully loaded
so new connections avoid it). SIGTERM or SIGINT to the parent drains: ``drain`` to the daemon
(no new connections), SIGTERM to the workers, which keep serving their open connections and
exit when they have none left (or when ``drain_timeout`` expires: then they close the rest).
A parent whose generation was replaced (another process registered the same app with
``replace=True``) notices it in the daemon's status and drains by itself.

Under ``steerd exec`` (sockets passed the systemd way, see steerd/app/exec.py) ``run`` serves the
inherited sockets instead of registering; there is then no control connection in-process and
no load reports.

aioquic internals relied on (aioquic is pinned; tests/sdk/test_internals.py fails loudly when
any of these change): ``QuicConnection._host_cids`` (``QuicConnectionId`` entries with
``cid``, ``sequence_number``, ``stateless_reset_token``, ``was_sent``), ``host_cid``,
``_local_initial_source_connection_id``, ``_replenish_connection_ids``; ``QuicServer``'s
``_configuration``, ``_protocols``, ``_create_protocol``, ``_stream_handler``, ``_transport``,
``_retry``, ``_session_ticket_fetcher``/``_handler``,
``_connection_id_issued``/``_retired``/``_terminated``, and the protocol's
``_connection_id_issued_handler``/``_retired_handler``/``_connection_terminated_handler``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicPacketType, encode_quic_retry, pull_quic_header
from aioquic.tls import SessionTicket

from quic.builders import NO_APPLICATION_PROTOCOL
from quic.cid import CidLayout
from quic.reset import reset_token
from quic.token import is_retry_token, read_retry_token
from steerd.app.client import RESUME_RETRY, ControlClient, own_generation, resume_once
from steerd.app.protocol import DEFAULT_CONTROL_PATH, ControlError, Registration, layout_dict

log = logging.getLogger("steerd.app.sdk")

DEAD_WORKER_LOAD = 1e9  # reported for a slot whose worker died: the daemon's picker avoids it


# ---------------------------------------------------------------------------------------------
# Connection IDs


@dataclass(frozen=True, slots=True)
class CidIssuer:
    """Makes the CIDs and reset tokens of one worker slot (shared by all its connections).
    ``reset_key`` is the slot's own key from the daemon (never the daemon's master key)."""

    layout: CidLayout
    slot: int
    reset_key: bytes

    def retried_odcid(self, token: bytes) -> bytes | None:
        """The original DCID of a connection the daemon retried (its Retry mode), from the
        token the client echoes; None if ``token`` is not shaped like the daemon's.

        Read without a key or any check: the worker does not hold the token key. It can
        trust the token because the caller only asks for an Initial whose DCID is outside
        the CID layout, and the data plane hands such an Initial to a worker only after the
        classifier validated its token (MAC, address, expiry) and routed its DCID here."""
        if not is_retry_token(token):
            return None
        return read_retry_token(token)

    def admit_initial(self, dcid: bytes, token: bytes) -> tuple[bytes, bytes | None] | None:
        """(original DCID, Retry SCID or None) for a connection from a new client Initial
        with this DCID and token; None when the DCID is in the CID layout: no classifier
        decided that Initial (see ``SteerdQuicServer``), and only a token of the server's
        own Retry can justify it, which is the caller's to check. With a token of the
        daemon's Retry the DCID is that Retry's SCID. The one accept rule, shared by
        ``SteerdQuicServer`` and steerd.app.asgi's hypercorn protocol."""
        if self.layout.decode(dcid) is not None:
            return None
        if token and (retried := self.retried_odcid(token)) is not None:
            return retried, dcid
        return dcid, None

    def new_cid(self) -> bytes:
        return self.layout.encode(self.slot, os.urandom(self.layout.nonce_len))

    def token(self, cid: bytes) -> bytes:
        return reset_token(self.reset_key, cid)

    def owns(self, cid: bytes) -> bool:
        return self.layout.decode(cid) == self.slot


class SteerdQuicConnection(QuicConnection):
    """A server ``QuicConnection`` whose every issued CID names its worker slot and whose
    reset tokens the daemon can recompute.

    aioquic draws CIDs from os.urandom in ``__init__`` and ``_replenish_connection_ids``; we
    overwrite them before anything is sent (the constructor sends nothing, and replenished
    entries are written to the wire only later, by ``_write_new_connection_id_frame``).
    """

    def __init__(self, *, issuer: CidIssuer, **kwargs: Any) -> None:
        self._steerd_issuer = issuer
        super().__init__(**kwargs)
        first = self._host_cids[0]
        first.cid = issuer.new_cid()
        first.stateless_reset_token = issuer.token(first.cid)
        self.host_cid = first.cid
        self._local_initial_source_connection_id = first.cid
        self.misdelivered = False  # see receive_datagram

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """aioquic's, except that a ClientHello offering none of our ALPNs ends the
        connection in silence instead of with a CONNECTION_CLOSE.

        Why: the classifier hands a new flight only to an app that owns one of its ALPNs, so
        such a ClientHello reached us without it: the kernel hashed it over the group while
        another tenant had detached the steering program (docs/SECURITY.md §3, until the
        watchdog attaches it again). Refusing it would end another tenant's handshake;
        dropping it lets the client retransmit, and its next Initial meets steerd's program
        again. Counted in ``misdelivered_initials``; nothing was sent for this connection."""
        super().receive_datagram(data, addr, now)
        event = self._close_event
        if (self._close_pending and event is not None
                and event.error_code == NO_APPLICATION_PROTOCOL
                and not self._handshake_complete):
            self._close_pending = False
            self._close_end()  # TERMINATED: nothing more to send; the server forgets us
            self.misdelivered = True
            log.info("dropped a ClientHello from %s offering none of our ALPNs (a "
                     "misdelivery: the classifier never sends one here)", addr)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        issuer = self._steerd_issuer
        for entry in self._host_cids:
            if not entry.was_sent and not issuer.owns(entry.cid):
                entry.cid = issuer.new_cid()
                entry.stateless_reset_token = issuer.token(entry.cid)


# ---------------------------------------------------------------------------------------------
# The per-socket server


class SteerdQuicServer(QuicServer):
    """aioquic's ``QuicServer`` making ``SteerdQuicConnection``s (and Retry packets whose SCID
    is one of ours, so the client's retried Initial is routed back to this worker).

    A connection the *daemon* retried (its Retry mode, under a flood) arrives with the
    daemon's token: the worker reads the original DCID from it and sets both
    ``original_destination_connection_id`` and ``retry_source_connection_id`` (the DCID the
    retried Initial carries) in its transport parameters, or the client aborts the handshake
    (RFC 9000 §7.3). Such a connection is not retried again by the worker's own Retry.

    New connections only through the classifier: the data plane steers a long-header packet
    whose DCID is in the CID layout straight to that slot's worker, so an Initial naming our
    slot (spoofed, or from a client that picked such a DCID) reached us without any ALPN,
    server-name or ACL decision. No connection is created from it (silently dropped and
    counted in ``refused_layout_initials``), except when it echoes a token our own Retry
    (``retry=True``) issued and that validates: our Retry's SCID is in the layout, so the
    retried Initial legitimately names the slot, and the first Initial of that exchange
    came through the classifier. Legitimate first Initials carry the client's own DCID or
    the daemon's Retry SCID, neither in the layout.

    Only the accept path is ours: a new connection is built and filed under its DCIDs, then
    the datagram is handed to ``QuicServer.datagram_received``, which finds it there.
    """

    def __init__(self, *, issuer: CidIssuer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.issuer = issuer
        self.accepted = 0
        self.refused_layout_initials = 0  # Initials naming our slot that no classifier decided
        self.misdelivered_initials = 0  # ClientHellos for none of our ALPNs, dropped unanswered

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        data = cast(bytes, data)
        config = self._configuration
        try:
            header = pull_quic_header(Buffer(data=data),
                                      host_cid_length=config.connection_id_length)
        except ValueError:
            return
        if (
            header.destination_cid not in self._protocols
            and header.packet_type == QuicPacketType.INITIAL
            and header.version in config.supported_versions
            and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE
            and not self._accept(data, addr, header)
        ):
            return
        protocol = self._protocols.get(header.destination_cid)
        super().datagram_received(data, addr)
        if protocol is not None and getattr(protocol._quic, "misdelivered", False):
            self.misdelivered_initials += 1

    def _accept(self, data: bytes, addr: NetworkAddress, header: Any) -> bool:
        """Build the connection for a new client Initial; False when the datagram is spent
        (answered with a Retry, or refused: see the class docstring)."""
        dcid: bytes = header.destination_cid
        admitted = self.issuer.admit_initial(dcid, header.token)
        if admitted is None:
            own = self._own_retry_odcid(addr, header)
            if own is None:
                self.refused_layout_initials += 1
                log.debug("refused an Initial from %s naming slot %d (DCID %s): not "
                          "decided by a classifier", addr, self.issuer.slot, dcid.hex())
                return False
            admitted = own, dcid
        elif admitted[1] is None and self._retry is not None:
            now = self._loop.time()
            if not header.token:
                scid = self.issuer.new_cid()
                token = self._retry.create_token(
                    address=addr, original_destination_connection_id=header.destination_cid,
                    retry_source_connection_id=scid, now=now)
                self._transport.sendto(
                    encode_quic_retry(
                        version=header.version, source_cid=scid,
                        destination_cid=header.source_cid,
                        original_destination_cid=header.destination_cid, retry_token=token,
                    ),
                    addr,
                )
                return False
            try:
                admitted = self._retry.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token,
                    now=now), header.destination_cid
            except ValueError:
                return True  # QuicServer answers INVALID_TOKEN for it
        odcid, retry_scid = admitted
        connection = SteerdQuicConnection(
            issuer=self.issuer, configuration=self._configuration,
            original_destination_connection_id=odcid, retry_source_connection_id=retry_scid,
            session_ticket_fetcher=self._session_ticket_fetcher,
            session_ticket_handler=self._session_ticket_handler,
        )
        protocol = self._create_protocol(connection, stream_handler=self._stream_handler)
        protocol.connection_made(self._transport)
        protocol._connection_id_issued_handler = partial(
            self._connection_id_issued, protocol=protocol)
        protocol._connection_id_retired_handler = partial(
            self._connection_id_retired, protocol=protocol)
        protocol._connection_terminated_handler = partial(
            self._connection_terminated, protocol=protocol)
        self._protocols[header.destination_cid] = protocol
        self._protocols[connection.host_cid] = protocol
        self.accepted += 1
        return True

    def _own_retry_odcid(self, addr: NetworkAddress, header: Any) -> bytes | None:
        """The original DCID from a token our own Retry issued for this DCID and address
        (still valid), or None: no Retry of ours, no token, or one that does not validate."""
        if self._retry is None or not header.token:
            return None
        try:
            return cast(bytes, self._retry.validate_token(
                address=addr, destination_cid=header.destination_cid, token=header.token,
                now=self._loop.time()))
        except ValueError:
            return None

    def connections(self) -> set[QuicConnectionProtocol]:
        return set(self._protocols.values())


# ---------------------------------------------------------------------------------------------
# What a worker knows about itself (for apps: which worker served a request)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    app: str
    generation: int
    slot: int
    pid: int


_current: WorkerInfo | None = None


def current_worker() -> WorkerInfo | None:
    """The worker this process is (None in the parent or outside the SDK)."""
    return _current


# ---------------------------------------------------------------------------------------------
# Session tickets (resumption and 0-RTT)


class TicketStore(Protocol):
    """Where a worker keeps the TLS session tickets it issues, for aioquic's server.

    ``add`` is aioquic's ``session_ticket_handler`` (called with each ticket the worker
    issues), ``pop`` its ``session_ticket_fetcher`` (called with the label a resuming client
    presents; None: unknown, the client gets a full handshake and its 0-RTT data is
    refused). An app that wants tickets redeemable at any of its workers (the daemon routes
    a returning client by load, not by ticket) supplies a store all of them share."""

    def add(self, ticket: SessionTicket) -> None: ...

    def pop(self, label: bytes) -> SessionTicket | None: ...


class MemoryTicketStore:
    """A bounded in-memory ticket store: lets clients resume (no certificate exchange) and
    send 0-RTT data, with no setup.

    Per worker process: ``run`` forks the workers after the ``AppSpec`` was made, so each
    worker gets its own (empty) copy, and a ticket is redeemable only at the worker that
    issued it. With several workers the daemon may route a returning client to another one,
    which does not know the ticket: that client gets a full handshake and its 0-RTT data is
    rejected (it resends it, RFC 9001 §4.6.2). Apps that need resumption at every worker
    supply a shared store instead (any object with this ``add``/``pop``, see
    ``TicketStore``).

    Each ticket is redeemable once (``pop`` removes it): a replayed ClientHello with 0-RTT
    data finds nothing (RFC 8446 §8.1, single-use tickets), within this worker; clients get
    a fresh ticket on every connection. At most ``max_tickets`` are kept (the oldest go
    first), and expired ones are dropped as new ones arrive.
    """

    def __init__(self, max_tickets: int = 10_000) -> None:
        if max_tickets < 1:
            raise ValueError("max_tickets must be at least 1")
        self.max_tickets = max_tickets
        self._tickets: OrderedDict[bytes, SessionTicket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: SessionTicket) -> None:
        tickets = self._tickets
        tickets[ticket.ticket] = ticket
        tickets.move_to_end(ticket.ticket)
        now = datetime.now(UTC)
        while tickets:
            oldest = next(iter(tickets.values()))
            if len(tickets) <= self.max_tickets and oldest.not_valid_after >= now:
                break
            tickets.popitem(last=False)

    def pop(self, label: bytes) -> SessionTicket | None:
        return self._tickets.pop(label, None)


# ---------------------------------------------------------------------------------------------
# Running an app


@dataclass
class AppSpec:
    """What to register: the app's name, ALPNs, server names (empty: all) and worker count."""

    app: str
    alpn: Sequence[str]
    server_names: Sequence[str] = ()
    workers: int = 1
    control: str = DEFAULT_CONTROL_PATH
    replace: bool = False
    drain_timeout: float = 30.0
    idle_grace: float = 0.5  # a draining worker exits after this long with no connections
    load_interval: float = 1.0
    retry: bool = False
    ready_line: bool = True  # print one JSON line on stdout when every worker serves
    # Session resumption and 0-RTT: e.g. MemoryTicketStore() (each worker its own copy, see
    # there), or a store the workers share. None: no tickets are issued.
    ticket_store: TicketStore | None = None




@dataclass
class _Slot:
    slot: int
    sockets: list[socket.socket]
    reset_key: bytes  # this slot's own stateless-reset key
    pid: int = 0
    pipe: int = -1
    pidfd: int = -1
    load: float = 0.0
    ready: bool = False
    exit_code: int | None = None
    buffer: bytes = field(default=b"")


@dataclass(frozen=True, slots=True)
class Inherited:
    """Sockets and parameters passed by ``steerd exec`` (see steerd/app/exec.py)."""

    app: str
    generation: int
    layout: CidLayout
    reset_keys: dict[int, bytes]  # slot -> that slot's stateless-reset key
    slots: dict[int, list[socket.socket]]
    cid_mode: str = "layout"  # steerd exec --cid-mode

    def layout_refusal(self, who: str) -> str | None:
        """Why ``who``, which issues CIDs in steerd's layout, must not serve these sockets:
        registered in learned mode, its layout CIDs would never be learned (the kernel
        refuses to learn layout CIDs) and no client could reach it. None: it may."""
        if self.cid_mode == "layout":
            return None
        return (f"{who}: registered with --cid-mode {self.cid_mode}, but {who} issues CIDs in "
                "steerd's layout: register with --cid-mode layout (the default)")

    def close(self) -> None:
        for socks in self.slots.values():
            for sock in socks:
                sock.close()


def inherited_from_environment(env: dict[str, str] | None = None) -> Inherited | None:
    """The sockets ``steerd exec`` passed us, or None if we were not started by it."""
    env = dict(os.environ) if env is None else env
    if "STEERD_SOCKETS" not in env or env.get("LISTEN_PID") != str(os.getpid()):
        return None
    cid = json.loads(env["STEERD_CID_LAYOUT"])
    layout = CidLayout(**{k: v for k, v in cid.items() if k != "cid_len"})
    slots: dict[int, list[socket.socket]] = {}
    keys: dict[int, bytes] = {}
    for entry in json.loads(env["STEERD_SOCKETS"]):
        os.set_inheritable(entry["fd"], False)  # ours, not our children's
        slots.setdefault(entry["slot"], []).append(socket.socket(fileno=entry["fd"]))
        keys[entry["slot"]] = bytes.fromhex(entry["reset_key"])
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children (sd_listen_fds(unset=1) semantics)
    return Inherited(
        app=env["STEERD_APP"], generation=int(env.get("STEERD_GENERATION", "0")),
        layout=layout, reset_keys=keys, slots=slots,
        cid_mode=env.get("STEERD_CID_MODE", "layout"),
    )


def run(
    spec: AppSpec,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., QuicConnectionProtocol] = QuicConnectionProtocol,
    stream_handler: Any = None,
) -> int:
    """Register (or take ``steerd exec``'s sockets), fork the workers, serve until drained.

    Returns the exit code for the parent. ``configuration`` is shared by all workers: load
    the certificate before calling, so a worker never reads the key file.
    """
    inherited = inherited_from_environment()
    client: ControlClient | None = None
    if inherited is None:
        try:
            client = ControlClient(spec.control)
        except OSError as exc:
            print(f"steerd: cannot reach the daemon at {spec.control}: {exc}", file=sys.stderr)
            return 2
        try:
            reg: Registration = client.register(
                spec.app, spec.alpn, spec.server_names, spec.workers, spec.replace)
        except ControlError as exc:
            client.close()
            print(f"steerd: register refused ({exc.reason}): {exc}", file=sys.stderr)
            return 2
        app, generation, layout = reg.app, reg.generation, reg.layout
        for sock in reg.sockets:  # not for programs the app may run (recv_fds may leave
            os.set_inheritable(sock.fileno(), False)  # them inheritable)
        slots = [_Slot(w["slot"], reg.worker_sockets(w["slot"]), reg.reset_key_of(w["slot"]))
                 for w in reg.workers]
    else:
        refusal = inherited.layout_refusal("steerd.app.sdk")
        if refusal is not None:
            print(refusal, file=sys.stderr)
            inherited.close()
            return 2
        app, generation, layout = inherited.app, inherited.generation, inherited.layout
        slots = [_Slot(s, socks, inherited.reset_keys[s])
                 for s, socks in sorted(inherited.slots.items())]
    configuration.connection_id_length = layout.cid_len
    for s in slots:
        _fork_worker(s, slots, client, app, generation, layout, spec, configuration,
                     create_protocol, stream_handler)
    if client is None:
        for s in slots:
            for sock in s.sockets:
                sock.close()  # the worker owns them now: its death must close them
    # Registered: the parent keeps its copies, to present them when it resumes after a daemon
    # restart, and closes a slot's copies the moment its worker dies (_reap), so a dead
    # worker's sockets still leave the group at once.
    parent = _Parent(spec, client, app, generation, slots, layout)
    parent.registration = reg if client is not None else None
    return asyncio.run(parent.run())


def read_worker_lines(fd: int, pending: bytes) -> tuple[list[str], bytes] | None:
    """The complete lines a worker wrote to its pipe (``fd``, non-blocking) since the last
    call, and what is left of an unfinished one (pass it back next time); None at end of
    file, when the pipe's reader is taken off the running loop."""
    try:
        chunk = os.read(fd, 4096)
    except BlockingIOError:
        return [], pending
    if not chunk:
        asyncio.get_running_loop().remove_reader(fd)
        return None
    *lines, pending = (pending + chunk).split(b"\n")
    return [line.decode() for line in lines], pending


def print_ready_line(app: str, generation: int, pids: dict[int, int], layout: CidLayout) -> None:
    """The one JSON line on stdout once every worker serves (``pids``: slot -> pid), the same
    from the SDK's parent and from steerd.app.asgi's."""
    print(json.dumps({
        "event": "ready", "app": app, "generation": generation, "slots": list(pids),
        "pids": {str(slot): pid for slot, pid in pids.items()}, "cid": layout_dict(layout),
    }), flush=True)


def fork_worker_process() -> tuple[int, int]:
    """Fork a worker process with a pipe back to its parent (its ``load``/``ready`` lines):
    (pid, the pipe's read end, non-blocking) in the parent, (0, the write end) in the worker.
    Stdio is flushed first, so nothing buffered is written twice. The SDK and steerd.app.asgi
    fork their workers this one way."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os.set_blocking(read_end, False)
        return pid, read_end
    os.close(read_end)
    return 0, write_end


def _fork_worker(
    me: _Slot, slots: list[_Slot], client: ControlClient | None, app: str, generation: int,
    layout: CidLayout, spec: AppSpec, configuration: QuicConfiguration,
    create_protocol: Callable[..., QuicConnectionProtocol], stream_handler: Any,
) -> None:
    pid, pipe = fork_worker_process()
    if pid:
        me.pid, me.pipe, me.pidfd = pid, pipe, os.pidfd_open(pid)
        return
    # the worker
    write_end = pipe
    code = 1
    try:
        if client is not None:
            client.close()  # the parent's control connection is the app's life, not ours
        for other in slots:
            if other is not me:
                for sock in other.sockets:
                    sock.close()
                if other.pipe >= 0:
                    os.close(other.pipe)
                    os.close(other.pidfd)
        global _current
        _current = WorkerInfo(app, generation, me.slot, os.getpid())
        worker = _Worker(spec, me.slot, me.sockets, CidIssuer(layout, me.slot, me.reset_key),
                         configuration, create_protocol, stream_handler, write_end)
        code = asyncio.run(worker.run())
    except BaseException:  # a forked child must never return into the caller
        log.exception("worker %d failed", me.slot)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Worker:
    """One worker process: an ``SteerdQuicServer`` per socket of its slot."""

    def __init__(
        self, spec: AppSpec, slot: int, sockets: list[socket.socket], issuer: CidIssuer,
        configuration: QuicConfiguration, create_protocol: Callable[..., QuicConnectionProtocol],
        stream_handler: Any, pipe: int,
    ) -> None:
        self.spec, self.slot, self.sockets, self.issuer = spec, slot, sockets, issuer
        self.configuration, self.create_protocol = configuration, create_protocol
        self.stream_handler, self.pipe = stream_handler, pipe
        self.servers: list[SteerdQuicServer] = []
        self.draining = asyncio.Event()

    def connections(self) -> set[QuicConnectionProtocol]:
        return set().union(*(s.connections() for s in self.servers))

    def _tell(self, message: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.pipe, message.encode() + b"\n")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.draining.set)
        tickets = self.spec.ticket_store
        for sock in self.sockets:
            _, server = await loop.create_datagram_endpoint(
                lambda: SteerdQuicServer(
                    issuer=self.issuer, configuration=self.configuration,
                    create_protocol=self.create_protocol, retry=self.spec.retry,
                    stream_handler=self.stream_handler,
                    session_ticket_handler=tickets.add if tickets is not None else None,
                    session_ticket_fetcher=tickets.pop if tickets is not None else None,
                ),
                sock=sock,
            )
            self.servers.append(cast(SteerdQuicServer, server))
        self._tell("ready")
        while not self.draining.is_set():
            self._tell(f"load {len(self.connections())}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.draining.wait(), self.spec.load_interval)
        return await self._drain()

    async def _drain(self) -> int:
        """Serve the open connections until there are none (for ``idle_grace``: a first
        flight the daemon routed here just before the drain may still be on its way) or
        until ``drain_timeout``; then close whatever is left."""
        for protocol in self.connections():
            hook = getattr(protocol, "drain", None)
            if callable(hook):
                hook()
        deadline = time.monotonic() + self.spec.drain_timeout
        idle_since: float | None = None
        while (now := time.monotonic()) < deadline:
            open_now = self.connections()
            self._tell(f"load {len(open_now)}")
            if open_now:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.spec.idle_grace:
                break
            await asyncio.sleep(0.05)
        else:
            for protocol in self.connections():
                protocol.close()
            await asyncio.sleep(0.1)  # let the CONNECTION_CLOSEs leave
        for server in self.servers:
            server._transport.close()
        return 0


class _Parent:
    """The registering process: holds the control connection, forwards load, drains."""

    def __init__(self, spec: AppSpec, client: ControlClient | None, app: str, generation: int,
                 slots: list[_Slot], layout: CidLayout) -> None:
        self.spec, self.client, self.app, self.generation = spec, client, app, generation
        self.layout = layout
        self.slots = slots
        self.draining = False
        self.done = asyncio.Event()
        self.registration: Registration | None = None
        self.resuming = False  # the daemon went away: resume with it when it is back

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain, f"signal {sig.name}")
        for s in self.slots:
            loop.add_reader(s.pipe, self._read_pipe, s)
            loop.add_reader(s.pidfd, self._reap, s)
        try:
            while not self.done.is_set():
                # While resuming, retry often: the daemon is back within a second.
                wait = RESUME_RETRY if self.resuming else self.spec.load_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.done.wait(), wait)
                self._report()
        finally:
            for s in self.slots:
                loop.remove_reader(s.pipe)
                loop.remove_reader(s.pidfd)
                os.close(s.pipe)
                os.close(s.pidfd)
            if self.client is not None:
                self.client.close()
        failed = [s for s in self.slots if s.exit_code != 0]
        return 1 if failed and not self.draining else 0

    def drain(self, why: str) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("%s generation %d draining (%s)", self.app, self.generation, why)
        if self.client is not None:
            try:
                self.client.drain(self.app)
            except (ControlError, OSError) as exc:
                log.warning("drain request failed: %s", exc)
        for s in self.slots:
            if s.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, signal.SIGTERM)

    def _read_pipe(self, s: _Slot) -> None:
        read = read_worker_lines(s.pipe, s.buffer)
        if read is None:
            return
        lines, s.buffer = read
        for line in lines:
            word, _, value = line.partition(" ")
            if word == "load":
                s.load = float(value)
            elif word == "ready" and not s.ready:
                s.ready = True
                if all(x.ready for x in self.slots) and self.spec.ready_line:
                    print_ready_line(self.app, self.generation,
                                     {x.slot: x.pid for x in self.slots}, self.layout)

    def _reap(self, s: _Slot) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(s.pidfd)
        _, status = os.waitpid(s.pid, 0)
        s.exit_code = os.waitstatus_to_exitcode(status)
        for sock in s.sockets:
            sock.close()  # the parent's copies: now the slot's sockets leave the group
        if not self.draining:
            log.warning("worker %d (pid %d) of %s exited with %s", s.slot, s.pid, self.app,
                        s.exit_code)
            s.load = DEAD_WORKER_LOAD
            self._report()
        if all(x.exit_code is not None for x in self.slots):
            if not self.draining:
                self.draining = True  # nothing left to serve
            self.done.set()

    def _report(self) -> None:
        if self.resuming:
            self._resume()
            return
        if self.client is None or self.done.is_set():
            return
        try:
            if not self.draining:
                self.client.load(self.app, {s.slot: s.load for s in self.slots})
                if self._replaced():
                    self.drain("replaced by a newer generation")
        except (ControlError, OSError) as exc:
            log.warning("control: %s", exc)
            if isinstance(exc, OSError):
                if self.registration is None:
                    self.drain("lost the control connection")
                else:  # the daemon restarts: workers serve on, and we resume with the next
                    self.client.close()
                    self.resuming = True

    def _resume(self) -> None:
        """Hand our live slots to a restarted daemon, with the sockets it checks them by."""
        assert self.registration is not None
        live = [s.slot for s in self.slots if s.exit_code is None]
        try:
            back = resume_once(self.spec.control, self.registration, self.spec.alpn,
                               self.spec.server_names, live)
        except ControlError as exc:  # refused for good: nothing to resume into
            log.warning("resume refused (%s): %s", exc.reason, exc)
            self.resuming = False
            self.drain("the restarted daemon refused the resume")
            return
        if back is None:
            return
        self.client, reg = back
        self.generation, self.resuming = reg.generation, False
        log.info("%s resumed slots %s as generation %d", self.app, live, reg.generation)

    def _replaced(self) -> bool:
        assert self.client is not None
        gen = own_generation(self.client.status(), self.app, self.generation)
        return gen is not None and gen["state"] == "draining"
