"""The jitted train step: groups, optimizer state, and mesh invariance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitune_jax import bitune

from bitune_jax.training import sharding

from bitune_jax.training import step as ts
from bitune_jax.model.config import ModelConfig
from bitune_jax.model import transformer as T
from bitune_jax.model.transformer import init_params
from bitune_jax.model.peft import PeftConfig
from hf_utils import random_batch

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def _batch(b=8, p=7, a=5, seed=0):
    return random_batch(b, p, a, seed)


def _setup(variant="bitune", method="lora", lr=1e-2):
    base = init_params(jax.random.PRNGKey(0), CFG)
    m = bitune.MethodConfig(variant=variant, peft=PeftConfig(method=method, rank=4, alpha=8))
    opt = ts.make_optimizer(ts.OptimConfig(lr=lr, warmup_ratio=0.0, mix_lr=0.1), total_steps=10)
    state = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(1), CFG, m, base), opt)
    return base, m, opt, state


def test_frozen_base_has_no_optimizer_state_and_groups_are_labelled():
    base, m, opt, state = _setup()
    labels = ts.param_labels(state.trainable)
    assert set(jax.tree_util.tree_leaves(labels["mix"])) == {"mix"}
    assert set(jax.tree_util.tree_leaves(labels["causal"])) == {"adapters"}
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(state.trainable))
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(base))
    # AdamW: two moments per trainable number (plus counters); nothing the size of the base.
    assert n_state <= 2 * n_trainable + 16
    assert n_base > n_state


def test_mixing_coefficients_use_their_own_learning_rate():
    base, m, opt, state = _setup()
    step = ts.make_train_step(CFG, m, opt, donate=False)
    new, _ = step(state, base, _batch())
    d_theta = np.abs(np.asarray(new.trainable["mix"]["theta_k"] - state.trainable["mix"]["theta_k"]))
    d_b = np.abs(np.asarray(new.trainable["causal"]["q_proj"]["lora_b"] - state.trainable["causal"]["q_proj"]["lora_b"]))
    # Adam's first step moves each parameter by about its learning rate.
    assert np.allclose(d_theta.max(), 0.1, rtol=1e-2) and np.allclose(d_b.max(), 1e-2, rtol=1e-2)


# One mixed two-stream variant, the single-stream baseline, and a bidirectional-only prefill.
@pytest.mark.parametrize("variant", ["bitune", "lora", "no_mixing"])
def test_eight_device_mesh_equals_one_device(variant):
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    base, m, opt, state = _setup(variant)
    batch = _batch()
    step1 = ts.make_train_step(CFG, m, opt, donate=False)
    s1, m1 = state, []
    for _ in range(2):
        s1, met = step1(s1, base, batch)
        m1.append(float(met["loss"]))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    step8 = ts.make_train_step(CFG, m, opt, mesh=mesh, state=state, base=base, batch=batch, donate=False)
    s8, b8, x8 = ts.place(mesh, state, base, batch, cfg=CFG)
    assert len(s8.trainable["causal"]["q_proj"]["lora_b"].sharding.device_set) == 8
    m8 = []
    for _ in range(2):
        s8, met = step8(s8, b8, x8)
        m8.append(float(met["loss"]))
    assert np.allclose(m1, m8, atol=1e-5), (m1, m8)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), s1.trainable, s8.trainable)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5


def test_grad_accumulation_equals_full_batch():
    base, m, opt, state = _setup()
    batch = _batch(b=8)
    full = ts.make_train_step(CFG, m, opt, donate=False)
    accum = ts.make_train_step(CFG, m, opt, grad_accum=2, donate=False)
    # Equal-size micro-batches: mean of micro-batch means == mean over all examples.
    s_full, m_full = full(state, base, batch)
    s_acc, m_acc = accum(state, base, batch)
    assert abs(float(m_full["loss"]) - float(m_acc["loss"])) <= 1e-6
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), s_full.trainable, s_acc.trainable)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_other_peft_methods_train(method):
    base, m, opt, state = _setup(method=method)
    step = ts.make_train_step(CFG, m, opt, donate=False)
    s, met0 = step(state, base, _batch())
    for _ in range(5):
        s, met = step(s, base, _batch())
    assert np.isfinite(float(met["loss"])) and float(met["loss"]) < float(met0["loss"])


def test_remat_policies_give_same_gradients():
    base, m, _, state = _setup()
    batch = _batch()
    grads = {}
    for policy in T.REMAT_POLICIES:
        g = jax.jit(jax.grad(lambda t: bitune.loss_fn(t, base, CFG, m, batch, remat=policy)[0]))(state.trainable)
        grads[policy] = g
    for policy in T.REMAT_POLICIES[1:]:
        d = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), grads["none"], grads[policy])
        assert max(jax.tree_util.tree_leaves(d)) <= 1e-6
