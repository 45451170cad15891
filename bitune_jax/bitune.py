"""Bitune: two prefills, a per-layer key/value mix, and the answer pass.

This module is the whole method (arXiv 2405.14862, docs/method.md).
For a prompt ``x[0..L)`` and an answer ``y[0..M)``:

1. the prefill span is ``x[0..L-1)``: every prompt token but the last;
2. a causal pass over the span with adapter set C gives ``K_c, V_c`` per layer;
3. a bidirectional pass over the span with adapter set B gives ``K_b, V_b``;
4. per layer ``alpha = |theta| / (theta_init + |theta|)`` (float32) and
   ``K = (1 - alpha_k) K_c + alpha_k K_b``, the same for V;
5. the answer pass feeds ``[x[L-1], y[0..M-1)]`` at positions ``L-1 ..`` with
   set C, attending to the mixed prefix and causally to itself; the loss is
   the next-token NLL of ``y[0..M)``. (``y[M-1]`` predicts nothing, so it is
   not fed.)

The passes are fused layer-synchronously. One ``lax.scan`` over the layers
carries three token streams (causal prompt, bidirectional prompt, answer) and
applies the model's one decoder block
(:class:`~bitune_jax.model.transformer.DecoderBlock`) to all of them: the base
projections multiply all streams' tokens at once, each stream adds its own
adapter set, the two prompt streams run one attention call as a doubled batch
with their own masks, and the answer stream's key/value prefix is this
layer's mix of the two prompt streams' keys/values (the block asks this
module for it). No cache of all layers is ever held, and no logits are
computed for prompt positions.

Variants (``MethodConfig.variant``) only change which streams run, which
adapter set and mask each uses, and whether the prefix is mixed:

==================== ================================ ============== =====
variant              prompt streams (mask, set)       answer set     mixed
==================== ================================ ============== =====
bitune               (causal, C), (bidirectional, B)  C              yes
lora                 (causal, C)                      C              no
naive_bidirectional  (bidirectional, C)               C              no
no_mixing            (bidirectional, B)               C              no
only_causal          (causal, C), (causal, B)         C              yes
shared_weights       (causal, C), (bidirectional, C)  C              yes
==================== ================================ ============== =====

Trainable parameters are a dict ``{"causal": adapters, "bidir": adapters?,
"mix": {"theta_k": [L], "theta_v": [L]}?}``; the frozen base parameters are
passed separately and never differentiated.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from bitune_jax.model.config import ModelConfig
    >>> from bitune_jax.model.transformer import init_params
    >>> cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32,
    ...                   intermediate_size=64, num_layers=2, num_heads=4,
    ...                   num_kv_heads=2, head_dim=8)
    >>> base = init_params(jax.random.PRNGKey(0), cfg)
    >>> method = MethodConfig(variant="bitune")
    >>> trainable = init_trainable(jax.random.PRNGKey(1), cfg, method, base)
    >>> batch = {"prompt_ids": jnp.array([[1, 2, 3, 4]]), "prompt_len": jnp.array([4]),
    ...          "answer_ids": jnp.array([[5, 6]]), "answer_len": jnp.array([2])}
    >>> loss, aux = loss_fn(trainable, base, cfg, method, batch)
    >>> aux["num_tokens"].tolist()
    [2]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from bitune_jax import schema
from bitune_jax.model import transformer as T
from bitune_jax.model.attention import Mask
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig, init_adapters


def _alpha_init_error(value) -> Optional[str]:
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not values:
        return "give one number or one per layer"
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            return f"every initial alpha must be a number in [0, 1); got {v!r}"
    return None


VARIANTS = ("bitune", "lora", "naive_bidirectional", "no_mixing", "only_causal", "shared_weights")

# variant -> (prompt streams as (causal?, adapter set name), mixed?)
_PLAN = {
    "bitune": (((True, "causal"), (False, "bidir")), True),
    "lora": (((True, "causal"),), False),
    "naive_bidirectional": (((False, "causal"),), False),
    "no_mixing": (((False, "bidir"),), False),
    "only_causal": (((True, "causal"), (True, "bidir")), True),
    "shared_weights": (((True, "causal"), (False, "causal")), True),
}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What is trained (the ``method`` config section).

    Attributes:
      variant: ``bitune`` (causal + bidirectional prefill with separate adapter
        sets, mixed K/V), ``lora`` (the plain baseline: one causal pass, one
        adapter set, whatever ``peft.method`` is), or one of the paper's
        ablations (the variants table of this module's docstring).
      peft: the adapter type and shape, used for every adapter set.
      theta_init: the constant of ``alpha = |theta| / (theta_init + |theta|)``
        and, unless ``alpha_init`` says otherwise, the initial value of every
        theta, so that every mix starts at 0.5 (the paper). It also sets how
        fast alpha moves: ``d alpha / d theta = (1 - alpha)^2 / theta_init``,
        and Adam moves theta by about the mixing learning rate per step
        whatever its gradient's size.
      alpha_init: the mix at step 0 instead of 0.5, for keys and values
        alike: one number for every layer or a list of one per layer, each in
        ``[0, 1)``; theta starts at ``theta_init * a / (1 - a)``. Alpha 0 is
        theta 0 exactly: the model starts from the causal model's own cache,
        and the loss at step 0 is the plain LoRA loss of the causal adapters.
        It still trains: JAX differentiates ``|theta|`` at 0 as +1
        (``lax.abs``: ``select(x >= 0, g, -g)``; a test checks it), where
        PyTorch's ``abs`` has gradient 0 and would freeze such a mix. None
        (default): theta starts at ``theta_init``.
    """

    variant: Literal[VARIANTS] = "bitune"
    peft: PeftConfig = PeftConfig()
    theta_init: float = schema.field(0.01, gt=0.0)
    alpha_init: Optional[Union[float, Tuple[float, ...]]] = schema.field(None, check=_alpha_init_error)

    def __post_init__(self):
        if isinstance(self.alpha_init, list):  # a hashable value: the config is a static jit argument
            object.__setattr__(self, "alpha_init", tuple(self.alpha_init))
        schema.validate(self, "method")

    @property
    def prompt_streams(self):
        return _PLAN[self.variant][0]

    @property
    def mixed(self) -> bool:
        return _PLAN[self.variant][1]

    @property
    def adapter_sets(self):
        """Names of the adapter sets this variant trains."""
        names = {"causal"} | {s for _, s in self.prompt_streams}
        return tuple(n for n in ("causal", "bidir") if n in names)


def init_trainable(rng, cfg: ModelConfig, method: MethodConfig, base_params=None):
    """Fresh adapter sets (and mixing coefficients) for ``method``."""
    out = {}
    for i, name in enumerate(method.adapter_sets):
        out[name] = init_adapters(jax.random.fold_in(rng, i), cfg, method.peft, base_params)
    if method.mixed:
        theta = initial_theta(method, cfg.num_layers)
        # Two distinct buffers (not one shared array), so a donating step can own both.
        out["mix"] = {"theta_k": jnp.asarray(theta), "theta_v": jnp.asarray(theta.copy())}
    return out


def initial_theta(method: MethodConfig, num_layers: int) -> np.ndarray:
    """Theta per layer ``[num_layers]`` (float32) at step 0: ``theta_init``, or what gives ``method.alpha_init``.

    >>> m = MethodConfig(alpha_init=[0.0, 0.5, 0.9])
    >>> [round(float(a), 6) for a in mix_alpha(jnp.asarray(initial_theta(m, 3)), m.theta_init)]
    [0.0, 0.5, 0.9]
    """
    if method.alpha_init is None:
        return np.full((num_layers,), method.theta_init, np.float32)
    alpha = np.asarray(method.alpha_init, np.float64).reshape(-1)
    if alpha.size not in (1, num_layers):
        raise schema.ConfigError(f"'method.alpha_init' has {alpha.size} values; the model has {num_layers} "
                                 f"layers: give one number or {num_layers}")
    alpha = np.broadcast_to(alpha, (num_layers,))
    return (method.theta_init * alpha / (1.0 - alpha)).astype(np.float32)


def with_base_default(trainable, method):
    """``(trainable, method)``, mapping the base model alone (``trainable=None``) to an adapter-free ``lora`` plan."""
    if trainable is None:
        return {"causal": None}, MethodConfig(variant="lora", peft=method.peft if method else PeftConfig())
    if method is None:
        raise ValueError("trainable adapters need their bitune.MethodConfig (method=...)")
    return trainable, method


def mix_alpha(theta, theta_init: float):
    """``|theta| / (theta_init + |theta|)`` in float32."""
    a = jnp.abs(theta.astype(jnp.float32))
    return a / (theta_init + a)


def mix(x_c, x_b, theta, theta_init: float):
    """``(1 - alpha) x_c + alpha x_b`` computed in float32, cast back to ``x_c``'s dtype."""
    alpha = mix_alpha(theta, theta_init)
    out = (1.0 - alpha) * x_c.astype(jnp.float32) + alpha * x_b.astype(jnp.float32)
    return out.astype(x_c.dtype)


class Streams(NamedTuple):
    """Token blocks derived from a padded batch (see :func:`make_streams`).

    Packed batches (:func:`packed_streams`) add segment ids: row ``r`` holds
    several examples, example ``s`` of the row has id ``s`` (from 1) on its
    prefill-span and answer-stream tokens, padding has 0.
    """

    pre_tokens: jax.Array  # [B, S] prefill span, S = max(P - 1, 1)
    pre_pos: jax.Array  # [B, S]
    pre_valid: jax.Array  # [B, S]
    ans_tokens: jax.Array  # [B, A] = [x[L-1], y[0..A-1)]
    ans_pos: jax.Array  # [B, A]
    ans_valid: jax.Array  # [B, A]
    targets: jax.Array  # [B, A] = y
    pre_seg: Optional[jax.Array] = None  # [B, S] segment ids of packed rows; None: one example per row
    ans_seg: Optional[jax.Array] = None  # [B, A]


PACKED_KEYS = ("pre_ids", "pre_pos", "pre_seg", "ans_ids", "ans_pos", "ans_seg", "targets")


def is_packed(batch) -> bool:
    """True for a packed batch (:func:`bitune_jax.data.packing.pack`), False for the padded format."""
    return "ans_seg" in batch


def packed_streams(batch) -> Streams:
    """The streams of a packed batch, whose arrays already are the stream blocks.

    ``batch`` (all int32, written by :func:`bitune_jax.data.packing.pack`):
    ``pre_ids/pre_pos/pre_seg [R, S]``: the prefill spans ``x[0..L-1)`` of
    the row's examples one after the other, positions ``0..L-2`` of each, and
    its segment id; ``ans_ids/ans_pos/ans_seg/targets [R, A]``: each example's
    answer-stream tokens ``[x[L-1], y[0..M-1)]`` at positions ``L-1 ..``, same
    order, and its targets ``y``. Segment id 0 is padding.
    """
    missing = [k for k in PACKED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"a packed batch needs {', '.join(PACKED_KEYS)}; missing: {', '.join(missing)}")
    i32 = lambda k: jnp.asarray(batch[k], jnp.int32)  # noqa: E731
    pre_seg, ans_seg = i32("pre_seg"), i32("ans_seg")
    return Streams(i32("pre_ids"), i32("pre_pos"), pre_seg > 0, i32("ans_ids"), i32("ans_pos"), ans_seg > 0,
                   i32("targets"), pre_seg, ans_seg)


def make_streams(batch) -> Streams:
    """Splits a padded batch into the prefill span and the answer stream.

    ``batch``: ``prompt_ids [B, P]``, ``prompt_len [B]``, ``answer_ids [B, A]``,
    ``answer_len [B]`` (right padded); a packed batch (:func:`is_packed`)
    goes to :func:`packed_streams`.
    """
    if is_packed(batch):
        return packed_streams(batch)
    prompt, plen = batch["prompt_ids"], batch["prompt_len"].astype(jnp.int32)
    answer, alen = batch["answer_ids"], batch["answer_len"].astype(jnp.int32)
    b, p = prompt.shape
    a = answer.shape[1]
    s = max(p - 1, 1)
    pre_tokens = prompt[:, :s] if p > 1 else jnp.zeros((b, 1), prompt.dtype)
    pre_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    pre_valid = pre_pos < (plen - 1)[:, None]
    last = jnp.take_along_axis(prompt, (plen - 1)[:, None], axis=1)  # [B, 1]
    ans_tokens = jnp.concatenate([last, answer[:, : a - 1]], axis=1).astype(jnp.int32)
    ans_pos = (plen - 1)[:, None] + jnp.arange(a, dtype=jnp.int32)[None]
    ans_valid = jnp.arange(a)[None] < alen[:, None]
    return Streams(pre_tokens.astype(jnp.int32), pre_pos, pre_valid, ans_tokens, ans_pos, ans_valid,
                   answer.astype(jnp.int32))


def run_streams(trainable, base, cfg: ModelConfig, method: MethodConfig, st: Streams, *, with_answer: bool = True,
                return_prefix: bool = False, remat: str = "none", attention: str = "auto", dropout_rng=None):
    """The fused layer loop: every layer applies the model's one decoder block to all streams.

    Returns ``(answer_hidden or None, prefix or None)`` where ``answer_hidden``
    is ``[B, A, d]`` before the final norm and ``prefix`` is the (mixed)
    prefill cache :class:`~bitune_jax.model.transformer.KV`
    ``[layers, B, S, kv_heads, hd]`` (only with ``return_prefix``).
    """
    streams = method.prompt_streams
    n_pre = len(streams)
    # Prompt streams attend among the prefill span (causally or not); the answer
    # stream attends to the (mixed) span, then causally to itself.
    # Packed rows: segment ids keep every token within its own example.
    # Positions grow with the index within every example (``ordered``): causal attention may skip later keys.
    masks = [Mask.over(st.pre_pos, st.pre_valid, causal=causal, segment=st.pre_seg, ordered=True)
             for causal, _ in streams]
    x_pre = T.embed(base, cfg, st.pre_tokens)
    xs = [x_pre] * n_pre
    positions = [st.pre_pos] * n_pre
    if with_answer:
        masks.append(Mask.over(st.ans_pos, st.ans_valid, causal=True, prefix_positions=st.pre_pos,
                               prefix_valid=st.pre_valid, segment=st.ans_seg, prefix_segment=st.pre_seg,
                               ordered=True))
        xs.append(T.embed(base, cfg, st.ans_tokens))
        positions.append(st.ans_pos)
    # The loop carries the streams packed along the token axis, as the block computes on them.
    xs = T.Packed(jnp.concatenate(xs, axis=1), tuple(x.shape[1] for x in xs))

    mix_params = trainable.get("mix") if method.mixed else None
    # With a remat policy the base weights are indexed per layer rather than scanned over (re-indexed in
    # the backward pass, never saved), so the loop can stop before the last layer without slicing a copy
    # of the stack. Without one, autodiff would save each layer's slice: the loop scans the stack whole.
    scan_weights = remat in (None, "none", False)
    layer_inputs = (base["layers"] if scan_weights else None, {k: v for k, v in trainable.items() if k != "mix"},
                    mix_params, T.layer_flags(cfg), jnp.arange(cfg.num_layers))

    # The `prompt_mlp` policy: the prompt streams keep no MLP gate/up outputs (the backward pass reruns them).
    mlp_recompute = (True,) * n_pre + ((False,) if with_answer else ()) if remat == "prompt_mlp" else None

    def body(xs, layer, kv_only=None):
        lp, sets, mixp, is_local, idx = layer
        if lp is None:
            lp = jax.tree_util.tree_map(lambda w: jax.lax.dynamic_index_in_dim(w, idx, keepdims=False), base["layers"])
        ads = [sets[name] for _, name in streams] + ([sets["causal"]] if with_answer else [])
        rngs = None
        if dropout_rng is not None:
            lr = jax.random.fold_in(dropout_rng, idx)
            rngs = [jax.random.fold_in(lr, i) for i in range(len(positions))]

        def mixed_prefix(ks, vs):
            """This layer's prefill keys/values as the answer stream sees them."""
            if not method.mixed:
                return ks[0], vs[0]
            return (mix(ks[0], ks[1], mixp["theta_k"], method.theta_init),
                    mix(vs[0], vs[1], mixp["theta_v"], method.theta_init))

        def prefixes(ks, vs):
            return [None] * n_pre + [mixed_prefix(ks, vs)]

        xs, ks, vs = T.apply_block(lp, cfg, xs, positions, masks, ads, is_local=is_local,
                                   prefix=prefixes if with_answer else None, peft_cfg=method.peft,
                                   attention=attention, dropout_rngs=rngs, kv_only=kv_only,
                                   mlp_recompute=mlp_recompute)
        return xs, (mixed_prefix(ks, vs) if return_prefix else None)

    remat_of = functools.partial(T.rematerialize, policy=remat)
    if scan_weights:
        xs, kv = jax.lax.scan(remat_of(body, prevent_cse=False), xs, layer_inputs)
    else:
        # Of the last layer the prompt streams feed only their keys/values (the answer stream's prefix or the
        # returned cache): that layer runs after the loop, without their queries, attention and MLP.
        last = cfg.num_layers - 1
        xs, kv = jax.lax.scan(remat_of(body, prevent_cse=False), xs,
                              jax.tree_util.tree_map(lambda a: a[:last], layer_inputs))
        kv_only = (True,) * n_pre + ((False,) if with_answer else ())
        xs, kv_last = remat_of(functools.partial(body, kv_only=kv_only))(
            xs, jax.tree_util.tree_map(lambda a: a[last], layer_inputs))
        if return_prefix:
            kv = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b[None]]), kv, kv_last)
    prefix = T.KV(*kv) if return_prefix else None
    return (xs.streams()[-1] if with_answer else None), prefix


def answer_nll(trainable, base, cfg: ModelConfig, method: MethodConfig, batch, **kw):
    """Per-example answer NLL terms: ``(nll_sum [B], num_tokens [B])`` (float32, int32).

    For a packed batch of ``R`` rows and answer width ``A`` the terms are per
    slot ``[R * A]``: slot ``r * A + s - 1`` is example ``s`` of row ``r``;
    unused slots have ``num_tokens == 0``.
    """
    st = make_streams(batch)
    h, _ = run_streams(trainable, base, cfg, method, st, **kw)
    logits = T.unembed(base, cfg, h)  # [B, A, V] float32
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, st.targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(st.ans_valid, logz - tgt, 0.0)
    if st.ans_seg is None:
        return nll.sum(-1), st.ans_valid.sum(-1).astype(jnp.int32)
    r, a = nll.shape  # a row holds at most A examples (each has >= 1 answer token)
    slot = (jnp.arange(r, dtype=jnp.int32)[:, None] * a + jnp.maximum(st.ans_seg - 1, 0)).reshape(-1)
    nll_sum = jax.ops.segment_sum(nll.reshape(-1), slot, num_segments=r * a)  # padding adds exact zeros
    n = jax.ops.segment_sum(st.ans_valid.reshape(-1).astype(jnp.int32), slot, num_segments=r * a)
    return nll_sum, n


def loss_fn(trainable, base, cfg: ModelConfig, method: MethodConfig, batch, **kw):
    """Mean over examples of each example's mean answer-token NLL.

    Examples with ``answer_len == 0`` (batch padding) get weight zero, so a
    batch gives the same number as averaging its examples one by one. A
    packed batch (several examples per row, :func:`packed_streams`) gives the
    same mean over its examples as the same examples unpacked.
    Returns ``(loss, {"nll_sum", "num_tokens"})``.
    """
    nll_sum, n = answer_nll(trainable, base, cfg, method, batch, **kw)
    real = n > 0
    per_example = nll_sum / jnp.maximum(n, 1)
    loss = jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.maximum(real.sum(), 1)
    return loss, {"nll_sum": nll_sum, "num_tokens": n}


class Prefix(NamedTuple):
    """A prefilled (mixed) cache ready for answer decoding or scoring."""

    kv: T.KV  # [layers, B, S, kv_heads, hd]
    positions: jax.Array  # [B, S]
    valid: jax.Array  # [B, S]
    last_token: jax.Array  # [B]: x[L-1], the first token the answer pass feeds
    next_pos: jax.Array  # [B]: L-1, its position


def prefill(trainable, base, cfg: ModelConfig, method: MethodConfig, prompt_ids, prompt_len, **kw) -> Prefix:
    """Runs the variant's prefill over ``prompt_ids[:, :L-1]`` and returns the mixed cache.

    Continue with ``transformer.forward(base, cfg, tokens, positions=...,
    prefix_kv=prefix.kv, prefix_positions=prefix.positions,
    prefix_valid=prefix.valid, adapters=trainable["causal"], peft_cfg=method.peft)``
    starting from ``prefix.last_token`` at ``prefix.next_pos``. With
    ``trainable=None`` (no adapters) it is the plain model's causal prefill.
    """
    b = prompt_ids.shape[0]
    dummy = {"prompt_ids": prompt_ids, "prompt_len": prompt_len,
             "answer_ids": jnp.zeros((b, 1), jnp.int32), "answer_len": jnp.ones((b,), jnp.int32)}
    st = make_streams(dummy)
    trainable, method = with_base_default(trainable, method)
    _, kv = run_streams(trainable, base, cfg, method, st, with_answer=False, return_prefix=True, **kw)
    return Prefix(kv, st.pre_pos, st.pre_valid, st.ans_tokens[:, 0], st.ans_pos[:, 0])
