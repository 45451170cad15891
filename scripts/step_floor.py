"""How fast the train step could get on this machine: the same step timed with parts taken out.

Prints one JSON line per variant and mode, then a summary line. For each
variant (``bitune``, ``lora``) it compiles the train step of
``bitune-jax bench`` (SmolLM2-135M, float32, LoRA r=8, batch 8, prompt 192 +
answer 64, remat ``projections`` by default) four times:

* ``full``: the step as trained;
* ``no_attention``: attention replaced by a pass-through of the queries
  (keys and values are still computed and kept in the graph; no scores, no
  softmax);
* ``no_adapters``: the projections run the frozen matmul only (the adapters
  get zero gradients);
* ``floor``: both.

The altered steps compute something else: they are timed, never used. The
four compiled steps are run alternately (``--rounds`` rounds, each the median
of ``--steps`` runs), next to a matmul of the step's own largest
base-projection shape timed in the same process, and the step's model FLOPs
(``bitune_jax.apps.bench.step_flops``). ``budget_75_s`` is the time in which
the *full* step would reach 75% of that matmul's FLOP rate. The summary adds
the ``floor`` time to the time attention's and the adapters' own model FLOPs
would take at the matmul's rate (no kernel does better): if that sum exceeds
the budget, no attention or adapter work can bring the step to 75%, and the
rest (frozen projections, norms, RoPE, activations, the layer loop's
bookkeeping, as XLA compiles them) sets the limit.

Usage (from the repository root, nothing else running)::

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/step_floor.py [--batch 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from unittest import mock

import jax

from bitune_jax import bitune
from bitune_jax.apps import bench
from bitune_jax.model import attention as attn_lib
from bitune_jax.model import peft as peft_lib
from bitune_jax.model.peft import PeftConfig
from bitune_jax.training import step as ts

MODES = ("full", "no_attention", "no_adapters", "floor")


def _pass_through_attention(q, k, v, *args, **kwargs):
    """The queries, with the keys and values kept in the graph (their sums times zero)."""
    return q + (k.sum() + v.sum()).astype(q.dtype) * 0


def _frozen_only(dense_packed):
    def frozen(x, lengths, proj, name, adapters, peft_cfg, dropout_rngs=None):
        y = dense_packed(x, lengths, proj, name, [None] * len(adapters), None)
        used = [leaf for a in adapters if a is not None for leaf in jax.tree_util.tree_leaves(a)]
        return y + sum(leaf.sum() for leaf in used).astype(y.dtype) * 0 if used else y
    return frozen


@contextlib.contextmanager
def _mode(mode: str):
    with contextlib.ExitStack() as stack:
        if mode in ("no_attention", "floor"):
            stack.enter_context(mock.patch.object(attn_lib, "blocked_attention", _pass_through_attention))
        if mode in ("no_adapters", "floor"):
            stack.enter_context(mock.patch.object(peft_lib, "dense_packed", _frozen_only(peft_lib.dense_packed)))
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=192)
    p.add_argument("--answer", type=int, default=64)
    p.add_argument("--remat", default="projections")
    p.add_argument("--variants", default="bitune,lora")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if attn_lib.resolve("auto") != "blocked":
        raise SystemExit(f"error: this script times the CPU path (attention 'blocked'); this backend takes "
                         f"{attn_lib.resolve('auto')!r}")

    base, cfg, _, name = bench.load_bench_model(args.model)
    data = bench._batch(cfg.vocab_size, args.batch, args.prompt, args.answer)
    opt = ts.make_optimizer(ts.OptimConfig(lr=1e-4, warmup_ratio=0.0), total_steps=1000)
    compiled = {}
    for v in args.variants.split(","):
        method = bitune.MethodConfig(variant=v, peft=PeftConfig(rank=8, alpha=1.0))
        state = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(0), cfg, method, base), opt)
        for mode in MODES:
            with _mode(mode):
                fn = ts.make_train_step(cfg, method, opt, remat=args.remat, attention="auto", donate=False)
                c = fn.lower(state, base, data).compile()
            jax.block_until_ready(c(state, base, data))  # warm-up
            compiled[(v, mode)] = (c, state)
    tokens = bench.step_flops(cfg, "bitune", args.batch, args.prompt, args.answer)["tokens"]
    rates, times = [], {key: [] for key in compiled}
    for _ in range(args.rounds):
        rates.append(bench.matmul_rate(tokens, cfg.hidden_size, cfg.intermediate_size, dtype=base["embed"].dtype))
        for key, (c, state) in compiled.items():
            runs = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                jax.block_until_ready(c(state, base, data))
                runs.append(time.perf_counter() - t0)
            times[key].append(statistics.median(runs))
    rate = statistics.median(rates)
    info = {"model": name, "batch": args.batch, "prompt": args.prompt, "answer": args.answer, "remat": args.remat,
            "matmul_shape": [tokens, cfg.hidden_size, cfg.intermediate_size], "matmul_flops_per_s": rate,
            **bench._device_info()}
    summary = {"bench": "step_floor_summary", "matmul_flops_per_s_rounds": rates, **info}
    for v in args.variants.split(","):
        flops = bench.step_flops(cfg, v, args.batch, args.prompt, args.answer)["total"]
        budget = flops / (0.75 * rate)
        for mode in MODES:
            t = statistics.median(times[(v, mode)])
            print(json.dumps({"bench": "step_floor", "variant": v, "mode": mode, "step_s": t,
                              "step_s_rounds": times[(v, mode)], "model_flops_full_step": flops,
                              "budget_75_s": budget, **info}), flush=True)
        full, floor = (statistics.median(times[(v, m)]) for m in ("full", "floor"))
        terms = bench.step_flops(cfg, v, args.batch, args.prompt, args.answer)
        # The floor plus attention's and the adapters' own model FLOPs at the matmul's rate: the fastest the
        # step can be while the rest runs as compiled now.
        best = floor + (terms["attention"] + terms["lora"]) / rate
        summary[v] = {"full_s": full, "floor_s": floor, "budget_75_s": budget,
                      "fraction_of_matmul_rate": flops / full / rate,
                      "fraction_if_attention_and_adapters_were_free": flops / floor / rate,
                      "best_s_if_attention_and_adapters_ran_at_the_matmul_rate": best,
                      "fraction_then": flops / best / rate}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
