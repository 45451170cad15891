"""``method.alpha_init``: the mix at step 0 is the one asked for; alpha 0 is the plain LoRA model, and trains."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitune_jax import bitune
from bitune_jax.config import config_to_dict, load_config
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig
from bitune_jax.model.transformer import init_params
from bitune_jax.schema import ConfigError
from bitune_jax.training import step as ts
from hf_utils import random_batch

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8)
PEFT = PeftConfig(method="lora", rank=4, alpha=8)


def _batch(b=4, p=7, a=5, seed=0):
    return random_batch(b, p, a, seed, min_prompt=2)


def _alphas(trainable, method):
    return {kv: np.asarray(bitune.mix_alpha(trainable["mix"][f"theta_{kv}"], method.theta_init)) for kv in "kv"}


def _randomize(tree, seed):
    """Every adapter leaf replaced by noise, so that the two adapter sets (and passes) really differ."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), tree)


@pytest.mark.parametrize("alpha_init, expected", [
    ((0.0, 0.25, 0.7), (0.0, 0.25, 0.7)), (0.3, (0.3,) * 3), (None, (0.5,) * 3), ([0.9, 0.0, 1e-3], (0.9, 0.0, 1e-3))])
def test_alpha_at_step_zero_is_the_requested_value_per_layer(alpha_init, expected):
    method = bitune.MethodConfig(variant="bitune", peft=PEFT, alpha_init=alpha_init)
    tr = bitune.init_trainable(jax.random.PRNGKey(0), CFG, method)
    for kv, alpha in _alphas(tr, method).items():
        assert alpha.shape == (3,) and alpha.dtype == np.float32
        np.testing.assert_allclose(alpha, expected, rtol=0, atol=1e-6, err_msg=kv)
        assert (alpha == 0).tolist() == [a == 0 for a in expected]  # 0 is exactly 0
    assert tr["mix"]["theta_k"] is not tr["mix"]["theta_v"]


def test_default_keeps_theta_init_bitwise():
    method = bitune.MethodConfig(variant="bitune", peft=PEFT, theta_init=0.02)
    tr = bitune.init_trainable(jax.random.PRNGKey(0), CFG, method)
    assert np.array_equal(np.asarray(tr["mix"]["theta_k"]), np.full(3, 0.02, np.float32))


def test_alpha_init_from_yaml_overrides_and_bad_values():
    assert load_config(None, ["method.alpha_init=0"]).method.alpha_init == 0.0
    cfg = load_config(None, ["method.alpha_init=[0.1, 0.2, 0]"])
    assert cfg.method.alpha_init == (0.1, 0.2, 0.0) and hash(cfg.method)
    assert config_to_dict(cfg)["method"]["alpha_init"] == [0.1, 0.2, 0.0]
    assert load_config(None).method.alpha_init is None
    for bad in ("1", "[0.5, -0.1]", "abc", "[]"):
        with pytest.raises(ConfigError, match="method.alpha_init"):
            load_config(None, [f"method.alpha_init={bad}"])
    with pytest.raises(ConfigError, match=r"'method.alpha_init' has 2 values; the model has 3 layers"):
        bitune.init_trainable(jax.random.PRNGKey(0), CFG, bitune.MethodConfig(alpha_init=[0.1, 0.2]))


@pytest.mark.slow
def test_alpha_zero_loss_at_step_zero_is_the_lora_loss():
    base = init_params(jax.random.PRNGKey(0), CFG)
    batch = _batch()
    lora = bitune.MethodConfig(variant="lora", peft=PEFT)
    zero = bitune.MethodConfig(variant="bitune", peft=PEFT, alpha_init=0.0)
    half = bitune.MethodConfig(variant="bitune", peft=PEFT)
    loss = jax.jit(lambda tr, m: bitune.loss_fn(tr, base, CFG, m, batch)[0], static_argnums=1)

    # Fresh state as training starts: same seed, so the same causal set; alpha is exactly 0.
    tr_zero = bitune.init_trainable(jax.random.PRNGKey(7), CFG, zero, base)
    tr_lora = bitune.init_trainable(jax.random.PRNGKey(7), CFG, lora, base)
    assert set(tr_lora) == {"causal"} and not np.any(np.asarray(tr_zero["mix"]["theta_k"]))
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), tr_zero["causal"], tr_lora["causal"])
    assert all(jax.tree_util.tree_leaves(same))
    l_lora, l_zero = float(loss(tr_lora, lora)), float(loss(tr_zero, zero))
    l_half = float(loss(dict(tr_zero, mix=bitune.init_trainable(jax.random.PRNGKey(7), CFG, half, base)["mix"]), half))
    assert abs(l_zero - l_lora) <= 1e-6, (l_zero, l_lora)
    assert abs(l_half - l_lora) > 1e-4, (l_half, l_lora)  # the paper's 0.5 start is another model

    # Trained-looking adapters, the two sets different: alpha = 0 still reads the causal cache only.
    tr_zero = dict(tr_zero, causal=_randomize(tr_zero["causal"], 1), bidir=_randomize(tr_zero["bidir"], 2))
    l_lora, l_zero = float(loss({"causal": tr_zero["causal"]}, lora)), float(loss(tr_zero, zero))
    l_half = float(loss(dict(tr_zero, mix=bitune.init_trainable(jax.random.PRNGKey(7), CFG, half, base)["mix"]), half))
    assert abs(l_zero - l_lora) <= 1e-6, (l_zero, l_lora)
    assert abs(l_half - l_lora) > 1e-3, (l_half, l_lora)


@pytest.mark.slow
def test_alpha_zero_start_still_trains_the_mix():
    """At theta = 0 JAX's |theta| has gradient +1 (PyTorch's: 0): the mix leaves alpha = 0 in one Adam step."""
    base = init_params(jax.random.PRNGKey(0), CFG)
    batch = _batch(seed=3)
    method = bitune.MethodConfig(variant="bitune", peft=PEFT, alpha_init=0.0)
    tr = bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base)
    tr = dict(tr, causal=_randomize(tr["causal"], 3), bidir=_randomize(tr["bidir"], 4))
    assert np.array_equal(np.asarray(tr["mix"]["theta_k"]), np.zeros(3, np.float32))
    grad = jax.jit(jax.grad(lambda t: bitune.loss_fn(t, base, CFG, method, batch)[0]))
    g = grad(tr)
    # d loss / d theta at 0 = (d loss / d alpha) / theta_init: the gradient a theta of +1e-9 would get.
    g_eps = grad(dict(tr, mix=jax.tree_util.tree_map(lambda t: t + 1e-9, tr["mix"])))
    for kv in ("theta_k", "theta_v"):
        assert np.all(np.abs(np.asarray(g["mix"][kv])) > 0), kv
        np.testing.assert_allclose(np.asarray(g["mix"][kv]), np.asarray(g_eps["mix"][kv]), rtol=1e-4, atol=1e-6)
    # One step of the training optimizer (mix lr 0.01, no warmup) moves every theta by about 0.01: alpha leaves 0.
    opt = ts.make_optimizer(ts.OptimConfig(lr=1e-3, warmup_ratio=0.0, mix_lr=0.01), total_steps=10)
    new = jax.jit(lambda g, t: optax.apply_updates(t, opt.update(g, opt.init(t), t)[0]))(g, tr)
    theta = np.abs(np.asarray(new["mix"]["theta_k"]))
    np.testing.assert_allclose(theta, 0.01, rtol=0.05)
    assert np.all(_alphas(new, method)["k"] > 0.3)
