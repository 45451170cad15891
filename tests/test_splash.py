"""Splash attention (the Pallas TPU kernel, run by Pallas's interpreter on CPU) against the dense reference.

Lengths sit just above 128 so every stream is padded up to the kernel's block multiple and spans two key
blocks; batches are ragged (short, empty and full rows) so padding has to come out exactly.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bitune_jax import bitune
from bitune_jax.data import pipeline as data
from bitune_jax.model.attention import Mask, dot_product_attention, resolve, splash_attention, splash_interpret
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.transformer import init_params
from bitune_jax.training import sharding as shd


@pytest.fixture(autouse=True)
def interpreted():
    with splash_interpret():
        yield


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


# --------------------------------------------------------------------------- one attention call per stream kind
S, A = 137, 9  # prefill span (padded to 256 = two key blocks of 128) and answer-stream widths


def _packed_rows(rows):
    """Prefill-span and answer-stream positions and segment ids of packed rows of ``(prompt_len, answer_len)``."""
    pre_pos, pre_seg = np.zeros((len(rows), S), np.int32), np.zeros((len(rows), S), np.int32)
    ans_pos, ans_seg = np.zeros((len(rows), A), np.int32), np.zeros((len(rows), A), np.int32)
    for r, examples in enumerate(rows):
        i = j = 0
        for sid, (plen, alen) in enumerate(examples, 1):
            pre_pos[r, i:i + plen - 1], pre_seg[r, i:i + plen - 1] = np.arange(plen - 1), sid
            ans_pos[r, j:j + alen], ans_seg[r, j:j + alen] = plen - 1 + np.arange(alen), sid
            i, j = i + plen - 1, j + alen
    return tuple(jnp.asarray(x) for x in (pre_pos, pre_seg, ans_pos, ans_seg))


def _stream(kind, *, b=3, heads=4, kv_heads=2, d=16, seed=0):
    """q, k, v and the Mask of one stream as the Bitune layer loop builds them (ragged rows)."""
    rng = np.random.default_rng(seed)
    plen = np.array([S + 1, 40, 1, 90])[:b]  # prompt lengths; the third row's prefill span is empty
    alen = np.array([A, 3, 0, 5])[:b]  # the third row is batch padding: no valid answer query at all
    pre_pos = jnp.broadcast_to(jnp.arange(S), (b, S))
    pre_valid = jnp.asarray(np.arange(S)[None] < (plen - 1)[:, None])
    ans_pos = jnp.asarray((plen - 1)[:, None] + np.arange(A)[None], jnp.int32)
    ans_valid = jnp.asarray(np.arange(A)[None] < alen[:, None])
    tq, tk = (A, S + A) if "answer" in kind else (S, S)
    if kind == "answer":
        mask = Mask.over(ans_pos, ans_valid, causal=True, prefix_positions=pre_pos, prefix_valid=pre_valid)
    elif kind == "packed_answer":  # two or three examples per row, each prefix followed by its answer
        rows = [[(60, 4), (50, 3), (20, 2)], [(100, 5), (30, 1)], [(2, 2)], [(130, 9)]][:b]
        pre_pos, pre_seg, ans_pos, ans_seg = _packed_rows(rows)
        mask = Mask.over(ans_pos, ans_seg > 0, causal=True, prefix_positions=pre_pos, prefix_valid=pre_seg > 0,
                         segment=ans_seg, prefix_segment=pre_seg)
    else:
        mask = Mask.over(pre_pos, pre_valid, causal=kind == "causal")
    q = jnp.asarray(rng.normal(size=(b, tq, heads, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, tk, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, tk, kv_heads, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    return q, k, v, mask, w


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "answer", "packed_answer"])
@pytest.mark.parametrize("window", [None, 7])
def test_each_stream_matches_the_reference(kind, window):
    """Outputs and q/k/v gradients; the windowed cases also cap logits (Gemma 2) and use one KV head."""
    softcap = 5.0 if window else None
    q, k, v, mask, w = _stream(kind, kv_heads=1 if window else 2)

    def ref(q, k, v):
        return dot_product_attention(q, k, v, mask.dense(window), scale=0.25, softcap=softcap)

    def spl(q, k, v):  # block 128: two query and key blocks, some skipped by the causal/local mask
        return splash_attention(q, k, v, mask, scale=0.25, softcap=softcap, window=window,
                                is_local=window is not None, block=128)

    def value_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return (out * w).sum(), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out_ref), g_ref = value_and_grads(ref)
    (_, out_spl), g_spl = value_and_grads(spl)
    np.testing.assert_allclose(np.asarray(out_spl), np.asarray(out_ref), atol=2e-5)
    for name, a, c in zip("qkv", g_spl, g_ref):
        assert np.isfinite(np.asarray(a)).all()
        assert _rel(a, c) <= 1e-4, (name, _rel(a, c))


# --------------------------------------------------------------------------- the Bitune loss through the model
LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)
# Gemma-3 style: local layers with a window far shorter than the prompts, their own RoPE base; plus
# Gemma-2 style logit softcapping, which splash applies in the kernel.
GEMMA3 = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True, sandwich_norm=True, sliding_window=6,
                     sliding_layers=(True, False), rope_local_theta=10.0, activation="gelu_tanh",
                     attn_logit_softcap=20.0)


def _batch(seed=0):
    """Ragged prompts (one longer than a kernel block) and answers, plus one batch-padding row."""
    rng = np.random.default_rng(seed)
    plen, alen = np.array([138, 50, 2, 5]), np.array([6, 1, 3, 0])
    prompt = np.where(np.arange(138)[None] < plen[:, None], rng.integers(1, 64, (4, 138)), 0)
    answer = np.where(np.arange(6)[None] < alen[:, None], rng.integers(1, 64, (4, 6)), 0)
    return {"prompt_ids": jnp.asarray(prompt, jnp.int32), "prompt_len": jnp.asarray(plen, jnp.int32),
            "answer_ids": jnp.asarray(answer, jnp.int32), "answer_len": jnp.asarray(alen, jnp.int32)}


def _loss_and_grads(cfg, variant, impl, batch=None):
    base = init_params(jax.random.PRNGKey(0), cfg, std=0.3)
    method = bitune.MethodConfig(variant=variant)
    trainable = bitune.init_trainable(jax.random.PRNGKey(1), cfg, method, base)
    # Non-zero LoRA B and theta away from its initial value, so every gradient path carries signal.
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                                       trainable)
    batch = jax.tree_util.tree_map(jnp.asarray, _batch() if batch is None else batch)
    fn = jax.jit(jax.value_and_grad(lambda t: bitune.loss_fn(t, base, cfg, method, batch, attention=impl)[0]))
    return fn(trainable)


def _assert_same(got, want):
    (l_got, g_got), (l_want, g_want) = got, want
    assert np.isfinite(float(l_got))
    assert abs(float(l_got) - float(l_want)) <= 1e-4 * abs(float(l_want)), (float(l_got), float(l_want))
    paths = jax.tree_util.tree_flatten_with_path(g_want)[0]
    for (path, c), a in zip(paths, jax.tree_util.tree_leaves(g_got)):
        assert np.isfinite(np.asarray(a)).all(), jax.tree_util.keystr(path)
        assert _rel(a, c) <= 1e-4, (jax.tree_util.keystr(path), _rel(a, c))


@pytest.mark.slow
@pytest.mark.parametrize("variant", bitune.VARIANTS)
def test_bitune_loss_and_gradients_of_every_variant(variant):
    """Splash on the padded batch and on the same examples packed two to a row, against the padded reference."""
    want = _loss_and_grads(LLAMA, variant, "reference")
    _assert_same(_loss_and_grads(LLAMA, variant, "splash"), want)
    padded = _batch()
    examples = [(np.asarray(padded["prompt_ids"][i, :p]).tolist(), np.asarray(padded["answer_ids"][i, :a]).tolist())
                for i, (p, a) in enumerate(zip(padded["prompt_len"].tolist(), padded["answer_len"].tolist())) if a > 0]
    packed = data.pack(examples, capacity=(137, 6))  # the batch-padding row (no answer) has weight 0 anyway
    assert packed["pre_ids"].shape[0] == 2 and packed["ans_seg"].max() == 2  # several examples share a row
    _assert_same(_loss_and_grads(LLAMA, variant, "splash", batch=packed), want)


@pytest.mark.slow
def test_gemma3_sliding_window_model_padded_and_packed():
    """Local layers (window 6, prompts up to 138 tokens) pick the local kernel inside the layer scan.

    The same examples padded one per row and packed several per row both give the reference's loss and
    gradients: the local layers right-align each padded row's prefix, and run a packed row's answer stream
    in its grouped layout (each example's prefix followed by its answer); the windows of packed prompt
    streams stop at example boundaries.
    """
    rng = np.random.default_rng(3)
    lengths = [(138, 4), (1, 3), (40, 2), (25, 5), (9, 1), (60, 3)]
    examples = [(rng.integers(1, 64, p).tolist(), rng.integers(1, 64, a).tolist()) for p, a in lengths]
    padded, packed = data.collate(examples), data.pack(examples, capacity=(137, 9))
    assert packed["ans_seg"].max() >= 3  # several examples share a row
    want = _loss_and_grads(GEMMA3, "bitune", "reference", batch=padded)
    _assert_same(_loss_and_grads(GEMMA3, "bitune", "splash", batch=padded), want)
    _assert_same(_loss_and_grads(GEMMA3, "bitune", "splash", batch=packed), want)


# --------------------------------------------------------------------------- sharded over the mesh
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_sharded_call_equals_unsharded(kv_heads):
    """Batch over (data, fsdp), heads over tensor on the 8-device CPU mesh; one KV head is repeated per shard."""
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    q, k, v, mask, w = _stream("answer", b=4, kv_heads=kv_heads)  # four rows: one per (data, fsdp) shard
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)

    def loss(q, k, v, mask, on_mesh):
        def run():
            out = splash_attention(q, k, v, mask, scale=0.25, block=128)
            return (out * w).sum(), out
        if not on_mesh:
            return run()
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
            return run()

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, out1), g1 = jax.jit(grad, static_argnums=4)(q, k, v, mask, False)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = jax.device_put((q, k, v, mask), rows)
    sharded = jax.jit(grad, static_argnums=4)
    assert "shard_map" in str(jax.make_jaxpr(sharded, static_argnums=4)(*args, True))
    (_, out8), g8 = sharded(*args, True)
    np.testing.assert_allclose(np.asarray(out8), np.asarray(out1), atol=1e-6)
    for a, c in zip(g8, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)


# --------------------------------------------------------------------------- what splash refuses, and auto
def test_resolve_picks_splash_on_tpu_and_refuses_it_elsewhere():
    assert resolve("auto", backend="tpu") == "splash"
    assert resolve("auto", softcap=30.0, backend="tpu") == "splash"  # splash caps logits itself
    assert resolve("splash", backend="cpu") == "splash"  # interpreted (this test's context)
    with splash_interpret(False):
        with pytest.raises(ValueError, match=r"model.attention='splash'.*needs a TPU.*'cpu'"):
            resolve("splash", backend="cpu")
        # A TPU topology traced on this CPU host (the compile-only check) counts as a TPU.
        tpu = jax.sharding.AbstractMesh((2,), ("data",), abstract_device=jax.sharding.AbstractDevice(
            device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
        with jax.sharding.use_abstract_mesh(tpu):
            assert resolve("auto") == "splash" and resolve("splash") == "splash"


def test_refused_inputs_name_the_problem():
    q, k, v, mask, _ = _stream("answer")
    with pytest.raises(ValueError, match="Mask objects"):
        splash_attention(q, k, v, mask.dense(), scale=1.0)
    with pytest.raises(ValueError, match="block=192"):
        splash_attention(q, k, v, mask, scale=1.0, block=192)
