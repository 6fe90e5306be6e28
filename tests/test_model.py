"""EHRMamba on CPU: shapes, padding, recurrent steps equal the full forward, the loss ignores [PAD], the model
learns a pattern, and very short and very long sequences work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odyssey_batch.model.config import preset
from odyssey_batch.model.ehrmamba import STREAMS, EHRMamba
from odyssey_batch.training.data import collate, length_batches
from odyssey_batch.training.pretrain import next_token_loss

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def sequence(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    times = np.cumsum(rng.exponential(3.0, n)) + 18000.0
    return {
        "token_ids": np.concatenate([[3], rng.integers(25, VOCAB, n - 1)]).astype(np.int32),
        "type_ids": np.concatenate([[1], rng.integers(2, 10, n - 1)]).astype(np.int8),
        "ages": (40 + (times - times[0]) / 365.25).astype(np.float32),
        "times": times,
        "visit_orders": np.minimum(np.arange(n) // 5, 700).astype(np.int32),
        "visit_segments": (np.arange(n) // 5 % 2 + 1).astype(np.int8),
    }


def model(**overrides) -> EHRMamba:
    torch.manual_seed(0)
    m = EHRMamba(preset("tiny", VOCAB, **overrides))
    m.eval()
    return m


def test_forward_shapes_tied_head_and_right_padding_changes_nothing():
    rng = np.random.default_rng(0)
    m = model()
    assert m.logits(torch.zeros(1, 32)).shape == (1, VOCAB)
    assert (
        m.embeddings.word_embeddings.weight.data_ptr()
        == dict(m.named_parameters())["embeddings.word_embeddings.weight"].data_ptr()
    )
    a, b = sequence(12, rng), sequence(30, rng)
    streams, lengths = collate([a, b])
    mask = torch.arange(30)[None, :] < lengths[:, None]
    with torch.no_grad():
        batched = m(streams, mask)
        alone, _ = collate([a])
        single = m(alone, None)
    assert batched.shape == (2, 30, 32)
    torch.testing.assert_close(batched[0, :12], single[0], rtol=1e-4, atol=1e-5)


def test_recurrent_steps_equal_the_full_forward():
    rng = np.random.default_rng(1)
    m = model()
    seqs = [sequence(20, rng), sequence(9, rng)]
    full, lengths = collate(seqs)
    with torch.no_grad():
        expected = m(full, torch.arange(20)[None, :] < lengths[:, None])
        # prefill the first 5 (and 4) tokens, then step through the rest one token at a time
        starts = torch.tensor([5, 4])
        prefix = {k: v[:, :5] for k, v in full.items()}
        last, cache = m.prefill(prefix, starts)
        torch.testing.assert_close(last, expected[torch.arange(2), starts - 1], rtol=1e-4, atol=1e-5)
        for t in range(4, 9):  # row 1 goes from 4; row 0 stays aligned by starting one later
            rows = torch.tensor([1])
            sub = cache.select(rows)
            out = m.step({k: v[rows, t] for k, v in full.items()}, sub)
            torch.testing.assert_close(out[0], expected[1, t], rtol=1e-4, atol=1e-5)
            cache.conv = [torch.cat([c[:1], s]) for c, s in zip(cache.conv, sub.conv, strict=True)]
            cache.ssm = [torch.cat([c[:1], s]) for c, s in zip(cache.ssm, sub.ssm, strict=True)]
            cache.last_time = torch.cat([cache.last_time[:1], sub.last_time])
        sub = cache.select(torch.tensor([0]))
        for t in range(5, 20):
            out = m.step({k: v[:1, t] for k, v in full.items()}, sub)
            torch.testing.assert_close(out[0], expected[0, t], rtol=1e-4, atol=1e-5)


def test_one_history_scored_for_several_tasks_by_one_step_each():
    rng = np.random.default_rng(2)
    m = model()
    history = sequence(15, rng)
    streams, lengths = collate([history])
    with torch.no_grad():
        _, cache = m.prefill(streams, lengths)
        tasks = torch.tensor([30, 31, 32])
        copies = cache.select(torch.zeros(3, dtype=torch.long))
        token = {
            "token_ids": tasks, "type_ids": torch.full((3,), 10), "ages": streams["ages"][0, -1].repeat(3),
            "times": streams["times"][0, -1].repeat(3), "visit_orders": torch.zeros(3, dtype=torch.long),
            "visit_segments": torch.zeros(3, dtype=torch.long),
        }  # fmt: skip
        stepped = m.step(token, copies)
        for i in range(len(tasks)):  # each equals appending that task token and re-encoding
            appended = {k: torch.cat([v, token[k][i : i + 1, None].to(v.dtype)], dim=1) for k, v in streams.items()}
            torch.testing.assert_close(stepped[i], m(appended)[0, -1], rtol=1e-4, atol=1e-5)


def test_pad_never_contributes_to_the_loss():
    rng = np.random.default_rng(3)
    m = model()
    a = sequence(10, rng)
    streams, lengths = collate([a, sequence(25, rng)])
    alone, alone_lengths = collate([a])
    with torch.no_grad():
        padded_loss, count = next_token_loss(m, {k: v[:1] for k, v in streams.items()}, lengths[:1])
        loss, n = next_token_loss(m, alone, alone_lengths)
    assert count == n == 9
    torch.testing.assert_close(padded_loss, loss, rtol=1e-5, atol=1e-6)
    # gradients: a PAD target changes nothing either
    m.train()
    streams["token_ids"][0, 10:] = 0
    loss, _ = next_token_loss(m, streams, lengths)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_the_model_learns_a_code_that_always_follows_another():
    """Token 30 is always followed by token 31: after a few hundred steps top-1 accuracy there exceeds 90%."""
    rng = np.random.default_rng(4)
    seqs = []
    for _ in range(64):
        s = sequence(24, rng)
        ids = s["token_ids"]
        ids[(ids == 30) | (ids == 31)] = 32
        for i in rng.choice(np.arange(1, 22, 3), 4, replace=False):  # pairs never overlap
            ids[i], ids[i + 1] = 30, 31
        seqs.append(s)
    torch.manual_seed(0)
    m = EHRMamba(preset("tiny", VOCAB))
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for step in range(150):
        batch = length_batches([24] * 64, 16, 0, step)[0]
        streams, lengths = collate([seqs[i] for i in batch])
        loss, _ = next_token_loss(m, streams, lengths)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    m.eval()
    streams, lengths = collate(seqs)
    with torch.no_grad():
        predicted = m.logits(m(streams)).argmax(-1)
    after = streams["token_ids"][:, :-1] == 30
    accuracy = (predicted[:, :-1][after] == 31).float().mean().item()
    assert accuracy > 0.9, accuracy


@pytest.mark.parametrize("n", [1, 10_000])
def test_a_sequence_of_one_token_and_one_of_ten_thousand(n):
    m = model()
    streams, lengths = collate([sequence(n, np.random.default_rng(5))])
    with torch.no_grad():
        hidden = m(streams)
        last, _ = m.prefill(streams, lengths)
    assert hidden.shape == (1, n, 32) and torch.isfinite(hidden).all()
    torch.testing.assert_close(last[0], hidden[0, -1])
    assert tuple(streams) == STREAMS
