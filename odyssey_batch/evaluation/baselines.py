"""The paper's non-neural baselines: logistic regression and gradient-boosted trees on code counts plus age.

As EHRMamba's XGBoost baseline, each prediction point becomes a bag of codes: how often every concept token
(condition, procedure, medication, lab) occurs in the history, plus four summary columns (``EXTRA_FEATURES``):
the age at the last token, the number of visits, the days between the first and the last token, and the number
of concept tokens. The features are built from the very prompted inputs the model scores
(``finetune.task_examples``), so baselines and model are evaluated on exactly the same prediction points; the
trailing task token and the structural tokens are ignored by their type id (but the task token, timed at the
prediction time, is the last token, so age and span reach up to the prediction time).

``logreg``: ``log1p`` of the counts (the age column stays linear), ``MaxAbsScaler`` and an L2
``LogisticRegression`` on the sparse matrix. ``gbt``: scikit-learn's ``HistGradientBoostingClassifier`` on a
dense matrix of the ``max_features`` codes present in the most training rows plus the summary columns, without
early stopping (a fixed number of iterations, so a seed gives the same model). Both are deterministic for a seed.
A training set with one class only gives a ``constant`` baseline that predicts the training prevalence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from odyssey_batch.sequences.grammar import EVENT_KINDS, TokenType

BASELINES = ("logreg", "gbt")
EXTRA_FEATURES = ("age", "visits", "span_days", "concepts")
CONCEPT_TYPES = np.array(sorted(int(k) for k in EVENT_KINDS))
LOGREG_C = 0.5
GBT_PARAMS: dict[str, Any] = {
    "learning_rate": 0.05,
    "max_iter": 200,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 20,
    "l2_regularization": 1.0,
    "early_stopping": False,
}


def code_count_features(streams: list[dict[str, np.ndarray]], vocab_size: int) -> sp.csr_matrix:
    """One row per input: columns ``0 … vocab_size − 1`` count each concept token id, then ``EXTRA_FEATURES``.

    Only tokens whose type is a concept kind (``TokenType.CONDITION`` … ``TokenType.LAB``) are counted;
    the extra columns are the age at the last token (years), the number of ``[VS]``-typed tokens, the days from
    the first to the last token (``times`` is in days) and the number of concept tokens. An empty input is a
    row of zeros. Raises ``ValueError`` for a concept token id outside the vocabulary.
    """
    n, width = len(streams), vocab_size + len(EXTRA_FEATURES)
    if n == 0:
        return sp.csr_matrix((0, width), dtype=np.float64)
    lengths = np.array([len(s["token_ids"]) for s in streams], dtype=np.int64)
    token_ids = np.concatenate([np.asarray(s["token_ids"], dtype=np.int64) for s in streams])
    type_ids = np.concatenate([np.asarray(s["type_ids"], dtype=np.int64) for s in streams])
    ages = np.concatenate([np.asarray(s["ages"], dtype=np.float64) for s in streams])
    times = np.concatenate([np.asarray(s["times"], dtype=np.float64) for s in streams])
    rows = np.repeat(np.arange(n), lengths)

    concept = np.isin(type_ids, CONCEPT_TYPES)
    ids = token_ids[concept]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"concept token ids must lie in 0..{vocab_size - 1}, found {ids.min()}..{ids.max()}")
    counts = sp.coo_matrix((np.ones(ids.size), (rows[concept], ids)), shape=(n, vocab_size)).tocsr()
    counts.sum_duplicates()

    nonempty = lengths > 0
    last = np.cumsum(lengths) - 1
    first = last - lengths + 1
    extra = np.zeros((n, len(EXTRA_FEATURES)))
    extra[nonempty, 0] = ages[last[nonempty]]
    extra[:, 1] = np.bincount(rows[type_ids == TokenType.VS], minlength=n)
    extra[nonempty, 2] = times[last[nonempty]] - times[first[nonempty]]
    extra[:, 3] = np.bincount(rows[concept], minlength=n)
    return sp.hstack([counts, sp.csr_matrix(extra)], format="csr")


@dataclass
class Baseline:
    """A fitted baseline: ``estimator`` reads the columns ``columns`` of a ``code_count_features`` matrix of
    ``n_features`` columns. With ``constant`` (one class in training) there is no estimator and every point
    gets ``prevalence``."""

    method: str
    estimator: Any
    columns: np.ndarray
    n_features: int
    prevalence: float
    constant: bool = False

    def predict(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """The probability of class 1 for each row of ``X``."""
        X = sp.csr_matrix(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} feature columns (as in training), got {X.shape[1]}")
        if self.constant:
            return np.full(X.shape[0], self.prevalence)
        return self.estimator.predict_proba(_prepare(self.method, X, self.columns, self.n_features))[:, 1]


def _prepare(method: str, X: sp.csr_matrix, columns: np.ndarray, n_features: int) -> sp.csr_matrix | np.ndarray:
    """The estimator's input: the kept columns, ``log1p`` of all but age for ``logreg``, dense for ``gbt``."""
    age_column = n_features - len(EXTRA_FEATURES) + EXTRA_FEATURES.index("age")
    X = X[:, columns].astype(np.float64)
    if method == "gbt":
        return X.toarray().astype(np.float32)
    X = X.tocsr(copy=True)
    keep_linear = columns[X.indices] == age_column
    X.data = np.where(keep_linear, X.data, np.log1p(np.maximum(X.data, 0.0)))
    return X


def fit_baseline(method: str, X: sp.spmatrix | np.ndarray, y: np.ndarray, *, seed: int = 0,
                 max_features: int = 2000) -> Baseline:  # fmt: skip
    """Fit ``method`` (one of ``BASELINES``) on a ``code_count_features`` matrix and 0/1 labels.

    ``logreg`` keeps every code seen in training and the extra columns; ``gbt`` the ``max_features`` codes
    present in the most training rows (ties: the lower id) and the extra columns.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}: one of {', '.join(repr(b) for b in BASELINES)}")
    X = sp.csr_matrix(X)
    y = np.asarray(y, dtype=float).ravel()
    if X.shape[0] != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as rows, and at least one: {X.shape[0]} rows, {len(y)} labels")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    n_features = X.shape[1]
    n_codes = n_features - len(EXTRA_FEATURES)
    extra = np.arange(n_codes, n_features)
    prevalence = float(y.mean())
    if prevalence in (0.0, 1.0):
        return Baseline(method, None, extra, n_features, prevalence, constant=True)

    present = np.asarray((X[:, :n_codes] > 0).sum(axis=0)).ravel()  # rows where each code occurs
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import MaxAbsScaler

        codes = np.flatnonzero(present)
        estimator = make_pipeline(
            MaxAbsScaler(), LogisticRegression(C=LOGREG_C, max_iter=5000, tol=1e-6, random_state=seed)
        )
    else:
        from sklearn.ensemble import HistGradientBoostingClassifier

        order = np.lexsort((np.arange(n_codes), -present))  # most rows first, then lower id
        codes = np.sort(order[: min(max_features, int((present > 0).sum()))])
        estimator = HistGradientBoostingClassifier(random_state=seed, **GBT_PARAMS)
    columns = np.concatenate([codes, extra])
    estimator.fit(_prepare(method, X, columns, n_features), y.astype(int))
    return Baseline(method, estimator, columns, n_features, prevalence)
