"""Splash attention (the Pallas TPU kernel) for the model's attention masks.

``jax.experimental.pallas.ops.tpu.splash_attention`` computes attention for
one example at a time (``[heads, len, head_dim]``) under a *static* mask over
column indices (causal, full, local window; the kernel skips the blocks it
hides) and'ed with *segment ids* (a query sees a key only when their ids are
equal). It does not scale ``q``; it caps logits itself
(``attn_logits_soft_cap``). A :class:`~bitune_jax.model.attention.Mask` maps
onto it like this:

* validity goes into the segment ids: a valid token carries its segment (0
  without packing), every padding token :data:`PAD_SEGMENT`, so a valid query
  sees exactly the valid keys of its own example, whatever the padding;
* a stream without prefix (the prompt streams) uses ``CausalMask`` or
  ``FullMask``; a stream whose keys are ``[prefix (P) | own (T)]`` (the answer
  stream over the mixed prompt cache, scoring continuations, decoding) uses
  ``CausalMask((T, P + T), offset=P)``: every prefix column plus causal within
  its own keys, which is the mask by position because every valid prefix key
  comes before the stream's first query;
* lengths are padded to multiples of 128 (the kernel's kv blocks must be), the
  padding carrying :data:`PAD_SEGMENT`; padding queries come back as zeros, as
  in the reference, so they add nothing to any loss or gradient;
* sliding-window layers use ``LocalMask`` (``|q_pos - k_pos| < window``), whose
  window counts columns. In a prompt stream columns and positions differ by a
  constant per example (consecutive positions), packed or not. Over a prefix
  they do not: a right-padded prefix puts pad columns between a row's last
  prompt key and its first query. Local layers therefore reorder the keys
  first: without packing, each row's valid prefix keys move to the right end
  of the prefix (a stable sort by validity); with packed rows, the stream
  becomes one self-attention sequence in which every example's prefix keys
  are directly followed by its own tokens (query rows at prefix columns are
  dummies, discarded). Both assume, as every caller in this package
  guarantees, that an example's valid keys hold consecutive positions and its
  prefix ends right before its first query.

The local/global choice of a layer is a traced flag inside the layer scan, so
on models with local layers both kernels are built and ``lax.cond`` runs one.

Under a mesh (the train step traces inside ``use_abstract_mesh`` and flax's
logical axis rules) the call runs in ``shard_map``: the batch split as the
``batch`` rule says and heads as ``heads`` (key/value heads repeated when
their count does not split the same way), each device running the kernel on
its shard.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

PAD_SEGMENT = -1  # segment id of padding tokens (queries and keys)
_LANES = 128  # kv blocks (and, with segment ids, the backward pass's q blocks) are multiples of this
_BIG = np.iinfo(np.int32).max


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int, largest: int) -> int:
    """The largest of ``largest, largest / 2, ..., 128`` dividing ``n`` (a multiple of 128)."""
    b = largest
    while n % b:
        b //= 2
    return b


@functools.lru_cache(maxsize=64)
def _kernel(tq: int, tk: int, heads: int, offset: int, causal: bool, window: Optional[int],
            softcap: Optional[float], block: int, interpret: bool):
    """The splash kernel for ``[heads, tq, hd]`` queries over ``tk`` keys (built once per static setting)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        mask = sa.CausalMask((tq, tk), offset=offset) if causal else sa.FullMask((tq, tk))
    else:  # key visible when |q_pos - k_pos| < window (and not after the query when causal)
        mask = sa.LocalMask((tq, tk), (window - 1, 0 if causal else window - 1), offset=offset)
    bq, bk = _block(tq, block), _block(tk, block)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    # Its block tables become concrete arrays (not values of the trace that first asks), so it can be cached.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def _run(q, k, v, q_seg, k_seg, *, offset, causal, window, softcap, block, interpret):
    """One kernel over a batch: ``[b, tq, heads, d]`` x ``[b, tk, kv_heads, d]`` -> ``[b, tq, heads, d]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, tq, h, _ = q.shape
    tk = k.shape[1]
    tq_p, tk_p = _round_up(tq, _LANES), _round_up(tk, _LANES)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    q, k, v = (jnp.swapaxes(pad(x, n), 1, 2) for x, n in ((q, tq_p), (k, tk_p), (v, tk_p)))  # [b, heads, t, d]
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tq_p - tq)), constant_values=PAD_SEGMENT)
    k_seg = jnp.pad(k_seg, ((0, 0), (0, tk_p - tk)), constant_values=PAD_SEGMENT)
    kernel = _kernel(tq_p, tk_p, h, offset, causal, window, softcap, block, interpret)
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=SegmentIds(qs, ks)))(q, k, v, q_seg, k_seg)
    return jnp.swapaxes(out, 1, 2)[:, :tq]


def _take(x, idx):
    """``x[r, idx[r, j]]`` along axis 1, per row."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _right_aligned(k_valid, p: int):
    """Key order ``[b, tk]`` moving each row's valid prefix keys (of ``p``) to the end of the prefix."""
    b, tk = k_valid.shape
    order = jnp.argsort(k_valid[:, :p].astype(jnp.int32), axis=1, stable=True)  # pad columns first, order kept
    return jnp.concatenate([order, jnp.broadcast_to(jnp.arange(p, tk), (b, tk - p))], axis=1)


def _grouped(k_pos, k_valid, k_seg):
    """Key order ``[b, tk]`` with each segment's valid keys together in position order, padding last.

    Returns ``(order, col)``: the old index of every new column, and the new
    column of every old index.
    """
    b, t = k_pos.shape
    rows = jnp.arange(b)[:, None]
    sid = jnp.clip(k_seg, 0, t)  # a per-row table index
    count = jnp.zeros((b, t + 1), jnp.int32).at[rows, sid].add(k_valid.astype(jnp.int32))
    start = jnp.cumsum(count, axis=1) - count
    first = jnp.full((b, t + 1), _BIG, jnp.int32).at[rows, sid].min(jnp.where(k_valid, k_pos, _BIG))
    col = jnp.where(k_valid, jnp.take_along_axis(start, sid, 1) + k_pos - jnp.take_along_axis(first, sid, 1),
                    k_valid.sum(1, keepdims=True) + jnp.cumsum(~k_valid, axis=1) - 1)
    return jnp.argsort(col, axis=1), col


def _call(x, is_local, *, offset, causal, window, softcap, block, interpret):
    """Splash attention on (this device's share of) the batch; ``x`` holds the arrays (see :func:`attention`)."""
    run = functools.partial(_run, causal=causal, softcap=softcap, block=block, interpret=interpret)
    q, k, v, q_seg, k_seg = x["q"], x["k"], x["v"], x["q_seg"], x["k_seg"]

    def global_layer():
        return run(q, k, v, q_seg, k_seg, offset=offset, window=None)

    def local_layer():
        if "order" not in x:
            return run(q, k, v, q_seg, k_seg, offset=offset, window=window)
        order = x["order"]
        k2, v2, k_seg2 = (_take(t, order) for t in (k, v, k_seg))
        if "q_cols" not in x:  # right-aligned prefix
            return run(q, k2, v2, q_seg, k_seg2, offset=offset, window=window)
        # Grouped: queries sit at their own keys' columns of one self-attention sequence; rows at prefix
        # columns are dummies (padding segment), dropped by the final gather.
        b, _, h, d = q.shape
        q2 = _take(jnp.concatenate([jnp.zeros((b, offset, h, d), q.dtype), q], axis=1), order)
        q_seg2 = _take(jnp.concatenate([jnp.full((b, offset), PAD_SEGMENT, jnp.int32), q_seg], axis=1), order)
        return _take(run(q2, k2, v2, q_seg2, k_seg2, offset=0, window=window), x["q_cols"])

    if window is None or is_local is False:
        out = global_layer()
    elif is_local is True:
        out = local_layer()
    else:
        out = jax.lax.cond(is_local, local_layer, global_layer)
    # Padding queries saw only padding keys (or nothing): zero, as in the reference, and no gradient.
    return jnp.where(x["q_valid"][:, :, None, None], out, 0).astype(q.dtype)


def _mesh_axes(logical: str, dim: int, sizes) -> tuple:
    """Mesh axes the current logical rules give ``logical``, or () when they do not divide ``dim``."""
    ax = nn.logical_to_mesh_axes((logical,))[0]
    names = () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)
    size = int(np.prod([sizes[n] for n in names])) if names else 1
    return names if size > 1 and dim % size == 0 else ()


def _spec_entry(names: tuple):
    return None if not names else names[0] if len(names) == 1 else names


def attention(q, k, v, mask, *, scale: float, softcap: Optional[float] = None, window: Optional[int] = None,
              is_local=False, block: int = 512, interpret: bool = False):
    """Grouped-query attention of one stream with the splash kernel.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``: ``k_len - q_len`` prefix
        keys, then the queries' own keys.
      mask: the stream's :class:`~bitune_jax.model.attention.Mask` (with
        ``q_segment``/``k_segment`` for packed rows).
      scale: multiplier of the scores (applied to ``q``; the kernel does not scale).
      softcap: optional ``c * tanh(s / c)`` logit cap.
      window: the model's sliding window (None: no local layers).
      is_local: bool or traced bool: this layer uses the window.
      block: largest block size (a power-of-two multiple of 128); lengths are
        padded to multiples of 128 and each block is the largest such size up
        to this that divides them.
      interpret: run the kernel in Pallas's interpreter (any backend; slow).

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype; padding queries are zero.
    """
    b, tq, h, _ = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    offset = tk - tq  # prefix keys
    if offset < 0:
        raise ValueError(f"splash attention: {tq} queries over {tk} keys; the queries' own keys must come last")
    if block < _LANES or block & (block - 1):
        raise ValueError(f"splash attention: block={block}; a power of two >= {_LANES} is needed")
    if window is not None and window >= tk:
        window = None  # no key is that far from any query: the window never bites
    if isinstance(is_local, (bool, np.bool_)):
        is_local = bool(is_local)
    q_seg, k_seg = getattr(mask, "q_segment", None), getattr(mask, "k_segment", None)
    packed = q_seg is not None
    x = {"q": (q.astype(jnp.float32) * scale).astype(q.dtype), "k": k, "v": v, "q_valid": mask.q_valid,
         "q_seg": jnp.where(mask.q_valid, q_seg if packed else 0, PAD_SEGMENT).astype(jnp.int32),
         "k_seg": jnp.where(mask.k_valid, k_seg if packed else 0, PAD_SEGMENT).astype(jnp.int32)}
    if window is not None and is_local is not False and offset:
        if packed:
            x["order"], col = _grouped(mask.k_pos, mask.k_valid, x["k_seg"])
            x["q_cols"] = col[:, offset:]
        else:
            x["order"] = _right_aligned(mask.k_valid, offset)
    call = functools.partial(_call, offset=offset, causal=mask.causal, window=window, softcap=softcap,
                             block=block, interpret=interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return call(x, is_local)
    sizes = dict(mesh.shape)
    batch_axes = _mesh_axes("batch", b, sizes)
    head_axes = tuple(a for a in _mesh_axes("heads", h, sizes) if a not in batch_axes)
    if head_axes and _mesh_axes("kv_heads", kvh, sizes) != head_axes:
        # Key/value heads do not split like the query heads: every query head gets its own copy.
        x["k"], x["v"] = (jnp.repeat(x[n], h // kvh, axis=2) for n in ("k", "v"))
    heads_spec = P(_spec_entry(batch_axes), None, _spec_entry(head_axes), None)
    specs = {n: heads_spec if n in ("q", "k", "v") else P(_spec_entry(batch_axes), None) for n in x}
    if isinstance(is_local, bool):
        fn = lambda x: call(x, is_local)  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=heads_spec, check_vma=False)(x)
    return jax.shard_map(call, mesh=mesh, in_specs=(specs, P()), out_specs=heads_spec,
                         check_vma=False)(x, jnp.asarray(is_local))
