"""Parameter-efficient adapters (LoRA, DoRA, IA3) as separate pytrees.

An adapter set is a plain dict keyed by canonical projection name, each entry
stacked over layers like the base weights it modifies::

    {"q_proj": {"lora_a": [L, in, r], "lora_b": [L, r, out]}, ...}      # LoRA
    {"q_proj": {"lora_a": ..., "lora_b": ..., "magnitude": [L, out]}}   # DoRA
    {"k_proj": {"scale": [L, out]}, "down_proj": {"scale": [L, in]}}    # IA3

The base weights never change; :func:`dense_packed` applies the frozen kernel
once to the tokens of every stream, packed in one array, and gives each token
its own stream's adapter set (all sets' rank-r products in one pass, each
token keeping its set's columns). That is how Bitune runs the causal and
bidirectional prefills with shared base matmuls but separate adapters, without
slicing streams out of the packed activations.

Example:

    >>> import jax
    >>> from bitune_jax.model.config import ModelConfig
    >>> cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16,
    ...                   intermediate_size=32, num_layers=2, num_heads=2,
    ...                   num_kv_heads=1, head_dim=8)
    >>> pc = PeftConfig(method="lora", rank=4)
    >>> ad = init_adapters(jax.random.PRNGKey(0), cfg, pc)
    >>> ad["q_proj"]["lora_a"].shape
    (2, 16, 4)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bitune_jax import schema

METHODS = ("lora", "dora", "ia3")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IA3_DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
# IA3 scales the *input* of feed-forward output projections, the output elsewhere.
IA3_FEEDFORWARD = ("down_proj",)


def _known_projections(targets) -> Optional[str]:
    bad = [t for t in targets if t not in ALL_PROJECTIONS]
    return f"unknown projections {bad}; allowed: {', '.join(ALL_PROJECTIONS)} or null (all)" if bad else None


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Static description of an adapter set (the ``method.peft`` config section).

    Attributes:
      method: ``lora``, ``dora`` or ``ia3``.
      rank: LoRA/DoRA rank r.
      alpha: LoRA/DoRA alpha; the update is scaled by alpha / rank.
      targets: canonical projection names to adapt; None means every
        projection for LoRA/DoRA and k, v, down for IA3.
      dropout: dropout rate on the LoRA/DoRA input (training only).
    """

    method: Literal[METHODS] = "lora"
    rank: int = schema.field(8, ge=1)
    alpha: float = schema.field(1.0, gt=0.0)
    targets: Optional[Tuple[str, ...]] = schema.field(None, check=_known_projections)
    dropout: float = schema.field(0.0, ge=0.0, lt=1.0)

    def __post_init__(self):
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        schema.validate(self, "method.peft")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def target_names(self, model_cfg) -> Tuple[str, ...]:
        """Targets that exist in ``model_cfg``, in canonical order."""
        wanted = self.targets
        if wanted is None:
            wanted = IA3_DEFAULT_TARGETS if self.method == "ia3" else ALL_PROJECTIONS
        return tuple(p for p in model_cfg.projections if p in wanted)


def init_adapters(rng, model_cfg, peft_cfg: PeftConfig, base_params=None, dtype=jnp.float32):
    """Creates one adapter set stacked over layers.

    LoRA A is drawn like PyTorch's ``kaiming_uniform_(a=sqrt(5))`` (uniform in
    +-1/sqrt(in)) and B is zero, so a fresh adapter leaves the model unchanged.
    DoRA needs ``base_params`` to initialise its magnitude to the column norms
    of the frozen kernels. IA3 scales start at one.
    """
    L = model_cfg.num_layers
    out = {}
    for i, name in enumerate(peft_cfg.target_names(model_cfg)):
        fan_in, fan_out = model_cfg.projection_shape(name)
        if peft_cfg.method == "ia3":
            size = fan_in if name in IA3_FEEDFORWARD else fan_out
            out[name] = {"scale": jnp.ones((L, size), dtype)}
            continue
        key = jax.random.fold_in(rng, i)
        bound = 1.0 / math.sqrt(fan_in)
        entry = {
            "lora_a": jax.random.uniform(key, (L, fan_in, peft_cfg.rank), dtype, -bound, bound),
            "lora_b": jnp.zeros((L, peft_cfg.rank, fan_out), dtype),
        }
        if peft_cfg.method == "dora":
            if base_params is None:
                raise ValueError("DoRA adapters need base_params to initialise their magnitude")
            kernel = base_params["layers"][name]["kernel"].astype(jnp.float32)  # [L, in, out]
            entry["magnitude"] = jnp.linalg.norm(kernel, axis=1).astype(dtype)
        out[name] = entry
    return out


def adapter_axes(adapters, kernel_axes):
    """Logical axis names of an adapter set, taken from the kernels it modifies.

    ``kernel_axes``: the base layers' axes tree (``param_axes(cfg)["layers"]``),
    whose ``[name]["kernel"]`` is ``("layers", in, out)``. LoRA ``A`` is
    ``(layers, in, lora_rank)``, ``B`` ``(layers, lora_rank, out)``; DoRA
    magnitudes follow ``out``; IA3 scales follow the dimension they scale.
    """
    out = {}
    for name, entry in adapters.items():
        layers, fan_in, fan_out = kernel_axes[name]["kernel"]
        axes = {"lora_a": (layers, fan_in, "lora_rank"), "lora_b": (layers, "lora_rank", fan_out),
                "magnitude": (layers, fan_out),
                "scale": (layers, fan_in if name in IA3_FEEDFORWARD else fan_out)}
        out[name] = {leaf: axes[leaf] for leaf in entry}
    return out


def layer_slice(adapters, name):
    """The entry of projection ``name`` in a per-layer adapter set, or None."""
    if adapters is None:
        return None
    return adapters.get(name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_delta(x, a, b, sel, scaling):
    """``((x @ a) * sel) @ b * scaling`` with a hand-written backward pass (same math as autodiff).

    ``sel`` is None for one adapter set. For ``n`` sets, ``a`` ``[in, n*r]``
    and ``b`` ``[n*r, out]`` hold them side by side and ``sel`` ``[T, n*r]``
    (0/1, broadcast over leading axes) keeps for each token the rank-r columns
    of its own set: a token's update is exactly its set's ``(x A) B`` (the
    other columns add exact zeros), and each set's gradient sums over the
    tokens that use it.

    Autodiff's weight gradients ``x^T g`` led XLA:CPU, inside the layer scan,
    to materialise a transposed copy of the large ``[tokens, features]``
    operand for every adapter (a strided fusion costing ~20% of the backward
    on SmolLM2-135M). Computing each gradient as the transpose of the flipped
    product (a small ``[features, rank]`` transpose) avoids those copies.
    """
    return _lora_delta_fwd(x, a, b, sel, scaling)[0]


def _lora_delta_fwd(x, a, b, sel, scaling):
    h = x @ a
    if sel is not None:
        h = h * sel
    h = checkpoint_name(h, "lora_h")  # kept by the ``projections`` rematerialisation policy
    return h @ b * jnp.asarray(scaling, x.dtype), (x, a, b, sel, h)


def _lora_delta_bwd(scaling, res, g):
    x, a, b, sel, h = res
    g = g * jnp.asarray(scaling, g.dtype)
    gh = g @ b.T  # [..., n*r]
    if sel is not None:
        gh = gh * sel
    dx = gh @ a.T
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    h2, gh2 = h.reshape(-1, h.shape[-1]), gh.reshape(-1, gh.shape[-1])
    da = jnp.einsum("nr,ni->ri", gh2, x2).T
    db = jnp.einsum("no,nr->or", g2, h2).T
    return dx, da.astype(a.dtype), db.astype(b.dtype), None


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def dense(xs: Sequence[jax.Array], proj: dict, name: str, adapters: Sequence, peft_cfg: Optional[PeftConfig],
          dropout_rngs: Optional[Sequence] = None):
    """Applies projection ``name`` to several token streams at once (:func:`dense_packed` on a list).

    Args:
      xs: one array per stream, each ``[..., in]``; shapes may differ.
      proj, name, adapters, peft_cfg, dropout_rngs: as for :func:`dense_packed`.

    Returns:
      A list with one ``[..., out]`` array per stream.
    """
    lengths = [int(np.prod(x.shape[:-1])) for x in xs]
    packed = jnp.concatenate([x.reshape(1, -1, x.shape[-1]) for x in xs], axis=1)
    y = dense_packed(packed, lengths, proj, name, adapters, peft_cfg, dropout_rngs)[0]
    parts = jnp.split(y, np.cumsum(lengths)[:-1].tolist(), axis=0) if len(xs) > 1 else [y]
    return [part.reshape(*x.shape[:-1], part.shape[-1]) for part, x in zip(parts, xs)]


def _per_token(values, lengths, dtype):
    """``[T, n]`` rows from one ``[n]`` vector per stream, stream ``i`` covering ``lengths[i]`` tokens."""
    rows = [jnp.broadcast_to(v.astype(dtype), (n, v.shape[-1])) for v, n in zip(values, lengths)]
    return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)


def dense_packed(x, lengths: Sequence[int], proj: dict, name: str, adapters: Sequence,
                 peft_cfg: Optional[PeftConfig], dropout_rngs: Optional[Sequence] = None):
    """Applies projection ``name`` to token streams packed along the token axis.

    Args:
      x: ``[..., T, in]`` holding the streams one after the other on axis -2:
        stream ``i`` is ``lengths[i]`` tokens long (``T = sum(lengths)``).
      lengths: static token count of each stream.
      proj: ``{"kernel": [in, out], "bias"?: [out]}`` for this layer.
      name: canonical projection name (decides IA3 input vs output scaling).
      adapters: one per-layer adapter set (or None) per stream; streams may
        share a set (the same object).
      peft_cfg: static adapter description (None when no stream has adapters).
      dropout_rngs: optional per-stream PRNG keys for adapter dropout.

    Returns:
      ``[..., T, out]`` in the same layout. One matmul with the frozen kernel
      serves every stream and no stream is sliced out: per-stream adapters act
      through per-token selections (LoRA/DoRA: all sets' rank-r products in one
      pass, each token keeping its own set's; IA3 and DoRA: per-token scales).

    >>> import jax, jax.numpy as jnp
    >>> pc = PeftConfig(rank=2)
    >>> ad = {"q_proj": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
    >>> x = jnp.ones((1, 5, 4))  # a 2-token stream without adapter, then a 3-token one with it
    >>> dense_packed(x, (2, 3), {"kernel": jnp.zeros((4, 3))}, "q_proj", [None, ad], pc)[0, :, 0].tolist()
    [0.0, 0.0, 4.0, 4.0, 4.0]
    """
    if sum(lengths) != x.shape[-2]:
        raise ValueError(f"dense_packed: stream lengths {tuple(lengths)} do not add up to {x.shape[-2]} tokens")
    kernel = proj["kernel"].astype(x.dtype)
    bias = proj.get("bias")
    ads = [layer_slice(a, name) for a in adapters]
    sets, which = [], []
    for ad in ads:  # distinct sets, by identity
        if ad is None:
            which.append(None)
            continue
        j = next((i for i, s in enumerate(sets) if s is ad), None)
        if j is None:
            sets.append(ad)
            j = len(sets) - 1
        which.append(j)
    if not sets or peft_cfg is None:
        y = x @ kernel
        return y if bias is None else y + bias.astype(y.dtype)
    if peft_cfg.method == "ia3":
        def scales(size):
            return _per_token([jnp.ones((size,), x.dtype) if j is None else sets[j]["scale"] for j in which],
                              lengths, x.dtype)
        if name in IA3_FEEDFORWARD:
            y = (x * scales(x.shape[-1])) @ kernel
            return y if bias is None else y + bias.astype(y.dtype)
        y = x @ kernel
        y = y if bias is None else y + bias.astype(y.dtype)
        return y * scales(y.shape[-1])
    xd = x
    if peft_cfg.dropout > 0.0 and dropout_rngs is not None:
        keep = jnp.concatenate([jax.random.bernoulli(r, 1.0 - peft_cfg.dropout, (*x.shape[:-2], n, x.shape[-1]))
                                for r, n in zip(dropout_rngs, lengths)], axis=-2)
        xd = jnp.where(keep, x / (1.0 - peft_cfg.dropout), 0).astype(x.dtype)
    y = x @ kernel
    if len(sets) == 1 and all(j == 0 for j in which):
        y = y + _lora_delta(xd, sets[0]["lora_a"].astype(x.dtype), sets[0]["lora_b"].astype(x.dtype), None,
                            peft_cfg.scaling)
    else:
        r = peft_cfg.rank
        eye = np.eye(len(sets), dtype=np.float32)
        sel = np.concatenate([np.repeat(np.zeros(len(sets), np.float32) if j is None else eye[j], r)[None]
                              .repeat(n, 0) for j, n in zip(which, lengths)], axis=0)
        a = jnp.concatenate([s["lora_a"].astype(x.dtype) for s in sets], axis=1)
        b = jnp.concatenate([s["lora_b"].astype(x.dtype) for s in sets], axis=0)
        y = y + _lora_delta(xd, a, b, jnp.asarray(sel, x.dtype), peft_cfg.scaling)
    if peft_cfg.method == "dora":  # magnitude / ||W + s B A|| per set (norm treated as a constant)
        def factor(ad):
            w = proj["kernel"].astype(jnp.float32) + peft_cfg.scaling * (
                ad["lora_a"].astype(jnp.float32) @ ad["lora_b"].astype(jnp.float32))
            return ad["magnitude"].astype(jnp.float32) / jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
        factors = [factor(s) for s in sets]
        y = y * _per_token([jnp.ones((y.shape[-1],), jnp.float32) if j is None else factors[j] for j in which],
                           lengths, y.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


def merge_adapters(base_params, adapters, peft_cfg: PeftConfig):
    """Folds an adapter set into the base kernels (for export or fast decoding).

    Only LoRA merges exactly into a kernel alone; DoRA and IA3 output scaling
    are folded into the kernel (and bias) as well, since both are per-column.
    """
    params = jax.tree_util.tree_map(lambda x: x, base_params)
    layers = dict(params["layers"])
    for name, ad in adapters.items():
        proj = dict(layers[name])
        k = proj["kernel"].astype(jnp.float32)
        if peft_cfg.method == "ia3":
            s = ad["scale"].astype(jnp.float32)
            if name in IA3_FEEDFORWARD:
                k = k * s[:, :, None]
            else:
                k = k * s[:, None, :]
                if "bias" in proj:
                    proj["bias"] = (proj["bias"].astype(jnp.float32) * s).astype(proj["bias"].dtype)
        else:
            w = k + peft_cfg.scaling * jnp.einsum("lir,lro->lio", ad["lora_a"].astype(jnp.float32),
                                                  ad["lora_b"].astype(jnp.float32))
            if peft_cfg.method == "dora":
                w = w * (ad["magnitude"].astype(jnp.float32) / jnp.linalg.norm(w, axis=1))[:, None, :]
            k = w
        proj["kernel"] = k.astype(layers[name]["kernel"].dtype)
        layers[name] = proj
    params["layers"] = layers
    return params
