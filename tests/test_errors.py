"""The command line's error contract, one bad input at a time.

Every expected failure must end the same way (README, "Command line"): exit
status 2, exactly one line starting with ``error:`` that names the culprit
(a file, a config key, a row, an option), no traceback, and no partial output
(the ``--out`` file or output folder is not created, or left as it was).

The commands run in-process through ``bitune_jax.cli.main`` on one tiny random
Llama with a word-level tokenizer (shared by the module). Most inputs are
refused before the model is even loaded; several cases pass a model path that
does not exist to prove it (the error names the bad argument, not the model).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import yaml

from bitune_jax import cli
from hf_utils import save_word_tokenizer, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "Question:", "Answer:"] + [f"w{i}" for i in range(60)]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("BITUNE_DEBUG", raising=False)  # BITUNE_DEBUG=1 would show tracebacks instead


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny model (HF folder and GGUF), data files for score/train/eval, and a one-step run config."""
    from test_gguf import write_gguf

    root = tmp_path_factory.mktemp("errors")
    model = root / "model"
    torch_model = tiny_hf_model("llama", str(model), vocab_size=len(WORDS) + 2)
    save_word_tokenizer(str(model), WORDS)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        words = [f"w{j}" for j in rng.integers(0, 60, rng.integers(2, 9))]
        rows.append({"prompt": " ".join(words), "answer": " ".join(reversed(words))})
    _write_jsonl(root / "train.jsonl", rows)
    _write_jsonl(root / "score.jsonl", rows[:2])
    _write_jsonl(root / "piqa.jsonl", [{"goal": f"w{i} w{i + 1}", "sol1": "w3", "sol2": "w4 w5", "label": i % 2}
                                       for i in range(6)])
    config = {
        "model": {"source": str(model)},
        "method": {"variant": "bitune", "peft": {"method": "lora", "rank": 4, "alpha": 8.0}},
        "data": {"train": str(root / "train.jsonl"), "batch_size": 4, "bucket": 16, "max_prompt_len": 16,
                 "max_answer_len": 16, "sort_window": 2},
        "train": {"steps": 1, "save_every": 1, "log_every": 1, "eval_every": 0, "async_checkpoint": False,
                  "output_dir": str(root / "default_run")},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return types.SimpleNamespace(root=root, model=model, gguf=write_gguf(root / "model.gguf", torch_model),
                                 train=root / "train.jsonl", score=root / "score.jsonl", piqa=root / "piqa.jsonl",
                                 config=root / "run.yaml")


@pytest.fixture(scope="module")
def run(env):
    """A finished one-step training run (its output folder)."""
    out = env.root / "run"
    assert cli.main(["train", str(env.config), f"train.output_dir={out}"]) == 0
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tree(path):
    """What "unchanged" compares: every entry under ``path`` with size and mtime.

    None for a missing path or an empty folder: ``train`` takes the output
    folder's lock (creating the folder) before it reads data, and an empty
    folder holds no output.
    """
    path = str(path)
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return None
    if not os.path.isdir(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    entries = []
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            st = os.stat(full)
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return sorted(entries)


def _fails(capsys, argv, culprits, unchanged=()):
    """Runs the command and checks the contract; returns the ``error:`` line."""
    culprits = [culprits] if isinstance(culprits, (str, os.PathLike)) else culprits
    before = [_tree(p) for p in unchanged]
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, f"exit status {status}; stderr:\n{err[-3000:]}"
    assert len(errors) == 1, f"expected one error: line; stderr:\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    for culprit in culprits:
        assert str(culprit) in errors[0], f"{str(culprit)!r} is not named in: {errors[0]}"
    for path, was in zip(unchanged, before):
        assert _tree(path) == was, f"{path} was written or changed"
    return errors[0]


def _model_copy(env, tmp, name="model"):
    dst = tmp / name
    shutil.copytree(env.model, dst)
    return dst


# --------------------------------------------------------------------------- bad inputs, one per case
# Each case builds its bad input under `tmp` and returns (argv, culprits, paths that must stay unchanged).


def _score(env, tmp, model=None, data=None, *extra):
    out = tmp / "scored.jsonl"
    argv = ["score", "--model", model or env.model, "--data", data or env.score, "--out", out, "--quiet", *extra]
    return argv, out


def missing_model(env, tmp):
    argv, out = _score(env, tmp, model=tmp / "no_such_model")
    return argv, tmp / "no_such_model", [out]


def empty_model_dir(env, tmp):
    (tmp / "empty").mkdir()
    argv, out = _score(env, tmp, model=tmp / "empty")
    return argv, [tmp / "empty", "config.json"], [out]


def dir_without_weights(env, tmp):
    (tmp / "m").mkdir()
    shutil.copy(env.model / "config.json", tmp / "m")
    argv, out = _score(env, tmp, model=tmp / "m")
    return argv, [tmp / "m", "model.safetensors"], [out]


def pickled_weights_in_dir(env, tmp):
    (tmp / "m").mkdir()
    shutil.copy(env.model / "config.json", tmp / "m")
    (tmp / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    argv, out = _score(env, tmp, model=tmp / "m")
    return argv, [tmp / "m", "pytorch_model.bin"], [out]


def pickle_file_pt(env, tmp):
    (tmp / "model.pt").write_bytes(b"\x80\x04K\x01.")
    argv, out = _score(env, tmp, model=tmp / "model.pt")
    return argv, [tmp / "model.pt", "pickle"], [out]


def pickle_file_pkl(env, tmp):
    (tmp / "weights.pkl").write_bytes(b"\x80\x04K\x01.")
    argv, out = _score(env, tmp, model=tmp / "weights.pkl")
    return argv, [tmp / "weights.pkl", "pickle"], [out]


def truncated_safetensors(env, tmp):
    m = _model_copy(env, tmp)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    argv, out = _score(env, tmp, model=m)
    return argv, [m / "model.safetensors", "truncated"], [out]


def not_safetensors(env, tmp):
    m = _model_copy(env, tmp)
    (m / "model.safetensors").write_bytes(b"<html>404 Not Found</html>\n")
    argv, out = _score(env, tmp, model=m)
    return argv, m / "model.safetensors", [out]


def config_not_json(env, tmp):
    m = _model_copy(env, tmp)
    (m / "config.json").write_text('{"model_type": "llama",')
    argv, out = _score(env, tmp, model=m)
    return argv, m / "config.json", [out]


def unknown_architecture(env, tmp):
    m = _model_copy(env, tmp)
    hf = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**hf, "model_type": "mamba9000", "architectures": ["Mamba9000"]}))
    argv, out = _score(env, tmp, model=m)
    return argv, [m / "config.json", "mamba9000"], [out]


def config_missing_key(env, tmp):
    m = _model_copy(env, tmp)
    (m / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 68}))
    argv, out = _score(env, tmp, model=m)
    return argv, m / "config.json", [out]


def malformed_shard_index(env, tmp):
    m = _model_copy(env, tmp)
    (m / "model.safetensors").unlink()
    (m / "model.safetensors.index.json").write_text('{"weight_map": ')
    argv, out = _score(env, tmp, model=m)
    return argv, m / "model.safetensors.index.json", [out]


def truncated_gguf(env, tmp):
    data = open(env.gguf, "rb").read()
    (tmp / "cut.gguf").write_bytes(data[: len(data) // 2])
    argv, out = _score(env, tmp, model=tmp / "cut.gguf")
    return argv, [tmp / "cut.gguf", "truncated"], [out]


def not_gguf(env, tmp):
    (tmp / "model.gguf").write_text("this is a text file, not a GGUF model\n")
    argv, out = _score(env, tmp, model=tmp / "model.gguf")
    return argv, [tmp / "model.gguf", "not a GGUF file"], [out]


def data_missing(env, tmp):
    argv, out = _score(env, tmp, data=tmp / "no_such.jsonl")
    return argv, tmp / "no_such.jsonl", [out]


def data_empty(env, tmp):
    (tmp / "empty.jsonl").write_text("")
    argv, out = _score(env, tmp, data=tmp / "empty.jsonl")
    return argv, tmp / "empty.jsonl", [out]


def data_malformed_json(env, tmp):
    (tmp / "bad.jsonl").write_text('{"prompt": "w1", "answer": "w2"}\n{"prompt": "w1", "answer": \n')
    argv, out = _score(env, tmp, data=tmp / "bad.jsonl")
    return argv, [tmp / "bad.jsonl", "line 2"], [out]


def data_not_utf8(env, tmp):
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9", "answer": "w2"}\n'.encode("latin-1"))
    argv, out = _score(env, tmp, data=tmp / "latin1.jsonl")
    return argv, [tmp / "latin1.jsonl", "line 1", "UTF-8"], [out]


def data_row_without_fields(env, tmp):
    _write_jsonl(tmp / "rows.jsonl", [{"prompt": "w1", "answer": "w2"}, {"question": "w1"}])
    argv, out = _score(env, tmp, data=tmp / "rows.jsonl")
    return argv, [tmp / "rows.jsonl", "row 2"], [out]


def data_ids_outside_vocabulary(env, tmp):
    _write_jsonl(tmp / "ids.jsonl", [{"prompt_ids": [1, 2], "answer_ids": [3, 5000]}])
    argv, out = _score(env, tmp, data=tmp / "ids.jsonl")
    return argv, [tmp / "ids.jsonl", "row 1", "answer_ids"], [out]


def batch_size_zero(env, tmp):
    argv, out = _score(env, tmp, None, None, "--batch-size", "0")
    return argv, "--batch-size", [out]


def batch_size_not_a_number(env, tmp):
    argv, out = _score(env, tmp, None, None, "--batch-size", "eight")
    return argv, ["--batch-size", "eight"], [out]


def unknown_variant(env, tmp):  # refused before loading: the model path does not even exist
    argv, out = _score(env, tmp, tmp / "no_such_model", None, "--variant", "bitunne")
    return argv, ["variant", "bitunne"], [out]


def variant_without_adapters(env, tmp):
    argv, out = _score(env, tmp, tmp / "no_such_model", None, "--variant", "bitune")
    return argv, ["variant", "--adapters"], [out]


def missing_adapters(env, tmp):
    argv, out = _score(env, tmp, tmp / "no_such_model", None, "--adapters", tmp / "no_adapters")
    return argv, tmp / "no_adapters", [out]


def wrong_shaped_adapters(env, tmp):
    import jax
    from safetensors.numpy import load_file, save_file

    from bitune_jax import bitune
    from bitune_jax.conversion import load_model
    from bitune_jax.conversion.adapters import export_adapters
    from bitune_jax.model.peft import PeftConfig

    model = load_model(str(env.model))
    method = bitune.MethodConfig(variant="lora", peft=PeftConfig("lora", rank=4, alpha=8.0))
    trainable = bitune.init_trainable(jax.random.PRNGKey(0), model.cfg, method, model.params)
    export_adapters(str(tmp / "adapters"), trainable, model.cfg, method, str(env.model))
    (weights,) = glob.glob(str(tmp / "adapters" / "**" / "adapter_model.safetensors"), recursive=True)
    tensors = load_file(weights)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = np.ascontiguousarray(tensors[key][:, :-1])  # one input column short
    save_file(tensors, weights)
    argv, out = _score(env, tmp, None, None, "--adapters", tmp / "adapters")
    return argv, [weights, key], [out]


def truncated_adapters(env, tmp):
    import shutil

    src = os.path.join(os.path.dirname(__file__), "fixtures", "compat_v0_1")
    shutil.copytree(os.path.join(src, "adapters"), tmp / "adapters")
    weights = tmp / "adapters" / "causal" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    out = tmp / "scored.jsonl"
    argv = ["score", "--model", os.path.join(src, "model"), "--adapters", tmp / "adapters",
            "--data", os.path.join(src, "score_in.jsonl"), "--out", out, "--quiet"]
    return argv, [weights, "truncated"], [out]


def out_is_a_folder(env, tmp):
    (tmp / "results").mkdir()
    argv, _ = _score(env, tmp, tmp / "no_such_model")
    argv[argv.index("--out") + 1] = tmp / "results"
    return argv, tmp / "results", [tmp / "results"]


def out_under_a_file(env, tmp):
    (tmp / "notes.txt").write_text("x")
    argv, _ = _score(env, tmp, tmp / "no_such_model")
    argv[argv.index("--out") + 1] = tmp / "notes.txt" / "scored.jsonl"
    return argv, tmp / "notes.txt" / "scored.jsonl", [tmp / "notes.txt"]


def _train(env, tmp, *overrides, config=None):
    out = tmp / "run"
    return ["train", config or env.config, f"train.output_dir={out}", *overrides], out


def config_missing(env, tmp):
    argv, out = _train(env, tmp, config=tmp / "missing.yaml")
    return argv, tmp / "missing.yaml", [out]


def config_not_yaml(env, tmp):
    (tmp / "run.yaml").write_text("model: {source: [unclosed\n")
    argv, out = _train(env, tmp, config=tmp / "run.yaml")
    return argv, tmp / "run.yaml", [out]


def unknown_key_in_config_file(env, tmp):
    cfg = yaml.safe_load(env.config.read_text())
    cfg["optim"] = {"lrr": 1e-3}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    argv, out = _train(env, tmp, config=tmp / "run.yaml")
    return argv, [tmp / "run.yaml", "optim.lrr"], [out]


def unknown_key_override(env, tmp):
    argv, out = _train(env, tmp, "train.stepz=3")
    return argv, "train.stepz", [out]


def bad_value_override(env, tmp):
    argv, out = _train(env, tmp, "data.batch_size=0")
    return argv, "data.batch_size", [out]


def bad_type_override(env, tmp):
    argv, out = _train(env, tmp, "optim.lr=fast")
    return argv, ["optim.lr", "fast"], [out]


def override_without_value(env, tmp):
    argv, out = _train(env, tmp, "optim.lr")
    return argv, "optim.lr", [out]


def train_data_missing(env, tmp):
    argv, out = _train(env, tmp, f"data.train={tmp / 'gone.jsonl'}")
    return argv, tmp / "gone.jsonl", [out]


def train_data_not_utf8(env, tmp):
    lines = env.train.read_bytes().splitlines(keepends=True)
    (tmp / "t.jsonl").write_bytes(b"".join(lines[:3]) + '{"prompt": "\u00e9", "answer": "w1"}\n'.encode("latin-1"))
    argv, out = _train(env, tmp, f"data.train={tmp / 't.jsonl'}", "data.bad_rows=error")
    return argv, [tmp / "t.jsonl", "line 4"], [out]


def train_data_all_rows_bad(env, tmp):
    _write_jsonl(tmp / "t.jsonl", [{"instruction": "w1", "output": "w2"}] * 8)
    argv, out = _train(env, tmp, f"data.train={tmp / 't.jsonl'}")
    return argv, tmp / "t.jsonl", [out]


def train_data_fewer_rows_than_a_batch(env, tmp):
    _write_jsonl(tmp / "t.jsonl", [{"prompt": "w1 w2", "answer": "w2 w1"}] * 2)
    argv, out = _train(env, tmp, f"data.train={tmp / 't.jsonl'}")
    return argv, [tmp / "t.jsonl", "data.batch_size"], [out]


def more_steps_than_the_epochs_hold(env, tmp):  # 16 rows, batches of 4: one epoch is 4 steps
    argv, out = _train(env, tmp, "data.num_epochs=1", "train.steps=10")
    return argv, ["data.num_epochs=1", str(env.train), "train.steps"], [out]


def output_dir_is_a_file(env, tmp):
    (tmp / "run").write_text("not a folder")
    argv, out = _train(env, tmp, "model.source=/no/such/model")
    return argv, tmp / "run", [out]


def _eval(env, tmp, *extra, model=None):
    out = tmp / "results.json"
    return ["eval", "--model", model or env.model, "--out", out, "--quiet", *extra], out


def limit_negative(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--limit", "-1")
    return argv, "--limit", [out]


def limit_zero(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--limit", "0")
    return argv, "--limit", [out]


def items_reversed(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--items", "5:2")
    return argv, ["--items", "5:2"], [out]


def items_not_a_range(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--items", "1000-1400")
    return argv, ["--items", "1000-1400"], [out]


def items_past_the_end(env, tmp):  # the task file has 6 items; checked before the model loads
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--items", "4:10", model=tmp / "no_such_model")
    return argv, [env.piqa, "6 items", "4:10"], [out]


def limit_and_items(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--items", "0:2", "--limit", "2")
    return argv, ["--limit", "--items"], [out]


def source_without_task(env, tmp):
    argv, out = _eval(env, tmp, "--source", str(env.piqa))
    return argv, ["--source", str(env.piqa)], [out]


def source_unknown_task(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqaa={env.piqa}")
    return argv, "piqaa", [out]


def source_missing_file(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={tmp / 'gone.jsonl'}", model=tmp / "no_such_model")
    return argv, tmp / "gone.jsonl", [out]


def source_malformed_json(env, tmp):
    (tmp / "p.jsonl").write_text(env.piqa.read_text() + '{"goal": "w1",\n')
    argv, out = _eval(env, tmp, "--source", f"piqa={tmp / 'p.jsonl'}", model=tmp / "no_such_model")
    return argv, [tmp / "p.jsonl", "line 7"], [out]


def source_rows_of_another_task(env, tmp):
    _write_jsonl(tmp / "arc.jsonl", [{"question": "w1?", "choices": {"text": ["w1"], "label": ["A"]},
                                      "answerKey": "A"}])
    argv, out = _eval(env, tmp, "--source", f"piqa={tmp / 'arc.jsonl'}", model=tmp / "no_such_model")
    return argv, [tmp / "arc.jsonl", "row 1"], [out]


def source_for_a_task_not_evaluated(env, tmp):
    argv, out = _eval(env, tmp, "--tasks", "arc_easy", "--source", f"piqa={env.piqa}")
    return argv, ["piqa", str(env.piqa)], [out]


def unknown_task(env, tmp):
    argv, out = _eval(env, tmp, "--tasks", "piqa,hellaswagg")
    return argv, "hellaswagg", [out]


def eval_unknown_variant(env, tmp):
    argv, out = _eval(env, tmp, "--source", f"piqa={env.piqa}", "--variant", "bi-tune", model=tmp / "no_such_model")
    return argv, "bi-tune", [out]


def generate_row_without_prompt(env, tmp):
    _write_jsonl(tmp / "prompts.jsonl", [{"prompt": "w1"}, {"text": "w2"}])
    out = tmp / "generated.jsonl"
    return (["generate", "--model", env.model, "--data", tmp / "prompts.jsonl", "--out", out],
            [tmp / "prompts.jsonl", "row 2"], [out])


def generate_prompts_file_missing(env, tmp):
    out = tmp / "generated.jsonl"
    return ["generate", "--model", env.model, "--prompts", tmp / "gone.txt", "--out", out], tmp / "gone.txt", [out]


def bench_bad_lengths(env, tmp):
    return ["bench", "--quick", "--lengths", "192x64"], ["--lengths", "192x64"], []


def export_run_without_checkpoints(env, tmp):
    (tmp / "not_a_run").mkdir()
    return (["export-adapters", tmp / "not_a_run", tmp / "exported"], [tmp / "not_a_run", "checkpoints"],
            [tmp / "exported"])


CASES = [
    missing_model, empty_model_dir, dir_without_weights, pickled_weights_in_dir, pickle_file_pt, pickle_file_pkl,
    truncated_safetensors, not_safetensors, config_not_json, unknown_architecture, config_missing_key,
    malformed_shard_index, truncated_gguf, not_gguf,
    data_missing, data_empty, data_malformed_json, data_not_utf8, data_row_without_fields,
    data_ids_outside_vocabulary, batch_size_zero, batch_size_not_a_number, unknown_variant,
    variant_without_adapters, missing_adapters, wrong_shaped_adapters, truncated_adapters, out_is_a_folder, out_under_a_file,
    config_missing, config_not_yaml, unknown_key_in_config_file, unknown_key_override, bad_value_override,
    bad_type_override, override_without_value, train_data_missing, train_data_not_utf8, train_data_all_rows_bad,
    train_data_fewer_rows_than_a_batch, more_steps_than_the_epochs_hold, output_dir_is_a_file,
    limit_negative, limit_zero, items_reversed, items_not_a_range, items_past_the_end, limit_and_items,
    source_without_task, source_unknown_task, source_missing_file, source_malformed_json,
    source_rows_of_another_task, source_for_a_task_not_evaluated, unknown_task, eval_unknown_variant,
    generate_row_without_prompt, generate_prompts_file_missing, bench_bad_lengths, export_run_without_checkpoints,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, env, tmp_path, capsys):
    argv, culprits, unchanged = case(env, tmp_path)
    _fails(capsys, argv, culprits, unchanged)


# --------------------------------------------------------------------------- outputs that cannot be written
def _can_create_in(folder) -> bool:
    probe = os.path.join(str(folder), ".bitune-test-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except OSError:
        return False
    os.remove(probe)
    return True


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder that refuses new files: mode 0o555, or /sys when running as root (root ignores modes)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not _can_create_in(folder):
            yield folder
        elif os.path.isdir("/sys") and not _can_create_in("/sys"):
            yield type(tmp_path)("/sys")
        else:
            pytest.skip("no folder here refuses new files (running as root, and /sys takes them)")
    finally:
        folder.chmod(0o755)


def test_outputs_in_a_readonly_folder_fail_before_any_work(env, run, readonly_dir, tmp_path, capsys):
    """Every command checks where it will write before it loads a model (the model paths here do not exist)."""
    nowhere = tmp_path / "no_such_model"
    out = readonly_dir / "bitune-test-out.jsonl"
    _fails(capsys, ["score", "--model", nowhere, "--data", env.score, "--out", out], out, [out])
    out = readonly_dir / "bitune-test-results.json"
    _fails(capsys, ["eval", "--model", nowhere, "--source", f"piqa={env.piqa}", "--out", out], out, [out])
    out = readonly_dir / "bitune-test-generated.jsonl"
    _fails(capsys, ["generate", "--model", nowhere, "--prompt", "w1", "--out", out], out, [out])
    out = readonly_dir / "bitune-test-run"
    _fails(capsys, ["train", env.config, f"train.output_dir={out}", f"model.source={nowhere}"], out, [out])
    out = readonly_dir / "bitune-test-adapters"
    _fails(capsys, ["export-adapters", run, out], out, [out])


@contextlib.contextmanager
def _file_size_limit(nbytes):
    """Within the block no file of this process grows past ``nbytes``: writes fail as on a full disk."""
    resource = pytest.importorskip("resource")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_leaves_no_partial_output(env, tmp_path, capsys):
    rows = [{"prompt": "w1 w2", "answer": "w2 w1", "note": "x" * (2 << 20)}]  # output rows keep input fields
    _write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out" / "scored.jsonl"
    with _file_size_limit(1 << 20):
        _fails(capsys, ["score", "--model", env.model, "--data", tmp_path / "big.jsonl", "--out", out, "--quiet"],
               [out, "cannot write"], [out])
    assert not [n for n in os.listdir(out.parent) if n.startswith(".tmp")]  # the temporary file is gone too


# --------------------------------------------------------------------------- runs and their checkpoints
def test_export_onto_an_existing_file(run, tmp_path, capsys):
    (tmp_path / "adapters").write_text("my notes")
    _fails(capsys, ["export-adapters", run, tmp_path / "adapters"], tmp_path / "adapters", [tmp_path / "adapters"])
    assert (tmp_path / "adapters").read_text() == "my notes"
    _fails(capsys, ["export-adapters", run, tmp_path / "exported", "--step", "99"], "step 99", [tmp_path / "exported"])


def _damaged_copy(run, tmp_path, damage):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    steps = glob.glob(str(copy / "checkpoints" / "[0-9]*"))
    assert steps
    for step in steps:
        damage(step)
    return copy


def _cut_json(step):
    for path in glob.glob(os.path.join(step, "config", "*")):
        if os.path.isfile(path) and "metadata" in os.path.basename(path):
            text = open(path).read()
            open(path, "w").write(text[: len(text) // 2])


def _garble_arrays(step):
    for path in glob.glob(os.path.join(step, "state", "**", "d", "*"), recursive=True):
        open(path, "wb").write(b"garbage")


@pytest.mark.parametrize("damage", [_cut_json, _garble_arrays], ids=["broken_json", "garbled_arrays"])
def test_no_checkpoint_restores(env, run, tmp_path, capsys, damage):
    """Every checkpoint of the run is damaged: resuming and exporting fail naming the checkpoint folder."""
    copy = _damaged_copy(run, tmp_path, damage)
    outputs = [copy / name for name in ("summary.json", "metrics.jsonl", "config.yaml")]
    line = _fails(capsys, ["train", env.config, f"train.output_dir={copy}"], copy / "checkpoints", outputs)
    assert len(line) < 1000  # the cause, not a tensorstore dump
    if damage is _cut_json:
        assert "JSON" in line or "Unterminated" in line
    _fails(capsys, ["export-adapters", copy, tmp_path / "exported"], copy / "checkpoints", [tmp_path / "exported"])


def test_garbled_checkpoint_in_a_real_process(env, run, tmp_path):
    """The same from the shell: orbax's abandoned reads print nothing after a failed restore.

    (In-process, pytest's own ``sys.unraisablehook`` would swallow those prints, so this runs the command.)
    """
    copy = _damaged_copy(run, tmp_path, _garble_arrays)
    environ = {k: v for k, v in os.environ.items() if k != "BITUNE_DEBUG"}
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bitune_jax.cli", "train", str(env.config),
                           f"train.output_dir={copy}"], capture_output=True, text=True, timeout=300, env=environ,
                          cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and str(copy / "checkpoints") in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "exception was never retrieved" not in proc.stderr, proc.stderr[-3000:]
