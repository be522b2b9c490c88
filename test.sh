#!/usr/bin/env bash
# The whole test suite: sets up what is missing, then runs ruff and pytest as root.
set -euo pipefail
top=$(cd "$(dirname "$0")" && pwd)
"$top/deploy/setup.sh"
cd "$top"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
