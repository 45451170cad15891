"""Attention implementations against the dense reference: outputs, gradients, and the Bitune loss of every variant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import bitune
from bitune_jax.model.attention import blocked_attention, dot_product_attention, make_mask
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.transformer import init_params


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_blocked_attention_matches_reference(causal, window, softcap):
    rng = np.random.default_rng(0)
    b, tq, tk, h, kvh, d = 3, 9, 21, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), jnp.float32)
    k_pos = jnp.broadcast_to(jnp.arange(tk), (b, tk))
    q_pos = k_pos[:, -tq:]  # queries sit after a 12-key prefix
    k_valid = jnp.asarray(rng.random((b, tk)) > 0.2)
    q_valid = jnp.asarray(rng.random((b, tq)) > 0.2).at[:, 0].set(False)  # padding rows included
    mask = make_mask(q_pos, k_pos, q_valid, k_valid, causal=causal, window=window)
    w = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)

    def ref(q, k, v):
        return dot_product_attention(q, k, v, mask, scale=0.3, softcap=softcap)

    def blocked(q, k, v):  # block 8: three key blocks, the last one padded
        return blocked_attention(q, k, v, q_pos, k_pos, q_valid, k_valid, jnp.full((b,), causal),
                                 window or 2 ** 30, scale=0.3, softcap=softcap, block=8)

    np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(ref(q, k, v)), atol=5e-6)
    g_ref = jax.grad(lambda *a: (ref(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(lambda *a: (blocked(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(g_blk, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=5e-6)


CFG = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qk_norm=True, sandwich_norm=True, sliding_window=3,
                  sliding_layers=(True, False), rope_local_theta=10.0, activation="gelu_tanh",
                  attn_logit_softcap=20.0)


# The stream layouts that differ for attention: two mixed prompt streams (causal + bidirectional) stacked in
# one call, and a single bidirectional prompt stream; each with the answer stream's prefix.
@pytest.mark.parametrize("variant", ["bitune", "no_mixing"])
def test_bitune_loss_and_gradients_with_blocked_attention(variant):
    """Ragged prompts and answers, a sliding-window layer and softcapping: blocked == reference."""
    base = init_params(jax.random.PRNGKey(0), CFG, std=0.3)
    method = bitune.MethodConfig(variant=variant)
    trainable = bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                                       trainable)
    batch = {"prompt_ids": jnp.array([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 0, 0, 0], [11, 12, 0, 0, 0, 0, 0]]),
             "prompt_len": jnp.array([7, 3, 2]),
             "answer_ids": jnp.array([[5, 6, 7, 8], [9, 0, 0, 0], [10, 11, 0, 0]]),
             "answer_len": jnp.array([4, 1, 2])}

    def loss(impl):
        return jax.value_and_grad(lambda t: bitune.loss_fn(t, base, CFG, method, batch, attention=impl)[0])(trainable)

    (l_ref, g_ref), (l_blk, g_blk) = loss("reference"), loss("blocked")
    assert abs(float(l_blk) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
    for a, c in zip(jax.tree_util.tree_leaves(g_blk), jax.tree_util.tree_leaves(g_ref)):
        scale = float(jnp.abs(c).max()) + 1e-12
        assert float(jnp.abs(a - c).max()) <= 1e-4 * scale


def test_blocked_attention_in_query_chunks_equals_the_reference(monkeypatch):
    """Causal ordered streams run chunk by chunk of queries, skipping later keys: loss and gradients unchanged.

    Chunks of 2 queries (the causal prompt stream's 6-token span in 3 chunks, the answer stream's 4 tokens after
    its prefix in 2), ragged and packed batches, a sliding-window layer and softcapping; one compilation.
    """
    from bitune_jax.data import pipeline as data
    from bitune_jax.model import attention as attn_lib
    from bitune_jax.model import transformer as T

    monkeypatch.setattr(T, "CAUSAL_CHUNK", 2)
    calls = []
    real = attn_lib.blocked_attention
    monkeypatch.setattr(attn_lib, "blocked_attention", lambda q, k, *a, **kw: calls.append(
        (q.shape[1], k.shape[1])) or real(q, k, *a, **kw))
    base = init_params(jax.random.PRNGKey(0), CFG, std=0.3)
    method = bitune.MethodConfig(variant="bitune")
    trainable = bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                                       trainable)
    examples = [(list(range(1, 8)), [5, 6, 7, 8]), ([9], [10, 11]), ([12, 13, 14], [15]), ([16, 17], [18, 19, 20])]

    def all_four(t, ragged, packed):  # (blocked, reference) for each batch
        return [jax.value_and_grad(lambda t: bitune.loss_fn(t, base, CFG, method, b, attention=impl)[0])(t)
                for b in (ragged, packed) for impl in ("blocked", "reference")]

    out = jax.jit(all_four)(trainable, data.collate(examples), data.pack(examples, capacity=(8, 8)))
    assert any(q < k for q, k in calls) and any(q == k == 2 for q, k in calls), calls  # chunks ran
    for (l_blk, g_blk), (l_ref, g_ref) in (out[:2], out[2:]):
        assert abs(float(l_blk) - float(l_ref)) <= 1e-5 * abs(float(l_ref))
        for a, c in zip(jax.tree_util.tree_leaves(g_blk), jax.tree_util.tree_leaves(g_ref)):
            scale = float(jnp.abs(c).max()) + 1e-12
            assert float(jnp.abs(a - c).max()) <= 1e-4 * scale
