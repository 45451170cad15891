"""The training loop: data, step, checkpoint and log in one file, top to bottom.

``train(cfg)`` runs one :class:`~bitune_jax.config.Config` and returns a summary
dict; ``bitune-jax train CONFIG.yaml [key=value ...]`` does the same from the
shell. A run writes into ``train.output_dir``::

    train.lock         held while a run writes here (see bitune_jax.training.run_lock)
    config.yaml        the resolved config (written at start)
    checkpoints/<step> orbax checkpoints (see bitune_jax.training.checkpoint)
    metrics.jsonl      train records every log_every steps, eval records, events
    tb/                TensorBoard events of the same scalars
    training.png       loss curves and alpha_k / alpha_v per layer (at the end)
    summary.json       what the run did (at the end, also after a stop)

Steps are counted from 1: the record and the checkpoint of step ``s`` hold
the state after ``s`` optimizer updates; the loss of step ``s`` is computed
before its update. Each update consumes ``optim.grad_accum`` batches.

Starting a run again with the same output directory resumes from the newest
complete checkpoint: adapters, optimizer state, step and data position are
restored, so the continued run computes bitwise what an uninterrupted run
would have (on the same devices). A newer checkpoint that does not restore
completely or fails its checksums is skipped with a warning and moved to
``checkpoints/skipped/`` (never deleted). Resuming is refused when the config
differs in a field that changes training (``allow_optim_change`` accepts
changed ``optim.*`` hyperparameters), or when the base model's content hash
changed (see :func:`bitune_jax.training.checkpoint.check_resume`). A second
run into the same output directory while one runs is refused
(:class:`~bitune_jax.training.run_lock.RunLockedError`).

What a run should not keep quiet about is printed and recorded as events in
``metrics.jsonl`` and ``summary.json`` (``events``): skipped checkpoints,
changed optimizer hyperparameters, updates that exploded and gradients that
vanished (:class:`~bitune_jax.training.metrics.HealthCheck`). The data's
counts (rows read, bad rows skipped, prompts truncated or dropped for length)
are printed at the start and recorded in ``summary.json`` (``data``).

Failures:

* a non-finite loss stops the run before anything is saved from the bad
  state, and raises :class:`NonFiniteLossError` naming the step; the last
  checkpoint stays the newest; resume from it with a lower ``optim.lr`` and
  ``allow_optim_change=True`` (``--allow-optim-change``);
* SIGTERM (preemption) finishes the current step, saves a checkpoint, waits
  for it to be complete on disk and returns with ``status == "stopped"``
  (the command exits 0); run the same command again to continue.

Multi-process: every process runs this same code on its own data shard
(``data.train_iterator`` splits each global batch); the global batch is
assembled with ``jax.make_array_from_process_local_data``; orbax writes
checkpoints collectively; process 0 alone prints and writes metrics, plot and
summary.

Example (a notebook)::

    from bitune_jax.config import load_config
    from bitune_jax.training.loop import train
    summary = train(load_config("configs/smollm2_demo.yaml", ["train.steps=20"]))
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from bitune_jax import bitune
from bitune_jax.config import Config, config_to_dict, save_config
from bitune_jax.conversion import assets, load_model
from bitune_jax.fileio import check_writable, write_json_atomic
from bitune_jax.data import pipeline as data
from bitune_jax.model import attention
from bitune_jax.training import checkpoint, metrics, run_lock
from bitune_jax.training import sharding as shd
from bitune_jax.training import step as ts


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite."""


def train(cfg: Config, *, allow_base_change: bool = False, allow_optim_change: bool = False,
          break_lock: bool = False, model=None) -> dict:
    """Trains (or resumes) the run ``cfg`` describes; returns the summary (also in ``summary.json``).

    ``allow_optim_change``: resume even though ``optim.*`` hyperparameters
    differ from the checkpoint's (e.g. a lower ``optim.lr`` after a
    non-finite loss); recorded as an ``optim_changed`` event.
    ``break_lock``: take over the output directory's lock even if another
    run seems to hold it (see :mod:`bitune_jax.training.run_lock`).
    ``model``: the already loaded ``cfg.model.source`` (``convert.load_model``
    with its tokenizer, in ``cfg.model.dtype``), so that several runs on one
    base model load it once; it is not modified. By default the loop loads it.

    Raises ``NonFiniteLossError`` on a NaN/inf loss, ``checkpoint.ResumeError``
    when the output directory holds a checkpoint this config may not continue,
    ``checkpoint.CheckpointError`` when it holds checkpoints but none restores,
    ``run_lock.RunLockedError`` when another run is writing there.
    """
    out_dir = os.path.abspath(cfg.train.output_dir)
    main = jax.process_index() == 0
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if main else (lambda msg: None)
    check_writable(out_dir, folder=True)  # a read-only or misplaced output_dir fails before the model loads
    with run_lock.hold(out_dir, break_lock=break_lock, main=main, say=say):
        return _train(cfg, out_dir, main, say, allow_base_change=allow_base_change,
                      allow_optim_change=allow_optim_change, model=model)


def _train(cfg: Config, out_dir: str, main: bool, say, *, allow_base_change: bool, allow_optim_change: bool,
           model) -> dict:
    """The body of :func:`train`, run while this process holds the output directory's lock."""
    t_start = time.time()

    # --- Model and data -------------------------------------------------------
    model_path = assets.resolve_model_source(cfg.model.source)
    loaded_here = model is None
    if loaded_here:
        model = load_model(model_path, dtype=cfg.model.dtype)
    if model.tokenizer is None:
        raise data.DataError(f"{model_path}: no tokenizer files; training reads text rows")
    # An attention implementation that cannot serve this model fails here, not after compiling.
    attention.resolve(cfg.model.attention, softcap=model.cfg.attn_logit_softcap)
    base_ref = checkpoint.base_reference(cfg.model.source, model_path)
    train_it, train_stats = data.train_iterator(model.tokenizer, cfg.data,
                                                batches=cfg.train.steps * cfg.optim.grad_accum)
    eval_ds, eval_stats = data.eval_dataset(model.tokenizer, cfg.data) if cfg.data.eval is not None else (None, None)
    data_counts = {}
    for split, stats in (("train", train_stats), ("eval", eval_stats)):
        if stats is not None:  # rows skipped or cut are printed, not only logged
            data_counts[split] = stats.counts()
            say(f"data ({split}): {stats.summary()}" + (f"; e.g. {stats.problems[0]}" if stats.problems else ""))

    # --- Mesh, optimizer, state, the jitted step -----------------------------
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if jax.process_count() > 1 and cfg.data.batch_size % batch_devices:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be a multiple of mesh data*fsdp="
                         f"{batch_devices} when training on {jax.process_count()} processes")
    method = cfg.method
    optimizer = ts.make_optimizer(cfg.optim, total_steps=cfg.train.steps)
    trainable = bitune.init_trainable(jax.random.PRNGKey(cfg.train.seed), model.cfg, method, model.params)
    state, base = ts.place(mesh, ts.init_state(trainable, optimizer), model.params, cfg=model.cfg,
                           rules=cfg.mesh.table)
    trainable = None  # the placed copies are used from here on
    if loaded_here:
        model.params = None

    # Packed rows per process: a multiple of this process's share of the batch devices, so rows split evenly.
    packed_rows = max(1, batch_devices // jax.process_count())

    def next_batch():
        """``grad_accum`` local batches padded to one shape, concatenated, made one global array."""
        parts = [next(train_it) for _ in range(cfg.optim.grad_accum)]
        if cfg.data.packing:  # equal row blocks, one per part: the step's micro-batches
            local = data.concat_packed(parts, packed_rows)
            return _global_batch(mesh, local, cfg.mesh.table), data.real_tokens(local) * jax.process_count()
        P = max(p["prompt_ids"].shape[1] for p in parts)
        A = max(p["answer_ids"].shape[1] for p in parts)
        local = {k: np.concatenate([_pad_to(p[k], P if k == "prompt_ids" else A) for p in parts])
                 for k in ("prompt_ids", "prompt_len", "answer_ids", "answer_len")}
        tokens = int(local["prompt_len"].sum() + local["answer_len"].sum()) * jax.process_count()
        return _global_batch(mesh, local, cfg.mesh.table), tokens

    # --- Resume from the newest complete checkpoint ---------------------------
    ckpt = checkpoint.Checkpoints(os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                  async_save=cfg.train.async_checkpoint, say=say)
    config_dict = config_to_dict(cfg)
    optim_changed = {}

    def accept(step, saved_config, saved_base):
        where = os.path.join(ckpt.directory, str(step))
        # Keys an older release did not write take their defaults, which are what that release used.
        saved = config_to_dict(Config.from_dict(saved_config, source=os.path.join(where, "config")))
        optim_changed.clear()
        optim_changed.update(checkpoint.check_resume(saved, config_dict, saved_base, base_ref,
                                                     allow_base_change=allow_base_change,
                                                     allow_optim_change=allow_optim_change, where=where))

    try:
        resumed = ckpt.restore_newest(state, accept)
    except BaseException:
        ckpt.close()  # else orbax's pending tasks print "Event loop is closed" tracebacks at exit
        raise
    start, events = 0, []
    if resumed is not None:
        start, state = resumed.step, resumed.state
        train_it.set_state(resumed.data)
        for skipped, why, moved_to in resumed.skipped:
            events.append(("checkpoint_skipped", f"skipped checkpoint {skipped} ({why}); moved it to {moved_to}",
                           {"checkpoint_step": skipped, "moved_to": moved_to}))
        if optim_changed:
            events.append(("optim_changed", "resuming with changed optimizer hyperparameters (allow_optim_change): "
                           + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in optim_changed.items()),
                           {"changes": {k: list(v) for k, v in optim_changed.items()}}))
        for _, message, _ in events:
            say(f"warning: {message}")
        say(f"resuming from {os.path.join(ckpt.directory, str(start))} (step {start} of {cfg.train.steps})")
    if main:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    log = metrics.MetricsWriter(out_dir, resume_step=start, enabled=main)
    for kind, message, fields in events:
        log.event(start, kind, message, **fields)

    batch = tokens = step_fn = None
    if start < cfg.train.steps:  # the first batch gives the step its example shapes
        batch, tokens = next_batch()
        step_fn = ts.make_train_step(model.cfg, method, optimizer, mesh=mesh, rules=cfg.mesh.table, state=state,
                                     base=base, batch=batch,
                                     grad_accum=cfg.optim.grad_accum, remat=cfg.train.remat,
                                     attention=cfg.model.attention,
                                     dropout_seed=cfg.train.seed if cfg.method.peft.dropout > 0 else None)
    else:
        say(f"{out_dir} already holds the checkpoint of the last step ({start}); nothing to train")
    eval_loss_fn = jax.jit(lambda tr, b, x: bitune.loss_fn(tr, b, model.cfg, method, x,
                                                           attention=cfg.model.attention)[0],
                           out_shardings=shd.replicated(mesh))
    lr_at = ts.make_schedule(cfg.optim.lr, cfg.optim.schedule, cfg.train.steps, cfg.optim.warmup_ratio)
    param_norm_fn = jax.jit(optax.global_norm, out_shardings=shd.replicated(mesh))
    health = metrics.HealthCheck(sum(x.size for x in jax.tree_util.tree_leaves(state.trainable)),
                                 _host(param_norm_fn(state.trainable)))

    def evaluate(step):
        n = min(len(eval_ds), cfg.train.eval_batches)
        local = (data.concat_packed([eval_ds[i]], packed_rows) if cfg.data.packing else eval_ds[i] for i in range(n))
        losses = [_host(eval_loss_fn(state.trainable, base, _global_batch(mesh, b, cfg.mesh.table))) for b in local]
        rec = {"step": step, "split": "eval", "loss": float(np.mean(losses)), "batches": n}
        log.write(rec)
        return rec["loss"]

    def save(step):
        ckpt.save(step, state, train_it.get_state(), config_dict, base_ref)

    # --- The loop -------------------------------------------------------------
    status, step, saved = "completed", start, start
    window, window_tokens, t_window = [], 0, time.time()
    train_loss = eval_loss = None
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not main, desc="train", dynamic_ncols=True)
    try:
        with _SigtermFlag() as sigterm:
            while step < cfg.train.steps:
                if batch is None:
                    batch, tokens = next_batch()
                state, m = step_fn(state, base, batch)
                batch, step = None, step + 1
                loss = _host(m["loss"])  # replicated: every process sees the same value
                if not math.isfinite(loss):
                    status = "non_finite"
                    break
                grad_norm, param_norm = _host(m["grad_norm"]), _host(param_norm_fn(state.trainable))
                for kind, message in health.update(step, loss, grad_norm, param_norm):
                    say(f"warning: {message}")
                    log.event(step, kind, message)
                window.append(loss)
                window_tokens += tokens
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    now = time.time()
                    train_loss = float(np.mean(window))
                    rec = {"step": step, "split": "train", "loss": train_loss, "loss_steps": len(window),
                           "grad_norm": grad_norm, "param_norm": param_norm, "lr": float(lr_at(step - 1)),
                           "answer_tokens": int(_host(m["answer_tokens"])),
                           "tokens_per_s": window_tokens / max(now - t_window, 1e-9), "elapsed_s": now - t_start}
                    for name in ("alpha_k", "alpha_v"):
                        if name in m:
                            rec[name] = np.asarray(m[name].addressable_data(0)).tolist()
                    log.write(rec)
                    post = {"loss": f"{train_loss:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                    if "alpha_k" in rec:
                        post["alpha"] = f"{np.mean(rec['alpha_k'] + rec['alpha_v']):.3f}"
                    bar.set_postfix(post, refresh=False)
                    window, window_tokens, t_window = [], 0, now
                at_end = step == cfg.train.steps
                if eval_ds is not None and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or at_end):
                    eval_loss = evaluate(step)
                    say(f"step {step}: eval loss {eval_loss:.4f}")
                if step % cfg.train.save_every == 0 or at_end:
                    save(step)
                    saved = step
                if checkpoint.any_process(sigterm.requested):
                    status = "stopped"
                    if saved != step:
                        save(step)
                        saved = step
                    break
    finally:  # also on errors: a started asynchronous save completes, files are closed
        bar.close()
        ckpt.close()
        log.close()

    # --- The end: messages, plot, summary --------------------------------------
    latest = ckpt.latest_step()
    last_ckpt = os.path.join(ckpt.directory, str(latest)) if latest else None
    summary = {"status": status, "step": step, "start_step": start, "steps": cfg.train.steps,
               "train_loss": train_loss, "eval_loss": eval_loss, "seconds": time.time() - t_start,
               "output_dir": out_dir, "checkpoint": last_ckpt, "base": base_ref,
               "metrics": log.path, "plot": None, "data": data_counts,
               "optim_changed": {k: list(v) for k, v in optim_changed.items()},
               "events": [r for r in metrics.read_metrics(log.path) if r.get("split") == metrics.EVENT] if main else []}
    if main:
        summary["plot"] = metrics.plot_training(log.path, os.path.join(out_dir, metrics.PLOT_FILE))
        write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    if status == "non_finite":
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) at step {step}; stopped without saving it. "
            + (f"The last good checkpoint is {last_ckpt}; lower optim.lr (or check the data) and resume from "
               "it with --allow-optim-change (train(..., allow_optim_change=True)), e.g. "
               f"`bitune-jax train CONFIG optim.lr={cfg.optim.lr / 10:g} --allow-optim-change`."
               if last_ckpt else "No checkpoint was written; lower optim.lr (or check the data) and start again."))
    if status == "stopped":
        say(f"SIGTERM received: saved checkpoint {last_ckpt} at step {step}; run the same command to resume")
    return summary


# ----------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------


def _pad_to(x: np.ndarray, width: int) -> np.ndarray:
    """Right-pads ``[B, n]`` ids with 0 to ``[B, width]``; lengths ``[B]`` pass through."""
    if x.ndim == 1 or x.shape[1] == width:
        return x
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _global_batch(mesh, local, rules):
    """This process's rows of every batch array -> one global ``jax.Array`` split over (data, fsdp)."""
    n = jax.process_count()

    def one(x):
        shape = (x.shape[0] * n,) + x.shape[1:]
        sharding = shd.batch_sharding(mesh, jax.ShapeDtypeStruct(shape, x.dtype), rules)
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return {k: one(v) for k, v in local.items() if k != "example_id"}


def _host(x) -> float:
    """A replicated scalar as a Python float (works on any process)."""
    return float(np.asarray(x.addressable_data(0)))


class _SigtermFlag:
    """Within the ``with`` block, SIGTERM sets ``requested`` instead of killing the process."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
