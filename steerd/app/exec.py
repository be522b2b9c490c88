"""``steerd exec``: put a QUIC server that is not written against the SDK behind steerd.

::

    steerd exec --app NAME --alpn ALPN [--alpn ...] [--server-name N ...] [--workers N]
                [--control PATH] [--replace] [--cid-mode layout|learned] [--cid-len N]
                -- CMD [ARG ...]

registers NAME over the control socket, then runs CMD with the worker sockets passed the
systemd way (sd_listen_fds(3)), so any server that supports socket activation can serve them.
``steerd exec`` stays CMD's parent: its control connection is the app's registration (closing
it withdraws the app's routes), so it must live exactly as long as CMD.

What CMD gets:

===================== ====================================================================
fds 3 .. 3+N-1        the worker sockets (UDP, bound to the shared port, in the reuseport
                      group): for each worker in STEERD_WORKER_SLOTS order, one socket per
                      daemon listen address, in the daemon's address order
LISTEN_FDS            N
LISTEN_PID            CMD's own pid (set in the child, after fork, before exec)
LISTEN_FDNAMES        ``:``-separated names, one per fd: ``slot<SLOT>-<i>`` (i: address index)
STEERD_APP            the app name
STEERD_GENERATION     the generation number this registration started
STEERD_WORKER_SLOTS   ``,``-separated worker slots, e.g. ``4,5``
STEERD_SOCKETS        JSON list, one object per fd: {"fd", "slot", "server_id" (hex),
                      "address", "port", "reset_key" (hex: that slot's key)}
STEERD_CID_LAYOUT     JSON {"config_id", "host_id", "host_id_len", "slot_len", "nonce_len",
                      "cid_len"}: every CID a worker issues must be the QUIC-LB plaintext
                      layout of quic/cid.py: first octet (config_id << 5 | cid_len - 1),
                      host_id (host_id_len bytes), the worker's slot (slot_len bytes,
                      big-endian), nonce_len random bytes (layout mode)
STEERD_CID_MODE       ``layout`` or ``learned``: the mode registered (``--cid-mode``)
===================== ====================================================================

Two CID modes. ``layout`` (the default and the best): CMD issues every CID in the layout
above, so steering is stateless, survives migration, and steerd can reset the clients of a
worker that died. ``learned`` (``--cid-mode learned --cid-len N``): CMD picks its own random
CIDs, all N bytes long (8 for aioquic, qh3 and hypercorn), and the kernel learns them, and
the client addresses CMD serves, from CMD's own packets (bpf/learn.c). This runs servers
nobody wrote for steerd unchanged, e.g. ``steerd exec --app web --alpn h3 --cid-mode
learned --cid-len 8 -- hypercorn --quic-bind fd://3 app:app``; it gives up migration to a
new CID, steerd's resets and steerd's Retry (docs/DATAPLANE.md, "Learned mode").
``steerd exec`` watches its app's per-slot statistics in ``steerd status`` and says once, on
stderr, when CMD's packets show it is not doing what it registered (``off_layout``: a
layout-mode server with CIDs of its own; ``wrong_length``; ``refused``; ``quota``): the one
mistake that otherwise shows only as clients that never connect.

In layout mode, the stateless-reset token advertised for a CID must be HMAC-SHA256(key, cid)[:16]
(quic/reset.py) with the ``reset_key`` of the slot the CID names, so steerd can reset the
clients of a worker that died. Each slot has its own key (derived from a master key that
stays in the daemon), so an app can reset only its own connections.

New connections only through the classifier: a long-header packet whose DCID is in the CID
layout goes straight to that slot's worker, without any ALPN, server-name or ACL decision.
So CMD must not create a connection from an Initial whose DCID is in the layout (legitimate
first Initials carry a client-chosen DCID, or the DCID of a Retry sent by steerd, which is
outside the layout); the one exception is an Initial echoing a token of CMD's own Retry
(whose SCID, in the layout, the retried Initial uses as its DCID). A Retry token of steerd's
(first byte 0x5E, quic/token.py) reaching CMD was already validated by steerd: CMD reads the
original DCID from it (``quic.token.read_retry_token``) and needs no key.

A server handling the sockets of several slots must serve each slot's sockets with CIDs of
that slot (one process or thread per slot is simplest). steerd.app.sdk's ``run`` recognises this
environment and serves it (so the demo apps also run under ``steerd exec``).

Signals: SIGTERM/SIGINT tell the daemon to drain the app (no new connections) and are passed
on to CMD as SIGTERM, which should finish its open connections and exit; SIGHUP, SIGUSR1 and
SIGUSR2 are passed on unchanged. If another process replaces the app (``--replace``), CMD gets
SIGTERM too. ``steerd exec`` exits with CMD's exit status (128+N if killed by signal N).
Under ``steerd exec`` there are no load reports: the daemon spreads new connections over
the workers round-robin.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from steerd.app.client import RESUME_RETRY, ControlClient, own_generation, resume_once
from steerd.app.protocol import (
    CID_MODES,
    DEFAULT_CONTROL_PATH,
    LAYOUT,
    ControlError,
    Registration,
    Steering,
    layout_dict,
)

FIRST_FD = 3  # SD_LISTEN_FDS_START
POLL_INTERVAL = 1.0  # seconds between checks that the generation was not replaced
_TERMINATE = (signal.SIGTERM, signal.SIGINT)
_FORWARD = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_HANDLED = {signal.SIGCHLD, *_TERMINATE, *_FORWARD}


def environment(reg: Registration) -> tuple[dict[str, str], list[socket.socket]]:
    """The variables CMD gets (all but LISTEN_PID, known only after fork) and the sockets in
    fd order."""
    socks: list[socket.socket] = []
    names: list[str] = []
    described: list[dict[str, Any]] = []
    for w in reg.workers:
        for i, (entry, sock) in enumerate(zip(w["sockets"], reg.worker_sockets(w["slot"]),
                                              strict=True)):
            described.append({
                "fd": FIRST_FD + len(socks), "slot": w["slot"], "server_id": w["server_id"],
                "address": entry["address"], "port": entry["port"],
                "reset_key": reg.reset_key_of(w["slot"]).hex(),
            })
            names.append(f"slot{w['slot']}-{i}")
            socks.append(sock)
    env = {
        "LISTEN_FDS": str(len(socks)),
        "LISTEN_FDNAMES": ":".join(names),
        "STEERD_APP": reg.app,
        "STEERD_GENERATION": str(reg.generation),
        "STEERD_WORKER_SLOTS": ",".join(str(w["slot"]) for w in reg.workers),
        "STEERD_SOCKETS": json.dumps(described),
        "STEERD_CID_LAYOUT": json.dumps(layout_dict(reg.layout)),
        "STEERD_CID_MODE": reg.steering.mode,
    }
    return env, socks


def exec_with_sockets(cmd: Sequence[str], env: dict[str, str],
                      socks: list[socket.socket]) -> None:
    """Become CMD (in a forked child, or in a launcher: exec keeps the pid, so LISTEN_PID
    is right either way) with ``socks`` at fds 3.. and ``env`` added. Never returns."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # move every socket above the target range first, so no dup2 clobbers a source
        # Python 3.11's socket.recv_fds drops MSG_CMSG_CLOEXEC, so the received originals
        # may be inheritable: make sure only the copies at 3.. reach CMD
        for s in socks:
            os.set_inheritable(s.fileno(), False)
        top = FIRST_FD + len(socks)
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, top) for s in socks]
        for i, fd in enumerate(high):
            os.dup2(fd, FIRST_FD + i, inheritable=True)
            os.close(fd)
        child_env = dict(os.environ)
        child_env.update(env)
        child_env["LISTEN_PID"] = str(os.getpid())
        os.execvpe(cmd[0], list(cmd), child_env)
    except BaseException as exc:  # never return into the parent's code
        print(f"steerd exec: cannot run {cmd[0]}: {exc}", file=sys.stderr, flush=True)
    finally:
        os._exit(127)




def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_exec(client: ControlClient, reg: Registration, cmd: Sequence[str], *,
             control: str, alpn: Sequence[str], server_names: Sequence[str]) -> int:
    """Run CMD with the registration's sockets; returns CMD's exit status."""
    env, socks = environment(reg)
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)  # handled synchronously below
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        exec_with_sockets(cmd, env, socks)
    # Keep our copies (CMD exits -> we return -> they close too): after a daemon restart we
    # present them to resume the app's slots.
    draining = False
    resuming = False
    warned: set[str] = set()

    def drain(why: str) -> None:
        nonlocal draining
        if draining:
            return
        draining = True
        print(f"steerd exec: {reg.app} draining ({why})", file=sys.stderr, flush=True)
        try:
            client.drain(reg.app)
        except (ControlError, OSError) as exc:
            print(f"steerd exec: drain request failed: {exc}", file=sys.stderr, flush=True)
        _kill(pid, signal.SIGTERM)

    while True:
        info = signal.sigtimedwait(_HANDLED, RESUME_RETRY if resuming else POLL_INTERVAL)
        if info is None:
            if resuming:
                try:
                    back = resume_once(control, reg, alpn, server_names)
                except ControlError as exc:  # refused for good: nothing to resume into
                    print(f"steerd exec: resume refused ({exc.reason}): {exc}",
                          file=sys.stderr, flush=True)
                    resuming, draining = False, True
                    _kill(pid, signal.SIGTERM)
                    continue
                if back is not None:
                    client, reg.generation, resuming = back[0], back[1].generation, False
                    print(f"steerd exec: {reg.app} resumed as generation {reg.generation}",
                          file=sys.stderr, flush=True)
                continue
            try:
                if not draining and _watch(client, reg, warned):
                    drain("replaced by a newer generation")
            except OSError:  # the daemon went away: CMD serves on; resume with the next
                client.close()
                resuming = True
            continue
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                client.close()
                reg.close()
                return _exit_status(status)
        elif info.si_signo in _TERMINATE:
            drain(f"signal {signal.Signals(info.si_signo).name}")
        else:
            _kill(pid, info.si_signo)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _watch(client: ControlClient, reg: Registration, warned: set[str]) -> bool:
    """One look at our generation in ``steerd status``: say (once per kind, on stderr) when
    the server's packets show it does not follow the CID mode it registered, which is the
    one thing that makes its clients' packets miss it without any error of its own. True if
    a newer generation replaced ours; OSError if the daemon is gone."""
    try:
        gen = own_generation(client.status(), reg.app, reg.generation)
    except ControlError:
        return False
    if gen is None:
        return False
    for line in mode_warnings(reg.app, reg.steering, gen.get("workers", [])):
        kind = line.split(":", 2)[1]
        if kind not in warned:
            warned.add(kind)
            print(f"steerd exec: {line}", file=sys.stderr, flush=True)
    return bool(gen["state"] == "draining")


def mode_warnings(app: str, steering: Steering, workers: Sequence[dict[str, Any]]) -> list[str]:
    """What the per-slot egress statistics of ``steerd status`` say is wrong, as
    ``APP: KIND: message`` lines (KIND names the problem, so each is said once)."""
    total: dict[str, int] = {}
    for w in workers:
        for name, value in w.get("steering", {}).items():
            total[name] = total.get(name, 0) + int(value)
    seen, off = total.get("egress_long", 0), total.get("egress_off_mode", 0)
    out: list[str] = []
    if off and not steering.learned:
        out.append(
            f"{app}: off_layout: {off} of the {seen} long-header packets its server sent carry "
            "a connection ID outside steerd's CID layout for its slot, so its clients' later "
            "packets cannot be steered to it: it picks its own CIDs. Issue CIDs in the layout "
            "(STEERD_CID_LAYOUT; steerd.app.sdk or python -m steerd.app.asgi do), or register with "
            "--cid-mode learned --cid-len N (N: its CID length, 8 for aioquic and qh3)")
    elif off:
        out.append(
            f"{app}: wrong_length: {off} of the {seen} long-header packets its server sent "
            f"carry a connection ID that is not {steering.cid_len} bytes long (--cid-len): "
            "those CIDs are not learned and their clients' packets cannot be steered to it")
    if total.get("egress_refused"):
        out.append(
            f"{app}: refused: {total['egress_refused']} CIDs its server issued are in "
            "steerd's CID layout or a client's first-flight DCID: never learned; in learned "
            "mode the server must pick random CIDs")
    if total.get("egress_full"):
        out.append(
            f"{app}: quota: {total['egress_full']} CIDs or client addresses were not learned: "
            "the slot's quota ([limits] learned_quota) or the table is full")
    return out


def _command(args: Any) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("steerd exec: no command given (steerd exec ... -- CMD ...)", file=sys.stderr)
        return 2
    try:
        client = ControlClient(args.control)
    except OSError as exc:
        print(f"steerd exec: cannot reach the daemon at {args.control}: {exc}", file=sys.stderr)
        return 2
    try:
        steering = Steering(args.cid_mode, args.cid_len or 0) if args.cid_mode == "learned" \
            else LAYOUT
        if args.cid_mode == "layout" and args.cid_len:
            print("steerd exec: --cid-len is for --cid-mode learned", file=sys.stderr)
            client.close()
            return 2
        reg = client.register(args.app, args.alpn, args.server_name, args.workers, args.replace,
                              steering)
    except ControlError as exc:
        client.close()
        print(f"steerd exec: register refused ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    return run_exec(client, reg, cmd, control=args.control, alpn=args.alpn,
                    server_names=args.server_name or [])


def add_command(subparsers: Any) -> None:
    """``steerd exec``."""
    p = subparsers.add_parser(
        "exec", help="register an app, then run CMD with its sockets (systemd-style)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--app", required=True)
    p.add_argument("--alpn", action="append", required=True, help="repeat for several")
    p.add_argument("--server-name", action="append", default=[],
                   help="claim only these names (repeatable; default: all names)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--control", default=DEFAULT_CONTROL_PATH)
    p.add_argument("--replace", action="store_true", help="start a new generation")
    p.add_argument("--cid-mode", choices=CID_MODES, default="layout",
                   help="layout: CMD issues CIDs in steerd's layout (stateless steering, "
                        "migration, resets); learned: CMD picks its own CIDs and the kernel "
                        "learns them from its packets")
    p.add_argument("--cid-len", type=int, default=None,
                   help="learned mode: the length of every CID CMD issues (8 for aioquic, "
                        "qh3 and hypercorn)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=_command)
