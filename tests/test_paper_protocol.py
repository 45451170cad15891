"""``bitune-jax paper``: the protocol's configs, the plan and resume states (dry run), the data, the table."""
import json
import os

import numpy as np
import pytest

from bitune_jax import cli
from bitune_jax.apps import paper
from bitune_jax.config import config_to_dict, load_config
from bitune_jax.evaluation.stats import Interval, paired_bootstrap, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"smollm2": os.path.join(ROOT, "configs", "paper", "smollm2_135m.yaml"),
           "gemma3-270m": os.path.join(ROOT, "configs", "paper", "gemma3_270m.yaml")}


@pytest.mark.parametrize("source", list(CONFIGS))
def test_configs_are_the_papers_protocol(source):
    cfg = load_config(CONFIGS[source])
    assert cfg.model.source == source and cfg.model.dtype == "bfloat16"
    assert (cfg.method.variant, cfg.method.peft.method, cfg.method.peft.rank, cfg.method.peft.alpha,
            cfg.method.peft.targets, cfg.method.peft.dropout, cfg.method.theta_init) == \
        ("bitune", "lora", 8, 1.0, None, 0.0, 0.01)
    assert cfg.data.batch_size * cfg.optim.grad_accum == 10
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.b1,
            cfg.optim.b2, cfg.optim.grad_clip) == (3e-4, "linear", 0.1, 0.0, 0.9, 0.999, 1.0)
    assert cfg.train.steps == 3000 and cfg.data.max_len == 512 and cfg.data.overlong == "drop"
    assert cfg.data.template == "plain" and cfg.method.alpha_init is None


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_dry_run_plans_three_seeds_of_both_arms_and_reads_their_state(tmp_path, capsys):
    out = tmp_path / "protocol"
    assert cli.main(["paper", CONFIGS["smollm2"], "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"protocol: {CONFIGS['smollm2']} -> {out}; 6 runs of 3000 steps; "
                               "tasks piqa, arc_challenge, csqa, siqa, mmlu")
    assert lines[1] == "  base model: new"
    runs = [line.split(":")[0].strip() for line in lines[2:]]
    assert runs == ["seed 42 lora", "seed 42 bitune", "seed 43 lora", "seed 43 bitune", "seed 44 lora",
                    "seed 44 bitune"]
    assert all(": new; overrides: " in line for line in lines[2:])
    assert not out.exists()  # a dry run writes nothing

    # The runs' configs differ in the arm, the seed (init and data order) and the folder only.
    planned = paper.plan(str(out))
    cfgs = [config_to_dict(load_config(CONFIGS["smollm2"], list(r.overrides))) for r in planned]
    for r, c in zip(planned, cfgs):
        assert c["method"]["variant"] == r.arm and c["train"]["seed"] == c["data"]["shuffle_seed"] == r.seed
        assert c["train"]["output_dir"] == str(out / f"seed{r.seed}" / r.arm)
    diff = {(s, k) for s in cfgs[0] for k in cfgs[0][s] if cfgs[0][s][k] != cfgs[3][s][k]}
    assert diff == {("method", "variant"), ("train", "seed"), ("data", "shuffle_seed"), ("train", "output_dir")}

    # Resume states come from the files of each run.
    _write(str(out / "seed42" / "lora" / "eval.json"), {"complete": True})
    _write(str(out / "seed42" / "bitune" / "summary.json"), {"status": "completed", "step": 3000})
    os.makedirs(out / "seed43" / "lora" / "checkpoints" / "250")
    os.makedirs(out / "seed43" / "lora" / "checkpoints" / "500")
    _write(str(out / "seed43" / "bitune" / "summary.json"), {"status": "stopped", "step": 40})
    _write(str(out / "base" / "eval.json"), {"complete": True})
    got = paper.run_protocol(CONFIGS["smollm2"], str(out), dry_run=True, say=lambda s: None)
    assert got["base"] == "evaluated"
    assert [p["state"] for p in got["plan"]] == ["evaluated", "trained", "resume from step 500", "new", "new", "new"]

    # --ultrafeedback: the data is written into the output folder and every run trains on it.
    assert cli.main(["paper", CONFIGS["gemma3-270m"], "--out", str(out), "--dry-run",
                     "--ultrafeedback", "/data/uf", "--seeds", "1,2", "train.steps=20"]) == 0
    text = capsys.readouterr().out
    assert f"  data: write {out / 'data' / 'train.jsonl'} from /data/uf" in text and "4 runs of 20 steps" in text
    assert text.count(f"data.train={out / 'data' / 'train.jsonl'} train.steps=20 method.variant=") == 4


def test_bad_arguments_fail_before_any_work(tmp_path, capsys):
    assert cli.main(["paper", CONFIGS["smollm2"], "--out", str(tmp_path / "o"), "--tasks", "piqa,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["paper", CONFIGS["smollm2"], "--out", str(tmp_path / "o"), "--seeds", "1,x"]) == 2
    assert cli.main(["paper", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_prepare_ultrafeedback_keeps_gpt4_answers_and_holds_out_the_last_rows(tmp_path):
    rows = [{"source": "evol", "instruction": f"q{i}",
             "completions": [{"model": "alpaca-7b", "response": f"a{i}"}]
             + ([{"model": "gpt-4", "response": f"g{i}"}, {"model": "gpt-4", "response": "second"}] if i % 3 else [])}
            for i in range(9)]
    src = tmp_path / "uf.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = paper.prepare_ultrafeedback(str(src), str(tmp_path / "data"), holdout=2)
    assert (info["rows"], info["kept"]) == (9, 6)
    read = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    train, valid = read(info["train"]), read(info["valid"])
    assert [(r["prompt"], r["answer"]) for r in train] == [("q1", "g1"), ("q2", "g2"), ("q4", "g4"), ("q5", "g5")]
    assert [r["answer"] for r in valid] == ["g7", "g8"] and valid[0]["id"] == "evol-7"
    with pytest.raises(ValueError, match="need more than the 6 held out"):
        paper.prepare_ultrafeedback(str(src), str(tmp_path / "d2"), holdout=6)


def _eval(tasks):
    """An eval.json as run_eval writes it (per_item=True): per task, acc and the per-item rows."""
    out = {"complete": True, "tasks": {}, "items": {}}
    for task, (gold, pred) in tasks.items():
        right = [float(p == g) for p, g in zip(pred, gold)]
        out["tasks"][task] = {"acc": float(np.mean(right)), "acc_norm": 0.0, "n": len(gold)}
        out["items"][task] = [{"index": i, "gold": g, "pred": p, "pred_norm": 0} for i, (g, p) in
                              enumerate(zip(gold, pred))]
    return out


def test_results_table_from_fixture_runs(tmp_path):
    gold = {"piqa": [0, 1, 0, 1], "siqa": [2, 0]}
    preds = {  # (arm, seed) -> predictions per task
        ("lora", 42): {"piqa": [0, 0, 0, 0], "siqa": [2, 1]},    # 2/4, 1/2
        ("bitune", 42): {"piqa": [0, 1, 0, 0], "siqa": [2, 0]},  # 3/4, 2/2
        ("lora", 43): {"piqa": [0, 1, 0, 0], "siqa": [0, 1]},    # 3/4, 0/2
        ("bitune", 43): {"piqa": [0, 1, 0, 1], "siqa": [2, 1]},  # 4/4, 1/2
        ("lora", 44): {"piqa": [1, 1, 1, 1], "siqa": [0, 0]},    # seed 44 has no Bitune run yet
    }
    for (arm, seed), p in preds.items():
        _write(str(tmp_path / f"seed{seed}" / arm / "eval.json"), _eval({t: (gold[t], p[t]) for t in gold}))
    _write(str(tmp_path / "base" / "eval.json"), _eval({"piqa": (gold["piqa"], [1, 1, 1, 1]),
                                                       "siqa": (gold["siqa"], [2, 1])}))
    _write(str(tmp_path / "seed43" / "bitune" / "other.json"), {})  # not an eval.json: ignored
    res = paper.results_table(str(tmp_path), n_boot=2000)
    assert res["seeds"] == [42, 43] and res["missing"] == ["seed 44 bitune"]
    piqa, siqa, avg = res["tasks"]["piqa"], res["tasks"]["siqa"], res["average"]
    assert piqa["lora"]["per_seed"] == [0.5, 0.75] and piqa["bitune"]["mean"] == 0.875
    assert piqa["lora"]["sd"] == pytest.approx(np.std([0.5, 0.75], ddof=1))
    assert siqa["base"] == 0.5 and piqa["base"] == 0.5 and avg["base"] == 0.5
    assert piqa["bitune_minus_lora"]["estimate"] == pytest.approx(0.25)
    assert siqa["bitune_minus_lora"]["estimate"] == pytest.approx(0.5)
    assert avg["bitune_minus_lora"]["estimate"] == pytest.approx(0.375)
    assert avg["lora"]["per_seed"] == [pytest.approx(0.5), pytest.approx(0.375)] and avg["n"] == 6
    # The interval is the paired bootstrap of the same tables.
    diffs = {"piqa": np.array([[0, 1, 0, 0], [0, 0, 0, 1]]), "siqa": np.array([[0, 1], [1, 0]])}
    ci = paired_bootstrap(diffs, n_boot=2000)
    d = avg["bitune_minus_lora"]
    assert (d["low"], d["high"]) == (ci["average"].low, ci["average"].high)
    assert res["verdict"] == verdict(Interval(*ci["average"][:3]), context="acc, mean over 2 tasks, 2 seeds, 6 items")
    lines = res["text"].splitlines()
    assert lines[0] == "| task | n | base | LoRA | Bitune | Bitune - LoRA (95% interval) |"
    assert lines[2].startswith("| piqa | 4 | 50.0 | 62.5 ± 17.7 | 87.5 ± 17.7 | +25.0 [")
    assert lines[4].startswith("| average | 6 | 50.0 | 43.8 ± 8.8 | 81.2 ± 8.8 | +37.5 [")
    assert "Missing: seed 44 bitune." in res["text"]
    assert (tmp_path / "results.md").read_text().startswith(lines[0])
    assert json.loads((tmp_path / "results.json").read_text())["verdict"] == res["verdict"]

    # Runs scored on other items than the baseline's are refused, not averaged.
    _write(str(tmp_path / "seed43" / "bitune" / "eval.json"), _eval({"piqa": ([0, 1], [0, 1]), "siqa": ([2], [2])}))
    with pytest.raises(ValueError, match="other items"):
        paper.results_table(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no seed has every arm"):
        paper.results_table(str(tmp_path / "empty"))
