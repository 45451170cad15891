"""Per-item statistics: mean and standard error, paired bootstrap intervals, and the verdict they support.

Two methods scored on the same items by several training seeds give, per
task, a table of per-item differences ``d[seed, item]`` (1 when only the
first is right, -1 when only the second is, 0 otherwise).
:func:`paired_bootstrap` turns those tables into percentile intervals of the
mean difference per task and of the unweighted mean over tasks, resampling
items and seeds (both are samples: the items of the benchmark, the seeds of
the training runs); :func:`verdict` writes the one line that interval
supports.

Example (two tasks, two seeds; Bitune right where LoRA is wrong on more items):

    >>> import numpy as np
    >>> d = {"sciq": np.array([[1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 0]]),
    ...      "arc_easy": np.array([[0, 1, -1, 1, 0], [1, 0, 0, 1, 0]])}
    >>> ci = paired_bootstrap(d, n_boot=2000, seed=0)
    >>> round(ci["sciq"].estimate, 3), round(ci["average"].estimate, 3)
    (0.5, 0.4)
    >>> ci["average"].low > 0
    True
    >>> verdict(ci["average"], context="2 tasks, 2 seeds")[:47]
    'Bitune beats LoRA: Bitune - LoRA = +40.0 points'
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np


def mean_stderr(x: Sequence[float]) -> Tuple[float, float]:
    """``(mean, standard error)`` of per-item values, the error as lm-evaluation-harness reports it.

    The standard error is ``std(x, ddof=1) / sqrt(n)``; it is nan for fewer
    than two items.

    >>> mean_stderr([1.0, 0.0, 1.0, 1.0])
    (0.75, 0.25)
    >>> mean_stderr([True])
    (1.0, nan)
    """
    x = np.asarray(x, np.float64)
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(np.mean(x)), se


class Interval(NamedTuple):
    """A point estimate with its two-sided interval at ``level`` (0.95: the 2.5% and 97.5% percentiles)."""

    estimate: float
    low: float
    high: float
    level: float = 0.95


def percentile_interval(replicates: Sequence[float], estimate: float, level: float = 0.95) -> Interval:
    """The percentile interval of bootstrap replicates: their ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.

    Quantiles interpolate linearly between order statistics (numpy's default).

    >>> percentile_interval(np.arange(101.0), 50.0, level=0.5)
    Interval(estimate=50.0, low=25.0, high=75.0, level=0.5)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must be in (0, 1)")
    low, high = np.quantile(np.asarray(replicates, np.float64), [(1.0 - level) / 2, (1.0 + level) / 2])
    return Interval(float(estimate), float(low), float(high), float(level))


def replicate_means(d: np.ndarray, seed_counts: np.ndarray, item_counts: np.ndarray) -> np.ndarray:
    """Mean of ``d [seeds, items]`` in each bootstrap replicate, given how often each seed and item was drawn.

    ``seed_counts [B, seeds]`` and ``item_counts [B, items]`` count the draws
    of each seed and item in replicate ``b`` (each row sums to the number of
    seeds / items). A resample of seeds and items is a weighted mean of the
    whole table: ``sum_s sum_i c_s w_i d[s, i] / (S * N)``.

    >>> d = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    >>> replicate_means(d, np.array([[1, 1], [0, 2]]), np.array([[2, 1, 0], [0, 0, 3]]))
    array([0.5, 1. ])
    """
    d = np.asarray(d, np.float64)
    s, n = d.shape
    by_item = np.asarray(seed_counts, np.float64) @ d  # [B, items]: the drawn seeds' sum per item
    return np.einsum("bi,bi->b", by_item, np.asarray(item_counts, np.float64)) / (s * n)


def paired_bootstrap(diffs: Mapping[str, np.ndarray], *, n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> Dict[str, Interval]:
    """Percentile bootstrap intervals of mean paired differences, resampling items and seeds.

    Args:
      diffs: per task, the per-item differences ``[seeds, items]`` of the two
        methods on the same items (row ``s``: both methods trained with seed
        ``s``). Every task has the same seeds, in the same order; a 1-D array
        is one seed.
      n_boot: bootstrap replicates.
      seed: seed of the resampling; the same inputs and seed give the same intervals.
      level: coverage of each interval.

    Each replicate draws the seeds with replacement once (shared by all
    tasks: a seed's run is scored on every task) and, for each task, its
    items with replacement (pairs stay together: an item's differences under
    every drawn seed go in). The estimate is the observed mean; the interval
    is :func:`percentile_interval` of the replicates.

    Returns:
      ``{task: Interval, ..., "average": Interval}``: each task's mean
      difference, and the unweighted mean over tasks.
    """
    if not diffs:
        raise ValueError("paired_bootstrap: no tasks given")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: must be >= 1")
    tables = {}
    for task, d in diffs.items():
        d = np.asarray(d, np.float64)
        d = d[None] if d.ndim == 1 else d
        if d.ndim != 2 or d.size == 0:
            raise ValueError(f"task {task!r}: differences must be a non-empty [seeds, items] table, got {d.shape}")
        tables[task] = d
    seeds = {d.shape[0] for d in tables.values()}
    if len(seeds) != 1:
        raise ValueError(f"every task needs the same seeds; got {({t: d.shape[0] for t, d in tables.items()})}")
    (s,) = seeds
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot)  # [B, seeds]
    reps, out = {}, {}
    for task, d in tables.items():
        n = d.shape[1]
        item_counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # [B, items]
        reps[task] = replicate_means(d, seed_counts, item_counts)
        out[task] = percentile_interval(reps[task], float(d.mean()), level)
    average = np.mean([reps[t] for t in tables], axis=0)
    out["average"] = percentile_interval(average, float(np.mean([d.mean() for d in tables.values()])), level)
    return out


def verdict(interval: Interval, *, first: str = "Bitune", second: str = "LoRA", scale: float = 100.0,
            unit: str = "points", context: Optional[str] = None) -> str:
    """The one-line conclusion an interval of ``first - second`` supports, and no more.

    Above 0 (``low > 0``): ``first`` beats ``second``; below 0 (``high < 0``):
    ``second`` beats ``first``; an interval that contains 0 is inconclusive:
    the runs cannot tell the two apart, and differences beyond the interval's
    ends are what they rule out. Numbers are multiplied by ``scale``
    (accuracy as a fraction -> points).

    >>> line = verdict(Interval(-0.01, -0.03, 0.02))
    >>> line[:line.index(";") + 1]
    'Inconclusive: Bitune - LoRA = -1.0 points, 95% interval [-3.0, +2.0] contains 0;'
    >>> line[line.index(";") + 2:]
    'these runs cannot tell Bitune and LoRA apart (they rule out only differences below -3.0 or above +2.0).'
    """
    est, lo, hi = (scale * v for v in interval[:3])
    pct = f"{100 * interval.level:g}%"
    where = f" ({context})" if context else ""
    numbers = f"{first} - {second} = {est:+.1f} {unit}, {pct} interval [{lo:+.1f}, {hi:+.1f}]{where}"
    if interval.low > 0:
        return f"{first} beats {second}: {numbers}, above 0."
    if interval.high < 0:
        return f"{second} beats {first}: {numbers}, below 0."
    return (f"Inconclusive: {numbers} contains 0; these runs cannot tell {first} and {second} apart "
            f"(they rule out only differences below {lo:+.1f} or above {hi:+.1f}).")
