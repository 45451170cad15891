"""Shardings come from logical axis names and one rules table (8 simulated CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bitune_jax import bitune
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig
from bitune_jax.model.transformer import init_params
from bitune_jax.training import sharding as shd
from bitune_jax.training import step as ts

# Every dimension divisible by 8, so each rule can bite on every mesh shape.
CFG = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                  num_kv_heads=8, head_dim=8, qkv_bias=True, tie_embeddings=False)

# What each parameter's dimensions mean, written out by hand (not read from the library).
EXPECTED_BASE = {
    "embed": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "final_norm/scale": ("norm",),
    "layers/attn_norm/scale": ("layers", "norm"),
    "layers/mlp_norm/scale": ("layers", "norm"),
    "layers/q_proj/kernel": ("layers", "embed", "heads"),
    "layers/q_proj/bias": ("layers", "heads"),
    "layers/k_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/k_proj/bias": ("layers", "kv_heads"),
    "layers/v_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/v_proj/bias": ("layers", "kv_heads"),
    "layers/o_proj/kernel": ("layers", "heads", "embed"),
    "layers/gate_proj/kernel": ("layers", "embed", "mlp"),
    "layers/up_proj/kernel": ("layers", "embed", "mlp"),
    "layers/down_proj/kernel": ("layers", "mlp", "embed"),
}
KERNEL_IO = {"q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
             "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
             "down_proj": ("mlp", "embed")}
MESHES = {"data": dict(data=8), "fsdp": dict(data=1, fsdp=8), "tensor": dict(data=1, tensor=8),
          "mixed": dict(data=2, fsdp=2, tensor=2)}


def _path(path):
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _expected_adapter(path):
    """``group/proj/leaf`` of an adapter (or ``mix/theta_*``) -> its logical axes."""
    parts = path.split("/")
    if parts[0] == "mix":
        return ("layers",)
    proj, leaf = parts[1], parts[2]
    fan_in, fan_out = KERNEL_IO[proj]
    return {"lora_a": ("layers", fan_in, "lora_rank"), "lora_b": ("layers", "lora_rank", fan_out),
            "magnitude": ("layers", fan_out),
            "scale": ("layers", fan_in if proj == "down_proj" else fan_out)}[leaf]


def _spec(logical, shape, mesh):
    """The rules table applied by hand: logical -> mesh axes, dropped where the size does not divide."""
    table = dict(shd.DEFAULT_RULES)
    out = []
    for name, dim in zip(logical, shape):
        ax = table[name]
        names = () if ax is None else (ax,) if isinstance(ax, str) else ax
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        out.append(ax if size > 1 and dim % size == 0 else None)
    return P(*out)


@pytest.mark.parametrize("peft_method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_every_array_gets_the_spec_its_axes_say(mesh_name, peft_method):
    mesh = shd.make_mesh(**MESHES[mesh_name])
    base = init_params(jax.random.PRNGKey(0), CFG)
    method = bitune.MethodConfig(variant="bitune", peft=PeftConfig(method=peft_method, rank=8))
    opt = ts.make_optimizer(ts.OptimConfig(), total_steps=4)
    state = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base), opt)
    batch = {"prompt_ids": jnp.zeros((8, 16), jnp.int32), "prompt_len": jnp.full((8,), 16, jnp.int32),
             "answer_ids": jnp.zeros((8, 8), jnp.int32), "answer_len": jnp.full((8,), 8, jnp.int32)}
    state_p, base_p, batch_p = ts.place(mesh, state, base, batch, cfg=CFG)

    seen = set()
    for path, x in jax.tree_util.tree_flatten_with_path(base_p)[0]:
        name = _path(path)
        seen.add(name)
        assert x.sharding.spec == _spec(EXPECTED_BASE[name], x.shape, mesh), name
    assert seen == set(EXPECTED_BASE)
    trainable_specs = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state_p.trainable)[0]:
        name = _path(path)
        trainable_specs[name] = x.sharding.spec
        assert x.sharding.spec == _spec(_expected_adapter(name), x.shape, mesh), name
    # Adam's moments mirror the parameters; step counts are replicated.
    n_mirrors = 0
    for path, x in jax.tree_util.tree_flatten_with_path(state_p.opt_state)[0]:
        name = _path(path)
        match = [k for k in trainable_specs if name.endswith(k)]
        if match and x.ndim:
            n_mirrors += 1
            assert x.sharding.spec == trainable_specs[match[0]], name
        else:
            assert x.sharding.spec == P(), name
    assert n_mirrors == 2 * len(trainable_specs)
    for k, x in batch_p.items():
        assert x.sharding.spec == _spec(("batch", "length")[:x.ndim], x.shape, mesh), k
    if mesh_name == "tensor":  # the table really shards: heads and MLP units over 8 devices
        assert base_p["layers"]["q_proj"]["kernel"].sharding.spec == P(None, None, "tensor")
        assert state_p.trainable["causal"]["down_proj"]["lora_a" if peft_method != "ia3" else "scale"] \
            .sharding.spec[1] == "tensor"


def test_custom_rules_change_the_layout():
    mesh = shd.make_mesh(data=1, fsdp=8)
    rules = tuple((name, None) if name == "embed" else (name, ax) for name, ax in shd.DEFAULT_RULES)
    base = init_params(jax.random.PRNGKey(0), CFG)
    default = shd.base_shardings(mesh, base, CFG)
    custom = shd.base_shardings(mesh, base, CFG, rules)
    assert default["layers"]["q_proj"]["kernel"].spec == P(None, "fsdp", None)
    assert custom["layers"]["q_proj"]["kernel"].spec == P(None, None, None)


@pytest.mark.parametrize("rules,needle", [
    ((("embeding", "fsdp"),) + shd.DEFAULT_RULES, "embeding"),
    (tuple((n, "model") if n == "mlp" else (n, a) for n, a in shd.DEFAULT_RULES), "model"),
    (shd.DEFAULT_RULES[:-1], "lora_rank"),
])
def test_bad_rules_are_named(rules, needle):
    with pytest.raises(ValueError, match=needle):
        shd.check_rules(rules)


def test_activations_are_constrained_only_on_a_mesh():
    """The train step on a mesh pins the block's hidden states to the ``batch`` rule; off a mesh it does not."""
    mesh = shd.make_mesh(data=8)
    base = init_params(jax.random.PRNGKey(0), CFG)
    method = bitune.MethodConfig(variant="lora")
    opt = ts.make_optimizer(ts.OptimConfig(), total_steps=4)
    state = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(1), CFG, method, base), opt)
    batch = {"prompt_ids": jnp.ones((8, 8), jnp.int32), "prompt_len": jnp.full((8,), 8, jnp.int32),
             "answer_ids": jnp.ones((8, 4), jnp.int32), "answer_len": jnp.full((8,), 4, jnp.int32)}
    on_mesh = ts.make_train_step(CFG, method, opt, mesh=mesh, state=state, base=base, batch=batch, donate=False)
    off_mesh = ts.make_train_step(CFG, method, opt, donate=False)
    text_on = on_mesh.lower(state, base, batch).as_text()
    text_off = off_mesh.lower(state, base, batch).as_text()
    pinned = [line for line in text_on.splitlines() if "sharding_constraint" in line]
    # One constraint per stream and layer on [batch, length, d] hidden states (inside the layer scan: 2 streams).
    assert len(pinned) >= 2 and all('[{"data", "fsdp"}, {}, {}]' in line for line in pinned), pinned
    assert "sharding_constraint" not in text_off


def test_config_rules_reach_the_table_and_unknown_axes_fail_at_load():
    from bitune_jax.config import ConfigError, load_config

    cfg = load_config(None, ["mesh.rules=[[embed], [mlp, tensor, fsdp]]"])
    table = dict(cfg.mesh.table)
    assert table["embed"] is None and table["mlp"] == ("tensor", "fsdp") and table["heads"] == "tensor"
    assert load_config(None, []).mesh.table == shd.DEFAULT_RULES
    with pytest.raises(ConfigError, match="mesh.rules.*unknown logical axis 'hidden'"):
        load_config(None, ["mesh.rules=[[hidden, tensor]]"])
    with pytest.raises(ConfigError, match="mesh.rules.*unknown mesh axes"):
        load_config(None, ["mesh.rules=[[embed, model]]"])
