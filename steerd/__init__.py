"""steerd: one UDP port, many QUIC servers, steered by ALPN and server name."""

__version__ = "0.1.0"
