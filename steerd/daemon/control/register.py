"""The ``register`` op: where worker sockets are made and handed out (``_op_register``: the
registry allocates the slots, ``socket_factory`` binds one socket per listen address per
worker, the sink puts them in the data plane, the reply carries them by SCM_RIGHTS), and
where a resuming app proves the sockets it holds (``_resume``)."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

from quic.reset import slot_reset_key
from steerd.app.protocol import (
    LAYOUT,
    Steering,
    layout_dict,
    socket_cookie,
)
from steerd.daemon.config import render
from steerd.daemon.control.connections import _Connection
from steerd.daemon.control.requests import _Refused
from steerd.daemon.registry import Generation


class RegisterOpMixin:
    """The register op of :class:`~steerd.daemon.control.ControlServer`."""

    # The state it uses, made in ControlServer.__init__ (server.py): config, registry, sink,
    # reset_key, socket_factory, socket_refusal.

    def _op_register(
        self, conn: _Connection, m: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[int], list[socket.socket]]:
        self._fields("register", m,
                     ("alpn", "app", "cid_len", "cid_mode", "replace", "resume",
                      "server_names", "workers"),
                     ("alpn", "app"))
        if "resume" in m:
            return self._resume(conn, m)
        workers = m.get("workers", 1)
        limit = self.config.limits.workers_per_app
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= limit:
            # checked before sockets are made for them, not only by the registry
            raise _Refused(
                "bad_request",
                f'register: "workers" must be an integer 1..{limit}, got {render(workers)}',
            )
        if self.socket_refusal is not None:
            refusal = self.socket_refusal(conn.peer.uid)
            if refusal is not None:
                raise _Refused(refusal[0], f"register: {refusal[1]}")
        addresses = self.config.listen.addresses
        port = self.config.listen.port
        steering = _steering(m)
        if steering.learned and self.config.flood.retry == "always":
            raise _Refused("bad_request", 'register: learned mode cannot work with [flood] '
                           'retry = "always": a server that did not send the Retry cannot '
                           "complete the retried handshake (docs/DATAPLANE.md, learned mode)")
        gen = self.registry.register(
            m["app"], m["alpn"], m.get("server_names", []), workers, m.get("replace", False),
            conn.peer, conn.id, steering=steering,
        )
        made: list[socket.socket] = []
        added: list[int] = []
        try:
            for _ in gen.workers:
                for address in addresses:
                    made.append(self.socket_factory(address, port))
            for i, w in enumerate(gen.workers):
                self.sink.add_worker(w.slot, made[i * len(addresses) : (i + 1) * len(addresses)])
                added.append(w.slot)
                self.sink.set_steering(w.slot, gen.steering, fresh=True)
        except OSError as e:
            self._undo(gen, made, added)
            raise _Refused("socket_error", f"register: cannot create worker sockets: {e}") from None
        except BaseException:
            self._undo(gen, made, added)
            raise
        self._update_gauges()
        return self._register_reply(gen, addresses, port), [s.fileno() for s in made], made

    def _resume(
        self, conn: _Connection, m: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[int], list[socket.socket]]:
        """An app that outlived a daemon restart takes back its slots: it presents the worker
        sockets it holds (one per listen address per slot, in reply order); each must be the
        very socket the data plane has in that slot (same SO_COOKIE). Nothing is created or
        handed over: its connections never stopped flowing."""
        slots = m["resume"]
        addresses = self.config.listen.addresses
        if (
            not isinstance(slots, list) or not slots
            or any(isinstance(x, bool) or not isinstance(x, int) for x in slots)
        ):
            raise _Refused("bad_request",
                           f'register: "resume" must be a non-empty list of slots, got '
                           f"{render(slots)}")
        workers = m.get("workers", len(slots))
        if workers != len(slots):
            raise _Refused("bad_request", f'register: "workers" ({render(workers)}) must equal '
                           f'the number of slots resumed ({len(slots)})')
        fds = conn.request_fds
        if len(fds) != len(slots) * len(addresses):
            raise _Refused(
                "bad_resume",
                f"register: resuming {len(slots)} slot(s) takes {len(slots) * len(addresses)} "
                f"sockets (one per listen address per slot), got {len(fds)}",
            )
        for i, slot in enumerate(slots):
            want = self.sink.worker_cookies(slot)
            for j, address in enumerate(addresses):
                try:
                    have: int | None = socket_cookie(fds[i * len(addresses) + j])
                except OSError:
                    have = None
                if j >= len(want) or have is None or want[j] != have:
                    raise _Refused(
                        "bad_resume",
                        f"register: the socket given for slot {slot} on {address} is not the "
                        "one steering that slot",
                    )
        gen = self.registry.register(
            m["app"], m["alpn"], m.get("server_names", []), len(slots), m.get("replace", False),
            conn.peer, conn.id, resume=slots, steering=_steering(m),
        )
        for slot in slots:  # the mode may differ from the previous run's
            self.sink.set_steering(slot, gen.steering, fresh=False)
        # A sink that watches worker sockets (the daemon's socket watchdog) keeps its own
        # copies of the resumed ones: the app's are the only others.
        watch = getattr(self.sink, "watch_worker", None)
        if watch is not None:
            for i, slot in enumerate(slots):
                watch(slot, fds[i * len(addresses) : (i + 1) * len(addresses)])
        self._update_gauges()
        reply = self._register_reply(gen, addresses, self.config.listen.port)
        reply["resumed"] = True
        return reply, [], []

    def _undo(self, gen: Generation, made: list[socket.socket], added: list[int]) -> None:
        for slot in added:
            self.sink.remove_worker(slot)
        for s in made:
            s.close()
        self.registry.undo(gen)

    def _register_reply(
        self, gen: Generation, addresses: Sequence[str], port: int
    ) -> dict[str, Any]:
        n = len(addresses)
        return {
            "app": gen.app,
            "generation": gen.number,
            "workers": [
                {
                    "slot": w.slot, "server_id": w.server_id.hex(),
                    # this slot's key only: an app must not forge other apps' resets
                    "reset_key": slot_reset_key(self.reset_key, w.slot).hex(),
                    "sockets": [
                        {"address": a, "port": port, "fd_index": i * n + j}
                        for j, a in enumerate(addresses)
                    ],
                }
                for i, w in enumerate(gen.workers)
            ],
            "cid": layout_dict(self.registry.layout),
            "cid_mode": gen.steering.mode,
            **({"cid_len": gen.steering.cid_len} if gen.steering.learned else {}),
        }


def _steering(m: Mapping[str, Any]) -> Steering:
    """The register message's ``cid_mode`` and ``cid_len`` (the registry checks them)."""
    mode = m.get("cid_mode", "layout")
    cid_len = m.get("cid_len", 0)
    if not isinstance(mode, str):
        raise _Refused("bad_request", f'register: "cid_mode" must be "layout" or "learned", '
                       f"got {render(mode)}")
    if isinstance(cid_len, bool) or not isinstance(cid_len, int):
        raise _Refused("bad_request", f'register: "cid_len" must be an integer, got '
                       f"{render(cid_len)}")
    if mode == "layout" and "cid_len" in m:
        raise _Refused("bad_request", 'register: "cid_len" is only for "cid_mode": "learned" '
                       "(layout mode issues the layout's CIDs)")
    return Steering(mode, cid_len) if mode != "layout" else LAYOUT
