"""Continual metrics against hand computations."""

import numpy as np
import pytest

from eva_rl import metrics

S = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.5, 0.8, 0.2],
        [0.3, 0.6, 1.0],
    ]
)


def test_average_performance_is_mean_of_last_row():
    assert metrics.average_performance(S) == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    # a non-square matrix (e.g. evaluation on more tasks than trained) still works
    assert metrics.average_performance(S[:2]) == pytest.approx((0.5 + 0.8 + 0.2) / 3)


def test_forgetting_by_hand():
    np.testing.assert_allclose(metrics.forgetting_per_task(S), [0.9 - 0.3, 0.8 - 0.6, 0.0])
    # last task left out of the average
    assert metrics.forgetting(S) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)
    assert metrics.forgetting([[0.7]]) == 0.0
    # negative forgetting (backward transfer) is kept, not clipped
    assert metrics.forgetting([[0.2, 0.0], [0.6, 0.5]]) == pytest.approx(-0.4)


def test_forgetting_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        metrics.forgetting(S[:2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.forgetting([[0.5, np.nan], [0.1, 0.2]])
    with pytest.raises(ValueError, match="2-D"):
        metrics.average_performance([0.1, 0.2])


def test_forward_transfer_by_hand_and_guard():
    auc = [0.6, 0.5, 1.0, 0.9]
    ref = [0.2, 0.5, 1.0, 1.0]
    per_task = metrics.forward_transfer_per_task(auc, ref)
    np.testing.assert_allclose(per_task, [(0.6 - 0.2) / 0.8, 0.0, 0.0, -0.1])
    assert metrics.forward_transfer(auc, ref) == pytest.approx(per_task.mean())
    assert np.all(np.isfinite(per_task))
    with pytest.raises(ValueError, match="tasks"):
        metrics.forward_transfer([0.1, 0.2], [0.1])


def test_success_auc_trapezoid():
    assert metrics.success_auc([0.0, 1.0]) == pytest.approx(0.5)
    assert metrics.success_auc([0.0, 1.0, 1.0]) == pytest.approx(0.75)
    # uneven sampling: 0 at step 0, 1 at step 10 and at step 100
    assert metrics.success_auc([0.0, 1.0, 1.0], steps=[0, 10, 100]) == pytest.approx(
        (5 + 90) / 100
    )
    assert metrics.success_auc([0.4]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="increasing"):
        metrics.success_auc([0.1, 0.2], steps=[5, 5])


def test_mean_and_stderr():
    mean, se = metrics.mean_and_stderr([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1) / np.sqrt(3))
    mean, se = metrics.mean_and_stderr([0.7])
    assert mean == 0.7 and np.isnan(se)


def test_bootstrap_ci():
    values = [0.1, 0.5, 0.6, 0.9, 0.95]
    low, high = metrics.bootstrap_ci(values, confidence=0.9, n_resamples=5000, seed=1)
    assert min(values) <= low < np.mean(values) < high <= max(values)
    assert (low, high) == metrics.bootstrap_ci(values, confidence=0.9, n_resamples=5000, seed=1)
    wide = metrics.bootstrap_ci(values, confidence=0.99, n_resamples=5000, seed=1)
    assert wide[0] <= low and wide[1] >= high
    assert metrics.bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    assert metrics.bootstrap_ci([0.4]) == (0.4, 0.4)
    with pytest.raises(ValueError, match="confidence"):
        metrics.bootstrap_ci(values, confidence=1.5)
