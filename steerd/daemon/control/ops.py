"""The other ops of an app's connection: ``deregister``, ``drain``, ``load``, ``status``."""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from typing import Any

from steerd.daemon.config import render
from steerd.daemon.control.connections import _Connection
from steerd.daemon.control.requests import _Refused


class OpsMixin:
    """deregister, drain, load and status of :class:`~steerd.daemon.control.ControlServer`."""

    # The state it uses, made in ControlServer.__init__ (server.py): registry, sink,
    # status_extra, on_load, _conns.

    def _app_of(self, op: str, m: Mapping[str, Any]) -> str:
        app = m["app"]
        if not isinstance(app, str):
            raise _Refused("bad_request", f'{op}: "app" must be a string, got {render(app)}')
        return app

    def _op_deregister(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("deregister", m, ("app",), ("app",))
        app = self._app_of("deregister", m)
        freed = self.registry.deregister(app, conn.id)
        self._release(freed)
        self._update_gauges()
        return {"app": app, "slots": sorted(freed)}, [], []

    def _op_drain(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("drain", m, ("app",), ("app",))
        app = self._app_of("drain", m)
        gens = self.registry.drain(app, conn.id)
        self._update_gauges()
        return {"app": app, "generations": [g.number for g in gens]}, [], []

    def _op_load(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("load", m, ("app", "workers"), ("app", "workers"))
        app = self._app_of("load", m)
        reports = m["workers"]
        bad = _Refused(
            "bad_request",
            'load: "workers" must be a list of {"slot": integer, "load": number >= 0}, got '
            f"{render(reports)}",
        )
        if not isinstance(reports, list):
            raise bad
        loads: dict[int, float] = {}
        for r in reports:
            if not isinstance(r, dict) or set(r) != {"slot", "load"}:
                raise bad
            slot, load = r["slot"], r["load"]
            if (
                isinstance(slot, bool) or not isinstance(slot, int)
                or isinstance(load, bool) or not isinstance(load, int | float)
                or not 0 <= load < math.inf
            ):
                raise bad
            loads[slot] = float(load)
        self.registry.report_load(app, conn.id, loads)
        if self.on_load is not None:
            self.on_load()
        return {"app": app}, [], []

    def _op_status(self, conn: _Connection, m: Mapping[str, Any]) -> tuple[
        dict[str, Any], list[int], list[socket.socket]
    ]:
        self._fields("status", m, (), ())
        status = self.registry.status(viewer_uid=conn.peer.uid)  # a tenant sees its own apps
        for app in status["apps"]:
            for gen in app["generations"]:
                for w in gen["workers"]:
                    w["steering"] = self.sink.steering_stats(w["slot"])
        status["control_connections"] = len(self._conns)
        if self.status_extra is not None:
            status.update(self.status_extra())
        return {"status": status}, [], []
