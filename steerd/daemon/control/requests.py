"""One request: rate and size checks, decoding, the op's dispatch to its ``_op_*`` handler
(register.py, ops.py), and every failure turned into a refusal reply."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from steerd.app.protocol import (
    OPS,
    SCM_MAX_FD,
)
from steerd.daemon.closer import is_socket
from steerd.daemon.config import render
from steerd.daemon.control.connections import _Connection
from steerd.daemon.registry import RegistryError


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestsMixin:
    """Request decoding and dispatch of :class:`~steerd.daemon.control.ControlServer`."""

    # The state it uses, made in ControlServer.__init__ (server.py): config, metrics, clock,
    # _max_message.

    def _handle(
        self, conn: _Connection, data: bytes, flags: int
    ) -> tuple[bytes, list[int], list[socket.socket]]:
        """One request -> (reply bytes, FDs to attach, sockets to close after sending).

        The steps run in this order, and the first to refuse names the reason: cheap checks
        before decoding, decoding before dispatch. A refusal carries as much of the request
        as was understood by then (its id, then its op)."""
        op: str | None = None
        rid: str | int | None = None
        try:
            self._check_rate(conn)
            self._check_size(data, flags)
            message = self._decode(data)
            rid = self._request_id(message)
            op = self._request_op(message)
            self._check_fds(op, message, conn.request_fds)
            if self.metrics is not None:
                self.metrics.control_messages.labels(op).inc()
            body, fds, cleanup = getattr(self, f"_op_{op}")(conn, message)
        except Exception as e:  # every failure becomes a reply: see _refusal
            return self._refusal(op, rid, e), [], []
        reply = {"ok": True, "op": op, **({"id": rid} if rid is not None else {}), **body}
        return json.dumps(reply).encode(), fds, cleanup

    # The steps of _handle.

    def _check_rate(self, conn: _Connection) -> None:
        """One app must not be able to keep the daemon's single event loop busy: each
        connection gets its own token bucket, checked before any work is spent on the
        message."""
        if not conn.bucket.take(self.clock()):
            limits = self.config.limits
            raise _Refused(
                "rate_limited",
                f"rate limit: at most {limits.control_rate:g} messages per second "
                f"(burst {limits.control_burst})",
            )

    def _check_size(self, data: bytes, flags: int) -> None:
        """A truncated message must be refused, not parsed: its tail, and any file
        descriptors the kernel dropped, would otherwise go missing without a word."""
        if flags & socket.MSG_TRUNC or len(data) > self._max_message:
            raise _Refused(
                "too_large", f"message too large: the limit is {self._max_message} bytes"
            )
        if flags & socket.MSG_CTRUNC:
            raise _Refused(
                "unexpected_fds",
                f"unexpected file descriptors: too many, at most {SCM_MAX_FD} per request",
            )

    @staticmethod
    def _decode(data: bytes) -> dict[str, Any]:
        """Any peer may send anything: every way ``json.loads`` can fail becomes a refusal
        saying why, so that a hostile message costs a reply and never the daemon."""
        try:
            message = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise _Refused("bad_json", "invalid JSON: not UTF-8") from None
        except json.JSONDecodeError as e:
            raise _Refused("bad_json", f"invalid JSON: {e.msg} at byte {e.pos}") from None
        except RecursionError:
            raise _Refused("bad_json", "invalid JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer past Python's digit limit
            raise _Refused("bad_json", f"invalid JSON: {e}") from None
        if not isinstance(message, dict):
            raise _Refused(
                "bad_message",
                f"a request must be a JSON object, got {type(message).__name__}",
            )
        return message

    @staticmethod
    def _request_id(message: Mapping[str, Any]) -> str | int | None:
        """The id an app matches replies by; it is echoed in every reply from here on, so
        it must be something an app can compare (not a list, an object or a boolean)."""
        raw_id = message.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
            raise _Refused("bad_message", f'"id" must be a string or integer, got '
                           f"{render(raw_id)}")
        return raw_id

    @staticmethod
    def _request_op(message: Mapping[str, Any]) -> str:
        """The op picks the ``_op_*`` handler by name, so only the known ones may pass."""
        raw_op = message.get("op")
        if not isinstance(raw_op, str) or raw_op not in OPS:
            raise _Refused(
                "unknown_op", f"unknown op {render(raw_op)} (known: {', '.join(OPS)})"
            )
        return raw_op

    @staticmethod
    def _check_fds(op: str, message: Mapping[str, Any], fds: Sequence[int]) -> None:
        """Sockets come in with one request only, a resume proving which slots it holds, and
        nothing but sockets: any other descriptor, or any with another op, is refused so that
        an app learns its mistake instead of the daemon quietly closing what it sent (the
        closer does that, off the loop, whatever the verdict). Sockets are told apart by the
        socket layer, not fstat, which on a FUSE file would wait for its server."""
        if fds and not (op == "register" and "resume" in message):
            raise _Refused(
                "unexpected_fds",
                f"unexpected file descriptors: only a register with \"resume\" carries "
                f"them, got {len(fds)}",
            )
        for i, fd in enumerate(fds):
            if not is_socket(fd):
                raise _Refused(
                    "unexpected_fds",
                    f"unexpected file descriptors: a resume carries only sockets, descriptor "
                    f"{i} is not one",
                )

    def _refusal(self, op: str | None, rid: str | int | None, e: Exception) -> bytes:
        """Every failure is answered and counted, and the daemon keeps serving: a bug or a
        data-plane failure in one request must not take the control socket down for every
        app. A registry refusal gets the op put in front, as the registry cannot know which
        op asked (the server's own refusals name theirs)."""
        if isinstance(e, _Refused):
            self._error(e.reason)
            return self._encode(op, rid, e.reason, str(e))
        if isinstance(e, RegistryError):
            self._error(e.reason)
            return self._encode(op, rid, e.reason, f"{op}: {e}")
        self._error("internal_error")
        return self._encode(
            op, rid, "internal_error", f"{op}: internal error: {type(e).__name__}: {e}"
        )

    @staticmethod
    def _fields(op: str, message: Mapping[str, Any], allowed: tuple[str, ...],
                required: tuple[str, ...]) -> None:
        known = ("id", "op", *allowed)
        for key in message:
            if key not in known:
                raise _Refused(
                    "bad_message",
                    f"{op}: unknown field {render(key)} (known: {', '.join(sorted(known))})",
                )
        for key in required:
            if key not in message:
                raise _Refused("bad_message", f"{op}: missing field {render(key)}")

    @staticmethod
    def _encode(op: str | None, rid: str | int | None, reason: str, message: str) -> bytes:
        reply: dict[str, Any] = {"ok": False, "op": op}
        if rid is not None:
            reply["id"] = rid
        reply.update(reason=reason, error=message)
        return json.dumps(reply).encode()

    def _error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.control_errors.labels(reason).inc()
