"""The continual-learning accuracy matrix and the summary numbers computed from it.

``R`` has T + 1 rows and T columns (T = number of tasks):

* row 0 is the starting model (before any training); rows 1..T are "after training through task t";
* column ``i - 1`` holds task ``i`` (tasks are 1-based in the formulas, columns 0-based in Python).

So the paper's R_{t,i} is ``R[t][i - 1]``; the diagonal "just after learning task i" is ``R[i][i - 1]``
and "task i before it was trained on" is ``R[i - 1][i - 1]``. Entries never evaluated are ``None`` or NaN;
a runner that evaluates only the diagonal and the last row still gets OP and both BWTs, and a summary
number whose inputs are missing comes out as ``None`` rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]] | np.ndarray


def _as_array(R: Matrix) -> np.ndarray:
    """Float array with NaN for missing entries, checked to be (T + 1) x T."""
    arr = np.array(R, dtype=float)  # None -> NaN
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.shape[0] != arr.shape[1] + 1:
        raise ValueError(f"accuracy matrix must be (T+1) x T with T >= 1, got shape {arr.shape}")
    return arr


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of the terms, or None when there are none or any of them is missing."""
    if values.size == 0 or np.isnan(values).any():
        return None
    return float(values.mean())


def _last_minus_diagonal(arr: np.ndarray) -> np.ndarray:
    """R[T][i-1] - R[i][i-1] for tasks i = 1..T (the last term is 0 by construction)."""
    T = arr.shape[1]
    tasks = np.arange(1, T + 1)
    return arr[T, tasks - 1] - arr[tasks, tasks - 1]


def overall_performance(R: Matrix) -> float | None:
    """OP = (1/T) * sum_i R[T][i-1]: mean score over all tasks after the last one."""
    arr = _as_array(R)
    return _mean_or_none(arr[-1])


def bwt_trace(R: Matrix) -> float | None:
    """TRACE's BWT = (1/T) * sum_{i=1..T} (R_{T,i} - R_{i,i}); the i = T term is 0 but counts."""
    return _mean_or_none(_last_minus_diagonal(_as_array(R)))


def bwt_gem(R: Matrix) -> float | None:
    """GEM's BWT = (1/(T-1)) * sum_{i=1..T-1} (R_{T,i} - R_{i,i}); None when T = 1."""
    return _mean_or_none(_last_minus_diagonal(_as_array(R))[:-1])


def fwt(R: Matrix) -> float | None:
    """FWT = (1/(T-1)) * sum_{i=2..T} (R_{i-1,i} - R_{0,i}), with row 0 (the starting model) as baseline.

    R_{i-1,i} is ``R[i-1][i-1]`` (task i scored just before training on it); None when T = 1 or when
    row 0 or any of those entries was not evaluated.
    """
    arr = _as_array(R)
    T = arr.shape[1]
    tasks = np.arange(2, T + 1)
    return _mean_or_none(arr[tasks - 1, tasks - 1] - arr[0, tasks - 1])


def own_task_score(R: Matrix) -> float | None:
    """(1/T) * sum_i R_{i,i}: each task's score right after training on it, the plasticity that
    BWT alone hides (a strategy that learns nothing forgets nothing); None if any is missing."""
    arr = _as_array(R)
    tasks = np.arange(1, arr.shape[1] + 1)
    return _mean_or_none(arr[tasks, tasks - 1])


def summarize(R: Matrix) -> dict[str, float | None]:
    """All summary numbers at once; ``None`` where the matrix lacks what a number needs."""
    return {"OP": overall_performance(R), "BWT_TRACE": bwt_trace(R), "BWT_GEM": bwt_gem(R), "FWT": fwt(R)}
