"""Sequence packing and the total-length bound.

Segment ids in attention masks (dense and blocked), the packed batch layout,
packed == unpacked loss and gradients for every variant, the packed data
pipeline (same examples, one shape for all processes, resumable), exact
training resume with packing, and ``data.max_len`` truncation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import bitune
from bitune_jax.config import Config, ConfigError, DataSection
from bitune_jax.data import pipeline as data
from bitune_jax.model.attention import Mask, blocked_attention, dot_product_attention, make_mask
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.transformer import init_params


# --------------------------------------------------------------------------- masks
def test_mask_segments_dense_by_hand():
    """A prefix of two examples (segments 1, 2) and an answer stream of the same two: each sees only its own."""
    pre_pos = jnp.array([[0, 1, 0, 0]])  # example 1: 2 prefill tokens, example 2: 1, then padding
    pre_seg = jnp.array([[1, 1, 2, 0]])
    ans_pos = jnp.array([[2, 3, 1, 0]])  # example 1 answers from position 2, example 2 from 1
    ans_seg = jnp.array([[1, 1, 2, 0]])
    m = Mask.over(ans_pos, ans_seg > 0, causal=True, prefix_positions=pre_pos, prefix_valid=pre_seg > 0,
                  segment=ans_seg, prefix_segment=pre_seg)
    want = [[1, 1, 0, 0, 1, 0, 0, 0],   # ex 1, first answer token: its prefix and itself
            [1, 1, 0, 0, 1, 1, 0, 0],   # ex 1, second: also its first answer token
            [0, 0, 1, 0, 0, 0, 1, 0],   # ex 2: its one prefix token and itself
            [0, 0, 0, 0, 0, 0, 0, 0]]   # padding sees nothing
    assert m.dense()[0].astype(int).tolist() == want
    bidir = Mask.over(pre_pos, pre_seg > 0, causal=False, segment=pre_seg).dense()[0].astype(int).tolist()
    assert bidir == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    # Without segment ids the same positions mix the two examples (and nothing else changes).
    plain = Mask.over(pre_pos, pre_seg > 0, causal=False)
    assert plain.q_segment is None and plain.dense()[0, 0].astype(int).tolist() == [1, 1, 1, 0]
    assert np.array_equal(plain.dense(), make_mask(pre_pos, pre_pos, pre_seg > 0, pre_seg > 0, causal=False))
    with pytest.raises(ValueError, match="segment and prefix_segment"):
        Mask.over(ans_pos, ans_seg > 0, causal=True, prefix_positions=pre_pos, prefix_valid=pre_seg > 0,
                  segment=ans_seg)
    with pytest.raises(ValueError, match="q_segment and k_segment"):
        make_mask(pre_pos, pre_pos, pre_seg > 0, pre_seg > 0, causal=False, q_segment=pre_seg)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_blocked_attention_with_segments_matches_reference(causal, window):
    """Rows of several segments whose positions restart: blocked == dense reference, outputs and gradients."""
    rng = np.random.default_rng(1)
    b, tq, tk, h, kvh, d = 2, 7, 19, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, tk, kvh, d)), jnp.float32)
    # Keys: a 12-token prefix of segments 1..3 (positions restart per segment), then the queries' own 7.
    k_seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3 + [1, 1, 2, 3, 3, 3, 0],
                         [1] * 8 + [2] * 2 + [0] * 2 + [1, 2, 2, 2, 0, 0, 0]])
    k_pos = jnp.asarray([list(range(5)) + list(range(4)) + list(range(3)) + [5, 6, 4, 3, 4, 5, 0],
                         list(range(8)) + list(range(2)) + [0, 0] + [8, 2, 3, 4, 0, 0, 0]])
    k_valid = k_seg > 0
    q_seg, q_pos, q_valid = k_seg[:, 12:], k_pos[:, 12:], k_valid[:, 12:]
    mask = make_mask(q_pos, k_pos, q_valid, k_valid, causal=causal, window=window, q_segment=q_seg,
                     k_segment=k_seg)
    assert not bool(mask[0, 0, 8])  # in the window and earlier, but another segment: hidden
    w = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)

    def ref(q, k, v):
        return dot_product_attention(q, k, v, mask, scale=0.3)

    def blocked(q, k, v):  # block 8: three key blocks, the last one padded
        return blocked_attention(q, k, v, q_pos, k_pos, q_valid, k_valid, jnp.full((b,), causal), window or 2 ** 30,
                                 scale=0.3, block=8, q_segment=q_seg, k_segment=k_seg)

    np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(ref(q, k, v)), atol=5e-6)
    g_ref = jax.grad(lambda *a: (ref(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.grad(lambda *a: (blocked(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, c in zip(g_blk, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=5e-6)


# --------------------------------------------------------------------------- layout
def test_pack_layout_by_hand():
    ex = [([1, 2, 3], [4, 5]), ([6], [7]), ([8, 9, 10, 11], [12, 13, 14])]
    # Spans (prefill, answer): (2, 2), (0, 1), (3, 3); capacity (5, 5): ex 2 first, then ex 0 beside it, ex 1 apart.
    assert data.pack_rows([(3, 2), (1, 1), (4, 3)], (5, 5)) == [[0, 2], [1]]
    b = data.pack(ex, capacity=(5, 5), pad_to=(3, 6, 6))
    assert sorted(b) == sorted(bitune.PACKED_KEYS) and all(v.dtype == np.int32 for v in b.values())
    assert b["pre_ids"].tolist() == [[1, 2, 8, 9, 10, 0], [0] * 6, [0] * 6]
    assert b["pre_pos"].tolist() == [[0, 1, 0, 1, 2, 0], [0] * 6, [0] * 6]
    assert b["pre_seg"].tolist() == [[1, 1, 2, 2, 2, 0], [0] * 6, [0] * 6]  # ex 1's prefill span is empty
    assert b["ans_ids"].tolist() == [[3, 4, 11, 12, 13, 0], [6, 0, 0, 0, 0, 0], [0] * 6]
    assert b["ans_pos"].tolist() == [[2, 3, 3, 4, 5, 0], [0] * 6, [0] * 6]
    assert b["ans_seg"].tolist() == [[1, 1, 2, 2, 2, 0], [1, 0, 0, 0, 0, 0], [0] * 6]
    assert b["targets"].tolist() == [[4, 5, 12, 13, 14, 0], [7, 0, 0, 0, 0, 0], [0] * 6]
    assert data.real_tokens(b) == 3 + 2 + 1 + 1 + 4 + 3
    # Default capacity: the longest example's spans, rounded up to the bucket.
    assert data.pack(ex, bucket=4)["pre_ids"].shape == (2, 4)
    merged = data.concat_packed([b, data.pack(ex[:1])], row_multiple=2)
    assert merged["ans_seg"].shape == (8, 6) and merged["ans_seg"][4].tolist() == [1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="smaller than the packed rows"):
        data.pack(ex, capacity=(5, 5), pad_to=(1, 6, 6))
    with pytest.raises(ValueError, match="every example exactly once"):
        data.pack(ex, rows=[[0, 1]])


# --------------------------------------------------------------------------- packed == unpacked
# A plain Llama for the variant matrix (cheapest to compile); Gemma 3's sliding window, logit softcap and
# norms for the one-token-prompt case.
LLAMA = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)
GEMMA3 = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, qk_norm=True, sandwich_norm=True, sliding_window=3,
                     sliding_layers=(True, False), rope_local_theta=10.0, activation="gelu_tanh",
                     attn_logit_softcap=20.0)
# Ragged prompts (one of a single token) and answers.
EXAMPLES = [(list(range(1, 8)), [5, 6, 7, 8]), ([9], [10, 11]), ([12, 13, 14], [15]), ([16, 17], [18, 19, 20]),
            ([21, 22, 23, 24, 25], [26, 27])]


def _packed_and_unpacked(cfg, variant, packed, unpacked, attention="reference"):
    """``((loss, grads) packed, (loss, grads) unpacked)``, both in one compiled function."""
    base = init_params(jax.random.PRNGKey(0), cfg, std=0.3)
    method = bitune.MethodConfig(variant=variant)
    trainable = bitune.init_trainable(jax.random.PRNGKey(1), cfg, method, base)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                                       trainable)

    def both(t, packed, unpacked):
        def value_and_grad(batch):
            return jax.value_and_grad(lambda t: bitune.loss_fn(t, base, cfg, method, batch, attention=attention)[0])(t)
        return value_and_grad(packed), value_and_grad(unpacked)

    return jax.jit(both)(trainable, packed, unpacked)


def _assert_same(a, b):
    """Losses within 1e-5 relative; every gradient entry within 1e-5 and 1e-4 of the largest gradient."""
    (l_a, g_a), (l_b, g_b) = a, b
    assert abs(float(l_a) - float(l_b)) <= 1e-5 * abs(float(l_b))
    scale = max(float(jnp.abs(y).max()) for y in jax.tree_util.tree_leaves(g_b))
    assert scale > 1e-3  # gradients that are not all tiny
    for x, y in zip(jax.tree_util.tree_leaves(g_a), jax.tree_util.tree_leaves(g_b)):
        assert float(jnp.abs(x - y).max()) <= min(1e-5, 1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["reference", "blocked"])
@pytest.mark.parametrize("variant", bitune.VARIANTS)
def test_packed_loss_and_gradients_equal_unpacked(variant, attention):
    # Capacity (8, 8): rows [0, 1, 2] (the 1-token prompt in the middle) and [3, 4]; an empty row and padding.
    assert data.pack_rows([(len(p), len(a)) for p, a in EXAMPLES], (8, 8)) == [[0, 1, 2], [3, 4]]
    packed = data.pack(EXAMPLES, capacity=(8, 8), pad_to=(3, 10, 9))
    _assert_same(*_packed_and_unpacked(LLAMA, variant, packed, data.collate(EXAMPLES), attention))


def test_packed_answer_nll_slots():
    base = init_params(jax.random.PRNGKey(0), LLAMA, std=0.3)
    method = bitune.MethodConfig(variant="lora")
    trainable = bitune.init_trainable(jax.random.PRNGKey(1), LLAMA, method, base)
    packed = data.pack(EXAMPLES, capacity=(8, 8), pad_to=(3, 10, 9))
    nll, n = jax.jit(lambda b: bitune.answer_nll(trainable, base, LLAMA, method, b))(packed)
    ref, n_ref = jax.jit(lambda b: bitune.answer_nll(trainable, base, LLAMA, method, b))(data.collate(EXAMPLES))
    # Slot r * 9 + s - 1 is example s of row r: rows [0, 1, 2] and [3, 4].
    slots = [0, 1, 2, 9, 10]
    n = np.asarray(n)
    assert n.shape == (27,) and n[slots].tolist() == np.asarray(n_ref).tolist() == [4, 2, 1, 3, 2]
    assert n.sum() == 12
    np.testing.assert_allclose(np.asarray(nll)[slots], np.asarray(ref), rtol=1e-5)


def test_packed_rows_of_one_token_prompts_only():
    """Every prefill span empty (a sliding-window, softcapped model): as unpacked."""
    ex = [([3], [4, 5]), ([6], [7]), ([8], [9, 10, 11])]
    packed = data.pack(ex, capacity=(1, 8))
    assert packed["pre_seg"].tolist() == [[0]] and packed["ans_seg"].tolist() == [[1, 1, 2, 3, 3, 3]]
    _assert_same(*_packed_and_unpacked(GEMMA3, "bitune", packed, data.collate(ex)))


# --------------------------------------------------------------------------- pipeline
def _examples(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 50, rng.integers(1, 14)).astype(np.int32),
             rng.integers(3, 50, rng.integers(1, 7)).astype(np.int32)) for _ in range(n)]


def _unpack(batch):
    """The (prompt, answer) examples of a packed batch, as sorted tuples."""
    out = []
    for r in range(batch["ans_seg"].shape[0]):
        for s in range(1, int(batch["ans_seg"][r].max()) + 1):
            pre, ans = batch["pre_seg"][r] == s, batch["ans_seg"][r] == s
            prompt = list(batch["pre_ids"][r][pre]) + [int(batch["ans_ids"][r][ans][0])]
            out.append((tuple(int(t) for t in prompt), tuple(int(t) for t in batch["targets"][r][ans])))
    return sorted(out)


def _plain(batch):
    return sorted((tuple(p[:lp].tolist()), tuple(a[:la].tolist())) for p, lp, a, la in
                  zip(batch["prompt_ids"], batch["prompt_len"], batch["answer_ids"], batch["answer_len"]))


def test_packed_batches_hold_the_unpacked_examples_in_one_shape_per_batch():
    examples = _examples()
    cfg = DataSection(batch_size=8, bucket=4, sort_window=2, shuffle_seed=3, max_prompt_len=13, max_answer_len=6)
    packed_cfg = dataclasses.replace(cfg, packing=True)
    plain = data.batch_dataset(examples, cfg, process_index=0, process_count=1)
    whole = data.batch_dataset(examples, packed_cfg, process_index=0, process_count=1)
    shards = [data.batch_dataset(examples, packed_cfg, process_index=p, process_count=2) for p in range(2)]
    assert data.pack_capacity(packed_cfg) == (12, 6)
    fewer_rows = 0
    for i in range(12):  # two epochs and a half
        ref = _plain(plain[i])
        assert _unpack(whole[i]) == ref
        fewer_rows += whole[i]["ans_seg"].shape[0] < 8
        a, b = shards[0][i], shards[1][i]
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert sorted(_unpack(a) + _unpack(b)) == ref
        for batch in (whole[i], a):
            sw, aw = batch["pre_ids"].shape[1], batch["ans_ids"].shape[1]  # bucketed, or the capacity
            assert sw in (4, 8, 12) and aw in (4, 6)
    assert fewer_rows > 6  # packing did pack
    # Resumable: a fresh iterator set to a saved state continues with the same batches.
    it = data.make_iterator(whole)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    again = data.make_iterator(data.batch_dataset(examples, packed_cfg, process_index=0, process_count=1))
    again.set_state(state)
    for x, y in zip(rest, [next(again) for _ in range(2)]):
        assert all(np.array_equal(x[k], y[k]) for k in bitune.PACKED_KEYS)
    assert len(first) == 3
    with pytest.raises(data.DataError, match="data.packing=true"):
        data.batch_dataset(examples, packed_cfg, process_index=0, process_count=1, include_ids=True)


# --------------------------------------------------------------------------- data.max_len
def test_max_len_truncation_and_drop_by_hand():
    fit = data._fit
    cfg = DataSection(max_prompt_len=100, max_answer_len=100, max_len=6)
    bos = 1
    assert fit([1, 2, 3], [4, 5, 6], cfg, bos) == ([1, 2, 3], [4, 5, 6], False)  # exactly 6
    assert fit([1, 2, 3, 4], [5, 6, 7], cfg, bos) == ([1, 2, 3, 4], [5, 6], True)  # the answer's end goes
    assert fit([1, 2, 3, 4, 5, 6, 7], [8, 9], cfg, bos) == ([1, 4, 5, 6, 7], [8], True)  # BOS + last 4, 1 answer
    assert fit([2, 3, 4, 5, 6, 7], [8], cfg, bos) == ([3, 4, 5, 6, 7], [8], True)  # no BOS: the last 5
    drop = dataclasses.replace(cfg, overlong="drop")
    assert fit([1, 2, 3, 4], [5, 6, 7], drop, bos) is None and fit([1, 2], [3, 4, 5, 6], drop, bos) is not None
    # The separate caps still apply, first.
    both = DataSection(max_prompt_len=3, max_answer_len=2, max_len=4)
    assert fit([1, 2, 3, 4, 5], [6, 7, 8], both, bos) == ([1, 4, 5], [6], True)
    stats = data.DataStats(source="x", rows=2, overlong_dropped=2, longest_prompt=4, longest_answer=3,
                           longest_total=7)
    assert "data.max_len=6 (longest prompt + answer: 7 tokens)" in stats.why_empty(drop)
    # Batches never pad past what max_len allows.
    ex = [([1] * 5, [2]), ([1], [2] * 5)]
    b = data.batch_dataset(ex, DataSection(batch_size=2, bucket=4, max_len=6), train=False, process_index=0,
                           process_count=1)[0]
    assert b["prompt_ids"].shape == (2, 5) and b["answer_ids"].shape == (2, 5)


def test_max_len_and_packing_config_errors():
    cfg = Config.from_dict({"data": {"max_len": 512, "packing": True, "overlong": "drop"}})
    assert cfg.data.max_len == 512 and cfg.data.packing and Config.from_dict({}).data.max_len is None
    with pytest.raises(ConfigError, match=r"'data.max_len'=1 is out of range; allowed: >= 2"):
        Config.from_dict({"data": {"max_len": 1}})
    with pytest.raises(ConfigError, match=r"'data.packing' must be true or false"):
        Config.from_dict({"data": {"packing": "yes"}})
    with pytest.raises(ConfigError, match=r"'data.max_len' must be an integer"):
        Config.from_dict({"data": {"max_len": 5.5}})


# --------------------------------------------------------------------------- training resume
@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    from hf_utils import reversal_run_folder

    root = tmp_path_factory.mktemp("packing")
    model_dir = reversal_run_folder(root, (("train", 16), ("eval", 8)), n_words=40, lengths=(1, 7))
    raw = {"model": {"source": model_dir},
           "method": {"variant": "bitune", "peft": {"method": "lora", "rank": 2, "alpha": 4.0}},
           "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "batch_size": 4,
                    "bucket": 8, "max_prompt_len": 16, "max_answer_len": 8, "sort_window": 1, "packing": True},
           "optim": {"lr": 1e-2, "mix_lr": 0.05},
           "train": {"steps": 2, "save_every": 1, "keep_checkpoints": 3, "log_every": 1, "eval_every": 2,
                     "eval_batches": 1, "seed": 0, "async_checkpoint": False}}
    return root, raw


def _config(raw, out, train=None, **data_overrides):
    raw = json.loads(json.dumps(raw))
    raw["data"].update(data_overrides)
    raw["train"].update(train or {}, output_dir=str(out))
    return Config.from_dict(raw)


def _state(out_dir, step):
    from hf_utils import checkpoint_tree, flat_arrays

    return flat_arrays(checkpoint_tree(out_dir, step))


def _metrics(out_dir):
    from hf_utils import metrics_rows

    return metrics_rows(out_dir)


@pytest.mark.slow
def test_packed_training_resumes_exactly_and_matches_the_unpacked_loss(run_files, tmp_path):
    from bitune_jax.training.loop import train

    root, raw = run_files
    full, cut = tmp_path / "full", tmp_path / "cut"
    summary = train(_config(raw, full))  # 2 steps, checkpoints 1 and 2, a packed evaluation at 2
    assert summary["status"] == "completed"
    assert sorted(r["split"] for r in _metrics(str(full))) == ["eval", "train", "train"]
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "2")
    os.remove(cut / "summary.json")
    resumed = train(_config(raw, cut, eval=None))  # (data.eval may change on resume)
    assert resumed["start_step"] == 1 and resumed["step"] == 2
    assert _metrics(str(cut)) == [r for r in _metrics(str(full)) if r["split"] == "train"]
    a, b = _state(str(full), 2), _state(str(cut), 2)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # The first step's loss (computed before any update) is the unpacked run's.
    plain = train(_config(raw, tmp_path / "plain", train={"steps": 1}, packing=False, eval=None))
    first = [r for r in _metrics(str(full)) if r["split"] == "train"][0]["loss"]
    assert abs(plain["train_loss"] - first) <= 1e-5 * abs(first)


def test_pack_rows_pow2_rounds_rows_up_and_keeps_the_examples():
    """``data.pack_rows=pow2``: the same examples as unpacked, rows a power of two (at most one per example),
    fewer distinct shapes over an epoch than ``exact``; a bad value is a config error naming the key."""
    examples = _examples()
    cfg = DataSection(batch_size=8, bucket=4, sort_window=2, shuffle_seed=3, max_prompt_len=13, max_answer_len=6,
                      packing=True)
    plain = data.batch_dataset(examples, dataclasses.replace(cfg, packing=False), process_index=0, process_count=1)
    exact = data.batch_dataset(examples, cfg, process_index=0, process_count=1)
    pow2 = data.batch_dataset(examples, dataclasses.replace(cfg, pack_rows="pow2"), process_index=0, process_count=1)
    shapes = {"exact": set(), "pow2": set()}
    for i in range(12):
        assert _unpack(pow2[i]) == _plain(plain[i])
        rows, used = pow2[i]["ans_seg"].shape[0], int((pow2[i]["ans_seg"] > 0).any(axis=1).sum())
        assert rows in (1, 2, 4, 8) and used <= rows < 2 * used
        assert (pow2[i]["ans_seg"][used:] == 0).all() and (pow2[i]["pre_seg"][used:] == 0).all()
        shapes["exact"].add(exact[i]["pre_ids"].shape + exact[i]["ans_ids"].shape)
        shapes["pow2"].add(pow2[i]["pre_ids"].shape + pow2[i]["ans_ids"].shape)
    assert len(shapes["pow2"]) < len(shapes["exact"]), shapes
    with pytest.raises(ConfigError, match="data.pack_rows"):
        Config.from_dict({"data": {"packing": True, "pack_rows": "auto"}})
