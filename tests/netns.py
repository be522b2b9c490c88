"""The namespace pair now lives in the product (steerd/netns.py: the demo builds one too);
this keeps the tests' and benches' ``from tests.netns import ...`` working."""

from steerd.netns import (
    CLIENT_V4,
    CLIENT_V6,
    LIVE,
    NETNS_PREFIX,
    SERVER_V4,
    SERVER_V6,
    NetnsPair,
    ip,
    list_netns,
    netns_pair,
)

__all__ = ["CLIENT_V4", "CLIENT_V6", "LIVE", "NETNS_PREFIX", "SERVER_V4", "SERVER_V6",
           "NetnsPair", "ip", "list_netns", "netns_pair"]
