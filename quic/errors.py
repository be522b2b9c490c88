"""The one error type of the quic package.

Every parser and decoder here turns malformed, truncated, undecryptable or over-limit input into
a ``QuicError`` carrying a short, stable ``reason`` (a lower_snake_case token used as a metrics
label and in ``steerd classify`` output) and a human-readable detail. Callers never need to catch
``IndexError``, ``ValueError`` or ``cryptography`` exceptions: letting one escape is a bug.
"""


class QuicError(Exception):
    """Input that cannot be accepted; ``reason`` is a stable token, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
