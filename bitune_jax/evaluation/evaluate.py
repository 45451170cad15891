"""Zero-shot evaluation: multiple-choice log-likelihoods with a shared prefix, and GSM8K by generation.

A multiple-choice question is a context and C choices; choice ``j`` is scored
as ``log p(" " + choice_j | context)`` summed over its tokens, with the
tokenization rule of :mod:`bitune_jax.data.text` (``encode_pair(..., add_eos=False)``:
context with the tokenizer's special tokens, choice without).

Shared prefix. Every choice of a question has the same prompt, so the
prompt's Bitune prefill (both passes and the mix, :func:`bitune.prefill`) runs
once per question. Its cache ``[layers, Q, S, kv_heads, hd]`` is repeated C
times and every continuation ``[x[L-1], choice[0..M-1)]`` (positions
``L-1 ..``) is fed against it in one batch with the causal adapter set
(``transformer.forward(prefix_kv=...)``). That is the answer pass of training,
so the numbers equal :func:`score_choices_naive`, which runs the full fused
Bitune forward (:func:`bitune.answer_nll`) per (context, choice) pair; the
shared form prefills a question once instead of C times (C times two for
Bitune).

Metrics (as lm-evaluation-harness): ``acc`` picks the choice with the highest
log-likelihood, ``acc_norm`` the highest log-likelihood divided by the
choice's length in characters; ties go to the first choice. Standard errors
are ``std(ddof=1) / sqrt(n)``.

Example, on token ids and a tiny random model (:func:`evaluate_mc` does the
same from text items and a tokenizer, e.g. ``tasks.load_task("arc_easy")`` and
a model from ``load_model``):

    >>> import jax
    >>> from bitune_jax.model.config import ModelConfig
    >>> from bitune_jax.model.transformer import init_params
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    >>> params = init_params(jax.random.PRNGKey(0), cfg)
    >>> contexts = [[1, 2, 3], [4, 5]]                  # two questions
    >>> continuations = [[[6], [7, 8]], [[9], [10], [11, 12]]]  # their choices
    >>> shared = score_choices(params, cfg, contexts, continuations)
    >>> [ll.shape for ll, _ in shared]                   # log-likelihood per choice
    [(2,), (3,)]
    >>> naive = score_choices_naive(params, cfg, contexts, continuations)
    >>> all(np.allclose(ll, n, atol=1e-5) for (ll, _), n in zip(shared, naive))
    True
    >>> items = [task_lib.MCItem("q1", ["a", "bb"], 0, "1"), task_lib.MCItem("q2", ["a", "b", "cc"], 2, "2")]
    >>> metrics, rows = mc_metrics(items, [ll for ll, _ in shared])
    >>> sorted(metrics), metrics["n"]
    (['acc', 'acc_norm', 'acc_norm_stderr', 'acc_stderr', 'n'], 2)
"""
from __future__ import annotations

import functools
import json
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import bitune
from bitune_jax.conversion.adapters import load_with_adapters
from bitune_jax.fileio import check_writable, write_text_atomic
from bitune_jax.data import tasks as task_lib
from bitune_jax.data.pipeline import round_up
from bitune_jax.evaluation.stats import mean_stderr
from bitune_jax.model import transformer as T
from bitune_jax.model.config import ModelConfig
from bitune_jax.data.text import encode_pair

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>", "<|end_of_text|>")  # the authors' gsm8k `until`


# --------------------------------------------------------------------------- scoring
@functools.partial(jax.jit, static_argnames=("cfg", "method", "attention"))
def _shared_prefix_scores(trainable, base, prompt_ids, prompt_len, cont_ids, cont_len, *, cfg: ModelConfig,
                          method: bitune.MethodConfig, attention: str = "auto"):
    """Sum of continuation log-probs ``[Q, C]`` and greedy flags ``[Q, C]``.

    prompt_ids ``[Q, P]``/prompt_len ``[Q]``: right-padded contexts;
    cont_ids ``[Q, C, A]``/cont_len ``[Q, C]``: right-padded continuations
    (``cont_len`` 0 for padding choices, which score 0).
    """
    q, c, a = cont_ids.shape
    prefix = bitune.prefill(trainable, base, cfg, method, prompt_ids, prompt_len, attention=attention)
    rep = lambda x, axis: jnp.repeat(x, c, axis=axis)  # noqa: E731  question-major: row q * C + j
    kv = T.KV(rep(prefix.kv.k, 1), rep(prefix.kv.v, 1))  # [layers, Q*C, S, kv_heads, hd]
    first = jnp.broadcast_to(prefix.last_token[:, None, None], (q, c, 1)).astype(jnp.int32)
    tokens = jnp.concatenate([first, cont_ids[:, :, : a - 1]], axis=-1).reshape(q * c, a)
    positions = jnp.broadcast_to(prefix.next_pos[:, None, None] + jnp.arange(a, dtype=jnp.int32),
                                 (q, c, a)).reshape(q * c, a)
    valid = (jnp.arange(a)[None, None] < cont_len[..., None]).reshape(q * c, a)
    logits, _ = T.forward(base, cfg, tokens, positions=positions, valid=valid, prefix_kv=kv,
                          prefix_positions=rep(prefix.positions, 0), prefix_valid=rep(prefix.valid, 0),
                          adapters=trainable["causal"], peft_cfg=method.peft, attention=attention)
    targets = cont_ids.reshape(q * c, a)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    ll = jnp.where(valid, logp, 0.0).sum(-1).reshape(q, c)
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~valid, axis=-1).reshape(q, c)
    return ll, greedy


def score_choices(base, cfg: ModelConfig, contexts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[Sequence[int]]], trainable=None,
                  method: Optional[bitune.MethodConfig] = None, *, batch_size: int = 8, bucket: int = 32,
                  cont_bucket: int = 8, attention: str = "auto", progress: bool = False
                  ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Shared-prefix log-likelihoods of several continuations per context.

    Args:
      contexts: token ids per question (at least one token each).
      continuations: per question, a list of token id lists (at least one token each).
      trainable, method: adapters and variant (``None``: the base model).
      batch_size: questions per batch (the last batch is padded to it, so one
        compilation serves a whole run); prompt and continuation lengths are
        rounded up to ``bucket`` / ``cont_bucket``.

    Returns:
      Per question ``(ll [C] float64, is_greedy [C] bool)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    trainable, method = bitune.with_base_default(trainable, method)
    n = len(contexts)
    for i in range(n):
        if not contexts[i] or not continuations[i] or not all(continuations[i]):
            raise ValueError(f"question {i}: empty context, no choices, or an empty choice")
    order = sorted(range(n), key=lambda i: (len(contexts[i]), max(map(len, continuations[i]))))
    out: List = [None] * n
    q = batch_size if n > batch_size else n
    batches = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="score", unit="batch", leave=False)
    for first in batches:
        idx = order[first:first + batch_size]
        p = round_up(max(len(contexts[i]) for i in idx), bucket)
        c = max(len(continuations[i]) for i in idx)
        a = round_up(max(len(x) for i in idx for x in continuations[i]), cont_bucket)
        prompt = np.zeros((q, p), np.int32)
        plen = np.ones((q,), np.int32)
        cont = np.zeros((q, c, a), np.int32)
        clen = np.zeros((q, c), np.int32)
        for r, i in enumerate(idx):
            prompt[r, :len(contexts[i])] = contexts[i]
            plen[r] = len(contexts[i])
            for j, x in enumerate(continuations[i]):
                cont[r, j, :len(x)] = x
                clen[r, j] = len(x)
        ll, greedy = _shared_prefix_scores(trainable, base, prompt, plen, cont, clen, cfg=cfg, method=method,
                                           attention=attention)
        ll, greedy = np.asarray(ll, np.float64), np.asarray(greedy)
        for r, i in enumerate(idx):
            k = len(continuations[i])
            out[i] = (ll[r, :k], greedy[r, :k])
    return out


def score_choices_naive(base, cfg: ModelConfig, contexts, continuations, trainable=None,
                        method: Optional[bitune.MethodConfig] = None, *, batch_size: int = 8, bucket: int = 32,
                        progress: bool = False, attention: str = "auto") -> List[np.ndarray]:
    """The same log-likelihoods, one full Bitune forward (:func:`bitune.answer_nll`) per (context, choice).

    Used to test :func:`score_choices` and to measure what the shared prefix saves.
    """
    from bitune_jax.evaluation.score import score_examples

    pairs = [(list(ctx), list(x)) for ctx, conts in zip(contexts, continuations) for x in conts]
    scores = score_examples(base, cfg, pairs, trainable, method, batch_size=batch_size, bucket=bucket,
                            progress=progress, attention=attention)
    out, k = [], 0
    for conts in continuations:
        out.append(np.array([-scores[k + j][0] for j in range(len(conts))], np.float64))
        k += len(conts)
    return out


# --------------------------------------------------------------------------- tasks
def encode_mc(tokenizer, items: Sequence[task_lib.MCItem]):
    """``(contexts, continuations)`` token ids of multiple-choice items (the ``text.encode_pair`` rule)."""
    contexts, continuations = [], []
    for it in items:
        pairs = [encode_pair(tokenizer, it.context, " " + ch, add_eos=False) for ch in it.choices]
        contexts.append(pairs[0][0])
        continuations.append([a for _, a in pairs])
    return contexts, continuations


def mc_metrics(items: Sequence[task_lib.MCItem], lls: Sequence[np.ndarray]) -> Tuple[Dict, List[Dict]]:
    """``acc``/``acc_norm`` with standard errors, and one row per item."""
    rows, acc, acc_norm = [], [], []
    for it, ll in zip(items, lls):
        lengths = np.array([max(len(c), 1) for c in it.choices], np.float64)
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        acc.append(pred == it.gold)
        acc_norm.append(pred_norm == it.gold)
        rows.append({"id": it.id, "gold": it.gold, "pred": pred, "pred_norm": pred_norm,
                     "loglikelihoods": [float(v) for v in ll]})
    m, se = mean_stderr(acc)
    mn, sen = mean_stderr(acc_norm)
    return {"acc": m, "acc_stderr": se, "acc_norm": mn, "acc_norm_stderr": sen, "n": len(rows)}, rows


def evaluate_mc(base, cfg: ModelConfig, tokenizer, items: Sequence[task_lib.MCItem], trainable=None,
                method: Optional[bitune.MethodConfig] = None, *, batch_size: int = 8, naive: bool = False,
                progress: bool = False, attention: str = "auto") -> Tuple[Dict, List[Dict]]:
    """Scores multiple-choice items; returns ``(metrics, per_item_rows)``."""
    contexts, continuations = encode_mc(tokenizer, items)
    if naive:
        lls = score_choices_naive(base, cfg, contexts, continuations, trainable, method, batch_size=batch_size,
                                  progress=progress, attention=attention)
    else:
        lls = [ll for ll, _ in score_choices(base, cfg, contexts, continuations, trainable, method,
                                             batch_size=batch_size, progress=progress, attention=attention)]
    return mc_metrics(items, lls)


def evaluate_generation(base, cfg: ModelConfig, tokenizer, items: Sequence[task_lib.GenItem], trainable=None,
                        method: Optional[bitune.MethodConfig] = None, *, batch_size: int = 8,
                        max_new_tokens: int = 256, stop: Sequence[str] = GSM8K_STOP,
                        progress: bool = False, attention: str = "auto") -> Tuple[Dict, List[Dict]]:
    """GSM8K-style exact match of the final number (greedy); ``(metrics, per_item_rows)``.

    ``exact_match`` uses the flexible extraction (``#### N`` if present, else
    the last number of the output), ``exact_match_strict`` only ``#### N``.
    """
    from bitune_jax.evaluation.generate import generate

    gens = generate(base, cfg, tokenizer, [it.prompt for it in items], trainable, method,
                    max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size, progress=progress,
                    attention=attention)
    rows, flex, strict = [], [], []
    for it, g in zip(items, gens):
        pf, ps = task_lib.extract_answer(g.text), task_lib.extract_answer(g.text, strict=True)
        flex.append(pf == it.answer)
        strict.append(ps == it.answer)
        rows.append({"id": it.id, "gold": it.answer, "pred": pf, "pred_strict": ps, "output": g.text,
                     "finish_reason": g.finish_reason})
    m, se = mean_stderr(flex)
    ms, ses = mean_stderr(strict)
    return {"exact_match": m, "exact_match_stderr": se, "exact_match_strict": ms,
            "exact_match_strict_stderr": ses, "n": len(rows)}, rows


# --------------------------------------------------------------------------- runs
def format_table(results: Dict) -> str:
    """A plain-text table of a :func:`run_eval` result."""
    lines = [f"{'task':<24} {'n':>6}  {'metric':<20} {'value':>8}  {'stderr':>7}"]
    for name, m in results["tasks"].items():
        for key in ("acc", "acc_norm", "exact_match", "exact_match_strict"):
            if key in m:
                lines.append(f"{name:<24} {m['n']:>6}  {key:<20} {m[key]:>8.4f}  {m[key + '_stderr']:>7.4f}")
    return "\n".join(lines)


def run_eval(model_src: str, adapters: Optional[str] = None, variant: Optional[str] = None,
             tasks: Sequence[str] = ("piqa", "arc_easy", "arc_challenge", "csqa", "siqa", "mmlu"),
             limit: Optional[int] = None, out: Optional[str] = None, per_item: bool = False, batch_size: int = 8,
             dtype: str = "float32", source: Optional[Dict[str, str]] = None, max_new_tokens: int = 256,
             naive: bool = False, quiet: bool = False, attention: str = "auto",
             items: Optional[Tuple[int, Optional[int]]] = None) -> Dict:
    """Evaluates a model (plus adapters) on tasks; the library side of ``bitune-jax eval``.

    Every task's data is read and its items selected before the model loads,
    so a bad file, task name or range fails in seconds.

    Args:
      model_src: HF directory, ``.gguf`` file or a packaged model name.
      adapters, variant: adapter folder and variant (see ``bitune_jax.conversion.adapters``).
      tasks: task names (:data:`bitune_jax.data.tasks.TASKS`, ``mmlu:<subjects>``).
      limit: first ``limit`` items per task (>= 1; fewer when a task has fewer).
      items: ``(start, stop)``: items ``start`` .. ``stop - 1`` of every task
        (0-based; ``stop`` None: to the end); a task without item ``start``,
        or with fewer than ``stop`` items, is an error. Not with ``limit``.
      out: results JSON path (written atomically; its folder is checked first).
      per_item: include every item's prediction and log-likelihoods; each row's
        ``index`` is the item's position in the task.
      source: ``{task: data path}``: read these tasks from local files (see
        :mod:`bitune_jax.data.tasks` for the formats) instead of the packaged
        data; every key must be one of ``tasks``.
      naive: score every choice with a full forward (slower; for checking).
      attention: the attention implementation (``bitune_jax.model.attention``).

    Returns:
      ``{"model", "adapters", "variant", "limit", "item_range", "sources",
      "tasks": {name: metrics}, "seconds": {name: s}, "items"?: {name: rows}}``.
    """
    names = list(tasks)
    canonical = [task_lib.canonical_name(name) for name in names]  # a bad name fails here
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if items is not None and limit is not None:
        raise ValueError(f"give limit ({limit}) or items ({items}), not both")
    start, stop = (0, None) if items is None else items
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"items=({start}, {stop}): need 0 <= start < stop")
    sources = {}
    for key, path in (source or {}).items():
        key_name = task_lib.canonical_name(key)
        if key_name not in canonical and key_name not in (c.split(":")[0] for c in canonical):
            raise ValueError(f"source {key!r} ({path}): {key!r} is not one of the tasks evaluated "
                             f"({', '.join(names)})")
        sources[key_name] = path
    if out:
        check_writable(out)
    selected = {}
    for name, full in zip(names, canonical):
        path = sources.get(full, sources.get(full.split(":")[0]))
        task_items = task_lib.load_task(name, limit=limit, source=path)
        if items is not None:
            end = len(task_items) if stop is None else stop
            if start >= len(task_items) or end > len(task_items):
                raise ValueError(f"task {name!r} ({path or 'packaged data'}) has {len(task_items)} items; "
                                 f"items {start}:{'' if stop is None else stop} asks for items {start} to {end - 1}")
            task_items = task_items[start:end]
        selected[name] = task_items

    model, trainable, method = load_with_adapters(model_src, adapters, variant, dtype)
    results: Dict = {"model": model_src, "adapters": adapters, "variant": method.variant if method else None,
                     "limit": limit, "item_range": None if items is None else [start, stop],
                     "sources": {name: sources[full] for name, full in zip(names, canonical) if full in sources},
                     "tasks": {}, "seconds": {}}
    if per_item:
        results["items"] = {}
    for name in names:
        t0 = time.perf_counter()
        task_items = selected[name]
        if not quiet:
            print(f"{name}: {len(task_items)} items", flush=True)
        if task_lib.is_generative(name):
            metrics, rows = evaluate_generation(model.params, model.cfg, model.tokenizer, task_items, trainable,
                                                method, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                progress=not quiet, attention=attention)
        else:
            metrics, rows = evaluate_mc(model.params, model.cfg, model.tokenizer, task_items, trainable, method,
                                        batch_size=batch_size, naive=naive, progress=not quiet,
                                        attention=attention)
        results["tasks"][name] = metrics
        results["seconds"][name] = round(time.perf_counter() - t0, 2)
        if per_item:
            results["items"][name] = [{"index": start + k, **row} for k, row in enumerate(rows)]
        if out:
            write_text_atomic(out, json.dumps(results, indent=1))
    if not quiet:
        print(format_table(results))
    return results
