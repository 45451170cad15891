"""Adapters and Bitune run on every family the same way as on Llama.

For each family's tiny random HF model: the fused Bitune scoring path with the
``lora`` variant and zero-initialised adapters reproduces ``transformers``'
answer NLL, and a ``bitune`` loss has non-zero gradients for every adapter
projection of both sets and for the mixing coefficients.
"""
import jax
import numpy as np
import pytest
import torch

from bitune_jax import bitune
from bitune_jax.conversion.hf import load_hf
from bitune_jax.model.peft import PeftConfig
from hf_utils import tiny_hf_model

EXAMPLES = [([3, 5, 9, 11, 4, 6, 7, 8, 2, 10, 12, 13, 14, 15], [7, 8, 9]), ([4, 6], [5, 5, 5, 1])]


def _batch(exs):
    p = max(len(a) for a, _ in exs)
    m = max(len(b) for _, b in exs)
    return {"prompt_ids": np.array([a + [0] * (p - len(a)) for a, _ in exs], np.int32),
            "prompt_len": np.array([len(a) for a, _ in exs], np.int32),
            "answer_ids": np.array([b + [0] * (m - len(b)) for _, b in exs], np.int32),
            "answer_len": np.array([len(b) for _, b in exs], np.int32)}


@pytest.mark.parametrize("kind", ["gemma", "gemma3", "phi"])
def test_bitune_on_family(kind, tmp_path):
    model = tiny_hf_model(kind, str(tmp_path))
    base, cfg = load_hf(str(tmp_path))
    batch = _batch(EXAMPLES)

    # Scoring path with fresh (zero-B) LoRA == transformers, per example.
    lora = bitune.MethodConfig(variant="lora", peft=PeftConfig(rank=4))
    tr = bitune.init_trainable(jax.random.PRNGKey(0), cfg, lora, base)
    nll, n = bitune.answer_nll(tr, base, cfg, lora, batch)
    for i, (p, a) in enumerate(EXAMPLES):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
        ref = -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
        assert abs(float(nll[i]) - ref) <= 1e-4, (kind, i, float(nll[i]), ref)
        assert int(n[i]) == len(a)

    # Bitune: every projection of both sets and theta receive gradient.
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4))
    tr = bitune.init_trainable(jax.random.PRNGKey(1), cfg, method, base)
    tr = jax.tree_util.tree_map(lambda x: x + 0.01, tr)  # non-zero B so A gets gradient too
    grads = jax.jit(jax.grad(lambda t: bitune.loss_fn(t, base, cfg, method, batch)[0]))(tr)
    assert set(grads) == {"causal", "bidir", "mix"}
    assert set(grads["causal"]) == set(cfg.projections) == set(grads["bidir"])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, (kind, jax.tree_util.keystr(path))
