"""The one exception of the data plane.

Why its own module: every layer (maps, programs, steering, guard, counters) raises it and the
facade (``steerd.daemon.dataplane``) is built from those layers, so it cannot live in the
facade. Callers outside those layers import it from the facade.
"""

from __future__ import annotations


class DataplaneError(Exception):
    """A data-plane operation failed; the message says what and how to fix it."""
