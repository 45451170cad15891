"""Text generation with a Bitune (or plain) model: prefill twice, mix, then decode.

Generation is the method's last step (docs/method.md, "Generation"): the prompt span
``x[0..L-1)`` is prefilled by the variant's passes and mixed
(:func:`bitune_jax.bitune.prefill`; a plain causal prefill for the base
model), then ordinary key/value-cache decoding runs with the causal adapter
set, starting by feeding ``x[L-1]`` at position ``L-1``. After the prefill a
Bitune model costs exactly what a LoRA model costs.

The decode cache has a fixed size, ``[layers, B, S + max_new_tokens,
kv_heads, hd]`` with ``S`` the (bucketed) prefill length: slots ``0..S)`` hold
the mixed prefix, and decode step ``t`` writes the keys/values of the token it
feeds into slot ``S + t`` of every example (``lax.dynamic_update_slice``).
Examples of different prompt lengths share a batch: every cache slot carries
its own position and a per-example validity bit, so example ``b`` at step
``t`` feeds position ``L_b - 1 + t`` and attends only to its own prompt and
its own generated tokens. One jitted ``lax.while_loop`` runs the decode steps
(it exits early once every example has finished).

Stopping: an example finishes on an EOS token (``finish_reason="eos"``, the
EOS id is kept in ``token_ids`` and left out of ``text``), on a stop string
(``"stop"``), or after ``max_new_tokens`` (``"length"``). Stop strings are
checked on the host on decoded text between chunks of ``chunk_size`` decode
steps, so a batch stops at most ``chunk_size - 1`` steps after its last
example printed a stop string; the text is cut before the first stop string
and ``token_ids`` end with the token that completed it.

Sampling: ``temperature=0`` is greedy; otherwise logits are divided by the
temperature, filtered by ``top_k`` (0: off) and ``top_p`` (1: off) and
sampled. Each example draws from its own key, ``fold_in(fold_in(seed, i), t)``
for prompt index ``i`` and step ``t``, so a seed reproduces its outputs
whatever the batch size or the order of the prompts.

Example, a tiny random Bitune model with token-id prompts (with a real model
from ``load_model``, pass ``m.tokenizer`` and text prompts, and get ``.text``):

    >>> from bitune_jax.model.config import ModelConfig
    >>> from bitune_jax.model.transformer import init_params
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    >>> base = init_params(jax.random.PRNGKey(0), cfg)
    >>> method = bitune.MethodConfig(variant="bitune")
    >>> trainable = bitune.init_trainable(jax.random.PRNGKey(1), cfg, method, base)
    >>> out = generate(base, cfg, None, [[1, 2, 3], [4, 5, 6, 7, 8]], trainable, method, max_new_tokens=5)
    >>> [(len(o.token_ids), o.finish_reason) for o in out]
    [(5, 'length'), (5, 'length')]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import bitune
from bitune_jax.data.pipeline import round_up
from bitune_jax.model import transformer as T
from bitune_jax.model.attention import Mask
from bitune_jax.model.config import ModelConfig


# --------------------------------------------------------------------------- public types
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` means greedy (top-k/top-p ignored)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; must be >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; must be in (0, 1] (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Generation(NamedTuple):
    """One prompt's result."""

    text: str  # decoded continuation, cut before a stop string, without the EOS token
    token_ids: List[int]  # every generated token (the final EOS / stop-completing token included)
    finish_reason: str  # "eos" | "stop" | "length"


class DecodeState(NamedTuple):
    """Everything the decode loop carries (device arrays)."""

    k: jax.Array  # [layers, B, T, kv_heads, hd] with T = S + max_new
    v: jax.Array  # [layers, B, T, kv_heads, hd]
    cache_pos: jax.Array  # [B, T] position of each slot
    cache_valid: jax.Array  # [B, T] slot holds a real key of this example
    token: jax.Array  # [B] token to feed at the next step
    step: jax.Array  # [] number of decode steps done
    out: jax.Array  # [B, max_new] generated tokens, -1 after an example finished
    done: jax.Array  # [B]
    keys: jax.Array  # [B, 2] per-example PRNG keys


# --------------------------------------------------------------------------- prefill and cache
@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new", "attention"))
def start(trainable, base, prompt_ids, prompt_len, keys, *, cfg: ModelConfig, method: bitune.MethodConfig,
          max_new: int, attention: str = "auto") -> DecodeState:
    """Prefills a right-padded batch and lays the prefix into a fixed-size decode cache.

    Args:
      prompt_ids: ``[B, P]`` right-padded prompts; ``prompt_len``: ``[B]`` (>= 1).
      keys: ``[B, 2]`` per-example PRNG keys (unused when greedy).
      max_new: decode steps the cache has room for.
    """
    prefix = bitune.prefill(trainable, base, cfg, method, prompt_ids, prompt_len, attention=attention)
    layers, b, s, kvh, hd = prefix.kv.k.shape
    pad = ((0, 0), (0, 0), (0, max_new), (0, 0), (0, 0))
    k = jnp.pad(prefix.kv.k, pad)
    v = jnp.pad(prefix.kv.v, pad)
    # Slot S + t holds the token fed at step t, i.e. position L - 1 + t.
    gen_pos = prefix.next_pos[:, None] + jnp.arange(max_new, dtype=jnp.int32)[None]
    cache_pos = jnp.concatenate([prefix.positions, gen_pos], axis=1)
    cache_valid = jnp.concatenate([prefix.valid, jnp.zeros((b, max_new), bool)], axis=1)
    return DecodeState(k, v, cache_pos, cache_valid, prefix.last_token.astype(jnp.int32), jnp.zeros((), jnp.int32),
                       jnp.full((b, max_new), -1, jnp.int32), jnp.zeros((b,), bool), keys)


def decode_step(base, cfg: ModelConfig, adapters, peft_cfg, k, v, cache_pos, cache_valid, token, slot,
                attention: str = "auto"):
    """Feeds one token per example and returns ``(logits [B, V] float32, k, v, cache_valid)``.

    ``token`` ``[B]`` sits at position ``cache_pos[:, slot]`` (``slot`` a
    traced scalar, the same for every example). Each layer applies the model's
    decoder block with that layer's cache as the key/value prefix (every valid
    slot at or before the token's position is visible), then writes the
    token's own keys/values into slot ``slot``.
    """
    b = token.shape[0]
    q_pos = jax.lax.dynamic_slice_in_dim(cache_pos, slot, 1, axis=1)  # [B, 1]
    mask = Mask.over(q_pos, jnp.ones((b, 1), bool), causal=True, prefix_positions=cache_pos,
                     prefix_valid=cache_valid)
    x = T.embed(base, cfg, token[:, None])  # [B, 1, d]

    def body(carry, layer):
        x, k, v = carry
        lp, ad, is_local, idx = layer
        k_l = jax.lax.dynamic_index_in_dim(k, idx, 0, keepdims=False)  # [B, T, kv_heads, hd]
        v_l = jax.lax.dynamic_index_in_dim(v, idx, 0, keepdims=False)
        (x,), (k_new,), (v_new,) = T.apply_block(lp, cfg, [x], [q_pos], [mask], [ad], is_local=is_local,
                                                 prefix=[(k_l, v_l)], peft_cfg=peft_cfg, attention=attention)
        zero = jnp.zeros((), jnp.int32)
        k = jax.lax.dynamic_update_slice(k, k_new[None].astype(k.dtype), (idx, zero, slot, zero, zero))
        v = jax.lax.dynamic_update_slice(v, v_new[None].astype(v.dtype), (idx, zero, slot, zero, zero))
        return (x, k, v), None

    layers = (base["layers"], adapters, T.layer_flags(cfg), jnp.arange(cfg.num_layers, dtype=jnp.int32))
    (x, k, v), _ = jax.lax.scan(body, (x, k, v), layers)
    logits = T.unembed(base, cfg, x)[:, 0]
    cache_valid = jax.lax.dynamic_update_slice_in_dim(cache_valid, jnp.ones((b, 1), bool), slot, axis=1)
    return logits, k, v, cache_valid


def sample_token(logits, keys, step, sampling: Sampling):
    """Next token ``[B]`` from float32 logits ``[B, V]``; ``keys`` ``[B, 2]`` are per-example keys."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        # Keep the smallest head of the sorted distribution whose mass reaches top_p (at least one token).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    step_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "peft_cfg", "sampling", "n_steps", "eos_ids", "attention"),
                   donate_argnames=("state",))
def decode(base, adapters, state: DecodeState, *, cfg: ModelConfig, peft_cfg, sampling: Sampling, n_steps: int,
           eos_ids: tuple = (), attention: str = "auto") -> DecodeState:
    """Runs up to ``n_steps`` decode steps (fewer when the cache is full or every example is done)."""
    max_new = state.out.shape[1]
    s = state.cache_pos.shape[1] - max_new
    stop_at = jnp.minimum(state.step + n_steps, max_new)
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def cond(st):
        return (st.step < stop_at) & ~jnp.all(st.done)

    def body(st):
        logits, k, v, cache_valid = decode_step(base, cfg, adapters, peft_cfg, st.k, st.v, st.cache_pos,
                                                st.cache_valid, st.token, s + st.step, attention)
        tok = sample_token(logits, st.keys, st.step, sampling)
        out = jax.lax.dynamic_update_slice_in_dim(st.out, jnp.where(st.done, -1, tok)[:, None], st.step, axis=1)
        done = st.done | jnp.any(tok[:, None] == eos[None], axis=-1)
        return st._replace(k=k, v=v, cache_valid=cache_valid, token=jnp.where(st.done, 0, tok), step=st.step + 1,
                           out=out, done=done)

    return jax.lax.while_loop(cond, body, state)


# --------------------------------------------------------------------------- host loop
def _find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def _stop_token_count(tokenizer, ids: List[int], stop: Sequence[str]) -> int:
    """Smallest n such that the decoded ``ids[:n]`` contains a stop string (binary search)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if _find_stop(tokenizer.decode(ids[:mid]), stop) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _encode_prompts(tokenizer, prompts) -> List[List[int]]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token id lists instead")
            ids = list(tokenizer(p)["input_ids"])
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty (a prompt needs at least one token)")
        out.append(ids)
    return out


def generate(base, cfg: ModelConfig, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], trainable=None,
             method: Optional[bitune.MethodConfig] = None, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Optional[Sequence[str]] = None,
             eos_token_ids: Optional[Sequence[int]] = None, batch_size: int = 8, chunk_size: int = 32,
             bucket: int = 32, attention: str = "auto", progress: bool = False) -> List[Generation]:
    """Generates a continuation for each prompt.

    Args:
      base, cfg: the frozen model.
      tokenizer: encodes text prompts (``tokenizer(p)["input_ids"]``, special
        tokens as the tokenizer adds them, like training prompts) and decodes
        outputs; may be None when prompts are token lists and no text or stop
        strings are wanted.
      prompts: strings or token id lists.
      trainable, method: adapters and their :class:`~bitune_jax.bitune.MethodConfig`
        (any variant); ``trainable=None`` is the base model.
      max_new_tokens: most tokens generated per prompt.
      temperature, top_k, top_p, seed: see :class:`Sampling` and the module docstring.
      stop: stop strings (checked on decoded text; see the module docstring).
      eos_token_ids: ids that end generation; default the tokenizer's EOS.
      batch_size: prompts decoded together (prompts are sorted by length
        into batches; results come back in input order).
      chunk_size: decode steps between host checks of stop strings.
      bucket: prompt lengths are padded up to a multiple of this (fewer compilations).

    Returns:
      One :class:`Generation` per prompt, in input order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; must be >= 1")
    sampling = Sampling(temperature, top_k, top_p)
    stop = tuple(s for s in (stop or ()) if s)
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the output")
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        eos_token_ids = () if eos is None else (int(eos),)
    eos_ids = tuple(int(e) for e in eos_token_ids)
    trainable, method = bitune.with_base_default(trainable, method)
    adapters = trainable["causal"]

    ids = _encode_prompts(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    root = jax.random.PRNGKey(seed)
    results: List[Optional[Generation]] = [None] * len(ids)
    n_steps = chunk_size if stop else max_new_tokens
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="generate", unit="batch")
    for first in batches:
        idx = order[first:first + batch_size]
        b = batch_size if len(ids) > batch_size else len(idx)
        p = round_up(max(len(ids[i]) for i in idx), bucket)
        prompt = np.zeros((b, p), np.int32)
        plen = np.ones((b,), np.int32)
        for j, i in enumerate(idx):
            prompt[j, :len(ids[i])] = ids[i]
            plen[j] = len(ids[i])
        keys = jnp.stack([jax.random.fold_in(root, i) for i in idx] + [root] * (b - len(idx)))
        state = start(trainable, base, jnp.asarray(prompt), jnp.asarray(plen), keys, cfg=cfg, method=method,
                      max_new=max_new_tokens, attention=attention)
        done_host = np.arange(b) >= len(idx)  # batch padding never runs its own stop checks
        state = state._replace(done=jnp.asarray(done_host))
        stopped = {}
        while True:
            state = decode(base, adapters, state, cfg=cfg, peft_cfg=method.peft, sampling=sampling,
                           n_steps=n_steps, eos_ids=eos_ids, attention=attention)
            step, done = int(state.step), np.array(state.done)
            if stop:
                out = np.asarray(state.out)
                for j in range(len(idx)):
                    if j in stopped or done[j]:
                        continue
                    toks = [int(t) for t in out[j, :step] if t >= 0]
                    if _find_stop(tokenizer.decode(toks), stop) >= 0:
                        stopped[j] = _stop_token_count(tokenizer, toks, stop)
                        done[j] = True
                state = state._replace(done=jnp.asarray(done))
            if step >= max_new_tokens or done.all():
                break
        out = np.asarray(state.out)
        for j, i in enumerate(idx):
            toks = [int(t) for t in out[j] if t >= 0]
            results[i] = _finish(tokenizer, toks, stopped.get(j), stop, eos_ids)
    return results


def _finish(tokenizer, toks: List[int], stop_count: Optional[int], stop, eos_ids) -> Generation:
    if stop_count is not None:
        toks = toks[:stop_count]
        text = tokenizer.decode(toks)
        return Generation(text[:_find_stop(text, stop)], toks, "stop")
    if toks and toks[-1] in eos_ids:
        text = tokenizer.decode(toks[:-1]) if tokenizer is not None else ""
        return Generation(text, toks, "eos")
    text = tokenizer.decode(toks) if tokenizer is not None else ""
    return Generation(text, toks, "length")


# --------------------------------------------------------------------------- load and generate
def run_generate(model_src: str, prompts: Sequence[str], adapters: Optional[str] = None,
                 variant: Optional[str] = None, out: Optional[str] = None, dtype: str = "float32",
                 **gen_kwargs) -> List[dict]:
    """Loads a model (and adapters) and generates for ``prompts``; the library side of ``bitune-jax generate``.

    ``gen_kwargs`` go to :func:`generate`. Returns one dict per prompt
    (``prompt``, ``text``, ``token_ids``, ``finish_reason``), also written as
    JSONL to ``out`` (atomically) when given.
    """
    from bitune_jax.conversion.adapters import load_with_adapters
    from bitune_jax.fileio import check_writable, write_jsonl_atomic

    if out:
        check_writable(out)  # before the model loads
    model, trainable, method = load_with_adapters(model_src, adapters, variant, dtype)
    gens = generate(model.params, model.cfg, model.tokenizer, list(prompts), trainable, method, **gen_kwargs)
    rows = [{"prompt": p, "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
            for p, g in zip(prompts, gens)]
    if out:
        write_jsonl_atomic(out, rows)
    return rows
