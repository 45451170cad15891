"""A run directory is never corrupted: the run lock, damaged checkpoints, interrupted deletions,
optimizer changes on resume, health warnings, data counts and file modes.

The end-to-end runs are ``python -m bitune_jax.cli train`` subprocesses on the tiny random
Llama of ``test_train`` (its ``files`` fixture and helpers, one CPU device, a persistent
compilation cache shared by this module's runs). Every resumed run must end bitwise where an
uninterrupted run of the same config ends. A run is held still or killed at a chosen point by
a small wrapper that patches one library function before calling the CLI.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from test_train import ROOT, _env, _finish, _json_item, _state, _steps, files  # noqa: F401 - files is a fixture

STEPS = 20
RUN = [f"train.steps={STEPS}", "train.save_every=5", "train.keep_checkpoints=3", "train.eval_every=0",
       "data.eval=null"]
TIMING = ("tokens_per_s", "elapsed_s")

# Runs the CLI after making one library function stop (sleep) once it reaches a point; the
# point is announced by creating the file $STALL_MARKER, so the test knows when to act.
STALL = r"""
import os, sys, time
from bitune_jax.training import checkpoint, metrics

def stall():
    open(os.environ["STALL_MARKER"], "w").close()
    time.sleep(600)

if os.environ["STALL_AT"] == "metrics":  # after the train record of step STALL_STEP
    write = metrics.MetricsWriter.write
    def patched(self, record):
        write(self, record)
        if record.get("split") == "train" and record["step"] == int(os.environ["STALL_STEP"]):
            stall()
    metrics.MetricsWriter.write = patched
else:  # in the middle of removing an old checkpoint: one file gone, the rest still there
    def patched(path):
        for folder, _, names in os.walk(path):
            if names:
                os.remove(os.path.join(folder, names[0]))
                break
        stall()
    checkpoint.remove_tree = patched

from bitune_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(root, config, *overrides, stall=None, marker=None):
    env = _env(root)
    if stall is not None:
        env.update(STALL_AT=stall[0], STALL_STEP=str(stall[1]), STALL_MARKER=str(marker))
        cmd = [sys.executable, "-c", STALL]
    else:
        cmd = [sys.executable, "-m", "bitune_jax.cli"]
    return subprocess.Popen(cmd + ["train", config, *RUN, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(root, config, *overrides):
    code, out = _finish(_start(root, config, *overrides))
    assert code == 0, out[-6000:]
    return out


def _wait_for(path, proc, timeout=200):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            code, out = _finish(proc)
            pytest.fail(f"the run ended ({code}) or timed out before {path}:\n{out[-4000:]}")
        time.sleep(0.05)


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r["split"] != "event"]


def _events(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "event"]


def _summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def _assert_same_run(out, ref):
    """``out`` ended where the uninterrupted ``ref`` did: every record and the final state, bitwise."""
    assert _metrics(out) == _metrics(ref)
    a, b = _state(ref, STEPS), _state(out, STEPS)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert _json_item(out, STEPS, "data") == _json_item(ref, STEPS, "data")


@pytest.fixture(scope="module")
def reference(files):
    root, config = files
    out = str(root / "reference")
    _run(root, config, f"train.output_dir={out}")
    assert _steps(out) == [10, 15, 20] and _events(out) == [] and _summary(out)["events"] == []
    return out


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(files, reference, tmp_path):
    root, config = files
    out = str(tmp_path / "run")
    first = _start(root, config, f"train.output_dir={out}", stall=("metrics", 12), marker=tmp_path / "stalled")
    _wait_for(tmp_path / "stalled", first)
    with open(os.path.join(out, "train.lock")) as f:
        lock = json.load(f)
    assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()

    code, log = _finish(_start(root, config, f"train.output_dir={out}"))
    assert code == 2, log[-3000:]
    error = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"pid {first.pid} on host {socket.gethostname()}" in error[0], log[-3000:]
    assert "in use by another run" in error[0]
    assert first.poll() is None  # the refused run did not disturb the first one

    first.send_signal(signal.SIGKILL)
    assert _finish(first)[0] == -signal.SIGKILL
    assert os.path.exists(os.path.join(out, "train.lock")) and _steps(out)[-1] == 10
    log = _run(root, config, f"train.output_dir={out}")
    assert f"taking over the lock of {out}/train.lock (pid {first.pid}" in log
    assert f"process {first.pid} is no longer running" in log
    assert f"resuming from {out}/checkpoints/10 (step 10 of {STEPS})" in log
    assert not os.path.exists(os.path.join(out, "train.lock"))
    _assert_same_run(out, reference)


def _biggest_array_file(step_dir):
    folder = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    return max((os.path.join(folder, n) for n in os.listdir(folder)), key=os.path.getsize)


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(len(data) // 2, len(data) // 2 + 4):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [
    # (newest checkpoint, the one before it): both skipped, the run resumes from step 10
    ("truncated array file", "flipped bytes in an array file"),
    ("truncated state/_METADATA", "truncated config JSON"),
], ids=["array-files", "json-files"])
def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_from_the_previous_one(files, reference, tmp_path,
                                                                                  damage):
    root, config = files
    out = str(tmp_path / "run")
    shutil.copytree(reference, out)
    os.remove(os.path.join(out, "summary.json"))
    ckpts = os.path.join(out, "checkpoints")
    how = {"truncated array file": lambda d: _truncate(_biggest_array_file(d)),
           "flipped bytes in an array file": lambda d: _flip_bytes(_biggest_array_file(d)),
           "truncated state/_METADATA": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
           "truncated config JSON": lambda d: _truncate(os.path.join(d, "config", "metadata"))}
    damaged = {}
    for step, kind in zip((20, 15), damage):
        how[kind](os.path.join(ckpts, str(step)))
        damaged[step] = sorted(os.path.join(dp, n)[len(ckpts) + len(str(step)) + 2:]
                               for dp, _, names in os.walk(os.path.join(ckpts, str(step))) for n in names)
    os.mkdir(os.path.join(ckpts, "25.orbax-checkpoint-tmp-1700000000"))  # a save killed half-way

    log = _run(root, config, f"train.output_dir={out}")
    assert "removing 1 incomplete checkpoint folder(s) of an interrupted save" in log
    for step in (20, 15):
        assert f"warning: skipped checkpoint {step} ({ckpts}/{step}" in log, log[-3000:]
    assert f"resuming from {ckpts}/10 (step 10 of {STEPS})" in log
    _assert_same_run(out, reference)
    # The skipped checkpoints are kept as they were, out of the way.
    assert sorted(os.listdir(os.path.join(ckpts, "skipped"))) == ["15", "20"]
    for step, names in damaged.items():
        folder = os.path.join(ckpts, "skipped", str(step))
        assert sorted(os.path.join(dp, n)[len(folder) + 1:] for dp, _, ns in os.walk(folder) for n in ns) == names
    assert not [n for n in os.listdir(ckpts) if "orbax-checkpoint-tmp" in n]
    events = [e for e in _summary(out)["events"] if e["event"] == "checkpoint_skipped"]
    assert [(e["step"], e["checkpoint_step"]) for e in events] == [(10, 20), (10, 15)]
    assert events == [e for e in _events(out) if e["event"] == "checkpoint_skipped"]


def test_when_no_checkpoint_restores_the_run_stops_and_moves_nothing(files, reference, tmp_path):
    from bitune_jax.training.checkpoint import CheckpointError
    from bitune_jax.training.loop import train

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for step in _steps(str(out)):
        _truncate(_biggest_array_file(str(out / "checkpoints" / str(step))))
    with pytest.raises(CheckpointError, match=r"none of the 3 checkpoint\(s\) in .* restores: .*/20: .*/15: .*/10: "):
        train(_config(files, out))
    assert _steps(str(out)) == [10, 15, 20] and not (out / "checkpoints" / "skipped").exists()
    assert not (out / "train.lock").exists()


@pytest.mark.slow
def test_a_kill_while_deleting_an_old_checkpoint_leaves_a_resumable_run(files, reference, tmp_path):
    root, config = files
    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    # keep_checkpoints=2: saving step 15 retires step 5; the run is killed while removing it (at the save of 20).
    run = _start(root, config, f"train.output_dir={out}", "train.keep_checkpoints=2", stall=("delete", 0),
                 marker=tmp_path / "stalled")
    _wait_for(tmp_path / "stalled", run)
    run.send_signal(signal.SIGKILL)
    assert _finish(run)[0] == -signal.SIGKILL
    assert _steps(out) == [10, 15] and os.listdir(os.path.join(ckpts, ".deleted")) == ["5"]
    # And step 10 half-deleted in place, as an older release (deleting step folders directly) would leave it.
    for folder, _, names in os.walk(os.path.join(ckpts, "10", "state")):
        for n in names[: len(names) // 2 + 1]:
            os.remove(os.path.join(folder, n))

    log = _run(root, config, f"train.output_dir={out}", "train.keep_checkpoints=2")
    assert f"finished deleting old checkpoint(s) 5 of {ckpts} (their deletion was interrupted)" in log
    assert f"resuming from {ckpts}/15 (step 15 of {STEPS})" in log
    _assert_same_run(out, reference)
    assert _steps(out) == [15, 20] and os.listdir(os.path.join(ckpts, ".deleted")) == []


def _config(files, out, **sections):
    from bitune_jax.config import Config

    root, config = files
    with open(config) as f:
        raw = yaml.safe_load(f)
    raw["train"].update(steps=STEPS, save_every=5, keep_checkpoints=3, eval_every=0)
    raw["data"]["eval"] = None
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["train"]["output_dir"] = str(out)
    return Config.from_dict(raw)


def test_resuming_with_a_lower_lr_after_a_non_finite_loss_needs_allow_optim_change(files, tmp_path, monkeypatch):
    from bitune_jax.training import metrics
    from bitune_jax.training.checkpoint import ResumeError
    from bitune_jax.training.loop import NonFiniteLossError, train

    out = tmp_path / "run"
    steps = {"steps": 6, "save_every": 1000}
    # Warmup from 0: step 1 changes nothing, step 2's update overflows, step 3's loss is NaN.
    bad = {"lr": 1e30, "mix_lr": 1e30, "schedule": "constant", "warmup_ratio": 0.5}
    good = {**bad, "lr": 1e-2, "mix_lr": 0.05}

    # The last good checkpoint: step 1, where the run was preempted (SIGTERM).
    write = metrics.MetricsWriter.write

    def preempt_at_step_1(self, record):
        write(self, record)
        if record["split"] == "train" and record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.MetricsWriter, "write", preempt_at_step_1)
    assert train(_config(files, out, optim=bad, train=steps))["status"] == "stopped"
    monkeypatch.undo()
    assert _steps(str(out)) == [1]

    with pytest.raises(NonFiniteLossError, match=r"at step 3; .* The last good checkpoint is .*/checkpoints/1; .* "
                                                 r"resume from it with --allow-optim-change") as e:
        train(_config(files, out, optim=bad, train=steps))
    assert "`bitune-jax train CONFIG optim.lr=1e+29 --allow-optim-change`" in str(e.value)
    assert _steps(str(out)) == [1]

    # A lower learning rate: refused without the flag, which the message names; accepted and recorded with it.
    with pytest.raises(ResumeError, match=r"optim\.lr: 1e\+30 -> 0\.01; optim\.mix_lr: 1e\+30 -> 0\.05\. .*"
                                          r"pass --allow-optim-change"):
        train(_config(files, out, optim=good, train=steps))
    summary = train(_config(files, out, optim=good, train=steps), allow_optim_change=True)
    assert summary["status"] == "completed" and summary["start_step"] == 1 and summary["step"] == 6
    assert summary["optim_changed"] == {"optim.lr": [1e30, 1e-2], "optim.mix_lr": [1e30, 0.05]}
    # The failed run's warning at step 2 went with its records; the change is recorded at the step resumed.
    assert [(e["event"], e["step"], e["changes"]) for e in summary["events"]] == [
        ("optim_changed", 1, summary["optim_changed"])]
    assert summary["events"] == _events(str(out))
    train_records = [r for r in _metrics(str(out)) if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["param_norm"] < 100 for r in train_records)
    # Continuing further needs no flag: the newest checkpoint holds the new values.
    assert train(_config(files, out, optim=good, train=steps))["optim_changed"] == {}

    with pytest.raises(ResumeError, match=r"optim\.grad_clip: 1\.0 -> None turns clipping on or off"):
        train(_config(files, out, optim={**good, "grad_clip": None}, train=steps), allow_optim_change=True)


@pytest.fixture(scope="module")
def exploding_run(files, tmp_path_factory):
    """``optim.lr=1e10`` with warmup, on data with bad and overlong rows, written under umask 022 and exported."""
    from bitune_jax.conversion.adapters import export_run_adapters
    from bitune_jax.training.loop import train

    root, _ = files
    work = tmp_path_factory.mktemp("exploding")
    rows = (root / "train.jsonl").read_text().splitlines()
    long_prompt = " ".join(f"w{i % 60}" for i in range(40))  # > data.max_prompt_len=16 tokens: truncated
    lines = rows + ['{"prompt": "w1 w2", "answer":', json.dumps({"answer": "w1"}),
                    json.dumps({"prompt": long_prompt, "answer": "w1 w2"}),
                    json.dumps({"prompt": long_prompt, "answer": "w3"})]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    out, exported = work / "run", work / "adapters"
    cfg = _config(files, out, data={"train": str(work / "train.jsonl")}, train={"steps": 8, "save_every": 4},
                  optim={"lr": 1e10, "warmup_ratio": 0.25})
    screen = io.StringIO()
    previous = os.umask(0o022)
    try:
        with contextlib.redirect_stderr(screen):
            summary = train(cfg)
        export_run_adapters(str(out), str(exported))
    finally:
        os.umask(previous)
    return summary, screen.getvalue(), out, exported, len(rows)


def test_exploding_updates_and_vanishing_gradients_are_warned_and_recorded(exploding_run):
    summary, screen, out, _, _ = exploding_run
    assert summary["status"] == "completed"
    kinds = {e["event"]: e for e in summary["events"]}
    assert set(kinds) == {"exploding_updates", "vanishing_gradients"}
    assert kinds["exploding_updates"]["step"] <= 3 and "lower optim.lr" in kinds["exploding_updates"]["message"]
    assert kinds["vanishing_gradients"]["step"] < 8
    for e in kinds.values():
        assert f"warning: {e['message']}" in screen
    assert summary["events"] == _events(str(out))
    train = [r for r in _metrics(str(out)) if r["split"] == "train"]
    assert train[-1]["param_norm"] > 1e6 and train[-1]["grad_norm"] < 1e-10


def test_skipped_truncated_and_dropped_rows_are_counted_and_shown(exploding_run, files):
    from bitune_jax.data.pipeline import DataError
    from bitune_jax.training.loop import train

    summary, screen, out, _, rows = exploding_run
    counts = summary["data"]["train"]
    assert counts["rows"] == rows + 4 and counts["examples"] == rows + 2
    assert (counts["undecodable"], counts["missing_field"], counts["overlong_truncated"]) == (1, 1, 2)
    assert counts["longest_prompt"] > 16 and summary["data"].get("eval") is None
    assert f"rows -> {rows + 2} examples (missing_field=1, undecodable=1, overlong_truncated=2)" in screen
    assert "; e.g. " in screen and "line 65: undecodable: invalid JSON" in screen

    # Nothing left: the error says why, before any training.
    drop = _config(files, out.parent / "dropped", data={"max_prompt_len": 2, "overlong": "drop"})
    with pytest.raises(DataError, match=r"all 64 rows of .*train\.jsonl exceed data\.max_prompt_len=2 \(longest "
                                        r"prompt: \d+ tokens\) and data\.overlong=drop drops them"):
        train(drop)
    bad = out.parent / "bad.jsonl"
    bad.write_text('{"question": "w1"}\n' * 12)
    with pytest.raises(DataError, match=r"all 12 rows of .*bad\.jsonl are bad \(missing_field=12\), e\.g\. "):
        train(_config(files, out.parent / "bad", data={"train": str(bad)}))


def test_run_outputs_and_exported_adapters_follow_the_umask(exploding_run):
    _, _, out, exported, _ = exploding_run
    seen = 0
    for top in (out, exported):
        for folder, dirs, names in os.walk(top):
            assert os.stat(folder).st_mode & 0o777 == 0o755, folder
            for n in names:
                path = os.path.join(folder, n)
                assert os.stat(path).st_mode & 0o777 == 0o644, path
                seen += 1
    assert seen > 20 and (exported / "causal" / "adapter_model.safetensors").exists()
