"""Attention kernels and masks.

Implementations (the ``model.attention`` config key and the ``--attention``
flag of every command select one; :data:`IMPLEMENTATIONS`):

* ``reference``: dense masked attention; runs on every backend and defines
  the numerics (scores and softmax in float32);
* ``blocked``: :func:`blocked_attention`, an online softmax over key blocks
  whose backward pass recomputes the probabilities, so no ``[q, k]`` score or
  probability tensor is saved for the backward pass (pure JAX, any backend);
* ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``,
  cuDNN's fused flash attention (GPU only);
* ``auto``: cuDNN on GPUs where it applies, ``xla`` on TPUs, the reference on
  CPUs (:func:`resolve`).

Tests compare every implementation that runs on the test machine with the
reference.

An attention mask is described by :class:`Mask`: per-token positions and
validity of the queries and keys plus a static ``causal`` flag. The dense
boolean form ``[batch, q_len, k_len]`` (True where a query may attend to a
key) is built from it by :func:`make_mask`, so one description serves causal,
bidirectional and sliding-window attention, and keys from a prefix cache that
sit before the queries (a key is "earlier" by position, not by index).
Kernels that take segment ids and block masks instead of a dense array read
the same description.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

_NEG = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


def make_mask(q_pos, k_pos, q_valid, k_valid, *, causal: bool, window: Optional[int] = None):
    """Boolean attention mask ``[batch, q_len, k_len]``.

    Args:
      q_pos, k_pos: integer positions ``[batch, q_len]`` / ``[batch, k_len]``.
      q_valid, k_valid: booleans, False at padding.
      causal: keys must not be after the query.
      window: sliding-window size; a key is visible when it is less than
        ``window`` positions before the query (and, for bidirectional masks,
        less than ``window`` positions after it).
    """
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    m = k_valid[:, None, :] & q_valid[:, :, None]
    if causal:
        m = m & (kp <= qp)
    if window is not None:
        m = m & (jnp.abs(qp - kp) < window)
    return m


@struct.dataclass
class Mask:
    """Which keys each query may see, described by positions and validity.

    ``q_pos``/``q_valid`` are ``[batch, q_len]``, ``k_pos``/``k_valid``
    ``[batch, k_len]`` (keys of a prefix cache first, then the queries' own
    keys). A query sees a valid key when the key is not later than the query
    (``causal``) or always (bidirectional); a sliding-window layer further
    requires ``|q_pos - k_pos| < window``.

    >>> import jax.numpy as jnp
    >>> pos = jnp.arange(3)[None]
    >>> ok = jnp.ones((1, 3), bool)
    >>> Mask(pos, pos, ok, ok, causal=True).dense()[0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """

    q_pos: jax.Array
    k_pos: jax.Array
    q_valid: jax.Array
    k_valid: jax.Array
    causal: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def over(cls, positions, valid, *, causal: bool, prefix_positions=None, prefix_valid=None) -> "Mask":
        """The mask of tokens attending to themselves, after an optional prefix cache."""
        k_pos, k_valid = positions, valid
        if prefix_positions is not None:
            k_pos = jnp.concatenate([prefix_positions, positions], axis=1)
            k_valid = jnp.concatenate([prefix_valid, valid], axis=1)
        return cls(positions, k_pos, valid, k_valid, causal=causal)

    def dense(self, window: Optional[int] = None) -> jax.Array:
        """Boolean ``[batch, q_len, k_len]``; ``window`` for sliding-window layers."""
        return make_mask(self.q_pos, self.k_pos, self.q_valid, self.k_valid, causal=self.causal, window=window)


IMPLEMENTATIONS = ("reference", "blocked", "xla", "cudnn", "auto")


def resolve(impl: str, *, softcap: Optional[float] = None, backend: Optional[str] = None) -> str:
    """The implementation ``impl`` stands for on ``backend`` (default: JAX's), checked.

    ``auto`` becomes ``cudnn`` on GPUs (the reference when logits are
    softcapped, which cuDNN cannot do), ``xla`` on TPUs (the reference with
    softcapping) and ``reference`` elsewhere. An implementation that cannot
    serve the case raises ``ValueError`` naming it and what to use instead.

    >>> resolve("auto", backend="cpu"), resolve("auto", backend="gpu"), resolve("auto", softcap=50.0, backend="gpu")
    ('reference', 'cudnn', 'reference')
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        if softcap is not None:
            return "reference"
        return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "xla"}.get(backend, "reference")
    if impl in ("xla", "cudnn") and softcap is not None:
        raise ValueError(f"attention={impl!r} cannot apply attention logit softcapping (this model has "
                         f"attn_logit_softcap={softcap}); use 'reference', 'blocked' or 'auto'")
    if impl == "cudnn" and backend not in ("gpu", "cuda"):
        raise ValueError(f"attention='cudnn' needs a GPU (this run's backend is {backend!r}); use 'auto'")
    return impl


def dot_product_attention(q, k, v, mask, *, scale: float, softcap: Optional[float] = None, impl: str = "reference"):
    """Grouped-query attention.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``.
      mask: boolean ``[batch, q_len, k_len]``.
      scale: multiplier of the scores.
      softcap: optional ``c * tanh(s / c)`` logit cap (Gemma).
      impl: "reference" (dense, everywhere), "xla" or "cudnn"
        (``jax.nn.dot_product_attention``; neither supports logit softcapping).

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype.
    """
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    if impl in ("xla", "cudnn"):
        resolve(impl, softcap=softcap)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=impl)
        # Rows with no visible key (padding) are zero, as in the reference.
        return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
    if impl != "reference":
        raise ValueError(f"attention={impl!r} is not a dense-mask implementation; allowed here: reference, xla, cudnn")
    g = h // kvh
    qg = q.reshape(b, tq, kvh, g, d)
    # [batch, kv_heads, group, q_len, k_len]
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v)
    return out.reshape(b, tq, h, d)


# --------------------------------------------------------------------------- blocked attention
def blocked_attention(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, *, scale: float,
                      softcap: Optional[float] = None, block: int = 512):
    """Grouped-query attention over key blocks with an online softmax; nothing ``[q, k]``-sized is saved.

    The mask is computed block by block from positions and validity (never
    materialised whole): query ``i`` of row ``b`` sees key ``j`` when both are
    valid, ``k_pos <= q_pos`` where ``causal[b]``, and
    ``|q_pos - k_pos| < window``. The backward pass recomputes each block's
    probabilities from the saved log-sum-exp (flash-attention style), so the
    residuals are the inputs, the output and one float per query and head.

    Args:
      q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, k_len, kv_heads, head_dim]``.
      q_pos, q_valid: ``[batch, q_len]``; k_pos, k_valid: ``[batch, k_len]``.
      causal: bool ``[batch]`` (rows of different mask kinds can share a call).
      window: int scalar (may be traced); a huge value means no window.
      block: keys per block (the key length is padded up to a multiple).

    Returns ``[batch, q_len, heads, head_dim]`` in q's dtype; rows with no
    visible key are zero, as in the reference.
    """
    tk = k.shape[1]
    block = min(block, -(-tk // 8) * 8)
    pad = -tk % block
    if pad:
        k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k, v))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)))
        k_valid = jnp.pad(k_valid, ((0, 0), (0, pad)))
    out = _blocked(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, jnp.asarray(window, jnp.int32),
                   float(scale), softcap, block)
    return out


def _blocks(x, block):
    """``[b, n*block, ...] -> [n, b, block, ...]`` (scan over key blocks)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _block_mask(q_pos, q_valid, kp, kv, causal, window):
    """``[b, 1, 1, q, block]`` visibility of one key block."""
    qp = q_pos[:, :, None]
    kpb = kp[:, None, :]
    m = q_valid[:, :, None] & kv[:, None, :] & (jnp.abs(qp - kpb) < window)
    m = m & (~causal[:, None, None] | (kpb <= qp))
    return m[:, None, None]


def _scores(qg, kb, scale, softcap):
    s = jnp.einsum("bhgqd,bkhd->bhgqk", qg, kb, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _group(q, kvh):
    b, tq, h, d = q.shape
    return jnp.moveaxis(q.reshape(b, tq, kvh, h // kvh, d), 1, 3)  # [b, kvh, g, tq, d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _blocked(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, scale, softcap, block):
    return _blocked_fwd(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, scale, softcap, block)[0]


def _blocked_fwd(q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, scale, softcap, block):
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    qg = _group(q, kvh)

    def step(carry, xs):
        m, l, acc = carry
        kb, vb, kp, kv = xs
        s, _ = _scores(qg, kb, scale, softcap)
        ok = _block_mask(q_pos, q_valid, kp, kv, causal, window)
        s = jnp.where(ok, s, _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        acc = acc * corr[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), vb,
                                                 preferred_element_type=jnp.float32)
        return (m_new, l * corr + p.sum(-1), acc), None

    g = h // kvh
    init = (jnp.full((b, kvh, g, tq), _NEG, jnp.float32), jnp.zeros((b, kvh, g, tq), jnp.float32),
            jnp.zeros((b, kvh, g, tq, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (_blocks(k, block), _blocks(v, block), _blocks(k_pos, block),
                                               _blocks(k_valid, block)))
    seen = l > 0
    outg = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    out = jnp.moveaxis(outg, 3, 1).reshape(b, tq, h, d).astype(q.dtype)
    return out, (q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, out, lse)


def _blocked_bwd(scale, softcap, block, res, dout):
    q, k, v, q_pos, k_pos, q_valid, k_valid, causal, window, out, lse = res
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    qg = _group(q, kvh).astype(jnp.float32)
    dog = _group(dout, kvh).astype(jnp.float32)
    delta = jnp.sum(dog * _group(out, kvh).astype(jnp.float32), -1)  # [b, kvh, g, tq]

    def step(dq, xs):
        kb, vb, kp, kv = xs
        s, t = _scores(qg, kb, scale, softcap)
        ok = _block_mask(q_pos, q_valid, kp, kv, causal, window)
        p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bhgqk,bhgqd->bkhd", p, dog)
        dp = jnp.einsum("bhgqd,bkhd->bhgqk", dog, vb.astype(jnp.float32))
        ds = p * (dp - delta[..., None])
        if softcap is not None:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dq = dq + jnp.einsum("bhgqk,bkhd->bhgqd", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("bhgqk,bhgqd->bkhd", ds, qg)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qg), (_blocks(k, block), _blocks(v, block),
                                                           _blocks(k_pos, block), _blocks(k_valid, block)))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, kvh, d)  # noqa: E731
    dq = jnp.moveaxis(dq, 3, 1).reshape(b, tq, h, d).astype(q.dtype)
    return (dq, unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None, None, None, None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
