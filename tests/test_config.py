"""Typed config: load-time validation, overrides, base files, round trip, and every library field reachable."""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from bitune_jax import bitune
from bitune_jax.apps import demo
from bitune_jax.config import (Config, ConfigError, DataSource, config_to_dict, load_config, parse_override,
                               save_config)
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.peft import PeftConfig
from bitune_jax.model.transformer import init_params
from bitune_jax.training import step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")) + glob.glob(os.path.join(demo.CONFIG_DIR, "*.yaml")))


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def _assert_rejected(tmp_path, data, key, allowed):
    """Loading ``data`` fails with a message naming the dotted key, the file and what is allowed."""
    path = _write(tmp_path, "run.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{key}'" in msg and path in msg and allowed in msg, msg


def test_defaults_match_paper():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.method.variant == "bitune" and cfg.method.theta_init == 0.01
    assert cfg.method.peft == PeftConfig(method="lora", rank=8, alpha=1.0, targets=None, dropout=0.0)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        3e-4, "linear", 0.1, 0.0)
    assert (cfg.data.max_prompt_len, cfg.data.max_answer_len, cfg.data.bucket) == (448, 64, 32)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 1, 1)
    assert cfg.train.keep_checkpoints == 3 and cfg.train.async_checkpoint is True


@pytest.mark.parametrize("data, key, allowed", [
    ({"optim": {"lrr": 1.0}}, "optim.lrr", "allowed keys in 'optim'"),
    ({"optimizer": {"lr": 1.0}}, "optimizer", "allowed keys in '<top level>'"),
    ({"method": {"peft": {"rnk": 4}}}, "method.peft.rnk", "rank"),
    ({"data": {"format": {"kind": "messages", "msgs": "x"}}}, "data.format.msgs", "messages_field"),
])
def test_unknown_key_names_dotted_key_and_file(tmp_path, data, key, allowed):
    _assert_rejected(tmp_path, data, f"unknown key '{key}", allowed)


@pytest.mark.parametrize("data, key, allowed", [
    ({"optim": {"lr": "fast"}}, "optim.lr", "a number"),
    ({"data": {"batch_size": 2.5}}, "data.batch_size", "an integer"),
    ({"data": {"batch_size": True}}, "data.batch_size", "an integer"),
    ({"train": {"async_checkpoint": "yes please"}}, "train.async_checkpoint", "true or false"),
    ({"model": {"source": None}}, "model.source", "a string"),
    ({"method": {"peft": {"targets": "q_proj"}}}, "method.peft.targets", "a list of"),
    ({"data": {"train": 3}}, "data.train", "a mapping"),
    ({"data": {"train": {"split": "test"}}}, "data.train", "'path' must name a file"),
])
def test_wrong_type(tmp_path, data, key, allowed):
    _assert_rejected(tmp_path, data, f"'{key}", allowed)


@pytest.mark.parametrize("data, key, allowed", [
    ({"optim": {"lr": 0.0}}, "optim.lr", "> 0.0"),
    ({"optim": {"warmup_ratio": 1.5}}, "optim.warmup_ratio", ">= 0.0 and <= 1.0"),
    ({"optim": {"b2": 1.0}}, "optim.b2", "< 1.0"),
    ({"data": {"max_prompt_len": 0}}, "data.max_prompt_len", ">= 1"),
    ({"data": {"num_epochs": 0}}, "data.num_epochs", ">= 1"),
    ({"method": {"peft": {"rank": 0}}}, "method.peft.rank", ">= 1"),
    ({"method": {"peft": {"dropout": 1.0}}}, "method.peft.dropout", "< 1.0"),
    ({"method": {"peft": {"targets": ["q_proj", "qq_proj"]}}}, "method.peft.targets", "k_proj"),
    ({"mesh": {"data": 0}}, "mesh.data", "-1"),
])
def test_out_of_range(tmp_path, data, key, allowed):
    _assert_rejected(tmp_path, data, f"'{key}", allowed)


@pytest.mark.parametrize("data, key, allowed", [
    ({"method": {"variant": "bitoon"}}, "method.variant", "naive_bidirectional"),
    ({"method": {"peft": {"method": "qlora"}}}, "method.peft.method", "dora"),
    ({"model": {"dtype": "float16"}}, "model.dtype", "bfloat16"),
    ({"data": {"template": "alpaca"}}, "data.template", "plain, chat, none"),
    ({"data": {"overlong": "wrap"}}, "data.overlong", "truncate, drop"),
    ({"data": {"bad_rows": "ignore"}}, "data.bad_rows", "report, error"),
    ({"data": {"format": "sharegpt"}}, "data.format.kind", "prompt_answer, instruction, messages"),
    ({"optim": {"schedule": "step"}}, "optim.schedule", "linear, cosine, constant"),
    ({"train": {"remat": "some"}}, "train.remat", "none, full, dots"),
])
def test_bad_enum(tmp_path, data, key, allowed):
    _assert_rejected(tmp_path, data, f"'{key}", allowed)


def test_overrides_apply_with_dots(tmp_path):
    path = _write(tmp_path, "run.yaml", {"data": {"train": "a.jsonl", "batch_size": 4}, "optim": {"lr": 1e-4}})
    cfg = load_config(path, ["optim.lr=3e-4", "data.train.split=test", "method.peft.targets=[q_proj, v_proj]",
                             "method.peft.method=dora", "data.eval=b.parquet", "optim.grad_clip=null",
                             "train.output_dir=out/x", "data.format.kind=instruction"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train == DataSource(path="a.jsonl", split="test")
    assert cfg.data.eval == DataSource(path="b.parquet")
    assert cfg.data.batch_size == 4
    assert cfg.method.peft.targets == ("q_proj", "v_proj") and cfg.method.peft.method == "dora"
    assert cfg.optim.grad_clip is None
    assert cfg.train.output_dir == "out/x" and cfg.data.format.kind == "instruction"


def test_bad_override_names_override_and_key(tmp_path):
    path = _write(tmp_path, "run.yaml", {})
    with pytest.raises(ConfigError, match=r"override 'optim\.lr=-1'.*'optim\.lr'.*> 0\.0"):
        load_config(path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lr\.x'"):
        load_config(path, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["optim.lr"])
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_round_trip(tmp_path):
    cfg = load_config(None, ["method.peft.targets=[q_proj]", "data.train=x.jsonl", "data.eval.path=y.arrow",
                             "data.eval.split=validation", "optim.mix_lr=0.01", "mesh.fsdp=2"])
    out = str(tmp_path / "sub" / "config.yaml")
    save_config(cfg, out)
    assert os.listdir(tmp_path / "sub") == ["config.yaml"]  # temp file replaced, none left over
    assert load_config(out) == cfg
    assert Config.from_dict(config_to_dict(cfg)) == cfg
    assert yaml.safe_load(open(out))["method"]["peft"]["targets"] == ["q_proj"]


def test_base_file_merges_sections(tmp_path):
    _write(tmp_path, "base.yaml", {"optim": {"lr": 1e-3, "b1": 0.8}, "data": {"train": {"path": "t", "split": "s"}}})
    child = _write(tmp_path, "child.yaml", "base: base.yaml\noptim:\n  lr: 2.0e-3\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.b1) == (2e-3, 0.8)
    assert cfg.data.train == DataSource(path="t", split="s")
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_not_yaml_or_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = _write(tmp_path, "bad.yaml", "optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="'optim' must be a mapping"):
        load_config(_write(tmp_path, "list.yaml", "optim: [1, 2]\n"))


def test_demo_configs_ship_inside_the_package():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(demo.CONFIG_DIR, "*.yaml"))) == [
        "demo.yaml", "demo_quick.yaml"]
    assert os.path.dirname(demo.CONFIG_DIR) == os.path.dirname(os.path.abspath(demo.__file__))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(p))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.train is not None
    name = os.path.basename(path)
    if name.startswith("ablation_"):
        assert cfg.method.variant == name[len("ablation_"):-len(".yaml")]
    if name in ("gemma2b_instruct.yaml", "llama3_8b_instruct.yaml"):
        assert cfg.method.peft == PeftConfig(method="lora", rank=8, alpha=1.0)
        assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
            3e-4, "linear", 0.1, 0.0)
        assert cfg.data.max_prompt_len + cfg.data.max_answer_len == 512
        assert cfg.data.batch_size * cfg.optim.grad_accum == 10 and cfg.model.dtype == "bfloat16"
    if name == "gsm8k_single_task.yaml":
        assert cfg.optim.lr == 1e-3


def test_shipped_configs_cover_every_variant():
    variants = {load_config(p).method.variant for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))}
    assert variants == {"bitune", "lora", "naive_bidirectional", "no_mixing", "only_causal", "shared_weights"}


# ----------------------------------------------------------------------------
# One schema: the method and optim sections are the library's dataclasses
# ----------------------------------------------------------------------------


def test_sections_are_the_library_dataclasses():
    cfg = load_config(None, ["optim.eps=1e-6", "optim.grad_accum=2", "method.variant=lora"])
    assert type(cfg.method) is bitune.MethodConfig and type(cfg.method.peft) is PeftConfig
    assert type(cfg.optim) is ts.OptimConfig
    assert (cfg.optim.eps, cfg.optim.grad_accum, cfg.method.variant) == (1e-6, 2, "lora")


@pytest.mark.parametrize("build, message", [
    (lambda: bitune.MethodConfig(variant="bitoon"), "'method.variant'='bitoon' is not allowed; allowed: bitune, lora"),
    (lambda: bitune.MethodConfig(theta_init=0.0), "'method.theta_init'=0.0 is out of range; allowed: > 0.0"),
    (lambda: PeftConfig(method="qlora"), "'method.peft.method'='qlora' is not allowed"),
    (lambda: PeftConfig(rank=0), "'method.peft.rank'=0 is out of range; allowed: >= 1"),
    (lambda: PeftConfig(targets=["q_proj", "x"]), "unknown projections ['x']"),
    (lambda: ts.OptimConfig(schedule="step"), "'optim.schedule'='step' is not allowed; allowed: linear, cosine"),
    (lambda: ts.OptimConfig(eps=0.0), "'optim.eps'=0.0 is out of range; allowed: > 0.0"),
    (lambda: ts.OptimConfig(grad_accum=0), "'optim.grad_accum'=0 is out of range; allowed: >= 1"),
])
def test_library_dataclasses_apply_the_same_rules(build, message):
    """Built from Python, the dataclasses enforce the rules the loader reports (declared once, on the field)."""
    with pytest.raises(ConfigError) as e:
        build()
    assert message in str(e.value)


def test_config_saved_by_the_previous_release_loads():
    """A checkpoint's config written by bitune-jax 0.1.0 (no optim.eps) loads, missing keys at their defaults."""
    path = os.path.join(ROOT, "tests", "fixtures", "compat_v0_1", "run", "checkpoints", "3", "config", "metadata")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert "eps" not in saved["optim"]
    cfg = Config.from_dict(saved, source=path)
    assert cfg.optim == ts.OptimConfig(lr=0.01, mix_lr=0.05)
    assert cfg.method == bitune.MethodConfig(peft=PeftConfig(rank=2, alpha=4.0))
    assert config_to_dict(cfg)["optim"]["eps"] == 1e-8
    assert {k: v for k, v in config_to_dict(cfg)["optim"].items() if k != "eps"} == saved["optim"]


# A valid, non-default YAML value for every field of the library sections. Adding a field to
# MethodConfig, PeftConfig or OptimConfig without a case here fails test_every_library_field_has_a_case.
NON_DEFAULT = {
    "method.variant": ("only_causal", "only_causal"),
    "method.theta_init": ("0.05", 0.05),
    "method.alpha_init": ("[0.25, 0]", (0.25, 0.0)),
    "method.peft.method": ("dora", "dora"),
    "method.peft.rank": ("3", 3),
    "method.peft.alpha": ("2.5", 2.5),
    "method.peft.targets": ("[q_proj, down_proj]", ("q_proj", "down_proj")),
    "method.peft.dropout": ("0.1", 0.1),
    "optim.lr": ("1e-3", 1e-3),
    "optim.schedule": ("cosine", "cosine"),
    "optim.warmup_ratio": ("0.3", 0.3),
    "optim.weight_decay": ("0.5", 0.5),
    "optim.b1": ("0.5", 0.5),
    "optim.b2": ("0.9", 0.9),
    "optim.eps": ("1e-3", 1e-3),
    "optim.grad_clip": ("0.5", 0.5),
    "optim.grad_accum": ("2", 2),
    "optim.mix_lr": ("0.05", 0.05),
    "optim.mix_weight_decay": ("0.5", 0.5),
}


def _leaf_keys(cls, prefix):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_library_field_has_a_case():
    keys = set(_leaf_keys(bitune.MethodConfig, "method.")) | set(_leaf_keys(ts.OptimConfig, "optim."))
    assert keys == set(NON_DEFAULT)


_TINY = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=8)


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _adam_reference(o: ts.OptimConfig, params, grads_per_step, total_steps):
    """AdamW with clipping and the warmup schedule written out in float64 numpy, from ``o``'s values.

    ``params`` and each step's grads are ``{"adapters": array, "mix": array}``; returns the final params.
    """
    def lr_at(peak, t):
        warm = int(round(o.warmup_ratio * total_steps))
        if t < warm:
            return peak * t / warm
        done, span = t - warm, max(total_steps - warm, 1)
        if o.schedule == "linear":
            return peak * max(1.0 - done / span, 0.0)
        if o.schedule == "cosine":
            return peak * 0.5 * (1.0 + math.cos(math.pi * min(done, span) / span))
        return peak

    groups = {"adapters": (o.lr, o.weight_decay), "mix": (o.mix_lr if o.mix_lr is not None else o.lr,
                                                          o.mix_weight_decay)}
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_per_step):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float(np.sum(x ** 2)) for x in g.values()))
        if o.grad_clip is not None and norm > o.grad_clip:
            g = {k: x * o.grad_clip / norm for k, x in g.items()}
        for k, (peak, wd) in groups.items():
            m[k] = o.b1 * m[k] + (1 - o.b1) * g[k]
            v2[k] = o.b2 * v2[k] + (1 - o.b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - o.b1 ** (t + 1)), v2[k] / (1 - o.b2 ** (t + 1))
            p[k] = p[k] - lr_at(peak, t) * (m_hat / (np.sqrt(v_hat) + o.eps) + wd * p[k])
    return p


def _optax_run(o: ts.OptimConfig, params, grads_per_step, total_steps):
    """``make_optimizer(o)`` applied to the trainable tree ``{"causal": {"q_proj": ...}, "mix": {"theta_k": ...}}``."""
    opt = ts.make_optimizer(o, total_steps=total_steps)

    def tree(d):
        return {"causal": {"q_proj": {"lora_a": jnp.asarray(d["adapters"], jnp.float32)}},
                "mix": {"theta_k": jnp.asarray(d["mix"], jnp.float32)}}

    p = tree(params)
    state = opt.init(p)
    for grads in grads_per_step:
        updates, state = opt.update(tree(grads), state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    return {"adapters": np.asarray(p["causal"]["q_proj"]["lora_a"], np.float64),
            "mix": np.asarray(p["mix"]["theta_k"], np.float64)}


@pytest.mark.parametrize("key", sorted(NON_DEFAULT))
def test_every_library_field_is_settable_from_yaml_and_reaches_the_step(key):
    """``key=value`` lands in the dataclass the library uses, and the library acts on it."""
    text, expected = NON_DEFAULT[key]
    cfg = load_config(None, [f"{key}={text}"])
    assert _get(cfg, key) == expected and _get(Config(), key) != expected
    assert config_to_dict(cfg) != config_to_dict(Config())
    section, name = key.split(".", 1)
    if section == "method":
        method = cfg.method
        base = init_params(jax.random.PRNGKey(0), _TINY)
        trainable = bitune.init_trainable(jax.random.PRNGKey(1), _TINY, method, base)
        a = trainable["causal"][next(iter(trainable["causal"]))]
        checks = {
            "variant": lambda: sorted(trainable) == ["bidir", "causal", "mix"] and method.prompt_streams == (
                (True, "causal"), (True, "bidir")),
            "theta_init": lambda: np.allclose(np.asarray(trainable["mix"]["theta_k"]), 0.05),
            "alpha_init": lambda: np.allclose(np.asarray(bitune.mix_alpha(trainable["mix"]["theta_v"], 0.01)),
                                              [0.25, 0.0], atol=1e-6),
            "peft.method": lambda: "magnitude" in a,
            "peft.rank": lambda: a["lora_a"].shape[-1] == 3,
            "peft.alpha": lambda: method.peft.scaling == 2.5 / 8,
            "peft.targets": lambda: sorted(trainable["causal"]) == ["down_proj", "q_proj"],
            "peft.dropout": lambda: method.peft.dropout == 0.1,
        }
        assert checks[name](), key
        return
    if name == "grad_accum":  # the step splits each batch into that many micro-batches
        method = bitune.MethodConfig(variant="lora", peft=PeftConfig(rank=2))
        base = init_params(jax.random.PRNGKey(0), _TINY)
        opt = ts.make_optimizer(cfg.optim, total_steps=10)
        state = ts.init_state(bitune.init_trainable(jax.random.PRNGKey(1), _TINY, method, base), opt)
        step = ts.make_train_step(_TINY, method, opt, grad_accum=cfg.optim.grad_accum, donate=False)
        odd = {"prompt_ids": jnp.ones((3, 4), jnp.int32), "prompt_len": jnp.full((3,), 4),
               "answer_ids": jnp.ones((3, 2), jnp.int32), "answer_len": jnp.full((3,), 2)}
        with pytest.raises(ValueError, match="grad_accum=2"):
            step(state, base, odd)
        return
    rng = np.random.default_rng(0)
    params = {"adapters": rng.normal(0, 0.1, (3, 2)), "mix": rng.normal(0, 0.1, (2,))}
    # Gradient norms on both sides of the clip thresholds, and small enough that eps matters.
    grads = [{"adapters": rng.normal(0, s, (3, 2)), "mix": rng.normal(0, s, (2,))} for s in (0.01, 0.6, 0.05, 0.3)]
    ours = _optax_run(cfg.optim, params, grads, total_steps=10)
    reference = _adam_reference(cfg.optim, params, grads, total_steps=10)
    default = _optax_run(ts.OptimConfig(), params, grads, total_steps=10)
    for group in ("adapters", "mix"):
        np.testing.assert_allclose(ours[group] - params[group], reference[group] - params[group], rtol=1e-4, atol=1e-8)
    changed = max(np.max(np.abs(ours[g] - default[g])) for g in ("adapters", "mix"))
    assert changed > 1e-6, f"{key} did not change the updates"


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_release_resumes(tmp_path, monkeypatch):
    """Its saved config lacks optim.eps; resuming fills in the default (what that release used) instead of refusing."""
    from bitune_jax.training.loop import train

    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "compat_v0_1"), tmp_path / "compat")
    shutil.rmtree(tmp_path / "compat" / "run" / "checkpoints" / "6")
    monkeypatch.chdir(tmp_path / "compat")  # run.yaml names the model and data relative to its folder
    summary = train(load_config("run.yaml", ["train.output_dir=run"]))
    assert (summary["status"], summary["start_step"], summary["step"]) == ("completed", 3, 6)


def test_remat_policies_are_the_same_everywhere():
    """``train.remat``'s allowed values, ``bench --remat``'s choices and the model's policies agree."""
    import argparse

    from bitune_jax.cli import bench as bench_cli
    from bitune_jax.config import TrainSection
    from bitune_jax.model.transformer import REMAT_POLICIES

    p = argparse.ArgumentParser()
    bench_cli.add_arguments(p)
    choices = next(a.choices for a in p._actions if a.dest == "remat")
    assert tuple(choices) == REMAT_POLICIES
    assert typing.get_args(typing.get_type_hints(TrainSection)["remat"]) == REMAT_POLICIES
