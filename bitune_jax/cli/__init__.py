"""The ``bitune-jax`` command: a thin layer over the library.

Every subcommand parses its arguments and calls one library function; all of
them can be done from Python as well. Expected failures (bad files, bad
configs, unsupported models) print one ``error:`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys


def cmd_score(args):
    from bitune_jax import fileio
    from bitune_jax.evaluation import score
    from bitune_jax.conversion.adapters import load_with_adapters

    model, trainable, method = load_with_adapters(args.model, args.adapters, args.variant, args.dtype)
    rows = score.read_jsonl(args.data)
    out = score.score_rows(model, rows, trainable=trainable, method=method, add_eos=not args.no_eos,
                           batch_size=args.batch_size, source=args.data, progress=not args.quiet)
    fileio.write_jsonl_atomic(args.out, out)
    tokens = sum(r["num_tokens"] for r in out)
    nll = sum(r["nll_sum"] for r in out)
    print(f"scored {len(out)} rows, {tokens} answer tokens, mean NLL/token {nll / max(tokens, 1):.4f} -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitune-jax", description="Bitune (bidirectional instruction tuning) in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="log-likelihood of answers given prompts")
    s.add_argument("--model", required=True, help="HF safetensors directory, .gguf file, or 'smollm2'")
    s.add_argument("--data", required=True, help="input JSONL (prompt_ids/answer_ids or prompt/answer rows)")
    s.add_argument("--out", required=True, help="output JSONL (input rows + nll_sum, num_tokens)")
    s.add_argument("--adapters", help="adapter folder (Bitune export or a plain PEFT LoRA folder)")
    s.add_argument("--variant", help="Bitune variant to score with (default: bitune if both sets are present)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--no-eos", action="store_true", help="do not append EOS to text answers")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_score)

    _register_optional(sub)
    return p


def _register_optional(sub):
    """Subcommands implemented in other modules register themselves here."""
    for module_name in ("bitune_jax.training.loop", "bitune_jax.evaluation.evaluate", "bitune_jax.evaluation.generate", "bitune_jax.conversion.adapters",
                        "bitune_jax.apps.demo", "bitune_jax.apps.bench"):
        try:
            module = __import__(module_name, fromlist=["add_cli"])
        except ImportError as e:
            if e.name and e.name.startswith("bitune_jax"):
                continue
            raise
        if hasattr(module, "add_cli"):
            module.add_cli(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bitune_jax.errors import USER_ERRORS

    try:
        args.fn(args)
    except USER_ERRORS as e:
        if os.environ.get("BITUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
