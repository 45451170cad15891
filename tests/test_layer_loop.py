"""The layer loop's lean forms: packed projections, keys/values-only streams, the short loop, what is saved."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from bitune_jax import bitune
from bitune_jax.model import transformer as T
from bitune_jax.model.attention import Mask
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8)
BATCH = {"prompt_ids": jnp.array([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 0, 0, 0]]), "prompt_len": jnp.array([7, 3]),
         "answer_ids": jnp.array([[5, 6, 7], [9, 4, 0]]), "answer_len": jnp.array([3, 2])}


def _trainable(method, base):
    tr = bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base)
    return jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), tr)


def test_kv_only_streams_give_the_same_keys_and_leave_their_residual_alone():
    params = T.init_params(jax.random.PRNGKey(0), CFG, std=0.2)
    lp = jax.tree_util.tree_map(lambda x: x[0], params["layers"])
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32) for _ in range(2)]
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    valid = jnp.ones((2, 5), bool)
    masks = [Mask.over(pos, valid, causal=True), Mask.over(pos, valid, causal=False)]
    run = lambda kv_only: T.apply_block(lp, CFG, xs, [pos, pos], masks, [None, None], kv_only=kv_only)  # noqa: E731
    (a0, a1), ks, vs = run(None)
    (b0, b1), ks2, vs2 = run((True, False))
    np.testing.assert_array_equal(np.asarray(b0), np.asarray(xs[0]))  # untouched
    np.testing.assert_allclose(np.asarray(b1), np.asarray(a1), atol=1e-6)
    for u, w in zip(ks + vs, ks2 + vs2):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), atol=1e-6)
    (c0, c1), _, _ = run((True, True))  # nothing but keys and values
    assert c0 is xs[0] and c1 is xs[1]


@pytest.mark.parametrize("remat", ["full", "projections"])
def test_loop_stopping_before_the_last_layer_matches_the_plain_loop(remat):
    """With a remat policy the loop stops before the last layer, whose prompt streams give keys/values only.

    Loss, gradients and the prefill cache are those of the plain loop (``remat="none"``), which runs every
    stream through every layer.
    """
    base = T.init_params(jax.random.PRNGKey(0), CFG, std=0.2)
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4))
    tr = _trainable(method, base)

    def run(remat):
        lg = jax.value_and_grad(lambda t: bitune.loss_fn(t, base, CFG, method, BATCH, remat=remat)[0])(tr)
        pre = bitune.prefill(tr, base, CFG, method, BATCH["prompt_ids"], BATCH["prompt_len"], remat=remat)
        return lg, pre.kv

    (l0, g0), kv0 = run("none")
    (l1, g1), kv1 = run(remat)
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree_util.tree_leaves((g1, kv1)), jax.tree_util.tree_leaves((g0, kv0))):
        # The mixing gradients sum over every prefix key: rounding of a few 1e-6 of the leaf's largest entry.
        scale = float(np.abs(np.asarray(b)).max())
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-4 * scale


def _residual_shapes(capsys, fn, *args):
    """Shapes of what autodiff keeps for the backward pass of ``fn`` (``print_saved_residuals``' lines)."""
    capsys.readouterr()
    print_saved_residuals(fn, *args)
    return [tuple(int(n) for n in m.group(1).split(",") if n) for m in
            re.finditer(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, re.M)]


@pytest.mark.parametrize("attention,remat", [("reference", "none"), ("blocked", "none"),
                                             ("reference", "projections"), ("blocked", "projections")])
def test_query_by_key_tensors_are_saved_only_by_the_dense_reference_without_remat(capsys, attention, remat):
    base = T.init_params(jax.random.PRNGKey(0), CFG)
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4))
    tr = _trainable(method, base)
    shapes = _residual_shapes(
        capsys, lambda t: bitune.loss_fn(t, base, CFG, method, BATCH, attention=attention, remat=remat)[0], tr)
    s, a = BATCH["prompt_ids"].shape[1] - 1, BATCH["answer_ids"].shape[1]
    qk = {(s, s), (a, s + a)}  # the prompt streams' and the answer stream's [q, k]
    saved_qk = [sh for sh in shapes if sh[-2:] in qk]
    if (attention, remat) == ("reference", "none"):
        assert saved_qk  # softmax probabilities of every layer
    else:
        assert shapes and not saved_qk, saved_qk


def test_prompt_mlp_policy_keeps_the_mlp_outputs_of_the_answer_stream_only(capsys):
    """``remat="prompt_mlp"``: the loop keeps gate/up outputs for the answer tokens only; same loss and gradients.

    (LoRA's single prompt stream goes through the same code; ``test_remat_policies_give_same_gradients`` runs
    the policy too.)
    """
    base = T.init_params(jax.random.PRNGKey(0), CFG, std=0.2)
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4))
    tr = _trainable(method, base)
    loss = {r: (lambda t, r=r: bitune.loss_fn(t, base, CFG, method, BATCH, remat=r)[0]) for r in
            ("projections", "prompt_mlp")}
    s, a = BATCH["prompt_ids"].shape[1] - 1, BATCH["answer_ids"].shape[1]
    n_pre = len(method.prompt_streams)

    def mlp_tokens(remat):  # token counts of the loop's stacked [layers - 1, batch, tokens, intermediate] residuals
        return sorted(sh[2] for sh in _residual_shapes(capsys, loss[remat], tr)
                      if len(sh) == 4 and sh[0] == CFG.num_layers - 1 and sh[-1] == CFG.intermediate_size)

    assert mlp_tokens("projections") == [n_pre * s + a] * 2  # gate and up, every stream packed
    assert mlp_tokens("prompt_mlp") == [a] * 2  # the answer stream's only
    (l0, g0), (l1, g1) = (jax.value_and_grad(loss[r])(tr) for r in ("projections", "prompt_mlp"))
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for u, w in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_packed_projection_equals_each_stream_alone(method):
    """One matmul over packed streams with two adapter sets (and a stream without) == each stream on its own."""
    from bitune_jax.model import peft as peft_lib

    pc = PeftConfig(method=method, rank=4, alpha=8.0, targets=("q_proj", "down_proj") if method == "ia3" else None)
    base = T.init_params(jax.random.PRNGKey(0), CFG, std=0.2)
    sets = [jax.tree_util.tree_map(lambda x, i=i: x[0] + 0.1 * jax.random.normal(jax.random.PRNGKey(i), x.shape[1:]),
                                   peft_lib.init_adapters(jax.random.PRNGKey(i), CFG, pc, base)) for i in (3, 4)]
    rng = np.random.default_rng(0)
    lens = (5, 5, 3, 2)
    for name in ("q_proj", "down_proj"):
        proj = jax.tree_util.tree_map(lambda x: x[0], base["layers"][name])
        x = jnp.asarray(rng.normal(size=(2, sum(lens), CFG.projection_shape(name)[0])), jnp.float32)

        def packed(x, sets):
            return peft_lib.dense_packed(x, lens, proj, name, [sets[0], sets[1], sets[0], None], pc)

        def alone(x, sets):
            parts = jnp.split(x, np.cumsum(lens)[:-1].tolist(), axis=1)
            return jnp.concatenate([peft_lib.dense_packed(p, (n,), proj, name, [ad], pc)
                                    for p, n, ad in zip(parts, lens, [sets[0], sets[1], sets[0], None])], axis=1)

        np.testing.assert_allclose(np.asarray(packed(x, sets)), np.asarray(alone(x, sets)), rtol=1e-5, atol=1e-6)
        w = jnp.asarray(rng.normal(size=packed(x, sets).shape), jnp.float32)
        g1 = jax.grad(lambda x, s: (packed(x, s) * w).sum(), argnums=(0, 1))(x, sets)
        g2 = jax.grad(lambda x, s: (alone(x, s) * w).sum(), argnums=(0, 1))(x, sets)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_sets", [1, 2])
def test_adapted_projection_gradients_equal_autodiff_of_the_plain_formula(n_sets):
    """The adapters' hand-written backward pass (``peft._lora_delta``) against autodiff of the formula.

    Gradients of the input, the adapters and the kernel; one adapter set, and two selected per token.
    """
    from bitune_jax.model import peft as peft_lib

    pc = PeftConfig(rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    lens = (5, 3, 2)
    which = [0, 1, 0][:len(lens)] if n_sets == 2 else [0, 0, 0]
    for din, dout in ((32, 64), (64, 32)):
        w = jnp.asarray(rng.normal(size=(din, dout)), jnp.float32)
        sets = [{"down_proj": {"lora_a": jnp.asarray(rng.normal(size=(din, 4)), jnp.float32),
                               "lora_b": jnp.asarray(rng.normal(size=(4, dout)), jnp.float32)}} for _ in range(n_sets)]
        x = jnp.asarray(rng.normal(size=(2, sum(lens), din)), jnp.float32)
        gy = jnp.asarray(rng.normal(size=(2, sum(lens), dout)), jnp.float32)

        def packed(x, w, sets):
            return (peft_lib.dense_packed(x, lens, {"kernel": w}, "down_proj", [sets[j] for j in which], pc) * gy).sum()

        def plain(x, w, sets):
            parts = jnp.split(x, np.cumsum(lens)[:-1].tolist(), axis=1)
            ys = [p @ w + (p @ sets[j]["down_proj"]["lora_a"]) @ sets[j]["down_proj"]["lora_b"] * pc.scaling
                  for p, j in zip(parts, which)]
            return (jnp.concatenate(ys, axis=1) * gy).sum()

        np.testing.assert_allclose(float(packed(x, w, sets)), float(plain(x, w, sets)), rtol=1e-5)
        g1 = jax.grad(packed, argnums=(0, 1, 2))(x, w, sets)
        g2 = jax.grad(plain, argnums=(0, 1, 2))(x, w, sets)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_auto_attention_takes_the_dense_reference_for_an_explicit_mask():
    from bitune_jax.model.attention import make_mask

    params = T.init_params(jax.random.PRNGKey(0), CFG, std=0.2)
    lp = jax.tree_util.tree_map(lambda x: x[0], params["layers"])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    ok = jnp.ones((2, 5), bool)
    dense = [make_mask(pos, pos, ok, ok, causal=True)]
    (auto,), _, _ = T.apply_block(lp, CFG, [x], [pos], dense, [None])  # blocked on CPU needs positions
    (ref,), _, _ = T.apply_block(lp, CFG, [x], [pos], dense, [None], attention="reference")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    with pytest.raises(ValueError, match="blocked"):
        T.apply_block(lp, CFG, [x], [pos], dense, [None], attention="blocked")
