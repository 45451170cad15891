"""``bitune-jax paper``: the paper's instruction-tuning protocol, LoRA against Bitune over three seeds, resumable.

One command runs the whole protocol for a run config of ``configs/paper/``
(``smollm2_135m.yaml``, ``gemma3_270m.yaml``; the values and where they come
from are in those files): for each seed of :data:`SEEDS` and each arm of
:data:`ARMS` it trains ``<out>/seed<s>/<arm>`` (``train.seed`` and
``data.shuffle_seed`` set to the seed, ``method.variant`` to the arm), exports
the adapters, and evaluates zero-shot on :data:`TASKS` with the paper's
prompts (:func:`bitune_jax.evaluation.evaluate.run_eval`, per-item rows kept
in ``eval.json``); the base model is evaluated once (``<out>/base``). Then
:func:`results_table` writes ``results.md`` and ``results.json``.

Resuming: run the same command again. A run whose ``eval.json`` is complete
is skipped, a trained run is only evaluated, and an unfinished one resumes
from its newest checkpoint (``train.train`` restores adapters, optimizer,
step and data position). ``dry_run`` prints what would run and does nothing.

Training data: the authors' UltraFeedback rows, written from a local copy of
``openbmb/UltraFeedback`` by :func:`prepare_ultrafeedback` (the protocol's
``ultrafeedback`` argument does it into ``<out>/data`` once; nothing is
downloaded).

Example (a notebook)::

    from bitune_jax.apps.paper import run_protocol, results_table
    run_protocol("configs/paper/smollm2_135m.yaml", "runs/paper/smollm2",
                 ultrafeedback="/data/UltraFeedback", dry_run=True)
    print(results_table("runs/paper/smollm2")["text"])
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from bitune_jax.evaluation.stats import Interval, paired_bootstrap, verdict
from bitune_jax.fileio import write_json_atomic, write_jsonl_atomic, write_text_atomic

SEEDS = (42, 43, 44)  # the authors' seeds (common_0.sh)
ARMS = {"lora": ("method.variant=lora",), "bitune": ("method.variant=bitune",)}
BASELINE = "lora"
TASKS = ("piqa", "arc_challenge", "csqa", "siqa", "mmlu")  # the paper's table; ARC is ARC-Challenge (arc_full)
LABELS = {"base": "base", "lora": "LoRA", "bitune": "Bitune"}
EVAL_FILE = "eval.json"
PROTOCOL_FILE = "protocol.json"
HOLDOUT = 1000  # the authors hold out the last 1,000 filtered rows (dataloaders.py, val_subset)


# --------------------------------------------------------------------------- data
def prepare_ultrafeedback(source: str, out_dir: str, holdout: int = HOLDOUT) -> Dict:
    """Writes the authors' instruction data from a local copy of ``openbmb/UltraFeedback``.

    Every row whose ``completions`` include one by ``gpt-4`` becomes
    ``{"prompt": instruction, "answer": that first GPT-4 response, "id"}``;
    the last ``holdout`` such rows (file order) go to ``valid.jsonl``, the
    others to ``train.jsonl`` (as the authors' ``dataloaders.py`` does; their
    512-token limit is the run config's ``data.max_len``).

    Args:
      source: anything :func:`bitune_jax.data.pipeline.read_rows` reads
        (JSONL, Parquet, Arrow, a ``save_to_disk`` folder).
      out_dir: folder for ``train.jsonl`` and ``valid.jsonl``.

    Returns:
      ``{"train": path, "valid": path, "rows": n read, "kept": n with a GPT-4 completion}``.
    """
    from bitune_jax.data import pipeline as data_lib

    rows = data_lib.read_rows(source)
    kept = []
    for i, raw in enumerate(rows):
        f = raw.fields or {}
        gpt4 = [c for c in (f.get("completions") or []) if isinstance(c, Mapping) and c.get("model") == "gpt-4"]
        if gpt4 and isinstance(f.get("instruction"), str) and isinstance(gpt4[0].get("response"), str):
            kept.append({"prompt": f["instruction"], "answer": gpt4[0]["response"],
                         "id": str(f.get("source", "ultrafeedback")) + f"-{i}"})
    if len(kept) <= holdout:
        raise ValueError(f"{source}: {len(kept)} rows with a gpt-4 completion (of {len(rows)}); need more than "
                         f"the {holdout} held out (is this openbmb/UltraFeedback?)")
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "valid": os.path.join(out_dir, "valid.jsonl")}
    write_jsonl_atomic(paths["train"], kept[:-holdout])
    write_jsonl_atomic(paths["valid"], kept[-holdout:])
    return {**paths, "rows": len(rows), "kept": len(kept)}


# --------------------------------------------------------------------------- the plan
class Run(NamedTuple):
    """One training run of the protocol."""

    seed: int
    arm: str
    run_dir: str
    overrides: tuple  # on top of the config file


def plan(out_dir: str, seeds: Sequence[int] = SEEDS, arms: Mapping[str, Sequence[str]] = ARMS,
         overrides: Sequence[str] = ()) -> List[Run]:
    """The runs of the protocol in the order they run: seed by seed, LoRA then Bitune."""
    out = []
    for seed in seeds:
        for arm, arm_ov in arms.items():
            run_dir = os.path.join(os.path.abspath(out_dir), f"seed{seed}", arm)
            out.append(Run(seed, arm, run_dir, (*overrides, *arm_ov, f"train.seed={seed}",
                                                f"data.shuffle_seed={seed}", f"train.output_dir={run_dir}")))
    return out


def _read_json(path: str) -> Optional[Dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_state(run_dir: str, steps: int) -> str:
    """``evaluated``, ``trained`` (not evaluated), ``resume from step K`` or ``new``, from the files in ``run_dir``."""
    done = _read_json(os.path.join(run_dir, EVAL_FILE))
    if done and done.get("complete"):
        return "evaluated"
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary and summary.get("status") == "completed" and summary.get("step") == steps:
        return "trained"
    saved = [int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints"))
             if d.isdigit()] if os.path.isdir(os.path.join(run_dir, "checkpoints")) else []
    return f"resume from step {max(saved)}" if saved else "new"


# --------------------------------------------------------------------------- running it
def _evaluate(model_src: str, adapters: Optional[str], tasks: Sequence[str], out_path: str, *, dtype: str,
              attention: str, limit: Optional[int], batch_size: int) -> Dict:
    from bitune_jax.evaluation.evaluate import run_eval

    results = run_eval(model_src, adapters, tasks=tasks, limit=limit, per_item=True, batch_size=batch_size,
                       dtype=dtype, attention=attention, quiet=True)
    results["complete"] = True
    write_json_atomic(out_path, results)
    return results


def run_protocol(config: str, out_dir: str, *, seeds: Sequence[int] = SEEDS, tasks: Sequence[str] = TASKS,
                 overrides: Sequence[str] = (), ultrafeedback: Optional[str] = None, dry_run: bool = False,
                 limit: Optional[int] = None, batch_size: int = 8, say=print) -> Dict:
    """Runs (or resumes) the protocol of the module docstring; returns ``{"plan", "table"?}``.

    Args:
      config: the run config (``configs/paper/*.yaml``).
      out_dir: the runs, the base model's evaluation, ``protocol.json``, ``results.md``/``.json``.
      seeds: training seeds (each sets ``train.seed`` and ``data.shuffle_seed``).
      tasks: zero-shot tasks (:data:`bitune_jax.data.tasks.TASKS`).
      overrides: ``key=value`` overrides for every run (e.g. ``train.steps=300`` for a shorter check).
      ultrafeedback: a local ``openbmb/UltraFeedback`` copy to write ``<out>/data/train.jsonl`` from
        (:func:`prepare_ultrafeedback`), once; when that file exists it is every run's ``data.train``.
      dry_run: print the plan (each run's state and overrides) and stop.
      limit: first ``limit`` items per task (a quick check; None: all).
      batch_size: questions per evaluation batch.
    """
    from bitune_jax.config import load_config
    from bitune_jax.data import tasks as task_lib

    out_dir = os.path.abspath(out_dir)
    for name in tasks:
        task_lib.canonical_name(name)  # a bad task name fails before anything runs
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)}: give distinct seeds")
    data_path = os.path.join(out_dir, "data", "train.jsonl")
    extra = list(overrides)
    if ultrafeedback is not None or os.path.isfile(data_path):
        extra = [f"data.train={data_path}", *extra]
    runs = plan(out_dir, seeds, ARMS, extra)
    cfgs = [load_config(config, list(r.overrides)) for r in runs]  # every run's config is checked up front
    steps = cfgs[0].train.steps
    base_state = "evaluated" if (_read_json(os.path.join(out_dir, "base", EVAL_FILE)) or {}).get("complete") \
        else "new"
    lines = [f"protocol: {config} -> {out_dir}; {len(runs)} runs of {steps} steps; tasks {', '.join(tasks)}",
             f"  base model: {base_state}"]
    lines += [f"  seed {r.seed} {r.arm}: {run_state(r.run_dir, steps)}; overrides: {' '.join(r.overrides)}"
              for r in runs]
    if ultrafeedback is not None and not os.path.isfile(data_path):
        lines.insert(1, f"  data: write {data_path} from {ultrafeedback}")
    say("\n".join(lines))
    result = {"plan": [dict(r._asdict(), state=run_state(r.run_dir, steps)) for r in runs], "base": base_state}
    if dry_run:
        return result

    from bitune_jax.conversion.adapters import export_run_adapters
    from bitune_jax.training import loop as train_lib

    if ultrafeedback is not None and not os.path.isfile(data_path):
        info = prepare_ultrafeedback(ultrafeedback, os.path.dirname(data_path))
        say(f"data: {info['kept']} of {info['rows']} rows have a GPT-4 completion -> {info['train']}")
    write_json_atomic(os.path.join(out_dir, PROTOCOL_FILE),
                      {"config": os.path.abspath(config), "seeds": list(seeds), "arms": {a: list(v) for a, v in
                                                                                        ARMS.items()},
                       "tasks": list(tasks), "overrides": extra, "limit": limit})
    first = cfgs[0]
    eval_kw = dict(dtype=first.model.dtype, attention=first.model.attention, limit=limit, batch_size=batch_size)
    if base_state != "evaluated":
        say("base model: evaluating")
        _evaluate(first.model.source, None, tasks, os.path.join(out_dir, "base", EVAL_FILE), **eval_kw)
    for run, cfg in zip(runs, cfgs):
        state = run_state(run.run_dir, steps)
        if state == "evaluated":
            continue
        if state != "trained":
            say(f"seed {run.seed} {run.arm}: training ({state})")
            summary = train_lib.train(cfg)
            if summary["status"] != "completed":  # SIGTERM: saved; never evaluate a half-trained run
                say(f"seed {run.seed} {run.arm}: {summary['status']} at step {summary['step']}; "
                    "run the same command again to resume")
                return result
        adapters = os.path.join(run.run_dir, "adapters")
        export_run_adapters(run.run_dir, adapters)
        say(f"seed {run.seed} {run.arm}: evaluating")
        _evaluate(cfg.model.source, adapters, tasks, os.path.join(run.run_dir, EVAL_FILE), **eval_kw)
    result["table"] = results_table(out_dir)
    say(result["table"]["text"])
    return result


# --------------------------------------------------------------------------- the table
def results_table(out_dir: str, metric: str = "acc", n_boot: int = 10_000) -> Dict:
    """Reads every complete ``eval.json`` under ``out_dir`` and writes ``results.md`` and ``results.json``.

    Per task and on average over tasks (unweighted): the base model, each
    arm's accuracy (mean and standard deviation over seeds) and the paired
    ``Bitune - LoRA`` difference with its 95% interval
    (:func:`bitune_jax.evaluation.stats.paired_bootstrap`: items and seeds
    resampled), and the verdict line for the average. Only seeds for which
    every arm is evaluated count (the others are listed as missing), so the
    table can be made while runs are still going.

    Returns ``{"text", "tasks", "average", "seeds", "missing", "verdict"}``.
    """
    if metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric {metric!r}; allowed: acc, acc_norm")
    pred_key = "pred" if metric == "acc" else "pred_norm"
    out_dir = os.path.abspath(out_dir)
    evals: Dict[str, Dict[int, Dict]] = {arm: {} for arm in ARMS}
    for path in sorted(glob.glob(os.path.join(out_dir, "seed*", "*", EVAL_FILE))):
        run_dir = os.path.dirname(path)
        arm, seed_dir = os.path.basename(run_dir), os.path.basename(os.path.dirname(run_dir))
        ev = _read_json(path)
        if arm in evals and seed_dir[4:].isdigit() and ev and ev.get("complete"):
            evals[arm][int(seed_dir[4:])] = ev
    all_seeds = sorted(set().union(*(set(v) for v in evals.values())))
    seeds = [s for s in all_seeds if all(s in evals[arm] for arm in ARMS)]
    missing = [f"seed {s} {arm}" for s in all_seeds for arm in ARMS if s not in evals[arm]]
    base = _read_json(os.path.join(out_dir, "base", EVAL_FILE))
    if not seeds:
        raise FileNotFoundError(f"{out_dir}: no seed has every arm ({', '.join(ARMS)}) evaluated yet"
                                + (f"; done: {', '.join(f'seed {s} {a}' for a in ARMS for s in evals[a])}"
                                   if any(evals.values()) else ""))
    tasks = [t for t in evals[BASELINE][seeds[0]]["tasks"] if all(t in evals[a][s]["tasks"] for a in ARMS
                                                                 for s in seeds)]

    def correct(ev, task):
        return np.array([float(r[pred_key] == r["gold"]) for r in ev["items"][task]])

    per_task, diffs = {}, {}
    for task in tasks:
        ids = [r["index"] for r in evals[BASELINE][seeds[0]]["items"][task]]
        for arm in ARMS:
            for s in seeds:
                if [r["index"] for r in evals[arm][s]["items"][task]] != ids:
                    raise ValueError(f"seed {s} {arm}: task {task} was scored on other items than seed {seeds[0]} "
                                     f"{BASELINE} (a different --limit?)")
        tables = {arm: np.stack([correct(evals[arm][s], task) for s in seeds]) for arm in ARMS}
        diffs[task] = tables["bitune"] - tables[BASELINE]
        per_task[task] = {"n": len(ids), **{arm: {"mean": float(t.mean()), "sd": float(t.mean(axis=1).std(ddof=1))
                                                  if len(seeds) > 1 else 0.0,
                                                  "per_seed": t.mean(axis=1).tolist()} for arm, t in tables.items()}}
        if base and task in base.get("tasks", {}):
            per_task[task]["base"] = base["tasks"][task][metric]
    ci = paired_bootstrap(diffs, n_boot=n_boot)
    for task in tasks:
        per_task[task]["bitune_minus_lora"] = dict(zip(("estimate", "low", "high"), ci[task][:3]))
    average = {"n": sum(p["n"] for p in per_task.values()),
               "bitune_minus_lora": dict(zip(("estimate", "low", "high"), ci["average"][:3]))}
    for arm in ARMS:
        per_seed = np.mean([per_task[t][arm]["per_seed"] for t in tasks], axis=0)
        average[arm] = {"mean": float(per_seed.mean()), "sd": float(per_seed.std(ddof=1)) if len(seeds) > 1 else 0.0,
                        "per_seed": per_seed.tolist()}
    if all("base" in per_task[t] for t in tasks):
        average["base"] = float(np.mean([per_task[t]["base"] for t in tasks]))
    plural = lambda n, word: f"{n} {word}" + ("s" if n != 1 else "")  # noqa: E731
    line = verdict(Interval(*ci["average"][:3]), context=f"{metric}, mean over {plural(len(tasks), 'task')}, "
                                                         f"{plural(len(seeds), 'seed')}, {average['n']} items")

    def pct(x):
        return f"{100 * x:.1f}"

    def arm_cell(v):
        return f"{pct(v['mean'])} ± {pct(v['sd'])}" if len(seeds) > 1 else pct(v["mean"])

    def diff_cell(d):
        return f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"

    head = "| task | n | base | LoRA | Bitune | Bitune - LoRA (95% interval) |"
    rows = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in list(per_task.items()) + [("average", average)]:
        b = p.get("base")
        rows.append(f"| {name} | {p['n']} | {pct(b) if b is not None else '-'} | {arm_cell(p['lora'])} | "
                    f"{arm_cell(p['bitune'])} | {diff_cell(p['bitune_minus_lora'])} |")
    text = "\n".join(rows + ["", line, f"{metric} in %, zero-shot; LoRA and Bitune: mean ± sd over seeds "
                             f"{', '.join(map(str, seeds))}; the interval resamples items and seeds."
                             + (f" Missing: {', '.join(missing)}." if missing else "")])
    result = {"text": text, "metric": metric, "tasks": per_task, "average": average, "seeds": seeds,
              "missing": missing, "verdict": line}
    write_text_atomic(os.path.join(out_dir, "results.md"), text + "\n")
    write_json_atomic(os.path.join(out_dir, "results.json"), result)
    return result
