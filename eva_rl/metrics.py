"""Continual-learning metrics on plain numpy arrays, as Continual World computes them.

A success matrix ``S`` has one row per point in the sequence and one column per task:
``S[i, j]`` is the success rate on task ``j`` measured after training task ``i``.

The defaults follow Continual World's ``results_processing/tables.py`` (Wołczyk et al.,
2021): forgetting averaged over all ``T`` tasks, forward transfer as a ratio of seed means,
the AUC as the plain mean of the evaluations during a task's training, 90% percentile
bootstrap intervals from 4000 resamples. Continual World averages the last 5 evaluations
of a stage; a success matrix here holds one evaluation (of many episodes) per stage, which
is that rule with a tail of one. Variants that earlier versions of eva-rl reported keep
their own names: :func:`forgetting_excluding_last`, :func:`forward_transfer_mean_of_ratios`
and :func:`success_auc_trapezoid`.
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


def _runs(values: ArrayLike, name: str) -> np.ndarray:
    """A (runs, tasks) array; one run's 1-D vector is one row."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"{name} must be a (tasks,) or (runs, tasks) array, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or inf")
    return v


# ----------------------------------------------------------------------------- performance


def average_performance(S: ArrayLike) -> float:
    """Mean success over tasks at the end of the sequence (the last row of ``S``)."""
    return float(_matrix(S)[-1].mean())


def forgetting_per_task(S: ArrayLike) -> np.ndarray:
    """``S[j, j] - S[T-1, j]`` for every task ``j`` (the last task's entry is 0 by definition)."""
    S = _matrix(S, square=True)
    return np.diag(S) - S[-1]


def forgetting(S: ArrayLike) -> float:
    """Average forgetting over all ``T`` tasks, the last task's 0 included (Continual World).

    Continual World's ``calculate_forgetting_individual`` gives every task a column, the
    last one included, and averages over all of them: the sum is divided by ``T``.
    Negative values (the task got better later) are kept, not clipped.
    """
    return float(forgetting_per_task(S).mean())


def forgetting_excluding_last(S: ArrayLike) -> float:
    """Variant: average forgetting over the first ``T - 1`` tasks (0 for ``T == 1``).

    What eva-rl reported before it followed Continual World; larger than
    :func:`forgetting` by the factor ``T / (T - 1)``.
    """
    per_task = forgetting_per_task(S)
    if per_task.size == 1:
        return 0.0
    return float(per_task[:-1].mean())


# ----------------------------------------------------------------------------- forward transfer


def _normalised_gain(auc: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``(auc - ref) / (1 - ref)``; where ``ref == 1`` there is no room to improve and the
    ratio is undefined, so the plain difference ``auc - 1`` (0 or negative) is used."""
    room = 1.0 - ref
    full = np.isclose(room, 0.0)
    return np.where(full, auc - ref, (auc - ref) / np.where(full, 1.0, room))


def forward_transfer_per_task(auc: ArrayLike, auc_reference: ArrayLike) -> np.ndarray:
    """Continual World's normalised forward transfer per task, from seed means.

    ``auc`` is the AUC of each task during the continual run, shape ``(tasks,)`` or
    ``(seeds, tasks)``; ``auc_reference`` the same for single-task runs from the same
    starting model (its seeds need not pair with ``auc``'s). Per task:
    ``(mean AUC - mean AUC_ref) / (1 - mean AUC_ref)``, means over seeds. A ratio of means,
    not a mean of per-seed ratios, which blows up when a reference nearly solves its task.
    """
    x, y = _runs(auc, "auc"), _runs(auc_reference, "auc_reference")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"auc has {x.shape[1]} tasks but auc_reference has {y.shape[1]}")
    return _normalised_gain(x.mean(axis=0), y.mean(axis=0))


def forward_transfer(auc: ArrayLike, auc_reference: ArrayLike) -> float:
    """Forward transfer averaged over tasks (see :func:`forward_transfer_per_task`)."""
    return float(forward_transfer_per_task(auc, auc_reference).mean())


def forward_transfer_mean_of_ratios(auc: ArrayLike, auc_reference: ArrayLike) -> float:
    """Variant: the mean over seeds of each seed's forward transfer against its paired
    reference (row ``r`` of ``auc`` with row ``r`` of ``auc_reference``).

    What eva-rl reported before it followed Continual World. One seed's ratio is large
    and noisy when its reference nearly solves the task, and the mean inherits that.
    """
    x, y = _runs(auc, "auc"), _runs(auc_reference, "auc_reference")
    if x.shape != y.shape:
        raise ValueError(f"auc has shape {x.shape} but its paired reference has {y.shape}")
    return float(np.mean([_normalised_gain(a, r).mean() for a, r in zip(x, y, strict=True)]))


def forward_transfer_ci(
    auc: ArrayLike,
    auc_reference: ArrayLike,
    confidence: float = 0.9,
    n_resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`forward_transfer`, as Continual World's
    ``BootstrapCI``: the seeds (rows) of ``auc`` and of ``auc_reference`` are resampled
    independently, each resample's forward transfer computed from its seed means."""
    x, y = _runs(auc, "auc"), _runs(auc_reference, "auc_reference")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"auc has {x.shape[1]} tasks but auc_reference has {y.shape[1]}")
    _check_bootstrap(confidence, n_resamples)
    rng = np.random.default_rng(seed)
    xs = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)  # (B, tasks)
    ys = y[rng.integers(0, len(y), size=(n_resamples, len(y)))].mean(axis=1)
    return _percentile_interval(_normalised_gain(xs, ys).mean(axis=1), confidence)


# ----------------------------------------------------------------------------- AUC


def success_auc(curve: ArrayLike, steps: ArrayLike | None = None) -> float:
    """Area under a success curve, Continual World's rule: the plain mean of the
    evaluations made during training.

    ``curve[k]`` is the success rate measured at training step ``steps[k]``. Continual World
    evaluates every ``log_every`` steps and never at step 0, so an evaluation at step 0
    (the starting model, before any update) is left out; with ``steps`` None every point
    counts.
    """
    y = _vector(curve, "curve")
    if steps is None:
        return float(y.mean())
    x = _steps(steps, y)
    trained = x > 0
    if not np.any(trained):
        raise ValueError("success curve has no evaluation after step 0")
    return float(y[trained].mean())


def success_auc_trapezoid(curve: ArrayLike, steps: ArrayLike | None = None) -> float:
    """Variant: trapezoidal area under the success curve divided by the step range.

    What eva-rl reported before it followed Continual World; it weights points by the
    spacing of ``steps`` (evenly spaced if None) and counts a step-0 evaluation. A single
    sample is its own value.
    """
    y = _vector(curve, "curve")
    if y.size == 1:
        return float(y[0])
    x = np.arange(y.size, dtype=np.float64) if steps is None else _steps(steps, y)
    area = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    return area / float(x[-1] - x[0])


def _steps(steps: ArrayLike, curve: np.ndarray) -> np.ndarray:
    x = _vector(steps, "steps")
    if x.shape != curve.shape:
        raise ValueError(f"curve has {curve.size} points but steps has {x.size}")
    if np.any(np.diff(x) <= 0):
        raise ValueError("steps must be strictly increasing")
    return x


# ----------------------------------------------------------------------------- over seeds


def mean_and_stderr(values: ArrayLike) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``; NaN for one value)."""
    v = _vector(values, "values")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def bootstrap_ci(
    values: ArrayLike, confidence: float = 0.9, n_resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. over seeds), with
    Continual World's settings: 90%, 4000 resamples, midpoint quantiles.

    One value gives the zero-width interval ``(v, v)``: nothing to resample, not certainty.
    """
    _check_bootstrap(confidence, n_resamples)
    v = _vector(values, "values")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    return _percentile_interval(means, confidence)


def _check_bootstrap(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail], method="midpoint")
    return float(low), float(high)
