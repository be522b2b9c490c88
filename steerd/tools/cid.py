"""``steerd cid decode HEX [-c CONFIG]``: what a connection ID says, read in this host's layout.

Why: behind a load balancer the question "why did this packet reach that host (or none)?"
is answered by the CID's bytes: its config rotation, host ID and slot, and how the balancer
profile named in ``[cid] balancer`` reads them. An operator copies a DCID from a capture or a
log and gets every field, the balancer's reading, and whether this host owns it, with no
arithmetic by hand. Any CID decodes, ours or not: a foreign or stale one is exactly the case
worth looking at. The config is found the way ``steerd run`` finds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from quic.cid import CidLayout
from quic.packet import MAX_CID_LEN
from steerd.daemon.config import DEFAULT_CONFIG_PATH, ConfigError, cli_config


class CidHexError(ValueError):
    """A command-line CID that is not 1..20 bytes of hex; ``str()`` is the whole message."""


def parse_hex(text: str) -> bytes:
    """A CID as an operator pastes it: hex digits, optionally with a 0x prefix."""
    digits = text[2:] if text.lower().startswith("0x") else text
    try:
        cid = bytes.fromhex(digits)
    except ValueError:
        cid = b""
    if not 1 <= len(cid) <= MAX_CID_LEN:
        raise CidHexError(
            f"not a connection ID: {json.dumps(text)} (want 1..{MAX_CID_LEN} bytes as hex "
            "digits, e.g. 07c4605e4504cc4f)"
        )
    return cid


def describe(layout: CidLayout, cid: bytes) -> dict[str, Any]:
    """Every field of ``cid`` in ``layout``'s positions, the balancer's reading and the
    verdict, as one JSON-ready mapping (the text output prints it line by line)."""
    f = layout.split(cid)
    length_ok = f.length_bits is not None and f.length_bits + 1 == len(cid)
    if f.owned:
        verdict = "yes"
    elif f.config_rotation != layout.config_id:
        verdict = f"no: config rotation {f.config_rotation}, this host uses {layout.config_id}"
    elif not length_ok or len(cid) != layout.cid_len:
        verdict = f"no: {len(cid)} bytes, this host's CIDs have {layout.cid_len}"
    else:
        verdict = f"no: host ID {f.host_id}, this host is {layout.host_id}"
    return {
        "cid": cid.hex(),
        "length": len(cid),
        "config_rotation": f.config_rotation,
        "length_bits": f.length_bits,
        "length_bits_match": length_ok,
        "host_id": f.host_id,
        "slot": f.slot,
        "nonce": f.nonce.hex(),
        "balancer": layout.balancer_reading(cid),
        "owned": f.owned,
        "verdict": verdict,
    }


def _text(d: dict[str, Any], layout: CidLayout) -> list[str]:
    def field(value: int | None, size: int) -> str:
        if size == 0:
            return "none (host_id_len 0)"
        return "(CID too short)" if value is None else f"{value} (0x{value:0{2 * size}x})"

    return [
        f"cid: {d['cid']} ({d['length']} bytes)",
        f"config rotation: {d['config_rotation']}",
        f"length bits: {d['length_bits']} ("
        + ("matches" if d["length_bits_match"] else "does not match") + " the length)",
        f"host ID: {field(d['host_id'], layout.host_id_len)}",
        f"slot: {field(d['slot'], layout.slot_len)}",
        f"nonce: {d['nonce'] or '(none)'}",
        f"balancer: {d['balancer']}",
        f"this host: {d['verdict']}",
    ]


def _decode(args: argparse.Namespace) -> int:
    try:
        cid = parse_hex(args.hex)
        layout = cli_config(args.config).cid
    except (CidHexError, ConfigError) as e:
        print(f"steerd cid decode: {e}", file=sys.stderr)
        return 1
    d = describe(layout, cid)
    if args.json:
        print(json.dumps(d))
    else:
        print("\n".join(_text(d, layout)))
    return 0


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``steerd cid decode HEX``."""
    p = subparsers.add_parser("cid", help="connection ID tools")
    sub = p.add_subparsers(dest="cid_command", required=True, metavar="CID_COMMAND")
    d = sub.add_parser(
        "decode", help="take a connection ID apart in this host's [cid] layout",
        description="Print a CID's config rotation, length bits, host ID, slot and nonce, how "
        "the [cid] balancer profile reads it, and whether this host owns it.",
    )
    d.add_argument("hex", metavar="HEX", help="the CID in hex, e.g. 07c4605e4504cc4f")
    d.add_argument("--config", "-c", default=None,
                   help=f"TOML config (default {DEFAULT_CONFIG_PATH} if it exists, "
                        "else the embedded defaults)")
    d.add_argument("--json", action="store_true", help="one JSON object instead of text")
    d.set_defaults(func=_decode)
