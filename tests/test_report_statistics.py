"""rliable's comparisons as the report computes them: IQM, stratified bootstrap intervals,
probability of improvement; expected numbers worked out by hand."""

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics as rl_metrics

from agents.reports import statistics

# 4 seeds (rows) x 2 tasks; the 8 runs sorted: 0.0 0.1 0.2 0.4 0.5 0.6 1.0 1.0
SCORES = np.array([[0.0, 0.1], [0.2, 0.4], [0.5, 0.6], [1.0, 1.0]])
# 2 seeds of a reference method on the same tasks
REFERENCE = np.array([[0.1, 0.3], [0.5, 0.9]])
REPS = 300


def test_mean_and_iqm_by_hand():
    c = statistics.compare(SCORES, None, reps=REPS)
    # IQM: mean of the middle half of the 8 runs, (0.2 + 0.4 + 0.5 + 0.6) / 4 = 0.425
    assert c["iqm"]["value"] == pytest.approx(0.425)
    # mean: per task over seeds 1.7/4 = 0.425 and 2.1/4 = 0.525, then over tasks 0.475
    assert c["mean"]["value"] == pytest.approx(0.475)
    assert (c["runs"], c["tasks"], c["confidence"]) == (4, 2, 0.95)
    assert c["p_improvement"] is None
    for key in ("mean", "iqm"):
        low, high = c[key]["ci"]
        assert low < c[key]["value"] < high


def test_probability_of_improvement_by_hand():
    # P(X > Y) + P(X = Y) / 2 per task over all run pairs, then the mean over tasks:
    # task 0: (0.0, 0.2, 0.5, 1.0) vs (0.1, 0.5): 0 + 1 + (1 + 0.5) + 2 = 4.5 of 8 pairs
    # task 1: (0.1, 0.4, 0.6, 1.0) vs (0.3, 0.9): 0 + 1 + 1 + 2 = 4 of 8; (4.5 + 4) / 16
    c = statistics.compare(SCORES, REFERENCE, reps=REPS)
    assert c["p_improvement"]["value"] == pytest.approx(0.53125)
    low, high = c["p_improvement"]["ci"]
    assert low < 0.53125 < high
    # a method against itself: 0.5 exactly, inside its interval
    itself = statistics.compare(SCORES, SCORES, reps=REPS)["p_improvement"]
    assert itself["value"] == 0.5
    assert itself["ci"][0] <= 0.5 <= itself["ci"][1]


def test_intervals_are_rliables_seeded_and_leave_numpy_alone():
    c = statistics.compare(SCORES, REFERENCE, reps=REPS, seed=7)
    assert c == statistics.compare(SCORES, REFERENCE, reps=REPS, seed=7)
    assert c["iqm"]["ci"] != statistics.compare(SCORES, None, reps=REPS, seed=8)["iqm"]["ci"]
    # the same numbers from rliable directly (it draws from numpy's global RNG)
    np.random.seed(7)
    _, ci = rly.get_interval_estimates(
        {"x": SCORES}, lambda s: np.array([rl_metrics.aggregate_iqm(s)]), reps=REPS)
    np.testing.assert_allclose(c["iqm"]["ci"], ci["x"].ravel())
    np.random.seed(7)
    _, ci = rly.get_interval_estimates(
        {"x": [SCORES, REFERENCE]},
        lambda x, y: np.array([rl_metrics.probability_of_improvement(x, y)]), reps=REPS)
    np.testing.assert_allclose(c["p_improvement"]["ci"], ci["x"].ravel())
    # the caller's global numpy stream goes on as if no bootstrap had run
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    statistics.compare(SCORES, REFERENCE, reps=50)
    assert np.random.random() == expected


def test_intervals_shrink_with_more_seeds():
    scores = np.random.default_rng(0).beta(4, 3, size=(40, 5))  # 40 seeds x 5 tasks
    few = statistics.compare(scores[:4], None, reps=REPS)
    many = statistics.compare(scores, None, reps=REPS)
    for key in ("mean", "iqm"):
        for c in (few, many):
            assert c[key]["ci"][0] <= c[key]["value"] <= c[key]["ci"][1]
        width = {n: c[key]["ci"][1] - c[key]["ci"][0] for n, c in ((4, few), (40, many))}
        assert width[40] < 0.6 * width[4]


def test_one_seed_has_no_interval():
    one = statistics.compare(SCORES[:1], REFERENCE, reps=REPS)
    assert one["iqm"] == {"value": pytest.approx(0.05), "ci": None}  # IQM of (0.0, 0.1)
    assert one["mean"]["ci"] is None and one["p_improvement"]["ci"] is None
    # one reference seed: no interval for P(improvement), the method's own ones stay
    vs_one = statistics.compare(SCORES, REFERENCE[:1], reps=REPS)
    assert vs_one["p_improvement"]["ci"] is None and vs_one["iqm"]["ci"] is not None


def test_bad_input():
    with pytest.raises(ValueError, match="runs, tasks"):
        statistics.compare(np.zeros(3), None)
    with pytest.raises(ValueError, match="tasks"):
        statistics.compare(SCORES, REFERENCE[:, :1], reps=REPS)
    with pytest.raises(ValueError, match="NaN"):
        statistics.compare(np.array([[0.1, np.nan], [0.2, 0.3]]), None, reps=REPS)
    with pytest.raises(ValueError, match="reps"):
        statistics.compare(SCORES, None, reps=0)
