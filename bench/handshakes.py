"""Benchmark: completed QUIC handshakes per second through steerd against the same aioquic
server bound directly to its port, in one run.

    .venv/bin/python bench/handshakes.py [--workers 1] [--seconds 5] [--rounds 3]
                                         [--parallel 3] [--stack qh3|aioquic] [--json]

Why this comparison: steerd adds work to the first flight of every connection (steering
program -> classifier socket -> daemon: decrypt, parse, decide, route, raw re-injection ->
steering program -> worker), and a handshake-bound server (aioquic spends milliseconds of CPU
per handshake) is where that cost would show. Issue 5's target: steerd at least 0.9 of direct.

Set-up (root): a client and a server namespace joined by veth (deploy/netns.py). In the server
namespace, in the same run:
- steerd: ``steerd run`` owns UDP 4433 on the server address; the HTTP/3 demo site
  (deploy/apps/h3site.py, steerd.app.sdk) registers with W workers and gets its sockets;
- direct: the same h3site with W workers, on W SO_REUSEPORT sockets bound directly to UDP 4434
  (no steerd: the kernel's 4-tuple hash spreads connections). This script binds them and
  execs h3site with them the way ``steerd exec`` does (steerd.exec.exec_with_sockets), so the
  server code is identical.
The load generator runs in the client namespace: ``--parallel`` client processes (qh3: its
TLS runs in Rust and its ClientHello, with an X25519MLKEM768 key share, takes two datagrams,
the case browsers produce; or aioquic: one datagram), each doing handshakes back to back on
fresh sockets: connect, handshake complete, close. (ngtcp2's gtlsclient was tried first: at
~20 ms of client CPU per process start it was the bottleneck, so it is not used.) Modes
alternate round by round so machine noise hits both alike.

Reported per mode (medians over rounds): completed handshakes/s (the issue's ratio,
steerd/direct), and the server-side CPU per handshake, read from /proc for each server
process group (workers, and in steerd mode the daemon): a capacity ratio that the client's
share of the CPUs cannot distort. On a small machine the clients, workers and daemon share
the cores, so the throughput ratio also carries the daemon's CPU taken from the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.netns import netns_pair  # noqa: E402
from quic.cid import CidLayout  # noqa: E402
from steerd.app.exec import environment, exec_with_sockets  # noqa: E402
from steerd.app.protocol import Registration  # noqa: E402
from steerd.daemon.dataplane.netns import netns_path  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
STEERD = str(ROOT / ".venv" / "bin" / "steerd")
H3SITE = str(ROOT / "deploy" / "apps" / "h3site.py")
STEERD_PORT, DIRECT_PORT = 4433, 4434


def _direct(args: argparse.Namespace) -> int:
    """Internal: bind W reuseport sockets on the port and become h3site serving them."""
    socks = []
    for _ in range(args.workers):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((args.address, args.port))
        socks.append(s)
    layout = CidLayout()
    reg = Registration(
        app="direct", generation=1,
        workers=[{"slot": i, "server_id": i.to_bytes(2, "big").hex(),
                  "reset_key": os.urandom(32).hex(),
                  "sockets": [{"address": args.address, "port": args.port, "fd_index": i}]}
                 for i in range(args.workers)],
        sockets=socks, layout=layout, reply={},
    )
    env, ordered = environment(reg)
    cmd = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    exec_with_sockets(cmd, env, ordered)
    return 127  # not reached


def _load(args: argparse.Namespace) -> int:
    """Internal (client namespace): ``parallel`` client processes doing handshakes back to back
    for ``seconds``; each connection is a fresh socket, a full handshake, then a close."""
    from deploy.quicclient import RequestFailed, Session

    end = time.monotonic() + args.seconds
    pipes = []
    for _ in range(args.parallel):
        r, w = os.pipe()
        if os.fork() == 0:
            os.close(r)
            ok = failed = 0
            while time.monotonic() < end:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s = Session(args.stack, sock, (args.host, args.port), "h3", timeout=5.0)
                try:
                    s.handshake()
                    ok += 1
                except (RequestFailed, OSError):
                    failed += 1
                finally:
                    s.close()
            os.write(w, f"{ok} {failed}".encode())
            os._exit(0)
        os.close(w)
        pipes.append(r)
    start = time.monotonic()
    ok = failed = 0
    for r in pipes:
        a, b = os.read(r, 100).split()
        ok, failed = ok + int(a), failed + int(b)
        os.close(r)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    elapsed = max(time.monotonic(), end) - start
    print(json.dumps({"ok": ok, "failed": failed, "seconds": elapsed}), flush=True)
    return 0


def _group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group, plus
    what their reaped children used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp) is index 2 after the command
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def _line(proc: subprocess.Popen[str], want: str, timeout: float) -> dict[str, Any]:
    """Read stdout lines until one contains ``want`` (JSON lines are parsed)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if want in line:
            return json.loads(line) if line.startswith("{") else {"line": line}
    raise RuntimeError(f"no {want!r} line from {proc.args}")


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """Apps first (they drain over the control socket), the daemon last."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="steerd-bench-hs-"))
    procs: list[subprocess.Popen[str]] = []
    pin_dir = f"/sys/fs/bpf/steerd-bench-hs-{uuid.uuid4().hex[:8]}"
    try:
        with netns_pair("h") as pair:
            server = ["nsenter", f"--net={netns_path(pair.server)}"]
            conf = work / "steerd.toml"
            conf.write_text(f"""
[listen]
addresses = ["{pair.server_v4}"]
port = {STEERD_PORT}
[control]
path = "{work / 'control.sock'}"
[metrics]
enabled = false
[[acl]]
uids = [0]
alpn = ["*"]
server_names = ["*"]
""")
            daemon = subprocess.Popen(
                [*server, STEERD, "run", "-c", str(conf), "--pin-dir", pin_dir],
                stdout=subprocess.PIPE, stderr=open(work / "daemon.log", "w"), text=True,
                start_new_session=True,
            )
            procs.append(daemon)
            _line(daemon, "ready", 60)
            via = subprocess.Popen(
                [*server, PYTHON, H3SITE, "--control", str(work / "control.sock"),
                 "--cert-dir", str(work / "cert-steerd"), "--workers", str(args.workers)],
                stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT,
            )
            procs.append(via)
            _line(via, '"ready"', 30)
            direct = subprocess.Popen(
                [*server, PYTHON, __file__, "_direct", "--address", pair.server_v4,
                 "--port", str(DIRECT_PORT), "--workers", str(args.workers), "--",
                 PYTHON, H3SITE, "--cert-dir", str(work / "cert-direct")],
                stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT,
            )
            procs.append(direct)
            _line(direct, '"ready"', 30)

            results: dict[str, list[dict[str, Any]]] = {"direct": [], "steerd": []}
            for _ in range(args.rounds):
                for mode, port in (("direct", DIRECT_PORT), ("steerd", STEERD_PORT)):
                    groups = [direct] if mode == "direct" else [daemon, via]
                    cpu0 = [_group_cpu(g.pid) for g in groups]
                    out = subprocess.run(
                        ["nsenter", f"--net={netns_path(pair.client)}", PYTHON, __file__,
                         "_load", "--host", pair.server_v4, "--port", str(port),
                         "--seconds", str(args.seconds), "--parallel", str(args.parallel),
                         "--stack", args.stack],
                        capture_output=True, text=True, timeout=args.seconds + 60, check=True,
                    ).stdout
                    r = json.loads(out)
                    cpu = [_group_cpu(g.pid) - c for g, c in zip(groups, cpu0, strict=True)]
                    r["rate"] = r["ok"] / r["seconds"]
                    r["server_cpu_ms"] = 1000 * sum(cpu) / max(r["ok"], 1)
                    r["daemon_cpu_ms"] = 1000 * cpu[0] / max(r["ok"], 1) if mode == "steerd" else 0

                    results[mode].append(r)
                    if not args.json:
                        print(f"  {mode:7s} {r['rate']:8.1f} handshakes/s "
                              f"({r['ok']} ok, {r['failed']} failed), server CPU "
                              f"{r['server_cpu_ms']:.2f} ms/handshake (daemon "
                              f"{r['daemon_cpu_ms']:.2f})", flush=True)
            _stop(procs)
            codes = [p.returncode for p in procs]
            # a stopped daemon leaves its data plane for the next run; purge removes it
            purged = subprocess.run(
                [*server, STEERD, "purge", "-c", str(conf), "--pin-dir", pin_dir],
                capture_output=True, text=True, timeout=60,
            )
            codes.append(purged.returncode)
            if any(codes):
                log = (work / "daemon.log").read_text()[-3000:]
                raise RuntimeError(f"unclean stop: exit codes {codes}; daemon log:\n{log}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if os.path.exists(pin_dir):  # a failed run: purge detaches the jail and the learner
            # (at the cgroup root: no namespace needed, and the pair is gone by now)
            subprocess.run([STEERD, "purge", "-c", str(work / "steerd.toml"), "--pin-dir",
                            pin_dir], capture_output=True, timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
    med = {m: statistics.median(r["rate"] for r in rs) for m, rs in results.items()}
    cost = {m: statistics.median(r["server_cpu_ms"] for r in rs) for m, rs in results.items()}
    return {
        "stack": args.stack, "direct_cpu_ms": cost["direct"], "steerd_cpu_ms": cost["steerd"],
        "daemon_cpu_ms": statistics.median(r["daemon_cpu_ms"] for r in results["steerd"]),
        "cpu_ratio": cost["direct"] / cost["steerd"] if cost["steerd"] else 0.0,
        "workers": args.workers, "parallel": args.parallel, "seconds": args.seconds,
        "rounds": args.rounds, "direct_hs_per_s": med["direct"], "steerd_hs_per_s": med["steerd"],
        "ratio": med["steerd"] / med["direct"] if med["direct"] else 0.0,
        "failed": {m: sum(r["failed"] for r in rs) for m, rs in results.items()},
        "exit_codes": codes, "runs": results,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd_name")
    d = sub.add_parser("_direct")
    d.add_argument("--address", required=True)
    d.add_argument("--port", type=int, required=True)
    d.add_argument("--workers", type=int, required=True)
    d.add_argument("cmd", nargs=argparse.REMAINDER)
    g = sub.add_parser("_load")
    g.add_argument("--host", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--seconds", type=float, required=True)
    g.add_argument("--parallel", type=int, required=True)
    g.add_argument("--stack", default="qh3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=3, help="client processes")
    p.add_argument("--stack", default="qh3", choices=["qh3", "aioquic"], help="client stack")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.cmd_name == "_direct":
        return _direct(args)
    if args.cmd_name == "_load":
        return _load(args)
    result = bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"workers {result['workers']}, {result['parallel']} {result['stack']} client "
              f"processes, "
              f"{result['rounds']} rounds of {result['seconds']}s per mode")
        print(f"direct  {result['direct_hs_per_s']:8.1f} handshakes/s (median)")
        print(f"steerd  {result['steerd_hs_per_s']:8.1f} handshakes/s (median)")
        print(f"ratio   {result['ratio']:.3f}   failed: {result['failed']}")
        print(f"server CPU per handshake: direct {result['direct_cpu_ms']:.2f} ms, steerd "
              f"{result['steerd_cpu_ms']:.2f} ms (daemon {result['daemon_cpu_ms']:.2f}); "
              f"capacity ratio {result['cpu_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
