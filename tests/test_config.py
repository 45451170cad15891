"""Typed config: load-time validation, overrides, base files, round trip."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from bitune_jax.config import (Config, ConfigError, DataSource, config_to_dict, load_config, parse_override,
                               save_config)
from bitune_jax.model.peft import PeftConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
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
