"""The ``steerd`` command line.

Each sub-command lives in its own module with ``add_command(subparsers)``, which registers a
parser whose ``func(args) -> int`` does the work; this file only wires them together, so
sub-commands can be added without touching each other.
"""

import argparse
import importlib
import sys

COMMAND_MODULES: tuple[str, ...] = (
    "steerd.tools.classify",  # steerd classify FILE
    "steerd.tools.doctor",  # steerd doctor
    "steerd.tools.cid",  # steerd cid decode HEX
    "steerd.tools.lbconfig",  # steerd lb-config HOSTS_FILE
    "steerd.daemon.config",  # steerd check-config FILE
    "steerd.daemon.service",  # steerd run, steerd status, steerd purge
    "steerd.app.exec",  # steerd exec -- CMD (sockets passed systemd-style)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerd", description="QUIC ALPN steering for Linux")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
