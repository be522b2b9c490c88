"""The ``steerd`` command line."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; sub-commands register themselves in ``build_parser``."""
    parser = argparse.ArgumentParser(prog="steerd")
    parser.add_subparsers(dest="command", required=True)
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
