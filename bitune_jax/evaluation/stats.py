"""Mean and standard error of per-item scores (accuracies, exact matches, paired differences)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

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
