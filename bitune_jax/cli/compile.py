"""Compiles the train step of CONFIG.yaml for a TPU topology on this host (libtpu's compile-only mode: no TPU, no
weights) and reports per-chip memory against the chip's HBM, the compile time and the model FLOPs per step.
key=value arguments override config keys; model.source only needs the architecture (an HF folder with just its
config.json, such as configs/models/gemma-2b, or a GGUF). Prints a readable summary on stderr and one JSON line on
stdout. Exit status 0 when the step fits, 3 when it does not fit in HBM (with what to change), 2 for bad input or
when libtpu is missing (pip install -e ".[tpu]")."""
from __future__ import annotations

import json
import os
import sys

HELP = "compile the train step for a TPU topology on this host and report per-chip memory (needs the tpu extra)"

DOES_NOT_FIT = 3  # exit status when the step needs more HBM than the topology's chips have


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
    p.add_argument("--topology", required=True,
                   help="TPU slice: GENERATION:AxB[xC], e.g. v5e:2x2, v5e:4x4, v6e:2x4, v4:2x2x1, v5p:2x2x2")


def run(args) -> int:
    from bitune_jax.training import compile_check  # imports no JAX

    topology = compile_check.Topology.parse(args.topology)  # a bad name fails before anything loads
    # Before JAX starts: this process only compiles, so JAX's own backend stays the CPU (a TPU host's chips are
    # left alone) and libtpu does not ask the cloud metadata server for a slice.
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from bitune_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    try:
        report = compile_check.compile_train_step(cfg, topology)
    except compile_check.DoesNotFitError as e:
        if os.environ.get("BITUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return DOES_NOT_FIT
    print(compile_check.summary(report), file=sys.stderr)
    print(json.dumps(report), flush=True)
    return 0
