"""Metrics against scikit-learn on fixed arrays, bootstrap intervals, and calibrators."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from odyssey_batch.evaluation.calibration import Calibrator
from odyssey_batch.evaluation.metrics import (
    best_f1_threshold,
    bootstrap,
    evaluate_task,
    expected_calibration_error,
    metric,
)

Y = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.05, 0.6, 0.7, 0.3])


def test_metrics_equal_scikit_learn_on_fixed_arrays():
    assert metric("auroc", Y, P) == pytest.approx(roc_auc_score(Y, P)) == pytest.approx(22 / 24)
    assert metric("auprc", Y, P) == pytest.approx(average_precision_score(Y, P))
    assert metric("f1", Y, P) == pytest.approx(f1_score(Y, P >= 0.5)) == pytest.approx(0.75)
    assert metric("f1_tuned", Y, P, threshold=0.3) == pytest.approx(f1_score(Y, P >= 0.3))
    assert metric("f1", Y, P, threshold=0.3) == metric("f1", Y, P)  # F1 at 0.5 whatever the tuned threshold
    assert metric("brier", Y, P) == pytest.approx(brier_score_loss(Y, P))
    assert metric("auroc", np.zeros(5), np.linspace(0, 1, 5)) is None  # one class: undefined, not an error
    with pytest.raises(ValueError, match="unknown metric"):
        metric("accuracy", Y, P)


def test_fast_rank_metrics_equal_scikit_learn_with_ties():
    rng = np.random.default_rng(3)
    for n in (3, 40, 2000):
        for _ in range(10):
            y = (rng.random(n) < 0.3).astype(float)
            y[:2] = [1, 0]
            p = np.round(rng.random(n), 1)  # many ties
            assert metric("auroc", y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
            assert metric("auprc", y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_best_f1_threshold_maximizes_f1():
    threshold = best_f1_threshold(Y, P)
    best = max(f1_score(Y, np.greater_equal(P, t)) for t in np.unique(P))
    assert f1_score(Y, np.greater_equal(P, threshold)) == pytest.approx(best) and threshold == pytest.approx(0.7)


def test_expected_calibration_error_by_hand():
    # two bins used: [0.1, 0.2) holds 0.1 and 0.15 (rate 0); [0.9, 1] holds 0.9 and 0.95 (rate 1)
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.15, 0.9, 0.95])
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.125 + 0.5 * 0.075)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def test_bootstrap_interval_brackets_the_value_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small_y = rng.random(100) < 0.3
    small_p = np.clip(small_y * 0.3 + rng.random(100) * 0.7, 0, 1)
    big_y = rng.random(4000) < 0.3
    big_p = np.clip(big_y * 0.3 + rng.random(4000) * 0.7, 0, 1)
    small = bootstrap(lambda a, b: metric("auroc", a, b), small_y, small_p, resamples=300)
    big = bootstrap(lambda a, b: metric("auroc", a, b), big_y, big_p, resamples=300)
    assert small.ci_low < small.value < small.ci_high and big.ci_low < big.value < big.ci_high
    assert big.ci_high - big.ci_low < (small.ci_high - small.ci_low) / 3
    again = bootstrap(lambda a, b: metric("auroc", a, b), small_y, small_p, resamples=300)
    assert again == small  # seeded
    report = evaluate_task(Y, P, resamples=50)
    assert set(report) == {"auroc", "auprc", "f1", "f1_tuned", "brier", "ece"}
    assert report["auroc"].value == pytest.approx(22 / 24)


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibrators_are_monotone_and_fix_miscalibration(method):
    rng = np.random.default_rng(1)
    truth = rng.random(5000)
    y = (rng.random(5000) < truth).astype(float)
    scores = truth**3  # monotone but badly calibrated
    calibrator = Calibrator.fit(scores, y, method)
    grid = np.linspace(0, 1, 201)
    assert np.all(np.diff(calibrator(grid)) >= -1e-12)
    assert expected_calibration_error(y, calibrator(scores)) < expected_calibration_error(y, scores) / 3
    assert Calibrator.from_dict(calibrator.as_dict())(grid) == pytest.approx(calibrator(grid))
    with pytest.raises(ValueError, match="calibration method"):
        Calibrator.fit(scores, y, "magic")
