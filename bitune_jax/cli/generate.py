"""Generates text for prompts: Bitune prefill, then KV-cache decoding (greedy, temperature, top-k, top-p,
stop strings)."""
from __future__ import annotations

from bitune_jax.cli.common import add_attention_flag, positive_int

HELP = "generate text (Bitune prefill, then KV-cache decoding)"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF safetensors directory, .gguf file, or 'smollm2'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line (\\n escapes are expanded)")
    p.add_argument("--data", help="a JSONL file whose rows have a 'prompt' string (other fields are ignored)")
    p.add_argument("--adapters", help="adapter folder (Bitune export or a plain PEFT LoRA folder)")
    p.add_argument("--variant", help="Bitune variant (default: from the adapters)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", help="write results as JSONL here")
    add_attention_flag(p)


def _prompts(args):
    """The prompts of ``--prompt``, ``--prompts`` and ``--data``, in that order."""
    from bitune_jax.evaluation.score import read_jsonl

    prompts = [p.replace("\\n", "\n") for p in args.prompt]
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if args.data:
        for n, row in enumerate(read_jsonl(args.data), 1):
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{args.data}: row {n} has no 'prompt' string")
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError("give at least one --prompt, a --prompts file or a --data JSONL file")
    return prompts


def run(args) -> None:
    from bitune_jax.evaluation.generate import run_generate

    rows = run_generate(args.model, _prompts(args), adapters=args.adapters, variant=args.variant, out=args.out,
                        dtype=args.dtype, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                        batch_size=args.batch_size, progress=True, attention=args.attention)
    for r in rows:
        print(f"--- [{r['finish_reason']}] {r['prompt']!r}\n{r['text']}")
