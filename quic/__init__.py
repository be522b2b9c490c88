"""Pure functions on the bytes of QUIC first flights: no sockets, no clocks read, no I/O.

Everything that can fail on hostile input raises :class:`quic.errors.QuicError` and nothing
else, so callers (the classifier, ``steerd classify``) need exactly one ``except``.
"""
