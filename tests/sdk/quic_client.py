"""The aioquic/qh3 client session now lives in the product (steerd/quicclient.py: the demo
uses it); this keeps bench scripts that put tests/sdk on sys.path working, and the
``quic_client.py load ...`` command line."""

import sys

from steerd.quicclient import RequestFailed, Session, main, one_request

__all__ = ["RequestFailed", "Session", "main", "one_request"]

if __name__ == "__main__":
    sys.exit(main())
