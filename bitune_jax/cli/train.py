"""Trains the run of CONFIG.yaml; key=value arguments override config keys (optim.lr=1e-3). Re-running with the
same train.output_dir resumes from its latest checkpoint that restores (newer damaged ones are skipped and moved to
checkpoints/skipped/). SIGTERM saves and exits 0. A second run into an output_dir in use is refused."""
from __future__ import annotations

import os
import sys

from bitune_jax.training import distributed

HELP = "train (or resume) a run described by a YAML config"


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
    p.add_argument("--allow-base-change", action="store_true",
                   help="resume even if the base model's content hash differs from the checkpoint's")
    p.add_argument("--allow-optim-change", action="store_true",
                   help="resume even if optim.* hyperparameters (e.g. optim.lr after a non-finite loss) differ "
                        "from the checkpoint's; recorded in metrics.jsonl and summary.json")
    p.add_argument("--break-lock", action="store_true",
                   help="take over train.output_dir's train.lock even if another run seems to hold it")
    group = p.add_argument_group("multi-process (default: auto-detected on TPU pods, GKE and SLURM)")
    group.add_argument("--coordinator", default=None,
                       help=f"host:port of process 0's coordinator (or ${distributed.ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, default=None,
                       help=f"number of processes (or ${distributed.ENV_NUM_PROCESSES}); 1 forces a single process")
    group.add_argument("--process-id", type=int, default=None,
                       help=f"this process's id (or ${distributed.ENV_PROCESS_ID})")


def run(args) -> None:
    import jax

    from bitune_jax.config import load_config
    from bitune_jax.training.loop import train

    cfg = load_config(args.config, args.overrides)  # a bad config fails before any process waits for others
    distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(distributed.describe(), file=sys.stderr)
    summary = train(cfg, allow_base_change=args.allow_base_change, allow_optim_change=args.allow_optim_change,
                    break_lock=args.break_lock)
    if jax.process_index() == 0:
        losses = f"train loss {summary['train_loss']}" + (
            f", eval loss {summary['eval_loss']}" if summary["eval_loss"] is not None else "")
        print(f"{summary['status']} at step {summary['step']}/{summary['steps']}: {losses}; "
              f"checkpoint {summary['checkpoint']}; summary {os.path.join(summary['output_dir'], 'summary.json')}")
        if summary["events"]:  # warnings printed early may have scrolled away
            print("events: " + ", ".join(f"{e['event']} (step {e['step']})" for e in summary["events"])
                  + "; see summary.json", file=sys.stderr)
