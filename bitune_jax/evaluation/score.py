"""Answer log-likelihoods of (prompt, answer) rows: the library side of ``bitune-jax score``.

Each input row is either ``{"prompt_ids": [...], "answer_ids": [...]}`` (used
exactly as given) or ``{"prompt": "...", "answer": "..."}`` (tokenized with
``bitune_jax.data.text.encode_pair``: the training rule, EOS appended to the answer
unless ``add_eos=False``). Each output row is the input row plus ``nll_sum``
(sum of the answer tokens' negative log-likelihoods, nats) and ``num_tokens``.

The numbers are exactly the training loss terms: scoring runs the same fused
Bitune forward (``bitune.answer_nll``) as the train step, with the base model
alone, a plain LoRA adapter, or a Bitune adapter pair and any variant.

Example (a tiny random model; ``load_model`` gives a real one):

    >>> import jax
    >>> from bitune_jax.conversion import LoadedModel
    >>> from bitune_jax.model.config import ModelConfig
    >>> from bitune_jax.model.transformer import init_params
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    >>> model = LoadedModel(init_params(jax.random.PRNGKey(0), cfg), cfg, tokenizer=None, source="random")
    >>> out = score_rows(model, [{"prompt_ids": [1, 2, 3], "answer_ids": [4, 5]}])
    >>> sorted(out[0]), out[0]["num_tokens"]
    (['answer_ids', 'nll_sum', 'num_tokens', 'prompt_ids'], 2)
    >>> 0 < out[0]["nll_sum"] < 2 * 10  # two tokens of a 64-token vocabulary: about 2 * ln(64)
    True
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import bitune
from bitune_jax.data import pipeline as data_lib
from bitune_jax.data.pipeline import DataError
from bitune_jax.data.text import encode_pair


def read_jsonl(path: str) -> List[dict]:
    """Reads a JSONL file for scoring; any undecodable line is an error naming file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows = []
    for raw in data_lib.read_rows(path):
        if raw.fields is None:
            raise DataError(f"{raw.where}: {raw.problem}")
        rows.append(dict(raw.fields))
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def encode_rows(rows: List[dict], tokenizer, vocab_size: int, *, add_eos: bool = True, source: str = "<rows>"):
    """(prompt_ids, answer_ids) per row, validated. Errors name the source and 1-based row."""
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{source}: row {n}"
        if "prompt_ids" in row or "answer_ids" in row:
            p, a = row.get("prompt_ids"), row.get("answer_ids")
            for key, ids in (("prompt_ids", p), ("answer_ids", a)):
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                   for t in ids):
                    raise DataError(f"{where}: {key!r} must be a non-empty list of integers")
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise DataError(f"{where}: {key!r} has ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        elif "prompt" in row and "answer" in row:
            if not isinstance(row["prompt"], str) or not isinstance(row["answer"], str):
                raise DataError(f"{where}: 'prompt' and 'answer' must be strings")
            if tokenizer is None:
                raise DataError(f"{where}: text rows need a tokenizer, and the model has none; "
                                f"give 'prompt_ids'/'answer_ids' instead")
            p, a = encode_pair(tokenizer, row["prompt"], row["answer"], add_eos=add_eos)
            if not p or not a:
                raise DataError(f"{where}: prompt or answer tokenizes to nothing")
        else:
            raise DataError(f"{where}: needs either 'prompt_ids' and 'answer_ids', or 'prompt' and 'answer' "
                            f"(got keys {sorted(row)})")
        out.append((p, a))
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "method", "attention"))
def _nll(trainable, base, batch, cfg, method, attention):
    return bitune.answer_nll(trainable, base, cfg, method, batch, attention=attention)


def score_examples(base, cfg, examples, trainable=None, method: Optional[bitune.MethodConfig] = None,
                   batch_size: int = 8, bucket: int = 32, progress: bool = False, attention: str = "auto"):
    """``[(nll_sum, num_tokens)]`` for (prompt_ids, answer_ids) pairs, in input order.

    ``attention``: the attention implementation (``bitune_jax.model.attention``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    trainable, method = bitune.with_base_default(trainable, method)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), len(examples[i][1])))
    results = [None] * len(examples)
    it = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="score", unit="batch")
    for start in it:
        idx = order[start:start + batch_size]
        # A short last batch is filled with copies of its first example (results dropped), so every
        # batch has the same size and shapes only change with the length bucket.
        chunk = [examples[i] for i in idx]
        batch = data_lib.collate(chunk + [chunk[0]] * (batch_size - len(chunk)), bucket)
        nll, n = _nll(trainable, base, jax.tree_util.tree_map(jnp.asarray, batch), cfg, method, attention)
        nll, n = np.asarray(nll), np.asarray(n)
        for j, i in enumerate(idx):
            results[i] = (float(nll[j]), int(n[j]))
    return results


def score_rows(model, rows: List[dict], *, trainable=None, method=None, add_eos: bool = True, batch_size: int = 8,
               source: str = "<rows>", progress: bool = False, attention: str = "auto") -> List[dict]:
    """Scores rows with a :class:`bitune_jax.conversion.LoadedModel`; returns rows with ``nll_sum``/``num_tokens``."""
    examples = encode_rows(rows, model.tokenizer, model.cfg.vocab_size, add_eos=add_eos, source=source)
    scores = score_examples(model.params, model.cfg, examples, trainable, method, batch_size=batch_size,
                            progress=progress, attention=attention)
    return [{**row, "nll_sum": s, "num_tokens": n} for row, (s, n) in zip(rows, scores)]
