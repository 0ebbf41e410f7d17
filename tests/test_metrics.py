"""Continual metrics against hand computations from Continual World's formulas.

Continual World (awarelab/continual_world, continualworld/results_processing/tables.py):
forgetting per task = success at the end of its own training - success at the end of the
sequence, averaged over all T columns; normalized_ft = (mean(x) - mean(y)) / (1 - mean(y))
with means over seeds, averaged over tasks; the AUC is the mean of the evaluations logged
while the task is trained (every log_every steps, none at step 0).
"""

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
    # Continual World: divided by all T = 3 tasks, the last task's 0 included:
    # (0.6 + 0.2 + 0.0) / 3 = 0.8 / 3 = 0.266667
    assert metrics.forgetting(S) == pytest.approx(0.8 / 3)
    assert metrics.forgetting([[0.7]]) == 0.0
    # negative forgetting (backward transfer) is kept, not clipped: (-0.4 + 0) / 2
    assert metrics.forgetting([[0.2, 0.0], [0.6, 0.5]]) == pytest.approx(-0.2)


def test_forgetting_excluding_last_is_the_old_variant():
    # (0.6 + 0.2) / 2 = 0.4: T / (T - 1) = 1.5 times Continual World's 0.266667
    assert metrics.forgetting_excluding_last(S) == pytest.approx(0.4)
    assert metrics.forgetting_excluding_last(S) == pytest.approx(1.5 * metrics.forgetting(S))
    assert metrics.forgetting_excluding_last([[0.7]]) == 0.0
    assert metrics.forgetting_excluding_last([[0.2, 0.0], [0.6, 0.5]]) == pytest.approx(-0.4)


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
    # one seed each: (0.6-0.2)/0.8, 0/0.5, and where AUC_ref = 1 the difference AUC - 1
    np.testing.assert_allclose(per_task, [(0.6 - 0.2) / 0.8, 0.0, 0.0, -0.1])
    assert metrics.forward_transfer(auc, ref) == pytest.approx(per_task.mean())
    assert np.all(np.isfinite(per_task))
    with pytest.raises(ValueError, match="tasks"):
        metrics.forward_transfer([0.1, 0.2], [0.1])


# AUCs of 2 sequential seeds and 3 reference seeds (rows) on 3 tasks (columns)
AUC = [[0.6, 0.5, 0.9], [0.8, 0.3, 1.0]]
REF = [[0.2, 0.5, 0.96], [0.4, 0.1, 1.0], [0.3, 0.3, 0.98]]


def test_forward_transfer_is_a_ratio_of_seed_means():
    # seed means: AUC (0.7, 0.4, 0.95), AUC_ref (0.3, 0.3, 0.98); per task
    # (0.7-0.3)/0.7 = 0.571429, (0.4-0.3)/0.7 = 0.142857, (0.95-0.98)/0.02 = -1.5
    per_task = metrics.forward_transfer_per_task(AUC, REF)
    np.testing.assert_allclose(per_task, [0.4 / 0.7, 0.1 / 0.7, -1.5])
    # averaged over tasks: (0.571429 + 0.142857 - 1.5) / 3 = -0.261905
    assert metrics.forward_transfer(AUC, REF) == pytest.approx(-0.261905, abs=1e-6)
    # the reference's seeds need not pair with the run's: two of them, same means
    assert metrics.forward_transfer(AUC, REF[:2]) == pytest.approx(-0.261905, abs=1e-6)


def test_forward_transfer_mean_of_ratios_is_the_old_variant():
    # seed 0 vs ref seed 0: (0.6-0.2)/0.8 = 0.5, 0/0.5 = 0, (0.9-0.96)/0.04 = -1.5 -> -1/3
    # seed 1 vs ref seed 1: (0.8-0.4)/0.6 = 2/3, (0.3-0.1)/0.9 = 2/9, AUC_ref = 1 -> 1.0-1.0
    #   = 0 -> (2/3 + 2/9 + 0)/3 = 8/27; mean over seeds (-1/3 + 8/27)/2 = -1/54 = -0.018519
    assert metrics.forward_transfer_mean_of_ratios(AUC, REF[:2]) == pytest.approx(-1 / 54)
    with pytest.raises(ValueError, match="paired"):
        metrics.forward_transfer_mean_of_ratios(AUC, REF)


def test_forward_transfer_ci():
    point = metrics.forward_transfer(AUC, REF)
    low, high = metrics.forward_transfer_ci(AUC, REF, n_resamples=2000, seed=3)
    assert low < point < high
    assert (low, high) == metrics.forward_transfer_ci(AUC, REF, n_resamples=2000, seed=3)
    wider = metrics.forward_transfer_ci(AUC, REF, confidence=0.99, n_resamples=2000, seed=3)
    assert wider[0] <= low and wider[1] >= high
    # one seed on each side: nothing to resample, the interval is the point
    one = metrics.forward_transfer_ci(AUC[:1], REF[:1])
    assert one == pytest.approx((metrics.forward_transfer(AUC[:1], REF[:1]),) * 2)


def test_success_auc_continual_world_rule():
    # the evaluation at step 0 (before any update) is left out: (0.5 + 1.0 + 1.0) / 3
    assert metrics.success_auc([0.0, 0.5, 1.0, 1.0], steps=[0, 10, 20, 40]) == pytest.approx(
        2.5 / 3)
    # uneven spacing does not weight the points
    assert metrics.success_auc([0.2, 0.6], steps=[10, 1000]) == pytest.approx(0.4)
    assert metrics.success_auc([0.0, 1.0]) == pytest.approx(0.5)  # no steps: every point
    assert metrics.success_auc([0.4], steps=[100]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="after step 0"):
        metrics.success_auc([0.3], steps=[0])
    with pytest.raises(ValueError, match="increasing"):
        metrics.success_auc([0.1, 0.2], steps=[5, 5])


def test_success_auc_trapezoid_variant():
    assert metrics.success_auc_trapezoid([0.0, 1.0]) == pytest.approx(0.5)
    assert metrics.success_auc_trapezoid([0.0, 1.0, 1.0]) == pytest.approx(0.75)
    # uneven sampling: 0 at step 0, 1 at step 10 and at step 100
    assert metrics.success_auc_trapezoid([0.0, 1.0, 1.0], steps=[0, 10, 100]) == pytest.approx(
        (5 + 90) / 100
    )
    # the curve of the Continual World test: (2.5 + 7.5 + 20) / 40 = 0.75, not 0.8333
    assert metrics.success_auc_trapezoid([0.0, 0.5, 1.0, 1.0], steps=[0, 10, 20, 40]) == (
        pytest.approx(0.75))
    assert metrics.success_auc_trapezoid([0.4]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="increasing"):
        metrics.success_auc_trapezoid([0.1, 0.2], steps=[5, 5])


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
