"""Per-task metrics on probabilities (never on hard labels, the reference design's AUPRC bug), with bootstrap
confidence intervals.

``auroc`` (the Mann–Whitney statistic on ranks, ties counted half) and ``auprc`` (average precision, as
scikit-learn defines it) are computed here in NumPy, because a bootstrap calls them thousands of times; the tests
hold them equal to scikit-learn. ``f1`` at 0.5 and ``f1_tuned`` at a threshold chosen on the validation split;
``brier`` the mean squared error of the probabilities; ``ece`` the expected calibration error over equal-width
bins (the size-weighted mean gap between the mean probability and the observed rate in each bin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

METRICS = ("auroc", "auprc", "f1", "f1_tuned", "brier", "ece")


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    positives = y == 1
    n_pos = int(positives.sum())
    n_neg = len(y) - n_pos
    ranks = rankdata(p)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Σ (R_k − R_{k−1}) · P_k over the distinct thresholds, highest first (scikit-learn's definition)."""
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    last = np.r_[np.nonzero(np.diff(p_sorted))[0], len(p) - 1]  # the last index of each distinct score
    tps = np.cumsum(y_sorted)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    predicted = p >= threshold
    tp = float(np.sum(predicted & (y == 1)))
    denominator = float(predicted.sum() + (y == 1).sum())
    return 2 * tp / denominator if denominator else 0.0


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    index = np.clip(np.digitize(p, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=False), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    gaps = np.abs(np.bincount(index, p, bins) - np.bincount(index, y, bins))  # per bin: count · |mean p − rate|
    return float(gaps[counts > 0].sum() / len(y))


def metric(name: str, y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float | None:
    """One metric; None where it is undefined (AUROC and AUPRC need both classes). ``threshold`` is the one of
    ``f1_tuned`` (``f1`` is always at 0.5)."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if name in ("auroc", "auprc") and not 0 < y.sum() < len(y):
        return None
    if name == "auroc":
        return auroc(y, p)
    if name == "auprc":
        return average_precision(y, p)
    if name == "f1":
        return f1(y, p, 0.5)
    if name == "f1_tuned":
        return f1(y, p, threshold)
    if name == "brier":
        return float(np.mean((p - y) ** 2))
    if name == "ece":
        return expected_calibration_error(y, p)
    raise ValueError(f"unknown metric {name!r}: one of {', '.join(METRICS)}")


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold with the highest F1 (on the validation split; the lowest such threshold on ties)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    candidates = np.unique(p)
    scores = [f1(y, p, t) for t in candidates]
    return float(candidates[int(np.argmax(scores))]) if len(candidates) else 0.5


@dataclass(frozen=True)
class Estimate:
    value: float | None
    ci_low: float | None
    ci_high: float | None


def _interval(draws: list[float], level: float) -> tuple[float | None, float | None]:
    if not draws:
        return None, None
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return float(low), float(high)


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
    return Estimate(value, *_interval(draws, level))


def evaluate_task(y: np.ndarray, p: np.ndarray, *, threshold: float = 0.5, resamples: int = 1000,
                  level: float = 0.95, seed: int = 0) -> dict[str, Estimate]:  # fmt: skip
    """Every metric of ``METRICS`` with its bootstrap interval (one set of resamples shared by all metrics);
    ``threshold`` is the validation-chosen one of ``f1_tuned``."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    values = {name: metric(name, y, p, threshold) for name in METRICS}
    draws: dict[str, list[float]] = {name: [] for name in METRICS}
    rng = np.random.default_rng(seed)
    for _ in range(resamples if len(y) >= 2 else 0):
        index = rng.integers(0, len(y), len(y))
        for name in METRICS:
            if values[name] is not None:
                v = metric(name, y[index], p[index], threshold)
                if v is not None:
                    draws[name].append(v)
    return {
        name: Estimate(values[name], *_interval(draws[name], level)) if values[name] is not None
        else Estimate(None, None, None)
        for name in METRICS
    }  # fmt: skip
