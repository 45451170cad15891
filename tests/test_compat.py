"""Files written by the previous release (tests/fixtures/compat_v0_1) keep loading and continue.

The fixture holds a 6-step training run of release 0.1 (checkpoints at steps
3 and 6), the adapters it exported at step 6, and the scores ``bitune-jax
score`` gave with them. Resuming the step-3 checkpoint with this code must
reproduce the old run's steps 4-6 (losses in metrics.jsonl and the exported
adapter tensors), and the old export must score as before, to float32
rounding: the layer loop's packed streams and the CPU attention kernel
(``blocked``) order some sums differently than release 0.1 did, which moves
the last bits (about 3e-8 on adapters of size 0.1 after three steps).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "compat_v0_1")
ROUNDING = 1e-6  # relative: float32 rounding of a few differently ordered sums, never a changed result


def _run(cwd, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITUNE_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bitune_jax.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"}


@pytest.mark.slow
def test_old_checkpoint_resumes_and_old_adapters_score_as_before(tmp_path):
    work = tmp_path / "compat"
    shutil.copytree(FIXTURE, work)
    shutil.rmtree(work / "run" / "checkpoints" / "6")  # continue from the old step-3 checkpoint
    old_losses = _losses(os.path.join(FIXTURE, "run", "metrics.jsonl"))

    out = _run(work, "train", "run.yaml")
    assert "resuming from" in out and "step 3" in out, out
    new_losses = _losses(work / "run" / "metrics.jsonl")
    assert set(old_losses) == {1, 2, 3, 4, 5, 6}
    for step in (4, 5, 6):
        assert abs(new_losses[step] - old_losses[step]) <= ROUNDING * abs(old_losses[step]), (
            step, new_losses[step], old_losses[step])

    _run(work, "export-adapters", "run", "adapters_new")
    for rel in ("causal/adapter_model.safetensors", "bidirectional/adapter_model.safetensors", "mixing.safetensors"):
        old, new = load_file(os.path.join(FIXTURE, "adapters", rel)), load_file(str(work / "adapters_new" / rel))
        assert set(old) == set(new), rel
        for key in old:
            np.testing.assert_allclose(new[key], old[key], rtol=0, atol=ROUNDING * np.abs(old[key]).max(),
                                       err_msg=f"{rel}:{key}")

    # The release-0.1 export scores as release 0.1 scored it.
    _run(work, "score", "--model", "model", "--adapters", os.path.join(FIXTURE, "adapters"),
         "--data", "score_in.jsonl", "--out", "scored.jsonl", "--quiet")
    with open(os.path.join(FIXTURE, "score_expected.jsonl")) as f:
        expected = [json.loads(line) for line in f]
    with open(work / "scored.jsonl") as f:
        got = [json.loads(line) for line in f]
    assert [r["num_tokens"] for r in got] == [r["num_tokens"] for r in expected]
    np.testing.assert_allclose([r["nll_sum"] for r in got], [r["nll_sum"] for r in expected], rtol=ROUNDING)
