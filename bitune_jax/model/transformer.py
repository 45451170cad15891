"""The decoder-only transformer: one Flax decoder block, used functionally.

This is the file to read first. The model is written with ``flax.linen``
modules that are only ever *applied* to parameters passed in: the frozen base
weights are a plain nested dict (the same tree importers write, checkpoints
reference and the train step takes as an argument), and adapter sets are
separate dicts handed to the block as call arguments. linen was chosen over
``flax.nnx`` for exactly that: ``Module.apply({"params": p}, ...)`` is a pure
function of plain pytrees, so a frozen base plus several adapter sets needs no
graph/state split and the jitted step stays ``state, base, batch -> state,
metrics``. The parameter tree::

    {"embed": [vocab, d],
     "layers": {"attn_norm": {"scale": [L, d]},
                "q_proj": {"kernel": [L, d, heads*hd], "bias"?: [L, heads*hd]},
                "k_proj", "v_proj", "o_proj", "gate_proj"?, "up_proj", "down_proj",
                "mlp_norm"?, "q_norm"?, "k_norm"?, "post_attn_norm"?, "post_mlp_norm"?},
     "final_norm": {"scale": [d], "bias"?: [d]},
     "lm_head"?: {"kernel": [d, vocab], "bias"?: [vocab]}}

``layers`` holds :class:`DecoderBlock`'s parameters stacked on a leading
layer axis; callers walk the stack with ``jax.lax.scan`` (wrapped by
:func:`rematerialize`, the one rematerialisation switch) and apply the block to
each slice. Norm scales are stored as the multiplier actually applied
(importers fold Gemma's ``1 + w`` in), so one norm serves all families. Every
parameter carries logical axis names (``embed``, ``heads``, ``kv_heads``,
``mlp``, ``vocab``, ``layers``, ...; see :func:`param_axes`), which the
training code maps to mesh axes.

The block takes a *list of token streams*. Each stream has its own tokens,
positions, attention mask, adapter set and optional key/value prefix; the
base projections multiply all streams' tokens in one matmul. A plain forward
pass is one stream; Bitune's fused layer loop (``bitune_jax/bitune.py``) is
three streams whose answer stream attends to a prefix computed from the other
two streams' keys and values of the same layer; decoding is one stream whose
prefix is the key/value cache. The block knows nothing of Bitune.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from bitune_jax.model.config import ModelConfig
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32,
    ...                   intermediate_size=64, num_layers=2, num_heads=4,
    ...                   num_kv_heads=2, head_dim=8)
    >>> params = init_params(jax.random.PRNGKey(0), cfg)
    >>> params["layers"]["q_proj"]["kernel"].shape      # [layers, d, heads * head_dim]
    (2, 32, 32)
    >>> tokens = jnp.array([[1, 2, 3, 0]])
    >>> valid = jnp.array([[True, True, True, False]])
    >>> logits, _ = forward(params, cfg, tokens, valid=valid)
    >>> logits.shape
    (1, 4, 64)
"""
from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from bitune_jax.model import attention as attn_lib
from bitune_jax.model import peft as peft_lib
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig


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
    """RMSNorm or LayerNorm over the last axis, computed in float32 (``p``: ``{"scale", "bias"?}``)."""
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
    """Token embeddings ``[batch, seq, d]`` in the compute dtype (times ``embed_scale``)."""
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


def layer_flags(cfg: ModelConfig):
    """Per-layer booleans ``[layers]``: True for sliding-window layers."""
    if cfg.has_local_layers:
        return jnp.asarray(np.array(cfg.sliding_layers, dtype=bool))
    return jnp.zeros((cfg.num_layers,), bool)


# What the ``projections`` policy keeps for the backward pass: every projection's output (before
# any norm or RoPE), the attention output and its log-sum-exp, and LoRA's rank-r products. Norms,
# RoPE, activations, the Bitune mix and the attention probabilities are recomputed from them.
SAVED_NAMES = ("q_proj", "k_proj", "v_proj", "attn_out", "attn_lse", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lora_h")
REMAT_POLICIES = ("none", "full", "dots", "projections", "prompt_mlp")


def rematerialize(fn, policy: str, *, prevent_cse: bool = True):
    """The one rematerialisation switch for a layer body: one of :data:`REMAT_POLICIES`.

    ``none`` saves whatever autodiff keeps, ``full`` saves nothing (the
    backward pass reruns the layer), ``dots`` saves matmul outputs without
    batch dimensions, ``projections`` saves :data:`SAVED_NAMES` (no matmul of
    a projection is rerun; elementwise work and attention scores are).
    ``prompt_mlp`` is ``projections`` for this function; the callers that
    run prompt streams (``bitune.run_streams``) additionally leave those
    streams' MLP gate/up outputs unnamed (:class:`DecoderBlock`'s
    ``mlp_recompute``), so the backward pass reruns those two matmuls for the
    prompt tokens instead of keeping them.
    ``prevent_cse=False`` suits scan bodies (see ``jax.checkpoint``).
    """
    if policy in (None, "none", False):
        return fn
    if policy in ("full", True):
        return jax.checkpoint(fn, prevent_cse=prevent_cse)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                              prevent_cse=prevent_cse)
    if policy in ("projections", "prompt_mlp"):
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
                              prevent_cse=prevent_cse)
    raise ValueError(f"remat={policy!r}; allowed: {', '.join(REMAT_POLICIES)}")


# --------------------------------------------------------------------------- modules
def _logical(init, axes):
    return nn.with_logical_partitioning(init, axes)


class Norm(nn.Module):
    """RMSNorm (LayerNorm with ``cfg.norm_type == "layer"``) with a stored multiplier."""

    cfg: ModelConfig
    axis: str = "norm"
    with_bias: bool = False

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        dtype = compute_dtype(self.cfg)
        p = {"scale": self.param("scale", _logical(nn.initializers.ones, (self.axis,)), (dim,), dtype)}
        if self.with_bias:
            p["bias"] = self.param("bias", _logical(nn.initializers.zeros, (self.axis,)), (dim,), dtype)
        return norm(p, x, self.cfg)


class Projection(nn.Module):
    """A frozen linear projection applied to several token streams at once, each with its own adapter.

    ``x`` holds the streams packed along the token axis (``lengths`` tokens
    each); the kernel multiplies every stream's tokens in one matmul and each
    stream gets its own adapter (:func:`bitune_jax.model.peft.dense_packed`).
    ``axes`` are the logical names of the kernel's ``(in, out)`` dimensions.
    """

    cfg: ModelConfig
    features: int
    axes: Tuple[str, str]
    use_bias: bool = False
    peft_cfg: Optional[PeftConfig] = None

    @nn.compact
    def __call__(self, x, lengths: Sequence[int], adapters: Sequence, dropout_rngs=None):
        dtype = compute_dtype(self.cfg)
        proj = {"kernel": self.param("kernel", _logical(nn.initializers.normal(0.02), self.axes),
                                     (x.shape[-1], self.features), dtype)}
        if self.use_bias:
            proj["bias"] = self.param("bias", _logical(nn.initializers.zeros, self.axes[1:]), (self.features,), dtype)
        return peft_lib.dense_packed(x, lengths, proj, self.name, adapters, self.peft_cfg, dropout_rngs)


class DecoderBlock(nn.Module):
    """One transformer layer over several token streams.

    Call arguments (one entry per stream):

    * ``xs``: residual streams ``[batch, seq, d]`` (or one :class:`Packed`
      array holding them all);
    * ``positions``: ``[batch, seq]`` integer positions (RoPE and masks);
    * ``masks``: an :class:`~bitune_jax.model.attention.Mask` describing the
      stream's keys (its prefix first, then its own tokens), or an explicit
      boolean ``[batch, seq, prefix + seq]`` array used as is on every layer;
    * ``adapters``: this layer's slice of an adapter set, or None;
    * ``is_local``: (traced) bool, True on sliding-window layers (Gemma 3: the
      sliding window and the local RoPE base apply);
    * ``prefix``: None (no stream has one), a list with ``(k, v)`` or None per
      stream (``[batch, P, kv_heads, hd]`` keys/values placed before the
      stream's own), or a callable ``prefix(ks, vs) -> that list`` that
      receives every stream's own rotated keys/values of this layer, for
      callers whose prefix is computed from other streams of the same layer;
    * ``dropout_rngs``: optional per-stream PRNG keys for adapter dropout;
    * ``kv_only``: optional static tuple of bools, True for streams of which
      only this layer's keys and values are wanted (Bitune's prompt streams in
      the last layer): they skip queries, attention and the MLP, and their
      residual stream is returned unchanged;
    * ``mlp_recompute``: optional static tuple of bools, True for streams
      whose MLP gate/up projections are computed in a matmul of their own
      and not named for the ``projections`` policy (:data:`SAVED_NAMES`):
      under a name-based rematerialisation the backward pass reruns them
      (the ``prompt_mlp`` policy: less memory, more FLOPs). Values are
      unchanged.

    Returns ``(xs, ks, vs)``: the new residual streams and each stream's own
    rotated keys and values ``[batch, seq, kv_heads, hd]``. The streams share
    the batch size and are packed along the token axis for everything but
    attention (one array, no per-projection concatenation or split); streams
    whose queries and keys have equal shapes share one attention call
    (stacked on the batch axis).
    """

    cfg: ModelConfig
    peft_cfg: Optional[PeftConfig] = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, xs, positions, masks, adapters, *, is_local=False, prefix=None, dropout_rngs=None,
                 kv_only=None, mlp_recompute=None):
        cfg = self.cfg
        bias = cfg.norm_type == "layer"
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        # The streams are packed along the token axis ([batch, sum of lengths, d]): norms, projections and
        # elementwise work run once over all of them, and only attention sees each stream on its own.
        if isinstance(xs, Packed):
            x, lens = xs.x, list(xs.lengths)
        else:
            if any(x.shape[0] != xs[0].shape[0] for x in xs):
                raise ValueError(f"DecoderBlock: the streams of one call share the batch size; got "
                                 f"{[x.shape for x in xs]}")
            x, lens = _pack(xs), [x.shape[1] for x in xs]
        x = constrain(x, ACTIVATION_AXES)
        pos = _pack(positions)
        proj = functools.partial(Projection, cfg, peft_cfg=self.peft_cfg)
        h = Norm(cfg, with_bias=bias, name="attn_norm")(x)
        k = proj(nkv * hd, ("embed", "kv_heads"), cfg.qkv_bias, name="k_proj")(h, lens, adapters,
                                                                               _fold(dropout_rngs, 1))
        v = proj(nkv * hd, ("embed", "kv_heads"), cfg.qkv_bias, name="v_proj")(h, lens, adapters,
                                                                               _fold(dropout_rngs, 2))
        k = checkpoint_name(k, "k_proj").reshape(*k.shape[:-1], nkv, hd)  # [b, T, kv_heads, hd]
        v = checkpoint_name(v, "v_proj").reshape(*v.shape[:-1], nkv, hd)
        if cfg.qk_norm:
            k = Norm(cfg, "head_dim", name="k_norm")(k)
        inv = _inv_freq(cfg, is_local)
        k = apply_rope(k, pos, inv)
        ks, vs = _unpack(k, lens), _unpack(v, lens)
        if callable(prefix):
            prefix = prefix(ks, vs)
        prefix = prefix if prefix is not None else [None] * len(lens)

        # The streams that go on past their keys/values (all but the kv_only ones).
        full = [i for i in range(len(lens)) if not (kv_only and kv_only[i])]
        if not full:
            return xs, ks, vs
        lens_f = [lens[i] for i in full]
        x_f, h_f, pos_f = (_take(t, lens, full) for t in (x, h, pos))
        ads = [adapters[i] for i in full]

        def rngs(j):
            return None if dropout_rngs is None else [_fold(dropout_rngs, j)[i] for i in full]

        q = proj(nh * hd, ("embed", "heads"), cfg.qkv_bias, name="q_proj")(h_f, lens_f, ads, rngs(0))
        q = checkpoint_name(q, "q_proj").reshape(*q.shape[:-1], nh, hd)  # [b, T, heads, hd]
        if cfg.qk_norm:
            q = Norm(cfg, "head_dim", name="q_norm")(q)
        qs = _unpack(apply_rope(q, pos_f, inv), lens_f)
        k_all = [ks[i] if prefix[i] is None else jnp.concatenate([prefix[i][0].astype(ks[i].dtype), ks[i]], axis=1)
                 for i in full]
        v_all = [vs[i] if prefix[i] is None else jnp.concatenate([prefix[i][1].astype(vs[i].dtype), vs[i]], axis=1)
                 for i in full]
        masks_f = [masks[i] for i in full]
        outs = _attend_streams(cfg, qs, k_all, v_all, masks_f, self.attention, is_local)
        if _attention_impl(cfg, self.attention, masks_f, max(q.shape[1] for q in qs)) != "blocked":
            outs = [checkpoint_name(o, "attn_out") for o in outs]  # blocked_attention names its own output
        a = _pack([o.reshape(*o.shape[:-2], nh * hd) for o in outs])

        o = proj(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, name="o_proj")(a, lens_f, ads, rngs(3))
        o = checkpoint_name(o, "o_proj")
        if cfg.sandwich_norm:
            o = Norm(cfg, name="post_attn_norm")(o)
        mid = x_f + o
        mlp_in = h_f if cfg.parallel_block else Norm(cfg, with_bias=bias, name="mlp_norm")(mid)
        up = proj(cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, name="up_proj")
        gate = proj(cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, name="gate_proj")

        def mlp_act(t, idx, keep):
            """The MLP's activation of streams ``idx`` (of ``full``); ``keep``: name the projections (kept by
            the ``projections`` policy) or leave them to be recomputed in the backward pass."""
            lens_g = [lens_f[j] for j in idx]
            ads_g = [ads[j] for j in idx]

            def rngs_g(n):
                r = rngs(n)
                return None if r is None else [r[j] for j in idx]

            name = checkpoint_name if keep else (lambda y, _: y)
            if cfg.mlp_type == "gated":
                g = gate(t, lens_g, ads_g, rngs_g(4))
                u = up(t, lens_g, ads_g, rngs_g(5))
                return _act(name(g, "gate_proj"), cfg) * name(u, "up_proj")
            return _act(name(up(t, lens_g, ads_g, rngs_g(5)), "up_proj"), cfg)

        # Streams marked in ``mlp_recompute`` keep no MLP projection output for the backward pass: their
        # gate/up matmuls run as a separate call that the backward pass reruns (less memory, more FLOPs).
        redo = [j for j, i in enumerate(full) if mlp_recompute and mlp_recompute[i]]
        if not redo:
            act = mlp_act(mlp_in, list(range(len(full))), True)
        else:
            kept = [j for j in range(len(full)) if j not in redo]
            parts = [None] * len(full)
            for idx, keep in ((kept, True), (redo, False)):
                if idx:
                    a_g = mlp_act(_take(mlp_in, lens_f, idx), idx, keep)
                    for j, t in zip(idx, _unpack(a_g, [lens_f[j] for j in idx])):
                        parts[j] = t
            act = _pack(parts)
        d = proj(cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, name="down_proj")(act, lens_f, ads, rngs(6))
        if cfg.sandwich_norm:
            d = Norm(cfg, name="post_mlp_norm")(checkpoint_name(d, "down_proj"))
        y = mid + d
        if len(full) < len(lens):
            parts = _unpack(x, lens)
            for i, t in zip(full, _unpack(y, lens_f)):
                parts[i] = t
            y = _pack(parts)
        if isinstance(xs, Packed):
            return Packed(y, xs.lengths), ks, vs
        return _unpack(y, lens), ks, vs


@struct.dataclass
class Packed:
    """Token streams packed along the token axis: ``x`` ``[batch, sum(lengths), d]``.

    :class:`DecoderBlock` takes and returns this in place of a list of streams
    for callers that keep their streams packed from layer to layer (Bitune's
    fused loop), which saves a concatenation and a split per layer.

    >>> import jax.numpy as jnp
    >>> p = Packed(jnp.zeros((2, 7, 4)), (5, 2))
    >>> [s.shape for s in p.streams()]
    [(2, 5, 4), (2, 2, 4)]
    """

    x: jax.Array
    lengths: Tuple[int, ...] = struct.field(pytree_node=False)

    def streams(self):
        """The list of streams ``[batch, length_i, d]``."""
        return _unpack(self.x, self.lengths)


def _pack(ts):
    """Streams ``[batch, len_i, ...]`` packed along the token axis."""
    return ts[0] if len(ts) == 1 else jnp.concatenate(ts, axis=1)


def _unpack(t, lens):
    """The streams of a packed array (inverse of :func:`_pack`)."""
    return [t] if len(lens) == 1 else jnp.split(t, np.cumsum(lens)[:-1].tolist(), axis=1)


def _take(t, lens, idx):
    """The packed array of streams ``idx`` only (one slice when they are adjacent)."""
    if len(idx) == len(lens):
        return t
    off = np.concatenate([[0], np.cumsum(lens)])
    parts = [jax.lax.slice_in_dim(t, int(off[i]), int(off[i + 1]), axis=1) for i in idx]
    return _pack(parts)


ACTIVATION_AXES = ("batch", "length", "act_embed")


def constrain(x, logical):
    """Sharding constraint from logical axis names, active only while tracing under a mesh.

    The train step traces the model inside ``jax.sharding.use_abstract_mesh``
    and ``flax.linen.logical_axis_rules``; elsewhere (evaluation, tests on one
    device) this returns ``x`` unchanged. Mesh axes that do not divide a
    dimension are dropped, as for parameters.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return x
    spec = nn.logical_to_mesh_axes(logical)
    sizes = dict(mesh.shape)
    fitted = []
    for dim, ax in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
        names = () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)
        size = int(np.prod([sizes[n] for n in names])) if names else 1
        fitted.append(ax if size > 1 and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*fitted)))


def _fold(rngs, i):
    return None if rngs is None else [jax.random.fold_in(r, i) for r in rngs]


def _inv_freq(cfg: ModelConfig, is_local):
    inv_global = rope_inv_freq(cfg, cfg.rope_theta)
    if cfg.has_local_layers and cfg.rope_local_theta is not None:
        # Local layers use plain RoPE: rope_scaling applies to global layers only (as HF Gemma 3).
        inv_local = rope_inv_freq(cfg.replace(rope_scaling=None), cfg.rope_local_theta)
        return jnp.where(is_local, jnp.asarray(inv_local), jnp.asarray(inv_global))
    return jnp.asarray(inv_global)


def _dense_mask(cfg: ModelConfig, mask, is_local):
    """Boolean ``[b, q, k]`` of a stream on this layer (the sliding window on local layers)."""
    if not isinstance(mask, attn_lib.Mask):
        return mask
    full = mask.dense()
    if not cfg.has_local_layers:
        return full
    return jnp.where(is_local, mask.dense(window=cfg.sliding_window), full)


_NO_WINDOW = 2 ** 30


def _attention_impl(cfg: ModelConfig, impl: str, masks, q_len: Optional[int] = None,
                    backend: Optional[str] = None) -> str:
    """The implementation ``impl`` resolves to for these streams (``q_len``: their longest query length).

    ``auto`` takes the reference for explicit dense masks, and ``blocked``
    instead of splash for a decoding step (one query per row), which the
    kernel would pad to its smallest block of 128 query rows; ``blocked``
    runs so few queries in one pass without a loop.
    """
    resolved = attn_lib.resolve(impl, softcap=cfg.attn_logit_softcap, backend=backend)
    if impl == "auto" and resolved in ("blocked", "splash") and not all(isinstance(m, attn_lib.Mask) for m in masks):
        return "reference"
    if impl == "auto" and resolved == "splash" and q_len == 1:
        return "blocked"
    return resolved


# Queries per chunk of a causal ``ordered`` stream under ``blocked`` attention: each chunk attends to the
# prefix and to the stream's own keys up to its last query only, so a long causal stream skips about half of
# its [q, k] work (the keys after every query, which the mask hides anyway).
CAUSAL_CHUNK = 64


def _causal_chunks(mask, q_len: int, k_len: int):
    """Query bounds of the chunks of a causal, ordered stream (``[0, ..., q_len]``), or None: no chunking."""
    if not (isinstance(mask, attn_lib.Mask) and mask.causal and mask.ordered) or q_len <= CAUSAL_CHUNK:
        return None
    if k_len < q_len:  # keys are a prefix followed by the stream's own tokens
        return None
    n = -(-q_len // CAUSAL_CHUNK)
    return [int(x) for x in np.linspace(0, q_len, n + 1).round()]


def _attend_streams(cfg: ModelConfig, qs, ks, vs, masks, impl: str, is_local):
    """Attention of every stream; streams of equal shapes run as one call over a stacked batch.

    Under ``blocked``, causal streams whose masks are ``ordered`` (and longer
    than :data:`CAUSAL_CHUNK` queries) run apart from the others, chunk by
    chunk of queries, each chunk seeing only the keys up to its last query.
    """
    impl = _attention_impl(cfg, impl, masks, max(q.shape[1] for q in qs))
    groups = {}
    for i, (q, k) in enumerate(zip(qs, ks)):
        # A splash call has one static mask, so its streams also share the mask kind; chunked blocked
        # streams share their chunks.
        kind = None
        if impl == "splash":
            kind = getattr(masks[i], "causal", None)
        elif impl == "blocked":
            chunks = _causal_chunks(masks[i], q.shape[1], k.shape[1])
            kind = None if chunks is None else tuple(chunks)
        groups.setdefault((q.shape[1:], k.shape[1:], kind), []).append(i)
    outs = [None] * len(qs)
    for (_, _, kind), idx in groups.items():
        def cat(ts):  # the group's streams stacked on the batch axis
            return ts[idx[0]] if len(idx) == 1 else jnp.concatenate([ts[i] for i in idx], 0)

        if impl == "blocked":
            ms = [masks[i] for i in idx]
            if not all(isinstance(m, attn_lib.Mask) for m in ms):
                raise ValueError("attention='blocked' builds its mask from positions: pass attention.Mask objects, "
                                 "not dense mask arrays")
            window = _NO_WINDOW
            if cfg.has_local_layers:
                window = jnp.where(is_local, cfg.sliding_window, _NO_WINDOW)
            q_pos, k_pos, q_valid, k_valid = (jnp.concatenate([getattr(m, f) for m in ms], 0)
                                              for f in ("q_pos", "k_pos", "q_valid", "k_valid"))
            causal = jnp.concatenate([jnp.full((m.q_pos.shape[0],), m.causal) for m in ms], 0)
            q_seg, k_seg = attn_lib.stack_segments(ms)
            q, k, v = cat(qs), cat(ks), cat(vs)
            bounds = kind if kind is not None else (0, q.shape[1])
            prefix = k.shape[1] - q.shape[1] if kind is not None else 0
            chunk_outs = []
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                # Without chunks: every key. With chunks: the prefix and the own keys up to query `hi - 1`.
                kk = k.shape[1] if kind is None else prefix + hi
                chunk_outs.append(attn_lib.blocked_attention(
                    q[:, lo:hi], k[:, :kk], v[:, :kk], q_pos[:, lo:hi], k_pos[:, :kk], q_valid[:, lo:hi],
                    k_valid[:, :kk], causal, window, scale=cfg.scale, softcap=cfg.attn_logit_softcap,
                    q_segment=None if q_seg is None else q_seg[:, lo:hi],
                    k_segment=None if k_seg is None else k_seg[:, :kk]))
            o = _pack(chunk_outs)
        elif impl == "splash":
            ms = [masks[i] for i in idx]
            if not all(isinstance(m, attn_lib.Mask) for m in ms):
                raise ValueError("model.attention='splash' builds its mask from positions: pass attention.Mask "
                                 "objects, not dense mask arrays")
            mask = ms[0]
            if len(ms) > 1:
                q_seg, k_seg = attn_lib.stack_segments(ms)
                mask = attn_lib.Mask(*(jnp.concatenate([getattr(m, f) for m in ms], 0)
                                       for f in ("q_pos", "k_pos", "q_valid", "k_valid")),
                                     causal=mask.causal, q_segment=q_seg, k_segment=k_seg)
            o = attn_lib.splash_attention(cat(qs), cat(ks), cat(vs), mask, scale=cfg.scale,
                                          softcap=cfg.attn_logit_softcap, is_local=is_local,
                                          window=cfg.sliding_window if cfg.has_local_layers else None)
        else:
            dense = {i: _dense_mask(cfg, masks[i], is_local) for i in idx}
            o = attn_lib.dot_product_attention(cat(qs), cat(ks), cat(vs), cat(dense), scale=cfg.scale,
                                               softcap=cfg.attn_logit_softcap, impl=impl)
        for i, part in zip(idx, jnp.split(o, len(idx), axis=0) if len(idx) > 1 else [o]):
            outs[i] = part
    return outs


def apply_block(layer_params, cfg: ModelConfig, xs, positions, masks, adapters, *, is_local=False, prefix=None,
                peft_cfg: Optional[PeftConfig] = None, attention: str = "auto", dropout_rngs=None, kv_only=None,
                mlp_recompute=None):
    """Applies :class:`DecoderBlock` with one layer's parameters; see its docstring for the arguments."""
    return DecoderBlock(cfg, peft_cfg, attention).apply({"params": layer_params}, xs, positions, masks, adapters,
                                                         is_local=is_local, prefix=prefix, dropout_rngs=dropout_rngs,
                                                         kv_only=kv_only, mlp_recompute=mlp_recompute)


# --------------------------------------------------------------------------- forward
def forward(params, cfg: ModelConfig, tokens, *, positions=None, valid=None, causal: bool = True,
            prefix_kv: Optional[KV] = None, prefix_positions=None, prefix_valid=None,
            adapters=None, peft_cfg=None, return_kv: bool = False, compute_logits: bool = True,
            remat: str = "none", attention: str = "auto"):
    """Runs the model over one stream of tokens.

    Args:
      params: base parameters (see module docstring).
      cfg: the architecture.
      tokens: ``[batch, seq]`` token ids (right padding is fine).
      positions: ``[batch, seq]`` position ids; default ``0..seq-1`` (pass
        offsets explicitly when continuing a prefix).
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
      remat: rematerialisation policy of each layer (:func:`rematerialize`).

    Returns:
      ``(logits_or_hidden, kv_or_None)``.
    """
    b, t = tokens.shape
    ordered = positions is None  # the default positions grow with the index
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if valid is None:
        valid = jnp.ones((b, t), bool)
    if prefix_kv is not None and (prefix_positions is None or prefix_valid is None):
        raise ValueError("prefix_kv needs prefix_positions and prefix_valid")
    mask = attn_lib.Mask.over(positions, valid, causal=causal, prefix_valid=prefix_valid,
                              prefix_positions=prefix_positions if prefix_kv is not None else None, ordered=ordered)

    def body(x, layer):
        lp, ad, is_local, pkv = layer
        (x,), (k,), (v,) = apply_block(lp, cfg, [x], [positions], [mask], [ad], is_local=is_local,
                                       prefix=None if pkv is None else [pkv], peft_cfg=peft_cfg,
                                       attention=attention)
        return x, ((k, v) if return_kv else None)

    pkv = (prefix_kv.k, prefix_kv.v) if prefix_kv is not None else None
    x, kv = jax.lax.scan(rematerialize(body, remat, prevent_cse=False), embed(params, cfg, tokens),
                         (params["layers"], adapters, layer_flags(cfg), pkv))
    out = unembed(params, cfg, x) if compute_logits else x
    return out, (KV(*kv) if return_kv else None)


# --------------------------------------------------------------------------- init
def _init_block(rng, cfg: ModelConfig):
    """One layer's boxed parameters (``nn.LogicallyPartitioned`` leaves)."""
    x = jnp.zeros((1, 1, cfg.hidden_size), compute_dtype(cfg))
    pos = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    # Only shapes are traced here; the dense reference serves any backend.
    return DecoderBlock(cfg, attention="reference").init(rng, [x], [pos], [mask], [None])["params"]


def _outer_axes(cfg: ModelConfig):
    axes = {"embed": ("vocab", "embed"), "final_norm": {"scale": ("norm",)}}
    if cfg.norm_type == "layer":
        axes["final_norm"]["bias"] = ("norm",)
    if not cfg.tie_embeddings:
        axes["lm_head"] = {"kernel": ("embed", "vocab")}
        if cfg.lm_head_bias:
            axes["lm_head"]["bias"] = ("vocab",)
    return axes


def param_axes(cfg: ModelConfig):
    """Logical axis names of every base parameter: a tree like the parameters with tuple leaves.

    >>> from bitune_jax.model.config import ModelConfig
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    >>> param_axes(cfg)["layers"]["down_proj"]["kernel"]
    ('layers', 'mlp', 'embed')
    """
    boxed = jax.eval_shape(lambda r: _init_block(r, cfg), jax.random.PRNGKey(0))
    specs = nn.get_partition_spec(boxed)
    layers = jax.tree_util.tree_map(lambda spec: ("layers",) + tuple(spec), specs,
                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return {**_outer_axes(cfg), "layers": layers}


def param_shapes(cfg: ModelConfig):
    """Shape tree of the parameters of ``cfg`` (used by importers to check files)."""
    layer = jax.eval_shape(lambda r: nn.unbox(_init_block(r, cfg)), jax.random.PRNGKey(0))
    layer = jax.tree_util.tree_map(lambda a: (cfg.num_layers,) + tuple(a.shape), layer)
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "layers": _plain_dicts(layer),
              "final_norm": {"scale": (cfg.hidden_size,)}}
    if cfg.norm_type == "layer":
        shapes["final_norm"]["bias"] = (cfg.hidden_size,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = {"kernel": (cfg.hidden_size, cfg.vocab_size)}
        if cfg.lm_head_bias:
            shapes["lm_head"]["bias"] = (cfg.vocab_size,)
    return shapes


def _plain_dicts(tree):
    """Flax may hand back FrozenDicts; the parameter tree is plain dicts."""
    if isinstance(tree, Mapping):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    return tree


def init_params(rng, cfg: ModelConfig, std: float = 0.02):
    """Random parameters: normal(std) weights, unit norm scales, zero biases.

    Shapes come from :class:`DecoderBlock`'s declarations (:func:`param_shapes`);
    leaf ``i`` of the flattened tree draws from ``fold_in(rng, i)``, the same
    draws as earlier releases, so a seed keeps giving the same model.
    """
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
