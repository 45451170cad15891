"""Speed and memory benchmarks, one JSON object per line: the train step of Bitune against plain LoRA,
shared-prefix against naive multiple-choice scoring, decoding speed, padding with and without packing. On CPU only
ratios mean anything."""
from __future__ import annotations

import argparse

from bitune_jax.cli.common import add_attention_flag

HELP = "speed and memory benchmarks (JSON lines)"


def _lengths(text):
    try:
        return tuple(tuple(int(x) for x in pair.split("+")) for pair in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths {text!r}: expected PROMPT+ANSWER pairs, e.g. 192+64,448+64")


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2", help="model source (default: the packaged SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=_lengths, default=None,
                   help="train-step PROMPT+ANSWER pairs, comma-separated (default 192+64,448+64,64+64; "
                        "with --quick 24+8,48+8)")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions per setting")
    p.add_argument("--remat", default="projections", choices=["none", "full", "dots", "projections", "prompt_mlp"],
                   help="rematerialisation of the train step (default: train.remat's default, projections)")
    p.add_argument("--only", help="comma-separated subset of train,mc_eval,decode,padding (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny random model and short lengths (CI)")
    add_attention_flag(p)


def run(args) -> None:
    from bitune_jax.apps.bench import BENCHES, run_benches

    only = BENCHES if args.only is None else tuple(x for x in args.only.split(",") if x)
    run_benches(args.model, args.batch, args.lengths, args.steps, args.quick, args.remat, only,
                attention=args.attention)
