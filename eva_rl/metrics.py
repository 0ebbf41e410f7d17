"""Continual-learning metrics on plain numpy arrays (Continual World definitions).

A success matrix ``S`` has one row per point in the sequence and one column per task:
``S[i, j]`` is the success rate on task ``j`` measured after training task ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def _matrix(S: ArrayLike, square: bool = False) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.size == 0:
        raise ValueError(f"success matrix must be a non-empty 2-D array, got shape {S.shape}")
    if square and S.shape[0] != S.shape[1]:
        raise ValueError(f"success matrix must be square (tasks x tasks), got shape {S.shape}")
    if not np.all(np.isfinite(S)):
        raise ValueError("success matrix contains NaN or inf (an unfinished run?)")
    return S


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or inf")
    return v


def average_performance(S: ArrayLike) -> float:
    """Mean success over tasks at the end of the sequence (the last row of ``S``)."""
    return float(_matrix(S)[-1].mean())


def forgetting_per_task(S: ArrayLike) -> np.ndarray:
    """``S[j, j] - S[T-1, j]`` for every task ``j`` (the last task's entry is 0 by definition)."""
    S = _matrix(S, square=True)
    return np.diag(S) - S[-1]


def forgetting(S: ArrayLike) -> float:
    """Average forgetting over the first ``T - 1`` tasks.

    The last task is left out: nothing is trained after it, so its forgetting is 0 by
    construction and would only pull the average towards 0. For ``T == 1`` this is 0.
    """
    per_task = forgetting_per_task(S)
    if per_task.size == 1:
        return 0.0
    return float(per_task[:-1].mean())


def forward_transfer_per_task(auc: ArrayLike, auc_reference: ArrayLike) -> np.ndarray:
    """``(AUC - AUC_ref) / (1 - AUC_ref)`` per task.

    Where the reference already has ``AUC_ref == 1`` there is no room to improve and the
    ratio is undefined; the plain difference ``AUC - 1`` (0 when both are perfect, negative
    otherwise) is used there instead.
    """
    auc = _vector(auc, "auc")
    ref = _vector(auc_reference, "auc_reference")
    if auc.shape != ref.shape:
        raise ValueError(f"auc has {auc.size} tasks but auc_reference has {ref.size}")
    room = 1.0 - ref
    full = np.isclose(room, 0.0)
    return np.where(full, auc - ref, (auc - ref) / np.where(full, 1.0, room))


def forward_transfer(auc: ArrayLike, auc_reference: ArrayLike) -> float:
    """Forward transfer averaged over tasks (see :func:`forward_transfer_per_task`)."""
    return float(forward_transfer_per_task(auc, auc_reference).mean())


def success_auc(curve: ArrayLike, steps: ArrayLike | None = None) -> float:
    """Area under a success curve sampled during training, normalised to ``[0, 1]``.

    ``curve[k]`` is the success rate measured at training step ``steps[k]`` (evenly spaced if
    ``steps`` is None). Trapezoidal rule divided by the step range; a single sample is its
    own value.
    """
    y = _vector(curve, "curve")
    if y.size == 1:
        return float(y[0])
    x = np.arange(y.size, dtype=np.float64) if steps is None else _vector(steps, "steps")
    if x.shape != y.shape:
        raise ValueError(f"curve has {y.size} points but steps has {x.size}")
    if np.any(np.diff(x) <= 0):
        raise ValueError("steps must be strictly increasing")
    area = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    return area / float(x[-1] - x[0])


def mean_and_stderr(values: ArrayLike) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``; NaN for one value)."""
    v = _vector(values, "values")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def bootstrap_ci(
    values: ArrayLike, confidence: float = 0.9, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (e.g. over seeds)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    v = _vector(values, "values")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)
