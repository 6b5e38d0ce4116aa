#!/usr/bin/env bash
# The whole suite (what `make test` and CI run), as two pytest processes side by side:
#   1. tests/unit: no PostgreSQL, Redis or worker (tests/conftest.py refuses a unit test that
#      asks for one), CPU-bound training jobs;
#   2. tests/integration and tests/e2e: the real stack (PostgreSQL, Redis, uvicorn, Celery
#      workers, Chromium), which spends much of its time waiting on those processes.
# On 2 cores one pytest leaves about a quarter of the CPU idle while the stack tests wait; the
# unit lane fills it. Each lane's output goes to its own log under .venv/test-logs/ and is
# printed when both are done; the exit code is the first non-zero one (0 when both pass).
# Arguments are passed to both pytest runs (e.g. -x, -k, --durations=N). A single lane or file:
# run pytest directly (.venv/bin/python -m pytest tests/unit/test_losses.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=.venv/bin/python
LOGS=.venv/test-logs
mkdir -p "$LOGS"
started=$(date +%s)

"$PY" -m pytest tests/unit "$@" > "$LOGS/unit.log" 2>&1 &
unit_pid=$!
"$PY" -m pytest tests/integration tests/e2e "$@" > "$LOGS/stack.log" 2>&1
stack_rc=$?
wait "$unit_pid"
unit_rc=$?

echo "===== tests/integration + tests/e2e (exit $stack_rc) ====="
cat "$LOGS/stack.log"
echo "===== tests/unit (exit $unit_rc) ====="
cat "$LOGS/unit.log"
echo "test.sh: stack lane exit $stack_rc, unit lane exit $unit_rc, $(( $(date +%s) - started )) s in all"
if (( stack_rc != 0 )); then exit "$stack_rc"; fi
exit "$unit_rc"
