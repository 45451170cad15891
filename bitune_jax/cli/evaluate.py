"""Zero-shot evaluation of a model (plus adapters): multiple-choice tasks scored with a shared prompt prefix,
GSM8K by generation."""
from __future__ import annotations

from bitune_jax.data import tasks as task_lib

HELP = "zero-shot evaluation (multiple choice with a shared prefix; GSM8K)"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF safetensors directory, .gguf file, or 'smollm2'")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,csqa,siqa,mmlu",
                   help=f"comma-separated; allowed: {', '.join(task_lib.TASKS)}; mmlu:<subject>+<subject> for a subset")
    p.add_argument("--adapters", help="adapter folder (Bitune export or a plain PEFT LoRA folder)")
    p.add_argument("--variant", help="Bitune variant (default: from the adapters)")
    p.add_argument("--limit", type=int, help="first N items per task")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--per-item", action="store_true", help="include per-item predictions in the JSON")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length for GSM8K")
    p.add_argument("--quiet", action="store_true")


def run(args) -> None:
    from bitune_jax.evaluation.evaluate import run_eval

    # Subjects inside one mmlu: name are separated by "+" on the command line (commas separate tasks).
    names = [t.replace("+", ",") for t in args.tasks.split(",") if t]
    run_eval(args.model, adapters=args.adapters, variant=args.variant, tasks=names, limit=args.limit,
             out=args.out, per_item=args.per_item, batch_size=args.batch_size, dtype=args.dtype,
             max_new_tokens=args.max_new_tokens, quiet=args.quiet)
