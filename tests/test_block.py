"""The one decoder block: mask semantics, prefix caches, and every caller going through it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import bitune
from bitune_jax.evaluation import generate
from bitune_jax.model import transformer as T
from bitune_jax.model.attention import Mask, make_mask
from bitune_jax.model.config import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
# Gemma-3 style: sliding-window layers with their own RoPE base, qk-norm and sandwich norms.
LOCAL = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=1, head_dim=16, qk_norm=True, sandwich_norm=True, sliding_window=3,
                    sliding_layers=(True, False), rope_local_theta=10.0, activation="gelu_tanh")


def _layer(cfg, seed=0):
    params = T.init_params(jax.random.PRNGKey(seed), cfg, std=0.2)
    return params, jax.tree_util.tree_map(lambda x: x[0], params["layers"])


def _inputs(b=2, t=7, d=32, seed=1):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.asarray([[True] * t, [True] * (t - 2) + [False] * 2])
    return x, pos, valid


@pytest.mark.parametrize("cfg,is_local", [(CFG, False), (LOCAL, True), (LOCAL, False)])
def test_causal_mask_equals_the_explicit_mask_and_bidirectional_differs(cfg, is_local):
    _, lp = _layer(cfg)
    x, pos, valid = _inputs(d=cfg.hidden_size)
    window = cfg.sliding_window if is_local else None
    # One kernel for both (an explicit mask takes the dense reference): the masks alone are compared.
    run = functools.partial(T.apply_block, lp, cfg, [x], [pos], adapters=[None], is_local=is_local,
                            attention="reference")
    (described,), _, _ = run(masks=[Mask.over(pos, valid, causal=True)])
    (explicit,), _, _ = run(masks=[make_mask(pos, pos, valid, valid, causal=True, window=window)])
    (bidir,), _, _ = run(masks=[Mask.over(pos, valid, causal=False)])
    np.testing.assert_array_equal(np.asarray(described), np.asarray(explicit))
    # A causal row sees nothing later; the bidirectional one does, so every row but the last real one differs.
    diff = np.abs(np.asarray(bidir - described))[0].max(-1)
    assert (diff[:-1] > 1e-4).all() and diff[-1] <= 1e-6, diff


def test_sliding_window_hides_far_keys():
    _, lp = _layer(LOCAL)
    x, pos, valid = _inputs(d=LOCAL.hidden_size)
    # Changing token 0 changes rows 0..2 on a window-3 local layer, every row on a global one.
    x2 = x.at[:, 0].add(1.0)
    for is_local, changed in ((True, 3), (False, 7)):
        run = functools.partial(T.apply_block, lp, LOCAL, positions=[pos], masks=[Mask.over(pos, valid, causal=True)],
                                adapters=[None], is_local=is_local)
        (a,), _, _ = run(xs=[x])
        (b,), _, _ = run(xs=[x2])
        rows = np.abs(np.asarray(a - b))[0].max(-1) > 1e-6
        assert rows.sum() == changed, (is_local, rows)


def test_prefix_cache_continues_the_sequence():
    """Block over [0, 7) in one call == block over [0, 4) then [4, 7) with the first call's keys/values as prefix."""
    _, lp = _layer(CFG)
    x, pos, valid = _inputs()
    valid = jnp.ones_like(valid)
    (full,), _, _ = T.apply_block(lp, CFG, [x], [pos], [Mask.over(pos, valid, causal=True)], [None])
    (_,), (k,), (v,) = T.apply_block(lp, CFG, [x[:, :4]], [pos[:, :4]], [Mask.over(pos[:, :4], valid[:, :4],
                                                                                     causal=True)], [None])
    mask = Mask.over(pos[:, 4:], valid[:, 4:], causal=True, prefix_positions=pos[:, :4], prefix_valid=valid[:, :4])
    (tail,), _, _ = T.apply_block(lp, CFG, [x[:, 4:]], [pos[:, 4:]], [mask], [None], prefix=[(k, v)])
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 4:]), atol=1e-5)


@pytest.fixture
def block_calls(monkeypatch):
    """Counts traces of ``DecoderBlock.__call__`` (a scan traces its body once)."""
    calls = []
    original = T.DecoderBlock.__call__

    def counted(self, xs, *args, **kw):
        calls.append(len(xs.lengths) if isinstance(xs, T.Packed) else len(xs))
        return original(self, xs, *args, **kw)

    monkeypatch.setattr(T.DecoderBlock, "__call__", counted)
    return calls


def _params():
    return T.init_params(jax.random.PRNGKey(0), CFG)


def test_forward_goes_through_the_block(block_calls):
    params = _params()
    block_calls.clear()  # init traced the block for its shapes
    T.forward(params, CFG, jnp.array([[1, 2, 3]]))
    assert block_calls == [1]


def test_fused_bitune_loop_goes_through_the_block(block_calls):
    base = _params()
    method = bitune.MethodConfig(variant="bitune")
    trainable = bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base)
    block_calls.clear()
    batch = {"prompt_ids": jnp.array([[1, 2, 3, 4]]), "prompt_len": jnp.array([4]),
             "answer_ids": jnp.array([[5, 6]]), "answer_len": jnp.array([2])}
    bitune.loss_fn(trainable, base, CFG, method, batch)
    assert block_calls == [3]  # one block call carrying the three streams


def test_kv_cache_decoding_goes_through_the_block(block_calls):
    base = _params()
    b, t = 2, 6
    k = jnp.zeros((CFG.num_layers, b, t, CFG.num_kv_heads, CFG.head_dim))
    cache_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache_valid = jnp.zeros((b, t), bool).at[:, :2].set(True)
    block_calls.clear()
    logits, k2, _, cache_valid2 = generate.decode_step(base, CFG, None, None, k, k, cache_pos, cache_valid,
                                                       jnp.array([3, 4]), jnp.asarray(2))
    assert block_calls == [1]
    assert logits.shape == (b, CFG.vocab_size)
    assert bool(cache_valid2[:, 2].all()) and float(jnp.abs(k2[:, :, 2]).max()) > 0
