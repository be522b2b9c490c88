"""Fixtures of the SDK tests live in harness.py (importable by the tests and the bench);
naming them here makes pytest find them."""

from tests.e2e.conftest import own_daemon  # noqa: F401
from tests.sdk.harness import both_apps, daemon, loaders, pair, sessions  # noqa: F401
