#!/usr/bin/env bash
# The whole test suite: sets up what is missing, then runs ruff and pytest as root. Reports the
# suite's wall time and its slowest tests (pytest --durations), the figures to watch when the
# suite grows (docs/PERFORMANCE.md, "The test suite").
#
# Two parts: every test not marked "serial" in two pytest-xdist workers (whole files per
# worker: module fixtures are shared, and each test builds its own namespaces, pin dirs and
# daemons, so two run side by side as on a loaded machine); then the "serial" ones alone
# (floods, benchmarks, the fuzzer, many hosts: they load the machine themselves). Arguments
# go to both runs; STEERD_TEST_WORKERS=0 runs everything in one process.
set -euo pipefail
top=$(cd "$(dirname "$0")" && pwd)
"$top/deploy/setup.sh"
cd "$top"
.venv/bin/ruff check .
workers=${STEERD_TEST_WORKERS:-2}
start=$(date +%s)
status=0
if [ "$workers" = 0 ]; then
    .venv/bin/python -m pytest --durations=15 --durations-min=5 "$@" || status=$?
else
    # exit 5: no test selected (e.g. arguments that name only serial tests)
    .venv/bin/python -m pytest -n "$workers" --dist loadfile -m "not serial" \
        --durations=15 --durations-min=5 "$@" || { rc=$?; [ "$rc" = 5 ] || status=$rc; }
    parallel=$(( $(date +%s) - start ))
    .venv/bin/python -m pytest -m serial --durations=10 --durations-min=5 "$@" \
        || { rc=$?; [ "$rc" = 5 ] || [ "$status" != 0 ] || status=$rc; }
    echo "test.sh: parallel part ${parallel} s, serial part $(( $(date +%s) - start - parallel )) s"
fi
echo "test.sh: pytest wall time $(( $(date +%s) - start )) s (exit $status)"
exit "$status"
