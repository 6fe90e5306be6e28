"""Continuing a patient's token sequence with EHRMamba's recurrent state: sampling the future.

``generate`` encodes the history once (``prefill``) and then advances the recurrent state by one ``step`` per
generated token, so a continuation costs O(1) per token whatever the length of the history. Each token is drawn
from ``softmax(logits / temperature)`` restricted to the nucleus ``top_p`` (temperature 0: the most likely
token). Tokens a sequence never continues with are never drawn: ``[PAD]``, ``[UNK]``, ``[MASK]``, ``[CLS]``,
the ``[TASK:…]`` prompts, and ids beyond the vocabulary.

The side streams of each generated token follow the grammar of ``sequences.tokens.to_sequence``:

* **type**: from the token (``[VS]``, ``[VE]``, ``[REG]``, interval tokens; a concept's kind from its prefix);
* **time**: an interval token moves time forward by the gap it stands for (``INTERVAL_DAYS``: the shortest gap
  of its bin, so ``[W_2]`` is 14 days, ``[M_3]`` 90 days, ``[M_0]`` 28 days, ``[LT]`` 366 days: a forecast date
  is the earliest the tokens allow); the ``[VS]`` that follows is at that time, as in real sequences, where an
  interval token carries the next visit's start. Everything else keeps the current time. *Simplification*:
  real events carry their own times inside a visit and ``[VE]``/``[REG]`` the visit's end; generated ones all
  sit at the visit's start (the model does not predict durations), so a generated visit lasts no time;
* **visit order and segment**: ``[VS]`` opens a new visit (order + 1, segment alternating 1/2 as
  ``to_sequence`` and ``window`` assign them); an interval token carries the visit before it and segment 0;
  every other token belongs to the current visit;
* **age**: carried forward from the last known age by the time elapsed (``YEAR`` = 365.25 days); a history
  whose ages are all 0 (birth date unknown) keeps 0.

Sampling uses a ``torch.Generator`` seeded with ``seed``: the same model, history and seed give the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from odyssey_batch.sequences.grammar import (
    CLS,
    INTERVAL_TOKENS,
    LONG_TERM,
    MASK,
    MONTH_TOKENS,
    PAD,
    REG,
    UNK,
    VE,
    VS,
    WEEK_TOKENS,
    TokenType,
)
from odyssey_batch.sequences.tokens import STREAMS
from odyssey_batch.sequences.vocab import Vocabulary, concept_kind

if TYPE_CHECKING:
    import torch

    from odyssey_batch.model.ehrmamba import EHRMamba, InferenceCache

Streams = dict[str, np.ndarray]

DAYS_PER_YEAR = 365.25
# The gap (days) an interval token advances time by: the shortest gap of its bin (grammar.interval_token).
INTERVAL_DAYS: dict[str, float] = {
    **{token: 7.0 * k for k, token in enumerate(WEEK_TOKENS)},
    **{token: 28.0 if k == 0 else 30.0 * k for k, token in enumerate(MONTH_TOKENS)},
    LONG_TERM: 366.0,
}
NEVER_SAMPLED = (PAD, UNK, MASK, CLS)


class Generated(NamedTuple):
    """One generated token and its side streams; ``probability`` is the model's probability of the token at
    temperature 1 (over the tokens that may be sampled), whatever temperature and nucleus drew it."""

    token_id: int
    token: str
    type_id: int
    time_days: float
    age: float
    visit_order: int
    visit_segment: int
    probability: float


class TokenTable:
    """Per vocabulary id: its token type, the gap an interval token stands for, and whether it may be sampled."""

    def __init__(self, vocabulary: Vocabulary, size: int | None = None):
        size = len(vocabulary) if size is None else size
        self.vocabulary = vocabulary
        self.size = size
        self.types = np.zeros(size, dtype=np.int64)
        self.gaps = np.full(size, np.nan)
        self.allowed = np.zeros(size, dtype=bool)
        special = {VS: TokenType.VS, VE: TokenType.VE, REG: TokenType.REG, CLS: TokenType.CLS}
        for i, token in enumerate(vocabulary.tokens[:size]):
            if token in special:
                self.types[i] = special[token]
            elif token in INTERVAL_TOKENS:
                self.types[i] = TokenType.INTERVAL
                self.gaps[i] = INTERVAL_DAYS[token]
            elif token.startswith("[TASK:"):
                self.types[i] = TokenType.TASK
            elif (kind := concept_kind(token)) is not None:
                self.types[i] = kind
            self.allowed[i] = token not in NEVER_SAMPLED and self.types[i] != TokenType.TASK
        self.vs_id = vocabulary.id(VS)
        self.ve_id = vocabulary.id(VE)

    def token(self, token_id: int) -> str:
        return self.vocabulary.tokens[token_id]


class _State:
    """The side streams' running values for each generated row."""

    def __init__(self, history: Streams):
        ages = np.asarray(history["ages"], dtype=np.float64)
        orders = np.asarray(history["visit_orders"])
        visited = orders[orders > 0]
        self.time = np.array([float(history["times"][-1])])
        self.age = ages[-1:].copy()
        self.ageless = bool(np.all(ages == 0))
        self.order = np.array([int(visited[-1]) if visited.size else 0], dtype=np.int64)

    def repeat(self, rows: int) -> None:
        self.time, self.age, self.order = (np.repeat(a, rows) for a in (self.time, self.age, self.order))

    def segment(self) -> np.ndarray:
        return np.where(self.order > 0, (self.order - 1) % 2 + 1, 0)

    def advance(self, token_ids: np.ndarray, table: TokenTable) -> dict[str, np.ndarray]:
        """The streams of the next tokens (one per row); updates the running time, age and visit."""
        types = table.types[token_ids]
        gaps = table.gaps[token_ids]
        interval = types == TokenType.INTERVAL
        new_time = np.where(interval, self.time + np.nan_to_num(gaps), self.time)
        if not self.ageless:
            self.age = self.age + (new_time - self.time) / DAYS_PER_YEAR
        self.time = new_time
        self.order = np.where(types == TokenType.VS, self.order + 1, self.order)
        segments = np.where(interval, 0, self.segment())
        return {
            "token_ids": token_ids.astype(np.int64),
            "type_ids": types,
            "ages": self.age.astype(np.float32),
            "times": self.time.copy(),
            "visit_orders": self.order.copy(),
            "visit_segments": segments,
        }


def _tensors(streams: Streams, device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    dtypes = {"times": torch.float64, "ages": torch.float32}
    return {name: torch.as_tensor(v, dtype=dtypes.get(name, torch.long), device=device) for name, v in streams.items()}


def _device(model: EHRMamba) -> torch.device:
    return next(model.parameters()).device


def _prefill(model: EHRMamba, history: Streams) -> tuple[torch.Tensor, InferenceCache]:
    from odyssey_batch.training.data import collate

    streams, lengths = collate([{name: np.array(history[name]) for name in STREAMS}], _device(model))  # copies
    return model.prefill(streams, lengths)


def _masked(logits: torch.Tensor, table: TokenTable) -> torch.Tensor:
    import torch

    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    n = min(table.size, logits.shape[-1])
    allowed[:n] = torch.from_numpy(table.allowed[:n])
    return logits.float().masked_fill(~allowed, float("-inf"))


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from masked logits (rows, V): greedy at temperature 0, else nucleus sampling."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens
        keep = before < top_p
        keep[..., 0] = True  # the most likely token always stays
        ordered = ordered.masked_fill(~keep, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample(
    model: EHRMamba,
    history: Streams,
    vocabulary: Vocabulary,
    *,
    steps: int,
    rows: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_visit_end: bool = False,
    prefix: Sequence[int] = (),
    return_logits: bool = False,
) -> tuple[list[list[Generated]], np.ndarray | None, np.ndarray]:
    """``rows`` continuations of one history, advanced together (one prefill, then one batched step per token).

    ``prefix``: token ids appended to the history before sampling (one recurrent step each, side streams as
    for generated tokens; e.g. a visit's known ``[VS]``). Returns the continuations (each stops after its
    first ``[VE]`` with ``stop_at_visit_end``), the raw logits each token was drawn from (steps, rows, V) when
    ``return_logits``, and the next-token probabilities after the history and prefix (V,), over the tokens
    that may be sampled: the first step's distribution.
    """
    import torch

    if steps < 0 or rows < 1:
        raise ValueError("steps must be ≥ 0 and rows ≥ 1")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError("top_p must be in [0, 1] (0 keeps only the most likely token)")
    if temperature < 0:
        raise ValueError("temperature must be ≥ 0")
    if len(history["token_ids"]) == 0:
        raise ValueError("the history is empty: it needs at least [CLS]")
    table = TokenTable(vocabulary, model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, cache = _prefill(model, history)
            state = _State(history)
            for token_id in prefix:
                hidden = model.step(_tensors(state.advance(np.array([token_id]), table), device), cache)
            if rows > 1:
                cache = cache.select(torch.zeros(rows, dtype=torch.long, device=device))
                hidden = hidden.expand(rows, -1)
                state.repeat(rows)
            first = torch.softmax(_masked(model.logits(hidden[:1]).float().cpu(), table), dim=-1)[0].double().numpy()
            out: list[list[Generated]] = [[] for _ in range(rows)]
            done = np.zeros(rows, dtype=bool)
            kept_logits = []
            for _ in range(steps):
                raw = model.logits(hidden).float().cpu()  # sampled on the CPU: one generator, any device
                if return_logits:
                    kept_logits.append(raw.numpy().copy())
                masked = _masked(raw, table)
                chosen = _draw(masked, temperature, top_p, generator)
                probability = torch.softmax(masked, dim=-1).gather(-1, chosen[:, None])[:, 0].numpy()
                ids = chosen.numpy()
                streams = state.advance(ids, table)
                for r in np.flatnonzero(~done).tolist():
                    token_id = int(ids[r])
                    out[r].append(
                        Generated(
                            token_id,
                            table.token(token_id),
                            int(streams["type_ids"][r]),
                            float(streams["times"][r]),
                            float(streams["ages"][r]),
                            int(streams["visit_orders"][r]),
                            int(streams["visit_segments"][r]),
                            float(probability[r]),
                        )
                    )
                if stop_at_visit_end:
                    done |= ids == table.ve_id
                    if done.all():
                        break
                hidden = model.step(_tensors(streams, device), cache)
    finally:
        model.train(was_training)
    logits = np.stack(kept_logits) if return_logits and kept_logits else None
    if return_logits and logits is None:
        logits = np.zeros((0, rows, model.config.vocab_size), dtype=np.float32)
    return out, logits, first


def generate(
    model: EHRMamba,
    history: Streams,
    vocabulary: Vocabulary,
    *,
    steps: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_visit_end: bool = False,
    return_logits: bool = False,
) -> list[Generated] | tuple[list[Generated], np.ndarray]:
    """Continue ``history`` (one patient's streams, ``times`` in days, as a dataset stores them; usually a
    ``window``) by up to ``steps`` tokens.

    ``temperature`` 0 picks the most likely token at every step; otherwise tokens are drawn from
    ``softmax(logits / temperature)`` restricted to the smallest set of most likely tokens whose probability
    reaches ``top_p``. ``stop_at_visit_end`` ends after the first generated ``[VE]``. With ``return_logits`` also
    returns the raw logits (steps, vocab size) each token was drawn from (for tests and diagnostics).
    """
    out, logits, _ = sample(
        model,
        history,
        vocabulary,
        steps=steps,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_at_visit_end=stop_at_visit_end,
        return_logits=return_logits,
    )
    if return_logits:
        return out[0], logits[: len(out[0]), 0]  # type: ignore[index]
    return out[0]


def score_next(model: EHRMamba, history: Streams, vocabulary: Vocabulary | None = None) -> np.ndarray:
    """The model's next-token probabilities after ``history`` (vocab size,). With ``vocabulary``, over the
    tokens that may be sampled only (the others get 0), as ``generate`` sees them."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, _ = _prefill(model, history)
            logits = model.logits(hidden).float().cpu()
            if vocabulary is not None:
                logits = _masked(logits, TokenTable(vocabulary, model.config.vocab_size))
            return torch.softmax(logits, dim=-1)[0].numpy().astype(np.float64)
    finally:
        model.train(was_training)


def as_streams(history: Streams, generated: list[Generated]) -> Streams:
    """The history followed by generated tokens, as one set of streams (dtypes of the history)."""
    columns = {
        "token_ids": [g.token_id for g in generated],
        "type_ids": [g.type_id for g in generated],
        "ages": [g.age for g in generated],
        "times": [g.time_days for g in generated],
        "visit_orders": [g.visit_order for g in generated],
        "visit_segments": [g.visit_segment for g in generated],
    }
    return {
        name: np.concatenate([np.asarray(history[name]), np.asarray(values, dtype=np.asarray(history[name]).dtype)])
        for name, values in columns.items()
    }


def interval_days(token: str) -> float:
    """The gap (days) a generated interval token advances time by; NaN for any other token."""
    return INTERVAL_DAYS.get(token, math.nan)
