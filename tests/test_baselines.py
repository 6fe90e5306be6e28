"""Code-count features on hand-built streams, and both baselines on a planted signal."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from odyssey_batch.evaluation.baselines import BASELINES, EXTRA_FEATURES, code_count_features, fit_baseline
from odyssey_batch.sequences.grammar import TokenType as T

VOCAB = 100
CLS, VS, VE, REG, W0 = 3, 4, 5, 6, 7  # grammar.SPECIAL_TOKENS
TASK_ID = 45


def streams(tokens: list[tuple[int, int]], ages: list[float], times: list[float]) -> dict[str, np.ndarray]:
    ids, types = zip(*tokens, strict=True)
    n = len(ids)
    return {
        "token_ids": np.array(ids, dtype=np.int32),
        "type_ids": np.array(types, dtype=np.int8),
        "ages": np.array(ages, dtype=np.float32),
        "times": np.array(times, dtype=np.float64),
        "visit_orders": np.ones(n, dtype=np.int32),
        "visit_segments": np.ones(n, dtype=np.int8),
    }


def test_features_count_concepts_only_and_summarise_the_history():
    first = streams(
        [(CLS, T.CLS), (VS, T.VS), (30, T.CONDITION), (31, T.MEDICATION), (30, T.CONDITION), (VE, T.VE),
         (REG, T.REG), (W0, T.INTERVAL), (VS, T.VS), (32, T.LAB), (33, T.PROCEDURE), (VE, T.VE), (REG, T.REG),
         (TASK_ID, T.TASK)],
        ages=[50.0] * 8 + [50.5] * 5 + [51.25],
        times=[100.0] * 8 + [283.0] * 5 + [374.0],
    )  # fmt: skip
    second = streams([(CLS, T.CLS), (VS, T.VS), (33, T.PROCEDURE), (VE, T.VE), (REG, T.REG)],
                     ages=[7.0] * 5, times=[10.0, 10.0, 10.0, 12.0, 12.0])  # fmt: skip
    X = code_count_features([first, second], VOCAB)
    assert X.shape == (2, VOCAB + len(EXTRA_FEATURES)) == (2, 104)
    dense = X.toarray()
    expected = np.zeros((2, 104))
    expected[0, [30, 31, 32, 33]] = [2, 1, 1, 1]
    expected[0, VOCAB:] = [51.25, 2, 274.0, 5]  # age at the task token, 2 visits, 374 − 100 days, 5 concepts
    expected[1, 33] = 1
    expected[1, VOCAB:] = [7.0, 1, 2.0, 1]
    np.testing.assert_array_equal(dense, expected)  # no specials, no task token, no interval token counted
    assert code_count_features([], VOCAB).shape == (0, 104)
    with pytest.raises(ValueError, match="concept token ids"):
        code_count_features([first], 33)


def synthetic(n: int, rng: np.random.Generator) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Random histories; positives carry code 42 with probability 0.9, negatives 0.05 (the best AUROC is 0.925)."""
    y = (rng.random(n) < 0.4).astype(float)
    out = []
    kinds = [T.CONDITION, T.PROCEDURE, T.MEDICATION, T.LAB]
    for label in y:
        tokens = [(CLS, T.CLS)]
        for _ in range(rng.integers(1, 5)):
            codes = rng.integers(25, VOCAB, rng.integers(1, 7))
            codes = codes[codes != 42]
            tokens += [(VS, T.VS), *((int(c), kinds[int(c) % 4]) for c in codes), (VE, T.VE), (REG, T.REG)]
        if rng.random() < (0.9 if label else 0.05):
            tokens.insert(2, (42, T.CONDITION))
        tokens.append((TASK_ID, T.TASK))
        n_tokens = len(tokens)
        times = np.sort(rng.uniform(0, 2000, n_tokens))
        out.append(streams(tokens, list(40 + times / 365.25), list(times)))
    return out, y


@pytest.mark.parametrize("method", BASELINES)
def test_baselines_learn_a_planted_code_and_are_deterministic(method):
    rng = np.random.default_rng(7)
    train, y_train = synthetic(600, rng)
    test, y_test = synthetic(400, rng)
    X_train, X_test = code_count_features(train, VOCAB), code_count_features(test, VOCAB)
    model = fit_baseline(method, X_train, y_train, seed=3)
    p = model.predict(X_test)
    assert p.shape == (400,) and np.all((p >= 0) & (p <= 1)) and not model.constant
    assert roc_auc_score(y_test, p) > 0.8
    np.testing.assert_array_equal(fit_baseline(method, X_train, y_train, seed=3).predict(X_test), p)
    with pytest.raises(ValueError, match="feature columns"):
        model.predict(X_test[:, :50])


def test_gbt_keeps_the_most_frequent_codes():
    rng = np.random.default_rng(1)
    train, y = synthetic(200, rng)
    X = code_count_features(train, VOCAB)
    model = fit_baseline("gbt", X, y, max_features=5)
    assert len(model.columns) == 5 + len(EXTRA_FEATURES)
    present = np.asarray((X[:, :VOCAB] > 0).sum(axis=0)).ravel()
    assert present[model.columns[:5]].min() >= np.sort(present)[-5]


@pytest.mark.parametrize("method", BASELINES)
def test_a_single_class_predicts_the_prevalence(method):
    rng = np.random.default_rng(2)
    train, _ = synthetic(30, rng)
    X = code_count_features(train, VOCAB)
    for label in (0.0, 1.0):
        model = fit_baseline(method, X, np.full(30, label))
        assert model.constant and model.estimator is None
        np.testing.assert_array_equal(model.predict(X[:7]), np.full(7, label))


def test_unknown_method_names_the_choices():
    X = code_count_features([], VOCAB)
    with pytest.raises(ValueError, match="'logreg', 'gbt'"):
        fit_baseline("xgboost", X, np.array([]))
