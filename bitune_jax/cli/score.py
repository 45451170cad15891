"""Log-likelihood of each row's answer given its prompt (the training loss terms), written as JSONL."""
from __future__ import annotations

from bitune_jax.cli.common import add_attention_flag, positive_int

HELP = "log-likelihood of answers given prompts"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF safetensors directory, .gguf file, or 'smollm2'")
    p.add_argument("--data", required=True, help="input JSONL (prompt_ids/answer_ids or prompt/answer rows)")
    p.add_argument("--out", required=True, help="output JSONL (input rows + nll_sum, num_tokens)")
    p.add_argument("--adapters", help="adapter folder (Bitune export or a plain PEFT LoRA folder)")
    p.add_argument("--variant", help="Bitune variant to score with (default: bitune if both sets are present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to text answers")
    p.add_argument("--quiet", action="store_true")
    add_attention_flag(p)


def run(args) -> None:
    from bitune_jax import fileio
    from bitune_jax.conversion.adapters import load_with_adapters
    from bitune_jax.evaluation import score

    # The output place and the data are checked before the model loads.
    fileio.check_writable(args.out)
    rows = score.read_jsonl(args.data)
    model, trainable, method = load_with_adapters(args.model, args.adapters, args.variant, args.dtype)
    out = score.score_rows(model, rows, trainable=trainable, method=method, add_eos=not args.no_eos,
                           batch_size=args.batch_size, source=args.data, progress=not args.quiet,
                           attention=args.attention)
    fileio.write_jsonl_atomic(args.out, out)
    tokens = sum(r["num_tokens"] for r in out)
    nll = sum(r["nll_sum"] for r in out)
    print(f"scored {len(out)} rows, {tokens} answer tokens, mean NLL/token {nll / max(tokens, 1):.4f} -> {args.out}")
