"""Generation: greedy parity with transformers, Bitune decoding = the training path, sampling and stopping."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import bitune
from bitune_jax.evaluation.generate import decode_step, generate, start
from bitune_jax.model import transformer as T
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig
from hf_utils import tiny_hf_model

CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, norm_eps=1e-5)
PROMPTS = [[5, 9, 11, 3, 7], [8], [4, 4, 6, 1, 9, 12, 30, 2, 5, 17, 41, 22, 3], [13, 14]]


def random_trainable(cfg, method, seed=0, base=None):
    """Bitune trainables with every adapter entry and theta perturbed away from its identity init."""
    tr = bitune.init_trainable(jax.random.PRNGKey(seed), cfg, method, base)
    leaves, treedef = jax.tree_util.tree_flatten(tr)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def base():
    return T.init_params(jax.random.PRNGKey(0), CFG, std=0.3)


class CharTokenizer:
    """A stand-in tokenizer: token t decodes to one lowercase letter, EOS is 0."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [1 + (ord(ch) % 50) for ch in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def _hf_greedy(model, prompt, n, eos):
    import torch

    with torch.no_grad():
        g = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return g[0, len(prompt):].tolist()


# --------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_transformers_padded_batch(tmp_path, kind):
    pytest.importorskip("torch")
    from bitune_jax.conversion.hf import load_hf

    model = tiny_hf_model(kind, str(tmp_path))
    params, cfg = load_hf(str(tmp_path))
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 97, size=n).tolist() for n in (5, 12, 1, 30)]
    out = generate(params, cfg, None, prompts, max_new_tokens=12, eos_token_ids=(2,), batch_size=4)
    for p, o in zip(prompts, out):
        ref = _hf_greedy(model, p, 12, 2)
        assert o.token_ids == ref
        assert o.finish_reason == ("eos" if ref[-1] == 2 else "length")


@pytest.mark.real_model
def test_greedy_matches_transformers_smollm2(smollm2, smollm2_hf):
    hf = smollm2_hf  # both session fixtures (tests/conftest.py)
    tok = smollm2.tokenizer
    texts = ["Question: What is the capital of France?\n\nAnswer:",
             "The three primary colors are",
             "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]
    out = generate(smollm2.params, smollm2.cfg, tok, texts, max_new_tokens=16)
    for text, o in zip(texts, out):
        ref = _hf_greedy(hf, tok(text)["input_ids"], 16, tok.eos_token_id)
        assert o.token_ids == ref, (text, o.text, tok.decode(ref))


# --------------------------------------------------------------------------- Bitune decoding = training path
@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _scoring_logits_batch(trainable, base, batch, cfg, method):
    h, _ = bitune.run_streams(trainable, base, cfg, method, bitune.make_streams(batch))
    return T.unembed(base, cfg, h)


def scoring_logits(trainable, base, cfg, method, prompts, answers):
    """Next-token logits ``[B, A, V]`` at every answer position from the fused training/scoring loop."""
    p, a = max(map(len, prompts)) + 2, max(map(len, answers))
    batch = {k: np.zeros(s, np.int32) for k, s in
             (("prompt_ids", (len(prompts), p)), ("answer_ids", (len(prompts), a)))}
    for i, (x, y) in enumerate(zip(prompts, answers)):
        batch["prompt_ids"][i, :len(x)] = x
        batch["answer_ids"][i, :len(y)] = y
    batch["prompt_len"] = np.array([len(x) for x in prompts], np.int32)
    batch["answer_len"] = np.array([len(y) for y in answers], np.int32)
    return np.asarray(_scoring_logits_batch(trainable, base, batch, cfg, method))


VARIANT_CASES = [(v, "lora") for v in bitune.VARIANTS] + [("bitune", "dora"), ("bitune", "ia3")]


@pytest.mark.parametrize("variant,peft_method", VARIANT_CASES)
def test_bitune_generation_follows_training_path(base, variant, peft_method):
    method = bitune.MethodConfig(variant=variant, peft=PeftConfig(method=peft_method, rank=4, alpha=8.0))
    tr = random_trainable(CFG, method, base=base)
    out = generate(base, CFG, None, PROMPTS, tr, method, max_new_tokens=5, eos_token_ids=())
    if (variant, peft_method) == ("bitune", "lora"):
        # First token: argmax of the scoring path with a one-token dummy answer.
        first = scoring_logits(tr, base, CFG, method, PROMPTS, [[0]] * len(PROMPTS))[:, 0]
        assert [o.token_ids[0] for o in out] == np.argmax(first, -1).tolist()
    # Every token: argmax of the scoring path fed the tokens generated before it (the answer
    # pass is causal, so position 0 is the first-token distribution of a one-token dummy answer).
    logits = scoring_logits(tr, base, CFG, method, PROMPTS, [o.token_ids for o in out])
    assert [o.token_ids for o in out] == np.argmax(logits, -1).tolist()


@pytest.mark.parametrize("variant", ["bitune", "lora"])
def test_decode_logits_equal_answer_pass(base, variant):
    """Teacher-forced decode steps through the fixed-size cache give the answer pass's logits."""
    method = bitune.MethodConfig(variant=variant, peft=PeftConfig(rank=4, alpha=8.0))
    tr = random_trainable(CFG, method, seed=3, base=base)
    answers = [[7, 1, 30, 2], [9, 9, 9, 9], [11, 12, 13, 14], [40, 3, 8, 6]]
    p = max(map(len, PROMPTS)) + 3  # extra right padding
    prompt = np.zeros((len(PROMPTS), p), np.int32)
    for i, x in enumerate(PROMPTS):
        prompt[i, :len(x)] = x
    plen = np.array([len(x) for x in PROMPTS], np.int32)
    keys = jnp.zeros((len(PROMPTS), 2), jnp.uint32)
    st = start(tr, base, jnp.asarray(prompt), jnp.asarray(plen), keys, cfg=CFG, method=method, max_new=6)
    s = st.cache_pos.shape[1] - 6
    step = jax.jit(functools.partial(decode_step, cfg=CFG, peft_cfg=method.peft))
    ref = scoring_logits(tr, base, CFG, method, PROMPTS, answers)
    k, v, valid, token = st.k, st.v, st.cache_valid, st.token
    for t in range(4):
        logits, k, v, valid = step(base, adapters=tr["causal"], k=k, v=v, cache_pos=st.cache_pos,
                                   cache_valid=valid, token=token, slot=jnp.int32(s + t))
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-5, rtol=1e-5)
        token = jnp.asarray([a[t] for a in answers], jnp.int32)


# --------------------------------------------------------------------------- sampling and stopping
def test_top_k_1_equals_greedy(base):
    greedy = generate(base, CFG, None, PROMPTS, max_new_tokens=8, eos_token_ids=())
    topk1 = generate(base, CFG, None, PROMPTS, max_new_tokens=8, eos_token_ids=(), temperature=0.7, top_k=1, seed=5)
    assert [g.token_ids for g in greedy] == [g.token_ids for g in topk1]


def test_seeds_are_reproducible_and_batch_independent(base):
    kw = dict(max_new_tokens=10, eos_token_ids=(), temperature=1.5, top_k=20, top_p=0.95)
    a = generate(base, CFG, None, PROMPTS, seed=1, batch_size=4, **kw)
    b = generate(base, CFG, None, PROMPTS, seed=1, batch_size=4, **kw)
    c = generate(base, CFG, None, PROMPTS, seed=2, batch_size=4, **kw)
    d = generate(base, CFG, None, PROMPTS, seed=1, batch_size=1, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # Each prompt draws from its own key: how prompts are batched changes nothing.
    assert [g.token_ids for g in a] == [g.token_ids for g in d]


def test_sample_token_filters():
    from bitune_jax.evaluation.generate import Sampling, sample_token

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    toks = np.asarray(sample_token(logits, keys, 0, Sampling(temperature=1.0, top_p=0.7)))
    assert set(toks.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    toks = np.asarray(sample_token(logits, keys, 0, Sampling(temperature=1.0, top_k=3)))
    assert set(toks.tolist()) == {0, 1, 2}
    assert abs((toks == 0).mean() - 0.5 / 0.95) < 0.05


def test_stop_strings_and_eos(base):
    tok = CharTokenizer()
    prompts = ["hello there", "a"]
    full = generate(base, CFG, tok, prompts, max_new_tokens=24, eos_token_ids=())
    assert all(g.finish_reason == "length" and len(g.token_ids) == 24 for g in full)
    text = full[0].text
    stop = text[6:8]
    cut = generate(base, CFG, tok, prompts, max_new_tokens=24, eos_token_ids=(), stop=[stop, "\x00never"],
                   chunk_size=4)
    assert cut[0].finish_reason == "stop"
    assert cut[0].text == text[:text.find(stop)]
    n = len(cut[0].token_ids)
    assert cut[0].token_ids == full[0].token_ids[:n] and stop in tok.decode(cut[0].token_ids)
    assert stop not in tok.decode(cut[0].token_ids[:-1])
    if stop not in full[1].text:
        assert cut[1] == full[1]
    # EOS: the first occurrence of a token generated mid-way ends the sequence there.
    eos = full[0].token_ids[5]
    first = full[0].token_ids.index(eos)
    e = generate(base, CFG, tok, prompts, max_new_tokens=24, eos_token_ids=(eos,))
    assert e[0].finish_reason == "eos" and e[0].token_ids == full[0].token_ids[:first + 1]
    assert e[0].text == tok.decode(full[0].token_ids[:first])
