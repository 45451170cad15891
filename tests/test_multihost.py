"""Multi-process start-up, and two processes on localhost training exactly what one process does.

The start-up tests check :func:`bitune_jax.training.distributed.initialize`'s modes
and errors without starting anything. In the slow tests every run is
``bitune-jax train`` in fresh subprocesses. The two-process runs go through
``launch/local_cpu.sh`` (jax.distributed with gloo CPU collectives,
coordinator 127.0.0.1:PORT, 2 CPU devices per process); the one-process runs
get 4 CPU devices, so the global mesh (data=4) and the global batch (8) are
the same. Losses come from process 0's ``metrics.jsonl``, adapters from the
orbax checkpoints.

Tolerance: the runs differ only in how cross-device sums are ordered (gloo
across processes, in-process otherwise). Adam divides by the gradient's RMS,
which magnifies that rounding for weights whose gradients are near zero; with
lr 1e-3 it stays below 1e-6 here (with lr 1e-2 it reached 1.6e-5).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from bitune_jax.training import distributed
from hf_utils import FAST_COMPILE, save_word_tokenizer, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TOL = 1e-5
WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "Question:", "Answer:"] + [f"w{i}" for i in range(80)]
# Cheaper CPU compilation (every run compiles its step once): FAST_COMPILE, the same flags for every run.


@pytest.fixture
def no_cluster(monkeypatch):
    """No BITUNE_* variables and no cluster JAX would detect."""
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "detected_cluster", lambda: "")


def test_single_process_starts_nothing(no_cluster, monkeypatch):
    assert distributed.initialize() == distributed.Startup("single")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    monkeypatch.setattr(distributed, "detected_cluster", lambda: "SlurmCluster")
    assert distributed.initialize() == distributed.Startup("single")  # 1 wins over what is detected
    assert distributed.is_main()


@pytest.mark.parametrize("kwargs, env, message", [
    ({"coordinator": "127.0.0.1:1234"}, {}, "num_processes"),
    ({}, {"BITUNE_NUM_PROCESSES": "2", "BITUNE_PROCESS_ID": "0"}, "coordinator"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, {}, "not in [0, num_processes=2)"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, {}, "host:port"),
    ({}, {"BITUNE_COORDINATOR": "h:1", "BITUNE_NUM_PROCESSES": "two", "BITUNE_PROCESS_ID": "0"}, "not an integer"),
])
def test_explicit_start_checks_its_values(no_cluster, monkeypatch, kwargs, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.initialize(**kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root, devices=None):
    """Subprocess environment: CPU only, float32 matmuls, no inherited multi-process settings.

    The runs share a persistent compilation cache, so the resumed run does not compile again.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITUNE_")}
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHON=sys.executable,
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), XLA_FLAGS=FAST_COMPILE,
               JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices is not None:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return env


def _run(cmd, env, timeout):
    """Runs ``cmd`` in its own process group, which is killed on timeout; fails the test with its output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:  # the test itself was interrupted
            os.killpg(proc.pid, 9)
            proc.wait()
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{out[-6000:]}")
    return out


def train_one_process(root, config, *overrides):
    cmd = [sys.executable, "-m", "bitune_jax.cli", "train", config, *overrides]
    return _run(cmd, _env(root, devices=4), timeout=240)


def train_two_processes(root, config, *overrides):
    """``launch/local_cpu.sh 2 ...``; returns its output followed by every process's log."""
    log_dir = os.path.join(root, "logs")
    cmd = ["bash", os.path.join(ROOT, "launch", "local_cpu.sh"), "--port", str(_free_port()),
           "--devices-per-process", "2", "--log-dir", log_dir, "--timeout", "240", "2", config, *overrides]
    out = _run(cmd, _env(root), timeout=260)
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), errors="replace") as f:
            out += f"\n--- {name}\n" + f.read()
    return out


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _trainable(out_dir, step):
    """Adapter sets and mixing coefficients of checkpoint ``step``: ``{"/causal/q_proj/lora_a": array}``."""
    from hf_utils import checkpoint_tree, flat_arrays

    return flat_arrays(checkpoint_tree(out_dir, step)["trainable"])


def _assert_close(got, want, what):
    assert sorted(got) == sorted(want) and len(want) > 0, what
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=TOL, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, 64 training rows and a run config."""
    root = tmp_path_factory.mktemp("multihost")
    model_dir = root / "model"
    tiny_hf_model("llama", str(model_dir), vocab_size=len(WORDS) + 4, num_hidden_layers=2)
    save_word_tokenizer(str(model_dir), WORDS)
    # Prompts of 5..12 tokens and answers of 2..5 (EOS included) all pad to one batch shape
    # (bucket 16), so each run compiles its step once.
    rng = np.random.default_rng(0)
    rows = [{"prompt": " ".join(f"w{j}" for j in rng.integers(0, 80, rng.integers(2, 10))),
             "answer": " ".join(f"w{j}" for j in rng.integers(0, 80, rng.integers(1, 5)))} for _ in range(64)]
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"source": str(model_dir), "dtype": "float32"},
        "method": {"variant": "bitune", "peft": {"method": "lora", "rank": 4, "alpha": 8.0}},
        "data": {"train": str(train_file), "eval": None, "format": "prompt_answer", "template": "plain",
                 "max_prompt_len": 16, "max_answer_len": 16, "batch_size": 8, "bucket": 16, "sort_window": 2},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "mix_lr": 1e-2},
        "train": {"steps": STEPS, "save_every": 2, "keep_checkpoints": 5, "log_every": 1, "seed": 0},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    }
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return str(root), str(config)


@pytest.fixture(scope="module")
def one_process(run_files):
    """The reference: one process with 4 CPU devices, STEPS steps."""
    root, config = run_files
    out = os.path.join(root, "one")
    train_one_process(root, config, f"train.output_dir={out}")
    return out


@pytest.fixture(scope="module")
def two_processes(run_files):
    root, config = run_files
    out = os.path.join(root, "two")
    log = train_two_processes(root, config, f"train.output_dir={out}")
    return out, log


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    two, log = two_processes
    assert "process 0/2, 2 local of 4 cpu devices" in log, log[-3000:]  # one job, not two lone processes
    ref, got = _losses(one_process), _losses(two)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=0, atol=TOL)
    final = _trainable(one_process, STEPS)
    _assert_close(_trainable(two, STEPS), final, "final adapters")
    start = _trainable(one_process, 2)
    assert max(np.abs(final[k] - start[k]).max() for k in final) > 1e-3  # the adapters moved between checkpoints


@pytest.mark.slow
def test_checkpoint_of_two_processes_continues_in_one_process(run_files, one_process, two_processes):
    root, config = run_files
    two, _ = two_processes
    # The two-process run up to its step-2 checkpoint, finished by one process.
    resumed = os.path.join(root, "resumed")
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns(str(STEPS)))
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    out = train_one_process(root, config, f"train.output_dir={resumed}")
    assert "resuming from" in out and "(step 2 of 4)" in out
    ref, got = _losses(one_process), _losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 1-2 from the two processes, 3-4 from the one
    np.testing.assert_allclose([got[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=0, atol=TOL)
    _assert_close(_trainable(resumed, STEPS), _trainable(one_process, STEPS), "adapters after resuming")
