"""Training metrics: a JSONL log, TensorBoard events and the final PNG.

Every record is one JSON line in ``<output_dir>/metrics.jsonl``::

    {"step": 10, "split": "train", "loss": 2.31, "grad_norm": 0.8, "lr": 3e-4,
     "tokens_per_s": 5400.0, "alpha_k": [0.51, ...], "alpha_v": [...], ...}
    {"step": 50, "split": "eval", "loss": 2.2, "batches": 10}

Events are lines of their own, in the JSONL file only (:meth:`MetricsWriter.event`)::

    {"step": 2, "split": "event", "event": "exploding_updates", "message": "..."}

They record what a run should not keep quiet about: a checkpoint skipped on
resume, changed optimizer hyperparameters, and the warnings of
:class:`HealthCheck` (updates that exploded, gradients that vanished).

Scalars also go to TensorBoard under ``<output_dir>/tb`` (``train/loss``,
``eval/loss``, ``train/alpha_k/layer_03``, ...). Lines are flushed as they
are written, so a killed run leaves whole lines (a torn last line is dropped
when the run resumes, see :func:`truncate_after`). Only process 0 writes.

Example:

    >>> import os, tempfile
    >>> run = tempfile.mkdtemp()
    >>> w = MetricsWriter(run)
    >>> w.write({"step": 1, "split": "train", "loss": 2.0, "alpha_k": [0.5, 0.5]})
    >>> w.write({"step": 2, "split": "train", "loss": 1.5, "alpha_k": [0.4, 0.6]})
    >>> w.close()
    >>> [r["loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))]
    [2.0, 1.5]
    >>> sorted(os.listdir(run))
    ['metrics.jsonl', 'tb']
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

from bitune_jax.fileio import atomic_path, write_jsonl_atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
PLOT_FILE = "training.png"
EVENT = "event"  # the split of event records

# HealthCheck thresholds. Adapter weights are O(0.01-1) and an Adam step moves each by about optim.lr.
EXPLODED_GROWTH = 10.0  # adapter norm growing more than this in one step: update > 9x the weights
EXPLODED_RMS = 100.0  # adapter weights' root mean square beyond this
VANISHED_GRAD_NORM = 1e-10  # a gradient norm at or below this, with the loss above VANISHED_MIN_LOSS,
VANISHED_STEPS = 3  # for this many steps in a row: the gradients vanished
VANISHED_MIN_LOSS = 1e-3


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics JSONL file (a torn or bad line is skipped)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def truncate_after(path: str, step: int) -> None:
    """Keeps only records with ``step <= step`` (atomically).

    A resumed run recomputes the steps after its checkpoint; dropping their
    old records keeps one record per step, as in an uninterrupted run.
    """
    if not os.path.isfile(path):
        return
    write_jsonl_atomic(path, [r for r in read_metrics(path) if r["step"] <= step])


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and scalars to TensorBoard.

    Args:
      output_dir: the run's folder.
      resume_step: step of the checkpoint being resumed (None for a fresh
        run): later records are dropped from the JSONL file and TensorBoard
        purges its events after this step.
      enabled: False makes every method a no-op (processes other than 0).
    """

    def __init__(self, output_dir: str, resume_step: Optional[int] = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        truncate_after(self.path, resume_step or 0)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(output_dir, TB_DIR),
                                 purge_step=None if resume_step is None else resume_step + 1, flush_secs=30)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """One JSONL line; numeric fields (and per-layer lists) to TensorBoard as ``<split>/<name>``."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step, split = int(record["step"]), record.get("split", "train")
        if split == EVENT:
            return
        for name, value in record.items():
            if name in ("step", "split"):
                continue
            if isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    self._tb.add_scalar(f"{split}/{name}/layer_{i:02d}", float(v), step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{split}/{name}", float(value), step)

    def event(self, step: int, kind: str, message: str, **fields) -> None:
        """One event record (JSONL only): ``{"step", "split": "event", "event": kind, "message", **fields}``."""
        self.write({"step": step, "split": EVENT, "event": kind, "message": message, **fields})

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            self.enabled = False


class HealthCheck:
    """Warns when training goes wrong without a NaN: updates that explode, gradients that vanish.

    An absurd learning rate (``optim.lr=1e10``) need not produce a NaN: the
    first large update saturates the model, every later gradient is exactly
    0, the loss stays flat and the run "completes". :meth:`update` sees each
    step's loss, gradient norm and adapter norm and returns the warnings due:

    * ``exploding_updates``: the adapters' norm grew more than
      :data:`EXPLODED_GROWTH` times in one step (the update was larger than
      the weights), or their root mean square exceeds :data:`EXPLODED_RMS`;
    * ``vanishing_gradients``: the gradient norm was at most
      :data:`VANISHED_GRAD_NORM` for :data:`VANISHED_STEPS` steps in a row
      while the loss stayed above :data:`VANISHED_MIN_LOSS`.

    Each kind is reported once.

    >>> h = HealthCheck(param_count=100, param_norm=1.0)
    >>> h.update(1, loss=2.0, grad_norm=0.5, param_norm=1.1)
    []
    >>> [kind for kind, _ in h.update(2, loss=2.0, grad_norm=0.5, param_norm=5e10)]
    ['exploding_updates']
    >>> [h.update(s, loss=2.0, grad_norm=0.0, param_norm=5e10) for s in (3, 4)]
    [[], []]
    >>> [kind for kind, _ in h.update(5, loss=2.0, grad_norm=0.0, param_norm=5e10)]
    ['vanishing_gradients']
    """

    def __init__(self, param_count: int, param_norm: float):
        self._count = max(int(param_count), 1)
        self._norm = float(param_norm)
        self._flat = 0  # steps in a row with a vanished gradient
        self._reported = set()

    def update(self, step: int, loss: float, grad_norm: float, param_norm: float):
        """The warnings this step raises: ``[(kind, message)]``."""
        found = []
        rms = param_norm / math.sqrt(self._count)
        if (not math.isfinite(param_norm) or param_norm > EXPLODED_GROWTH * max(self._norm, 1e-30)
                or rms > EXPLODED_RMS):
            found.append(("exploding_updates",
                          f"step {step}: the updates exploded: the adapters' norm went from {self._norm:.3g} to "
                          f"{param_norm:.3g} in one step (weights' RMS {rms:.3g}); lower optim.lr. The checkpoints "
                          "from here on hold the exploded weights"))
        self._norm = param_norm
        self._flat = self._flat + 1 if grad_norm <= VANISHED_GRAD_NORM and loss > VANISHED_MIN_LOSS else 0
        if self._flat >= VANISHED_STEPS:
            found.append(("vanishing_gradients",
                          f"step {step}: the gradients vanished: gradient norm {grad_norm:.3g} for {self._flat} "
                          f"steps in a row while the loss is {loss:.4g}, so training has stalled (too large "
                          "updates saturate the model); lower optim.lr"))
        found = [(kind, message) for kind, message in found if kind not in self._reported]
        self._reported.update(kind for kind, _ in found)
        return found


def plot_training(metrics_path: str, png_path: str) -> Optional[str]:
    """Draws the loss curves and, for mixed variants, alpha_k / alpha_v per layer.

    Left: train loss (and eval loss) against step. Middle and right (when the
    records carry ``alpha_k`` / ``alpha_v``): one line per layer, coloured
    from the first layer (dark) to the last (light). Returns ``png_path``, or
    None when there is nothing to plot.
    """
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split", "train") == "train" and _finite(r.get("loss"))]
    evals = [r for r in records if r.get("split") == "eval" and _finite(r.get("loss"))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mixed = [r for r in train if "alpha_k" in r]
    panels = 3 if mixed else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean answer-token NLL)")
    ax.set_title("loss")
    ax.legend()
    if mixed:
        steps = [r["step"] for r in mixed]
        for ax, name in zip(axes[0, 1:], ("alpha_k", "alpha_v")):
            values = np.asarray([r[name] for r in mixed], np.float64)  # [records, layers]
            colors = plt.cm.viridis(np.linspace(0, 0.9, values.shape[1]))
            for layer in range(values.shape[1]):
                ax.plot(steps, values[:, layer], color=colors[layer], lw=1,
                        label=f"layer {layer}" if layer in (0, values.shape[1] - 1) else None)
            ax.set_xlabel("step")
            ax.set_title(f"{name} per layer")
            ax.legend(fontsize="small")
    return save_figure(fig, png_path)


def save_figure(fig, png_path: str) -> str:
    """Lays out ``fig``, writes it as PNG atomically and closes it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return png_path


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
