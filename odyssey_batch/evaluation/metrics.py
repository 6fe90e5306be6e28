"""Per-task metrics on probabilities (never on hard labels, the reference design's AUPRC bug), with bootstrap
confidence intervals.

``auroc`` and ``auprc`` (average precision) come from scikit-learn; ``f1`` at a threshold; ``brier`` the mean
squared error of the probabilities; ``ece`` the expected calibration error over equal-width bins (the
size-weighted mean gap between the mean probability and the observed rate in each bin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

METRICS = ("auroc", "auprc", "f1", "brier", "ece")


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            total += chosen.mean() * abs(p[chosen].mean() - y[chosen].mean())
    return float(total)


def metric(name: str, y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float | None:
    """One metric; None where it is undefined (AUROC and AUPRC need both classes)."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if name in ("auroc", "auprc") and not 0 < y.sum() < len(y):
        return None
    if name == "auroc":
        return float(roc_auc_score(y, p))
    if name == "auprc":
        return float(average_precision_score(y, p))
    if name == "f1":
        return float(f1_score(y, p >= threshold, zero_division=0.0))
    if name == "brier":
        return float(np.mean((p - y) ** 2))
    if name == "ece":
        return expected_calibration_error(y, p)
    raise ValueError(f"unknown metric {name!r}: one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class Estimate:
    value: float | None
    ci_low: float | None
    ci_high: float | None


def bootstrap(
    fn: Callable[[np.ndarray, np.ndarray], float | None],
    y: np.ndarray,
    p: np.ndarray,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The metric and its percentile bootstrap interval (resampling points with replacement; resamples where
    the metric is undefined are skipped)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    value = fn(y, p)
    if value is None or len(y) < 2:
        return Estimate(value, None, None)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, len(y), len(y))
        v = fn(y[index], p[index])
        if v is not None:
            draws.append(v)
    if not draws:
        return Estimate(value, None, None)
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high))


def evaluate_task(y: np.ndarray, p: np.ndarray, *, threshold: float = 0.5, resamples: int = 1000,
                  seed: int = 0) -> dict[str, Estimate]:  # fmt: skip
    """Every metric of ``METRICS`` with its bootstrap interval."""
    return {
        name: bootstrap(lambda a, b, n=name: metric(n, a, b, threshold), y, p, resamples=resamples, seed=seed)
        for name in METRICS
    }
