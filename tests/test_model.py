"""Model parity with transformers (Llama, Qwen2), mask semantics and prefix caches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax.conversion.hf import load_hf
from bitune_jax.model import transformer as T
from hf_utils import tiny_hf_model, torch_logits

IDS = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]])
MASK = (IDS != 0) | (np.arange(8) == 0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    overrides = {}
    if request.param == "llama":  # exercise Llama-3 rope scaling on one family
        overrides = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    torch_model = tiny_hf_model(request.param, str(d), **overrides)
    params, cfg = load_hf(str(d))
    return torch_model, params, cfg


def test_logits_match_transformers_padded_batch(models):
    torch_model, params, cfg = models
    ref = torch_logits(torch_model, IDS, MASK.astype(np.int64))
    ours, _ = T.forward(params, cfg, jnp.asarray(IDS), valid=jnp.asarray(MASK))
    diff = np.abs(np.asarray(ours) - ref)[MASK].max()
    assert diff <= 1e-4, diff


def test_logits_match_transformers_position_offsets(models):
    torch_model, params, cfg = models
    ids = IDS[:1]
    pos = np.arange(8)[None] + 37
    ref = torch_logits(torch_model, ids, None, pos)
    ours, _ = T.forward(params, cfg, jnp.asarray(ids), positions=jnp.asarray(pos))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_config_read_from_checkpoint(models):
    torch_model, _, cfg = models
    hf = torch_model.config
    assert cfg.num_layers == hf.num_hidden_layers and cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.qkv_bias == (cfg.family == "qwen2")


def test_bidirectional_mask_sees_later_tokens_causal_does_not(models):
    _, params, cfg = models
    a = jnp.array([[5, 6, 7, 8, 9]])
    b = a.at[0, 4].set(20)  # change only the last token
    for causal, should_change in ((True, False), (False, True)):
        la, _ = T.forward(params, cfg, a, causal=causal)
        lb, _ = T.forward(params, cfg, b, causal=causal)
        earlier_diff = float(jnp.abs(la[0, :4] - lb[0, :4]).max())
        assert (earlier_diff > 1e-4) == should_change, (causal, earlier_diff)
        if not should_change:
            assert earlier_diff == 0.0


def test_prefix_cache_equals_one_pass(models):
    _, params, cfg = models
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    full, kv_full = T.forward(params, cfg, tokens, return_kv=True)
    a, b = tokens[:, :4], tokens[:, 4:]
    _, kv_a = T.forward(params, cfg, a, return_kv=True)
    pos_b = jnp.broadcast_to(jnp.arange(4, 7), (2, 3))
    lb, kv_b = T.forward(params, cfg, b, positions=pos_b, prefix_kv=kv_a,
                         prefix_positions=jnp.broadcast_to(jnp.arange(4), (2, 4)),
                         prefix_valid=jnp.ones((2, 4), bool), return_kv=True)
    assert np.abs(np.asarray(lb) - np.asarray(full[:, 4:])).max() <= 1e-5
    assert np.abs(np.asarray(kv_b.k) - np.asarray(kv_full.k[:, :, 4:])).max() <= 1e-5


def test_padding_does_not_change_valid_positions(models):
    _, params, cfg = models
    short = jnp.array([[5, 6, 7]])
    padded = jnp.array([[5, 6, 7, 50, 51]])
    valid = jnp.array([[True, True, True, False, False]])
    for causal in (True, False):
        ls, _ = T.forward(params, cfg, short, causal=causal)
        lp, _ = T.forward(params, cfg, padded, valid=valid, causal=causal)
        assert np.abs(np.asarray(ls[0]) - np.asarray(lp[0, :3])).max() <= 1e-5


def test_bfloat16_runs_and_is_close(models, tmp_path):
    torch_model, params, cfg = models
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    lo, _ = T.forward(p16, cfg.replace(dtype="bfloat16"), jnp.asarray(IDS[:1]))
    ref, _ = T.forward(params, cfg, jnp.asarray(IDS[:1]))
    assert lo.dtype == jnp.float32
    assert np.abs(np.asarray(lo) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_fast_attention_matches_reference():
    from bitune_jax.model.attention import dot_product_attention, make_mask

    rng = np.random.default_rng(0)
    b, t, h, kvh, d = 2, 9, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kvh, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.asarray([[True] * 9, [True] * 5 + [False] * 4])
    for causal in (True, False):
        mask = make_mask(pos, pos, valid, valid, causal=causal)
        ref = dot_product_attention(q, k, v, mask, scale=d ** -0.5)
        fast = dot_product_attention(q, k, v, mask, scale=d ** -0.5, impl="xla")
        assert np.abs(np.asarray(ref) - np.asarray(fast)).max() <= 1e-5
