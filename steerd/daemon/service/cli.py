"""``steerd run``, ``steerd purge`` and ``steerd status``: the command line of the daemon."""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from steerd.app.client import ControlClient
from steerd.app.protocol import DEFAULT_CONTROL_PATH, ControlError
from steerd.daemon.config import DEFAULT_CONFIG_PATH, Config, ConfigError, cli_config
from steerd.daemon.dataplane import Dataplane, DataplaneConfig, DataplaneError
from steerd.daemon.dataplane.jail import remove_jail
from steerd.daemon.dataplane.learn import (
    remove_learner,
)
from steerd.daemon.dataplane.maps import DEFAULT_PIN_DIR
from steerd.daemon.dataplane.unicast import remove_unicast_filter
from steerd.daemon.service.daemon import Daemon
from steerd.daemon.service.files import _lock_path, claims_path, lock_pin_dir, reset_key_path
from steerd.daemon.watchdog import notify

log = logging.getLogger("steerd")


def _run(args: Any) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="steerd: %(message)s")
    try:
        config = cli_config(args.config)
    except ConfigError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        daemon = Daemon(config, pin_dir=args.pin_dir)
        await daemon.start()
        groups = ", ".join(f"{g.address}:{config.listen.port}" for g in daemon.groups)
        log.info("serving %s; control %s; metrics %s", groups, config.control.path,
                 daemon.metrics_address)
        # The line tests and scripts wait for: everything is listening from here on.
        print("steerd: ready", flush=True)
        notify("READY=1")  # systemd's Type=notify: started; WATCHDOG=1 pings follow each tick
        await daemon.serve_forever()

    try:
        asyncio.run(main())
    except DataplaneError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 1
    return 0


def purge(config: Config, pin_dir: str) -> list[str]:
    """Remove everything a stopped daemon leaves for its successor: the guard on the
    configured interfaces, the pinned maps and programs, the reset key. Established
    connections of apps still running lose their steering (new datagrams are hashed by the
    kernel); run it when steerd is to go away, not between restarts. Returns what it did."""
    lock = lock_pin_dir(pin_dir)  # refuses while a daemon serves this pin dir
    try:
        return _purge_locked(config, pin_dir)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(pin_dir))
        os.close(lock)


    # takes no "." in names


def _purge_locked(config: Config, pin_dir: str) -> list[str]:
    done: list[str] = remove_jail(pin_dir) + remove_unicast_filter(pin_dir)
    # Every group this pin dir holds, also of addresses the config no longer lists (and the
    # g<N> directories of versions that keyed groups by position).
    groups = sorted(p for p in Path(pin_dir).glob("g*") if p.is_dir()) if os.path.isdir(
        pin_dir) else []
    for group_dir in groups:
        dp = Dataplane(DataplaneConfig(layout=config.cid, pin_dir=str(group_dir)))
        for ifname in config.xdp.interfaces:  # only the group that attached it has its pin
            with contextlib.suppress(OSError):
                done += [f"{kind} guard off {ifname}"
                         for kind in dp.remove_pinned_guard(ifname)]
        if remove_learner(str(group_dir)):
            done.append(f"detached the learned-mode egress program of {group_dir}")
        shutil.rmtree(group_dir)
        done.append(f"removed {group_dir}")
    with contextlib.suppress(OSError):
        os.rmdir(pin_dir)  # only when empty: never another tool's pins
    for path in (reset_key_path(config), claims_path(config)):
        if os.path.exists(path):
            os.unlink(path)
            done.append(f"removed {path}")
    return done


def _purge(args: Any) -> int:
    try:
        config = cli_config(args.config)
    except ConfigError as exc:
        print(f"steerd: {exc}", file=sys.stderr)
        return 2
    try:
        done = purge(config, args.pin_dir)
    except OSError as exc:
        print(f"steerd purge: {exc}", file=sys.stderr)
        return 1
    for line in done or ["nothing to remove"]:
        print(line)
    return 0


def _status(args: Any) -> int:
    try:
        with ControlClient(args.control or DEFAULT_CONTROL_PATH) as client:
            status = client.status()
    except (OSError, ControlError) as exc:
        print(f"steerd: cannot reach the daemon at {args.control or DEFAULT_CONTROL_PATH}: "
              f"{exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The human table of ``steerd status``: apps and generations, then counters."""
    lines = [f"listen: {', '.join(status.get('listen', []))} port {status.get('port')}"]
    lines.append(f"pending first flights: {status.get('pending_connections', 0)} "
                 f"({status.get('pending_bytes', 0)} bytes)")
    if status.get("protection"):
        watch = status.get("watchdog", {})
        done = ", ".join(f"{k}={v}" for k, v in sorted(watch.get("repairs", {}).items()))
        evicted = ", ".join(f"{k}={v}" for k, v in sorted(watch.get("evictions", {}).items()))
        lines.append(f"protection: {status['protection']}"
                     + (f"; repaired {done}" if done else "")
                     + (f"; evicted {evicted}" if evicted else ""))
    lines.append("")
    lines.append(f"{'APP':<16} {'GEN':>4} {'STATE':<9} {'ALPN':<16} {'SERVER NAMES':<24} "
                 f"{'CIDS':<10} WORKERS")
    for app in status.get("apps", []):
        for gen in app.get("generations", []):
            workers = " ".join(str(w.get("slot")) for w in gen.get("workers", []))
            mode = gen.get("cid_mode", "layout")
            if mode == "learned":
                mode = f"learned/{gen.get('cid_len')}"
            lines.append(
                f"{app.get('app', ''):<16} {gen.get('generation', ''):>4} "
                f"{gen.get('state', ''):<9} {','.join(gen.get('alpn', [])):<16} "
                f"{','.join(gen.get('server_names', [])):<24} {mode:<10} {workers}"
            )
            steering: dict[str, int] = {}
            for w in gen.get("workers", []):
                for k, v in w.get("steering", {}).items():
                    steering[k] = steering.get(k, 0) + v
            if steering:
                lines.append("    " + " ".join(f"{k}={v}" for k, v in sorted(steering.items())))
    counters = status.get("counters", {})
    if counters:
        lines.append("")
        lines.append("data plane counters:")
        width = max(len(k) for k in counters)
        lines.extend(f"  {k:<{width}} {v}" for k, v in sorted(counters.items()) if v)
    if status.get("retry_mode"):
        lines.append(f"Retry mode: on in {status['retry_mode']} classifier(s)")
    drops = status.get("classifier_drops", {})
    if drops:
        lines.append("classifier drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


def add_command(subparsers: Any) -> None:
    """``steerd run``, ``steerd purge`` and ``steerd status``."""
    p = subparsers.add_parser("run", help="run the daemon (as root)")
    p.add_argument("--config", "-c", default=None,
                   help=f"TOML config (default {DEFAULT_CONFIG_PATH} if it exists, "
                        "else the embedded defaults)")
    p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help="bpffs directory for maps/programs")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=_run)
    u = subparsers.add_parser(
        "purge", help="remove the pinned data plane and guard a stopped daemon leaves behind")
    u.add_argument("--config", "-c", default=None,
                   help=f"the config the daemon ran with (default {DEFAULT_CONFIG_PATH} if it "
                        "exists, else the embedded defaults)")
    u.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    u.set_defaults(func=_purge)
    s = subparsers.add_parser("status", help="apps, generations, workers and counters")
    s.add_argument("--control", default=None, help="control socket path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)
