#!/usr/bin/env bash
# The whole test suite: sets up what is missing, then runs ruff and pytest as root. Reports the
# suite's wall time and its slowest tests (pytest --durations), the figures to watch when the
# suite grows (docs/ARCHITECTURE.md, "Tests").
set -euo pipefail
top=$(cd "$(dirname "$0")" && pwd)
"$top/deploy/setup.sh"
cd "$top"
.venv/bin/ruff check .
start=$(date +%s)
status=0
.venv/bin/python -m pytest --durations=15 --durations-min=5 "$@" || status=$?
echo "test.sh: pytest wall time $(( $(date +%s) - start )) s (exit $status)"
exit "$status"
