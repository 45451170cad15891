"""The decoder-only transformer, written as pure functions over plain pytrees.

This is the file to read first. Parameters are a nested dict (the functional
Flax style: weights are passed to the function, never stored in it)::

    {"embed": [vocab, d],
     "layers": {"attn_norm": {"scale": [L, d]},
                "q_proj": {"kernel": [L, d, heads*hd], "bias"?: [L, heads*hd]},
                "k_proj", "v_proj", "o_proj", "gate_proj"?, "up_proj", "down_proj",
                "mlp_norm"?, "q_norm"?, "k_norm"?, "post_attn_norm"?, "post_mlp_norm"?},
     "final_norm": {"scale": [d], "bias"?: [d]},
     "lm_head"?: {"kernel": [d, vocab], "bias"?: [vocab]}}

Every per-layer array is stacked on a leading layer axis and the layer stack
runs under ``jax.lax.scan``. Norm scales are stored as the multiplier actually
applied (importers fold Gemma's ``1 + w`` in), so one norm serves all families.

A layer is split into three steps so that Bitune can interleave several token
streams layer by layer (see ``bitune_jax/bitune.py``):

1. :func:`layer_qkv` normalises each stream and projects it to rotated
   queries, keys and values (base matmuls shared across streams);
2. the caller runs attention per stream with whatever mask and key/value
   prefix it needs;
3. :func:`layer_finish` applies the output projection, the MLP and the
   residuals.

:func:`forward` chains them for a single stream: an explicit attention mask
(causal or bidirectional), explicit positions, an optional prefix key/value
cache and optionally its own keys/values returned.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from bitune_jax.model.config import ModelConfig
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32,
    ...                   intermediate_size=64, num_layers=2, num_heads=4,
    ...                   num_kv_heads=2, head_dim=8)
    >>> params = init_params(jax.random.PRNGKey(0), cfg)
    >>> tokens = jnp.array([[1, 2, 3, 0]])
    >>> valid = jnp.array([[True, True, True, False]])
    >>> logits, _ = forward(params, cfg, tokens, valid=valid)
    >>> logits.shape
    (1, 4, 64)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax.model import attention as attn_lib
from bitune_jax.model import peft as peft_lib
from bitune_jax.model.config import ModelConfig


class KV(NamedTuple):
    """Keys and values of every layer: each ``[layers, batch, seq, kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array


def compute_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


# --------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig, theta: float) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32), with Llama-3/linear scaling."""
    dim = cfg.rotary_dim
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc[0] == "linear":
        return (inv / np.float32(sc[1])).astype(np.float32)
    if sc[0] == "llama3":
        _, factor, low, high, old = sc
        low_wavelen = old / low
        high_wavelen = old / high
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_scaling type {sc[0]!r} is not supported; allowed: 'linear', 'llama3'")


def apply_rope(x, positions, inv_freq):
    """Rotates the first ``2 * len(inv_freq)`` dims of each head (HF "rotate_half" layout).

    x: ``[batch, seq, heads, head_dim]``; positions: ``[batch, seq]``.
    """
    rot = 2 * inv_freq.shape[0]
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb)[:, :, None, :]
    sin = jnp.sin(emb)[:, :, None, :]
    xr, xp = x[..., :rot].astype(jnp.float32), x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = (xr * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out


# --------------------------------------------------------------------------- pieces
def norm(p, x, cfg: ModelConfig):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""
    xf = x.astype(jnp.float32)
    if cfg.norm_type == "layer":
        xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + cfg.norm_eps)
    y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def _act(x, cfg: ModelConfig):
    if cfg.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=cfg.activation == "gelu_tanh")


def embed(params, cfg: ModelConfig, tokens):
    # Ids are validated where data enters; clipping keeps padding garbage from turning into NaNs
    # (a NaN value at a masked key would still poison the attention sum: 0 * NaN = NaN).
    x = jnp.take(params["embed"], tokens, axis=0, mode="clip").astype(compute_dtype(cfg))
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    return x


def unembed(params, cfg: ModelConfig, h):
    """Final norm and vocabulary projection; returns float32 logits."""
    h = norm(params["final_norm"], h, cfg)
    if cfg.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"].astype(h.dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", h, params["lm_head"]["kernel"].astype(h.dtype),
                            preferred_element_type=jnp.float32)
        if "bias" in params["lm_head"]:
            logits = logits + params["lm_head"]["bias"].astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
        c = cfg.final_logit_softcap
        logits = c * jnp.tanh(logits / c)
    return logits


def layer_qkv(lp, cfg: ModelConfig, xs: Sequence, positions: Sequence, adapters: Sequence, peft_cfg=None,
              is_local=None, dropout_rngs=None):
    """First step of a layer for several streams.

    Args:
      lp: this layer's parameters (one slice of ``params["layers"]``).
      xs: residual streams, each ``[batch, seq, d]``.
      positions: matching ``[batch, seq]`` integer positions.
      adapters: one per-layer adapter set (or None) per stream.
      is_local: traced bool (Gemma 3): use the sliding-window RoPE base.
      dropout_rngs: optional per-stream PRNG keys for adapter dropout.

    Returns:
      ``(hs, qs, ks, vs)``: normalised inputs (needed again by parallel
      blocks), queries ``[b, s, heads, hd]``, rotated keys and values
      ``[b, s, kv_heads, hd]``.
    """
    hs = [norm(lp["attn_norm"], x, cfg) for x in xs]
    qs = peft_lib.dense(hs, lp["q_proj"], "q_proj", adapters, peft_cfg, _fold(dropout_rngs, 0))
    ks = peft_lib.dense(hs, lp["k_proj"], "k_proj", adapters, peft_cfg, _fold(dropout_rngs, 1))
    vs = peft_lib.dense(hs, lp["v_proj"], "v_proj", adapters, peft_cfg, _fold(dropout_rngs, 2))
    hd = cfg.head_dim
    qs = [q.reshape(*q.shape[:-1], cfg.num_heads, hd) for q in qs]
    ks = [k.reshape(*k.shape[:-1], cfg.num_kv_heads, hd) for k in ks]
    vs = [v.reshape(*v.shape[:-1], cfg.num_kv_heads, hd) for v in vs]
    if cfg.qk_norm:
        qs = [norm(lp["q_norm"], q, cfg) for q in qs]
        ks = [norm(lp["k_norm"], k, cfg) for k in ks]
    inv_global = rope_inv_freq(cfg, cfg.rope_theta)
    if cfg.has_local_layers and cfg.rope_local_theta is not None:
        # Local layers use plain RoPE: rope_scaling applies to global layers only (as HF Gemma 3).
        inv_local = rope_inv_freq(cfg.replace(rope_scaling=None), cfg.rope_local_theta)
        inv = jnp.where(is_local, jnp.asarray(inv_local), jnp.asarray(inv_global))
    else:
        inv = jnp.asarray(inv_global)
    qs = [apply_rope(q, p, inv) for q, p in zip(qs, positions)]
    ks = [apply_rope(k, p, inv) for k, p in zip(ks, positions)]
    return hs, qs, ks, vs


def _fold(rngs, i):
    return None if rngs is None else [jax.random.fold_in(r, i) for r in rngs]


def layer_finish(lp, cfg: ModelConfig, xs: Sequence, hs: Sequence, attn_outs: Sequence, adapters: Sequence,
                 peft_cfg=None, dropout_rngs=None):
    """Last step of a layer: output projection, MLP, residuals (per stream)."""
    flat = [a.reshape(*a.shape[:-2], -1) for a in attn_outs]
    os_ = peft_lib.dense(flat, lp["o_proj"], "o_proj", adapters, peft_cfg, _fold(dropout_rngs, 3))
    if cfg.sandwich_norm:
        os_ = [norm(lp["post_attn_norm"], o, cfg) for o in os_]
    if cfg.parallel_block:
        mlp_in = hs
        mids = [x + o for x, o in zip(xs, os_)]
    else:
        mids = [x + o for x, o in zip(xs, os_)]
        mlp_in = [norm(lp["mlp_norm"], m, cfg) for m in mids]
    if cfg.mlp_type == "gated":
        gates = peft_lib.dense(mlp_in, lp["gate_proj"], "gate_proj", adapters, peft_cfg, _fold(dropout_rngs, 4))
        ups = peft_lib.dense(mlp_in, lp["up_proj"], "up_proj", adapters, peft_cfg, _fold(dropout_rngs, 5))
        acts = [_act(g, cfg) * u for g, u in zip(gates, ups)]
    else:
        ups = peft_lib.dense(mlp_in, lp["up_proj"], "up_proj", adapters, peft_cfg, _fold(dropout_rngs, 5))
        acts = [_act(u, cfg) for u in ups]
    downs = peft_lib.dense(acts, lp["down_proj"], "down_proj", adapters, peft_cfg, _fold(dropout_rngs, 6))
    if cfg.sandwich_norm:
        downs = [norm(lp["post_mlp_norm"], d, cfg) for d in downs]
    return [m + d for m, d in zip(mids, downs)]


def layer_flags(cfg: ModelConfig):
    """Per-layer booleans ``[layers]``: True for sliding-window layers."""
    if cfg.has_local_layers:
        return jnp.asarray(np.array(cfg.sliding_layers, dtype=bool))
    return jnp.zeros((cfg.num_layers,), bool)


def attend(cfg: ModelConfig, q, k, v, mask, local_mask=None, is_local=None, impl="reference"):
    """Attention of one stream; picks the sliding-window mask on local layers."""
    if local_mask is not None and cfg.has_local_layers:
        mask = jnp.where(is_local, local_mask, mask)
    return attn_lib.dot_product_attention(q, k, v, mask, scale=cfg.scale, softcap=cfg.attn_logit_softcap, impl=impl)


def build_masks(cfg: ModelConfig, q_pos, k_pos, q_valid, k_valid, *, causal: bool):
    """``(mask, local_mask)`` for a stream; ``local_mask`` is None without sliding layers."""
    mask = attn_lib.make_mask(q_pos, k_pos, q_valid, k_valid, causal=causal)
    local = None
    if cfg.has_local_layers:
        local = attn_lib.make_mask(q_pos, k_pos, q_valid, k_valid, causal=causal, window=cfg.sliding_window)
    return mask, local


# --------------------------------------------------------------------------- forward
def forward(params, cfg: ModelConfig, tokens, *, positions=None, valid=None, causal: bool = True,
            prefix_kv: Optional[KV] = None, prefix_positions=None, prefix_valid=None,
            adapters=None, peft_cfg=None, return_kv: bool = False, compute_logits: bool = True,
            remat: bool = False, attn_impl: str = "reference"):
    """Runs the model over one stream of tokens.

    Args:
      params: base parameters (see module docstring).
      cfg: the architecture.
      tokens: ``[batch, seq]`` token ids (right padding is fine).
      positions: ``[batch, seq]`` position ids; default ``0..seq-1`` (plus
        nothing: pass offsets explicitly when continuing a prefix).
      valid: ``[batch, seq]`` bool, False on padding; default all True.
      causal: causal (True) or bidirectional (False) attention among ``tokens``.
      prefix_kv: optional cache of earlier keys/values, ``[layers, batch, P, kv_heads, hd]``,
        which every token may attend to (where ``prefix_valid``).
      prefix_positions, prefix_valid: ``[batch, P]`` positions and validity of the cache.
      adapters: optional adapter set stacked over layers (see ``bitune_jax.model.peft``).
      peft_cfg: its ``PeftConfig``.
      return_kv: also return this stream's own keys/values (a :class:`KV`).
      compute_logits: return float32 logits ``[batch, seq, vocab]``; else the
        final hidden states before the final norm.
      remat: recompute each layer in the backward pass.

    Returns:
      ``(logits_or_hidden, kv_or_None)``.
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if valid is None:
        valid = jnp.ones((b, t), bool)
    k_pos, k_valid = positions, valid
    if prefix_kv is not None:
        if prefix_positions is None or prefix_valid is None:
            raise ValueError("prefix_kv needs prefix_positions and prefix_valid")
        k_pos = jnp.concatenate([prefix_positions, positions], axis=1)
        k_valid = jnp.concatenate([prefix_valid, valid], axis=1)
    mask, local_mask = build_masks(cfg, positions, k_pos, valid, k_valid, causal=causal)

    x = embed(params, cfg, tokens)
    flags = layer_flags(cfg)

    def body(x, layer):
        lp, ad, is_local, pkv = layer
        hs, qs, ks, vs = layer_qkv(lp, cfg, [x], [positions], [ad], peft_cfg, is_local)
        k, v = ks[0], vs[0]
        if pkv is not None:
            k_all = jnp.concatenate([pkv[0].astype(k.dtype), k], axis=1)
            v_all = jnp.concatenate([pkv[1].astype(v.dtype), v], axis=1)
        else:
            k_all, v_all = k, v
        o = attend(cfg, qs[0], k_all, v_all, mask, local_mask, is_local, attn_impl)
        (x,) = layer_finish(lp, cfg, [x], hs, [o], [ad], peft_cfg)
        return x, ((k, v) if return_kv else None)

    if remat:
        body = jax.checkpoint(body)
    pkv = (prefix_kv.k, prefix_kv.v) if prefix_kv is not None else None
    x, kv = jax.lax.scan(body, x, (params["layers"], adapters, flags, pkv))
    out = unembed(params, cfg, x) if compute_logits else x
    return out, (KV(*kv) if return_kv else None)


# --------------------------------------------------------------------------- init
def param_shapes(cfg: ModelConfig):
    """Shape tree of the parameters of ``cfg`` (used by importers to check files)."""
    L, d = cfg.num_layers, cfg.hidden_size
    layers = {"attn_norm": {"scale": (L, d)}}
    if cfg.norm_type == "layer":
        layers["attn_norm"]["bias"] = (L, d)
    for name in cfg.projections:
        fi, fo = cfg.projection_shape(name)
        entry = {"kernel": (L, fi, fo)}
        has_bias = (name in ("q_proj", "k_proj", "v_proj") and cfg.qkv_bias) or \
                   (name == "o_proj" and cfg.o_bias) or \
                   (name in ("gate_proj", "up_proj", "down_proj") and cfg.mlp_bias)
        if has_bias:
            entry["bias"] = (L, fo)
        layers[name] = entry
    if not cfg.parallel_block:
        layers["mlp_norm"] = {"scale": (L, d)}
        if cfg.norm_type == "layer":
            layers["mlp_norm"]["bias"] = (L, d)
    if cfg.qk_norm:
        layers["q_norm"] = {"scale": (L, cfg.head_dim)}
        layers["k_norm"] = {"scale": (L, cfg.head_dim)}
    if cfg.sandwich_norm:
        layers["post_attn_norm"] = {"scale": (L, d)}
        layers["post_mlp_norm"] = {"scale": (L, d)}
    shapes = {"embed": (cfg.vocab_size, d), "layers": layers, "final_norm": {"scale": (d,)}}
    if cfg.norm_type == "layer":
        shapes["final_norm"]["bias"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = {"kernel": (d, cfg.vocab_size)}
        if cfg.lm_head_bias:
            shapes["lm_head"]["bias"] = (cfg.vocab_size,)
    return shapes


def init_params(rng, cfg: ModelConfig, std: float = 0.02):
    """Random parameters (normal(std) weights, unit norm scales, zero biases)."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    dtype = compute_dtype(cfg)
    out = []
    for i, (path, shape) in enumerate(leaves):
        last = path[-1].key
        if last == "scale":
            out.append(jnp.ones(shape, dtype))
        elif last == "bias":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(jax.random.fold_in(rng, i), shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
