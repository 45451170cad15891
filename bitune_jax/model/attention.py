"""Attention kernels and masks.

``dot_product_attention`` is the dense masked reference: it runs on every
backend and defines the numerics (scores and softmax in float32).
``impl="fast"`` calls ``jax.nn.dot_product_attention``, which picks cuDNN's
fused flash attention on GPUs where it applies and XLA elsewhere;
``impl="cudnn"`` insists on cuDNN. Tests compare "fast" with the reference on
every backend they run on.

Masks are boolean ``[batch, q_len, k_len]`` arrays, True where a query may
attend to a key. They are built from per-token positions and validity, so
the same helpers serve causal, bidirectional and sliding-window attention,
and prefix caches whose keys sit before the queries.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

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


def dot_product_attention(q, k, v, mask, *, scale: float, softcap: Optional[float] = None, impl: str = "reference"):
    """Grouped-query attention.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``.
      mask: boolean ``[batch, q_len, k_len]``.
      scale: multiplier of the scores.
      softcap: optional ``c * tanh(s / c)`` logit cap (Gemma).
      impl: "reference" (dense, everywhere), "fast" (``jax.nn.dot_product_attention``,
        best available kernel) or "cudnn" (GPU only). The fused kernels do not
        support logit softcapping.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype.
    """
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    if impl in ("fast", "cudnn"):
        if softcap is not None:
            raise ValueError(f"attention impl={impl!r} does not support logit softcapping; use 'reference'")
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                           implementation="cudnn" if impl == "cudnn" else None)
        # Rows with no visible key (padding) are zero, as in the reference.
        return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
    if impl != "reference":
        raise ValueError(f"attention impl={impl!r}; allowed: 'reference', 'fast', 'cudnn'")
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
