#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the main job on the real SmolLM2-135M model.
# Extra arguments are passed to `bitune-jax demo` (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
exec bitune-jax demo "$@"
