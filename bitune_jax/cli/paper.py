"""The paper's protocol for an accelerator: LoRA and Bitune instruction-tuned on UltraFeedback (lr 3e-4, LoRA
rank 8, alpha 1, effective batch 10, 3,000 steps) for seeds 42, 43, 44, then zero-shot PIQA, ARC-Challenge,
CSQA, SIQA and MMLU with the paper's prompts, and the results table (mean over seeds, paired Bitune - LoRA
difference with its 95% interval, verdict). Run the same command again to resume; --dry-run shows each run's
state; --table only rewrites the table from the runs evaluated so far. Configs: configs/paper/*.yaml."""
from __future__ import annotations

from bitune_jax.cli.common import positive_int

HELP = "the paper's protocol (3 seeds x LoRA/Bitune, zero-shot PIQA/ARC/CSQA/SIQA/MMLU), resumable"
DEFAULT_TASKS = "piqa,arc_challenge,csqa,siqa,mmlu"


def _seeds(text: str):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. 42,43,44") from None


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="run config (configs/paper/smollm2_135m.yaml, gemma3_270m.yaml); "
                                             "not needed with --table")
    p.add_argument("--out", required=True, help="output folder of the whole protocol (runs, evaluations, table)")
    p.add_argument("--ultrafeedback", help="local copy of openbmb/UltraFeedback (JSONL, Parquet, Arrow or a "
                                           "save_to_disk folder): writes OUT/data/train.jsonl once")
    p.add_argument("--seeds", default="42,43,44", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated zero-shot tasks (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="first N items per task (a quick check)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per evaluation batch")
    p.add_argument("--dry-run", action="store_true", help="print each run's state and overrides; run nothing")
    p.add_argument("--table", action="store_true", help="only (re)write the results table from OUT")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="metric of the table")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run (train.steps=300)")


def run(args) -> None:
    from bitune_jax.apps.paper import results_table, run_protocol

    if args.table:
        print(results_table(args.out, metric=args.metric)["text"])
        return
    if not args.config:
        raise ValueError("bitune-jax paper: give the run config (e.g. configs/paper/smollm2_135m.yaml), or --table")
    run_protocol(args.config, args.out, seeds=_seeds(args.seeds), tasks=[t for t in args.tasks.split(",") if t],
                 overrides=args.overrides, ultrafeedback=args.ultrafeedback, dry_run=args.dry_run,
                 limit=args.limit, batch_size=args.batch_size)
