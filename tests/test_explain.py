"""Integrated-gradients explanations: the model hooks reproduce the forward pass, attributions are complete,
and on a model trained to detect a planted concept the top event is that concept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.model.config import preset
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.scoring.explain import attribute, explain_batch, integrated_gradients, top_events
from odyssey_batch.sequences.grammar import TokenType
from odyssey_batch.training.data import collate

VOCAB = 40
CLS, VS, VE, REG, WEEK = 3, 4, 5, 6, 7  # grammar.SPECIAL_TOKENS ids; [W_0] as the interval token
CONCEPTS = np.arange(25, 39)  # concept token ids, each of a fixed type (6–9)
DRIVER = 30  # the planted concept: label 1 iff it appears in the history
TASK = 39

pytestmark = pytest.mark.usefixtures("one_thread")


def concept_type(token: int) -> int:
    return int(TokenType.CONDITION) + token % 4


def prompted(rng: np.random.Generator, positive: bool, length: int | None = None) -> dict[str, np.ndarray]:
    """[CLS] then visits ([VS] events [VE] [REG], an interval token between visits), then the task token; the
    driver concept appears once among the events iff ``positive``."""
    target = int(rng.integers(20, 41)) if length is None else length
    others = CONCEPTS[CONCEPTS != DRIVER]
    tokens, types, orders, segments = [CLS], [int(TokenType.CLS)], [0], [0]
    visit = 0
    while len(tokens) < target - 5:  # room for at least one event, [VE], [REG] and the task token
        visit += 1
        if visit > 1:
            tokens.append(WEEK), types.append(int(TokenType.INTERVAL)), orders.append(visit - 1), segments.append(0)
        n = int(min(rng.integers(3, 9), target - len(tokens) - 4))
        events = rng.choice(others, n).tolist()
        body = [VS, *events, VE, REG]
        tokens += body
        types += [int(TokenType.VS), *(concept_type(e) for e in events), int(TokenType.VE), int(TokenType.REG)]
        orders += [visit] * len(body)
        segments += [1 + (visit - 1) % 2] * len(body)
    events = [i for i, t in enumerate(types) if t >= TokenType.CONDITION]
    if positive:
        i = int(rng.choice(events))
        tokens[i], types[i] = DRIVER, concept_type(DRIVER)
    tokens.append(TASK), types.append(int(TokenType.TASK)), orders.append(visit), segments.append(0)
    n = len(tokens)
    times = 18000.0 + np.cumsum(rng.exponential(2.0, n) * (np.asarray(types) != TokenType.TASK))
    return {
        "token_ids": np.asarray(tokens, dtype=np.int32),
        "type_ids": np.asarray(types, dtype=np.int8),
        "ages": (50 + (times - times[0]) / 365.25).astype(np.float32),
        "times": times,
        "visit_orders": np.asarray(orders, dtype=np.int32),
        "visit_segments": np.asarray(segments, dtype=np.int8),
    }


def tiny_model(seed: int = 0) -> EHRMambaForTasks:
    torch.manual_seed(seed)
    model = EHRMambaForTasks(EHRMamba(preset("tiny", VOCAB)))
    model.eval()
    return model


def test_hooks_reproduce_the_forward_pass():
    rng = np.random.default_rng(0)
    model = tiny_model()
    examples = [prompted(rng, True, 25), prompted(rng, False, 38)]
    streams, lengths = collate(examples)
    mask = torch.arange(streams["token_ids"].shape[1])[None, :] < lengths[:, None]
    with torch.no_grad():
        expected = model(streams, lengths)
        got = model.logits_from_embeddings(model.input_embeddings(streams), mask, lengths)
        hidden, _ = model.backbone.encode_embeddings(model.backbone._embed(streams), mask)
    assert torch.equal(got, expected)
    assert torch.equal(hidden, model.backbone(streams, mask))


def test_attributions_are_complete_and_deterministic():
    for seed in range(4):  # a random model initialised wide (std 0.5) is far from linear in its inputs
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        model = EHRMambaForTasks(EHRMamba(preset("tiny", VOCAB, initializer_range=0.5)))
        for layer in (model.head.net[1], model.head.net[4]):
            torch.nn.init.normal_(layer.weight, std=0.5)
        s = prompted(rng, True, 32)
        model.train()  # attribution switches to eval mode itself and restores the mode after
        result = attribute(model, s, steps=64)
        assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
        model.eval()
        streams, lengths = collate([s])
        with torch.no_grad():
            assert result.logit == pytest.approx(float(model(streams, lengths)[0]), abs=1e-5)
        assert result.attributions.shape == (len(s["token_ids"]),)
        assert result.attributions[-1] == 0.0  # the task token keeps its concept in the baseline
        assert abs(result.gap) > 0.02
        assert result.completeness_error < 0.05 * abs(result.gap), (seed, result.gap, result.completeness_error)
        coarse = attribute(model, s, steps=4)  # the same gap, a worse integral
        assert coarse.gap == pytest.approx(result.gap, abs=1e-5)
        assert coarse.completeness_error > result.completeness_error
        logit, again = integrated_gradients(model, s, steps=64)
        assert logit == result.logit and np.array_equal(again, result.attributions)
    with pytest.raises(ValueError, match="baseline"):
        attribute(model, s, baseline="uniform")


def test_top_events_ranks_concepts_only_and_breaks_ties_by_recency():
    s = {"type_ids": np.array([1, 2, 6, 7, 8, 9, 6, 3, 5, 10])}
    a = np.array([9.0, 9.0, 0.5, -1.0, 2.0, 0.5, 0.0, 9.0, 9.0, 0.0])
    assert top_events(s, a) == [(4, 2.0), (5, 0.5), (2, 0.5)]
    assert top_events(s, a, k=2) == [(4, 2.0), (5, 0.5)]
    assert top_events(s, a, positive_only=False) == [(4, 2.0), (5, 0.5), (2, 0.5), (6, 0.0), (3, -1.0)]


def test_the_planted_driver_is_the_top_event():
    rng = np.random.default_rng(7)
    train = [prompted(rng, i % 2 == 0) for i in range(256)]
    labels = torch.tensor([float(i % 2 == 0) for i in range(256)])
    model = tiny_model(7)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    for step in range(300):
        rows = batches[step % len(batches)]
        streams, lengths = collate([train[i] for i in rows])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(streams, lengths), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        streams, lengths = collate(train)
        accuracy = float(((model(streams, lengths) > 0).float() == labels).float().mean())
    assert accuracy > 0.9, accuracy

    positives = [prompted(rng, True) for _ in range(10)]
    explained = explain_batch(model, positives, k=3, steps=32)
    hits = sum(bool(top) and positives[i]["token_ids"][top[0][0]] == DRIVER for i, top in enumerate(explained))
    assert hits >= 8, explained
