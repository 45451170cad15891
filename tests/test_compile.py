"""``bitune-jax compile``: the real train step compiled for a TPU topology by libtpu's compile-only mode (no TPU, no
weights), per-chip memory against HBM, and the errors: a step that does not fit (exit 3), a bad topology and a
missing libtpu (exit 2)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

from bitune_jax import cli
from bitune_jax.apps.bench import step_flops
from bitune_jax.conversion import load_model_config
from bitune_jax.model import attention
from bitune_jax.model.config import ModelConfig
from bitune_jax.model.transformer import param_shapes
from bitune_jax.training import compile_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not compile_check.have_tpu_compiler(),
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')

TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _config(tmp_path, **data):
    """A run config whose model.source is a folder holding only a tiny Llama's config.json."""
    model = tmp_path / "tiny"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY))
    cfg = {"model": {"source": str(model), "dtype": "bfloat16"},
           "data": {"batch_size": 8, "max_prompt_len": 64, "max_answer_len": 32, **data},
           "train": {"remat": "dots"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _compile(*args):
    env = {k: v for k, v in os.environ.items() if k != "BITUNE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "bitune_jax.cli", "compile", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)


@needs_libtpu
@pytest.mark.slow
def test_a_tiny_model_compiles_for_v5e_2x2_and_reports_memory_per_chip(tmp_path):
    proc = _compile(_config(tmp_path), "--topology", "v5e:2x2", "mesh.data=2", "mesh.fsdp=2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # `auto` is the splash kernel on TPUs: its Mosaic calls are in the compiled step (the real kernel, not the
    # interpreter, which would leave none).
    assert report["attention"] == attention.resolve("auto", backend="tpu") == "splash"
    assert report["pallas_kernels"] > 0
    mem = report["memory_per_chip"]
    assert mem["hbm_bytes"] == 16 * 2 ** 30
    assert 0 < mem["argument_bytes"] <= mem["total_bytes"] and 0 < mem["peak_bytes"] <= mem["hbm_bytes"]
    # embed + lm_head [256, 64], final norm [64]; per layer q, o [64, 64], k, v [64, 32], gate, up, down 64 x 128
    # and two norms of 64.
    assert report["base_params"] == 2 * 256 * 64 + 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)
    # The bfloat16 base (2 bytes a parameter) is split over the 4 chips (embed on fsdp, the rest on tensor too, as
    # far as the sizes divide); the adapters and Adam's two moments of them are float32.
    assert mem["argument_bytes"] >= 2 * report["base_params"] // 4
    assert report["batch"] == {"packed": False, "rows": 8, "prompt_width": 64, "answer_width": 32, "grad_accum": 1,
                               "split_over_chips": 4}
    flops = step_flops(ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16), "bitune", 8, 64, 32)
    assert report["model_flops_per_step"] == flops["total"] == 4 * report["model_flops_per_chip"]
    assert report["compile_s"] > 0
    for words in ("per chip: arguments", "peak", "of 16.00 GiB HBM", "model FLOPs per step", "attention splash"):
        assert words in proc.stderr


@needs_libtpu
@pytest.mark.slow
def test_an_oversized_packed_batch_does_not_fit_exit_3_with_what_to_change(tmp_path):
    proc = _compile(_config(tmp_path), "--topology", "v5e:2x2", "data.packing=true", "data.batch_size=16384",
                    "data.max_prompt_len=1024", "train.remat=none")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the train step does not fit in the 16 GiB of HBM per chip "
                                               "of v5e:2x2 (XLA: "), proc.stderr
    for hint in ("train.remat=prompt_mlp (the prompt streams recompute their MLP) or train.remat=full",
                 "(now none)", "mesh.data=1 mesh.fsdp=4", "data.batch_size (now 16384", "HBM"):
        assert hint in err[0]


@pytest.mark.parametrize("topology, words", [
    ("v5e:2x2x2", "v5e takes 2 dimensions"),
    ("v4:2x2", "v4 takes 3 dimensions"),
    ("v9:2x2", "expected GENERATION:AxB[xC]"),
    ("v5e", "expected GENERATION:AxB[xC]"),
    ("v5e:0x2", "dimensions >= 1"),
])
def test_a_bad_topology_is_one_error_line_with_status_2(topology, words, capsys):
    assert cli.main(["compile", "run.yaml", "--topology", topology]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --topology '{topology}'") and words in err[0], err


def test_the_topology_is_required(capsys):
    assert cli.main(["compile", "run.yaml"]) == 2
    assert "--topology" in capsys.readouterr().err


def test_without_libtpu_the_error_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # the command sets it; the test leaves the environment as it was
    monkeypatch.setattr(compile_check, "have_tpu_compiler", lambda: False)
    assert cli.main(["compile", _config(tmp_path), "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs libtpu" in err[0] and 'pip install -e ".[tpu]"' in err[0], err


def test_topology_geometry():
    t = compile_check.Topology.parse("V5P:4x4x4")
    assert (t.name, t.libtpu_name, t.chips, t.chip_config_name) == ("v5p:4x4x4", "v5:4x4x4", 64, "megacore")
    assert t.wrap == (True, True, True) and t.hbm_bytes == 95 * 2 ** 30
    t = compile_check.Topology.parse("v5e:8x16")
    assert (t.chips, t.chips_per_host_bounds, t.wrap) == (128, (2, 2, 1), (False, True, False))
    assert compile_check.Topology.parse("v6e:1x1").chips_per_host_bounds == (1, 1, 1)


@pytest.mark.parametrize("attached, expected", [(False, "cpu"), (True, "unset")])
def test_a_host_without_accelerators_runs_jax_on_the_cpu_without_probing_for_tpus(attached, expected):
    # With libtpu installed, JAX would first try (and fail) to start a TPU backend: slower, and libtpu prints
    # warnings. The command line sets JAX_PLATFORMS=cpu before JAX starts when nothing is attached.
    code = ("import os, sys; from bitune_jax import cli; "
            f"cli._accelerator_attached = lambda: {attached}; cli._cpu_only_host_skips_tpu_probe(); "
            "print(os.environ.get('JAX_PLATFORMS', 'unset'), 'jax' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    want = expected if compile_check.have_tpu_compiler() else "unset"
    assert proc.stdout.split() == [want, "False"]


@pytest.mark.parametrize("folder, family, params", [
    # The published sizes: Gemma-2B 2,506,172,416 parameters (tied embeddings), Llama-3-8B 8,030,261,248.
    ("gemma-2b", "gemma", 2_506_172_416),
    ("llama-3-8b", "llama", 8_030_261_248),
])
def test_the_shipped_architectures_describe_the_paper_models(folder, family, params):
    cfg = load_model_config(os.path.join(ROOT, "configs", "models", folder), dtype="bfloat16")
    shapes = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert (cfg.family, cfg.dtype, sum(int(np.prod(s)) for s in shapes)) == (family, "bfloat16", params)
