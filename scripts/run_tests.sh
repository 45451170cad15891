#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the whole test suite, slow tests included.
# Exits non-zero when a test fails or when no test ran.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "setup failed"; exit 1; }
. .venv/bin/activate
python -m pytest -q -rs --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
