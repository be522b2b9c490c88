"""The daemon's one token bucket.

Why one: the control server limits each connection's requests, and the classifier limits
what it sends unasked (Version Negotiation, CONNECTION_CLOSE, resets, Retry) so a spoofed
flood cannot turn the daemon into a reflector (RFC 9000 §21.5). Both need the same thing,
and one implementation gets the refill arithmetic right once.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` banked; starts full (at ``now``).

    Time is the caller's clock (monotonic seconds), passed in: no clock read inside, so tests
    drive it exactly and a hot path reads the clock once for several buckets."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.last = float(burst), now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
