"""Post-hoc calibration per task, fitted on the validation split so that scores are probabilities.

``isotonic`` (scikit-learn's IsotonicRegression, monotone, clipped to [0, 1]) or ``platt`` (a logistic
regression on the logit of the score). Both keep the order of the scores (isotonic may tie some), so AUROC is
unchanged or nearly so; both serialize to plain JSON to be stored with a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Calibrator:
    method: str
    x: tuple[float, ...] = ()  # isotonic: the fitted step function's knots
    y: tuple[float, ...] = ()
    a: float = 1.0  # platt: sigmoid(a · logit(p) + b)
    b: float = 0.0

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, method: str = "isotonic") -> Calibrator:
        scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
            return cls("isotonic", tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_)))
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=1e6).fit(_logit(scores)[:, None], labels)
            return cls("platt", a=float(model.coef_[0, 0]), b=float(model.intercept_[0]))
        raise ValueError(f"unknown calibration method {method!r}: isotonic or platt")

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=float)
        if self.method == "isotonic":
            return np.interp(scores, self.x, self.y)
        return expit(self.a * _logit(scores) + self.b)

    def as_dict(self) -> dict:
        return {"method": self.method, "x": list(self.x), "y": list(self.y), "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        return cls(data["method"], tuple(data["x"]), tuple(data["y"]), data["a"], data["b"])
