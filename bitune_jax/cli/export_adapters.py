"""Exports the adapters and mixing coefficients of a training run's checkpoint to OUT_DIR/causal,
OUT_DIR/bidirectional (PEFT folders) and OUT_DIR/mixing.safetensors."""
from __future__ import annotations

HELP = "write a run's adapters in PEFT layout"


def add_arguments(p) -> None:
    p.add_argument("run", help="the run's train.output_dir")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")


def run(args) -> None:
    from bitune_jax.conversion.adapters import export_run_adapters

    step = export_run_adapters(args.run, args.out, args.step)
    print(f"exported step {step} of {args.run} to {args.out}")
