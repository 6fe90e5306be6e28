"""How well sampled futures predict a patient's next visit: recall@k of its codes, model against a baseline.

For every test-split patient of the pretraining run's dataset version with at least two visits (taken in
patient-id order, at most ``max_patients``):

* **the question**: the history known when the last visit begins: every token up to and including the
  interval token before the last ``[VS]`` (an interval token is timed at the next visit's start), cut to the
  run's ``max_length`` by ``sequences.tokens.window``;
* **the truth**: the distinct concept codes of that last visit, between its ``[VS]`` and ``[VE]``. A code is a
  concept token without a lab's value bin (``lab:LOINC:2160-0:q3`` → ``lab:LOINC:2160-0``): what was
  diagnosed, done, prescribed or measured, not the value. Tokens outside the vocabulary (``[UNK]``) are not
  codes; a patient whose last visit has no code is skipped (counted in ``skipped``);
* **the model**: ``samples`` continuations of the history and the visit's ``[VS]`` (known at the visit's
  start, with the interval token), each sampled until its ``[VE]`` (at most ``max_visit_tokens`` tokens).
  Codes rank by the number of continuations that contain them, ties broken by the first step's probability
  (the next-token distribution right after the ``[VS]``, summed over a lab's bins), so every code of the
  vocabulary has a rank;
* **the baseline**: the patient's own codes in the whole known history (not only the window), by how often
  they occurred, ties by recency (the most recently seen first);
* recall@k = |top k ∩ truth| / |truth|, averaged over patients, for both rankings in the same run.

Sampling is seeded per patient from ``seed`` and the patient's position: the same run and seed give the same
numbers.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from odyssey_batch.sequences.grammar import UNK, VE, VS, TokenType
from odyssey_batch.sequences.vocab import concept_kind
from odyssey_batch.settings import Settings

Progress = Callable[[int, int], None]  # patients done, patients in all
_LAB_BIN = re.compile(r":q\d+$")


def concept_code(token: str) -> str | None:
    """The code a concept token stands for (a lab without its value bin); None for any other token."""
    kind = concept_kind(token)
    if kind is None:
        return None
    return _LAB_BIN.sub("", token) if kind == TokenType.LAB else token


def visit_codes(tokens: Iterable[str]) -> set[str]:
    """The distinct codes among ``tokens``."""
    return {c for c in map(concept_code, tokens) if c is not None}


def baseline_ranking(history: Sequence[str]) -> list[str]:
    """The codes of a history by frequency, ties by recency (the most recently seen first), then by text."""
    counts: Counter[str] = Counter()
    last_seen: dict[str, int] = {}
    for i, token in enumerate(history):
        code = concept_code(token)
        if code is not None:
            counts[code] += 1
            last_seen[code] = i
    return sorted(counts, key=lambda c: (-counts[c], -last_seen[c], c))


def model_ranking(samples: Sequence[Iterable[str]], first_step: dict[str, float]) -> list[str]:
    """Codes by the number of sampled continuations that contain them, ties by the first step's probability
    (``first_step``: code → probability), then by text. Every code of ``first_step`` or of a sample is ranked."""
    counts: Counter[str] = Counter()
    for tokens in samples:
        counts.update(visit_codes(tokens))
    codes = set(first_step) | set(counts)
    return sorted(codes, key=lambda c: (-counts[c], -first_step.get(c, 0.0), c))


def recall_at_k(ranking: Sequence[str], truth: set[str], k: int) -> float:
    """|top k of ``ranking`` ∩ ``truth``| / |``truth``| (``truth`` must not be empty)."""
    if not truth:
        raise ValueError("recall needs at least one true code")
    return len(set(ranking[:k]) & truth) / len(truth)


def last_visit_cut(token_ids: np.ndarray, vs_id: int = 4) -> int | None:
    """Where the history before the last visit ends (the index of the last ``[VS]``: tokens before it are
    known when the visit begins); None for fewer than two visits."""
    starts = np.flatnonzero(np.asarray(token_ids) == vs_id)
    return int(starts[-1]) if len(starts) >= 2 else None


def visit_tokens(tokens: Sequence[str], start: int) -> list[str]:
    """The tokens of the visit whose ``[VS]`` is at ``start``, up to its ``[VE]`` (or the end)."""
    out = []
    for token in tokens[start + 1 :]:
        if token in (VE, VS):
            break
        out.append(token)
    return out


def code_probabilities(probabilities: np.ndarray, tokens: Sequence[str]) -> dict[str, float]:
    """Next-token probabilities summed per code (a lab's bins together)."""
    out: dict[str, float] = {}
    for i, token in enumerate(tokens[: len(probabilities)]):
        code = concept_code(token)
        if code is not None:
            out[code] = out.get(code, 0.0) + float(probabilities[i])
    return out


def _patient_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def evaluate_forecast(
    url: str,
    settings: Settings,
    pretrain_run: int | None = None,
    *,
    k: tuple[int, ...] = (5, 10, 20),
    max_patients: int = 200,
    samples: int = 10,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_visit_tokens: int = 128,
    progress: Progress | None = None,
) -> dict:
    """Recall@k of the last visit's codes on test-split patients: sampled continuations vs the frequency
    baseline (see the module's docstring). Returns ``{"patients", "k", "model": {"recall@K": …}, "baseline":
    {…}, "seconds", …}``."""
    from odyssey_batch.forecast.generate import sample
    from odyssey_batch.forecast.runs import load_pretrained
    from odyssey_batch.sequences.tokens import window
    from odyssey_batch.training.data import load_sequences

    if not k or min(k) < 1:
        raise ValueError("k needs at least one cut-off ≥ 1")
    if samples < 1 or max_patients < 1:
        raise ValueError("samples and max_patients must be ≥ 1")
    started = time.perf_counter()
    pretrained = load_pretrained(url, settings, pretrain_run)
    vocabulary = pretrained.dataset.vocabulary
    tokens_of = vocabulary.tokens
    vs_id, unk = vocabulary.id(VS), UNK
    ids, rows = load_sequences(pretrained.dataset, "test")
    chosen = []
    skipped = {"fewer_than_2_visits": 0, "no_known_code_in_last_visit": 0}
    for _, streams in sorted(zip(ids, rows, strict=True), key=lambda pair: pair[0]):
        if len(chosen) == max_patients:
            break
        cut = last_visit_cut(streams["token_ids"], vs_id)
        if cut is None:
            skipped["fewer_than_2_visits"] += 1
            continue
        tokens = [tokens_of[i] for i in streams["token_ids"]]
        truth = visit_codes(t for t in visit_tokens(tokens, cut) if t != unk)
        if not truth:
            skipped["no_known_code_in_last_visit"] += 1
            continue
        chosen.append((streams, tokens, cut, truth))

    model_recall = {c: [] for c in k}
    baseline_recall = {c: [] for c in k}
    true_sizes = []
    for index, (streams, tokens, cut, truth) in enumerate(chosen):
        history = window(streams, cut, pretrained.max_length)
        continuations, _, first = sample(
            pretrained.model,
            history,
            vocabulary,
            steps=max_visit_tokens,
            rows=samples,
            temperature=temperature,
            top_p=top_p,
            seed=_patient_seed(seed, index),
            stop_at_visit_end=True,
            prefix=(vs_id,),
        )
        visits = [visit_tokens([VS, *(g.token for g in c)], 0) for c in continuations]  # up to [VE] (or a new [VS])
        ranked = model_ranking(visits, code_probabilities(first, tokens_of))
        own = baseline_ranking(tokens[:cut])
        for c in k:
            model_recall[c].append(recall_at_k(ranked, truth, c))
            baseline_recall[c].append(recall_at_k(own, truth, c))
        true_sizes.append(len(truth))
        if progress is not None:
            progress(index + 1, len(chosen))

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "pretrain_run": pretrained.run_id,
        "dataset_version": pretrained.dataset.version,
        "patients": len(chosen),
        "skipped": skipped,
        "k": list(k),
        "samples": samples,
        "seed": seed,
        "max_length": pretrained.max_length,
        "true_codes_per_visit": mean(true_sizes),
        "model": {f"recall@{c}": mean(model_recall[c]) for c in k},
        "baseline": {f"recall@{c}": mean(baseline_recall[c]) for c in k},
        "seconds": round(time.perf_counter() - started, 3),
    }
