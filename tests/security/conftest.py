"""The attacker tests run beside the SDK's demo apps: their fixtures come from there."""

from tests.sdk.harness import loaders, pair, sessions  # noqa: F401
