"""Timeline → token sequence with its side streams; cutting at a prediction time; truncation.

Side streams, one value per token (all the same length as the tokens):

* ``type_ids``: ``grammar.TokenType``;
* ``ages``: age in years at the token's time (0 when the birth date is unknown);
* ``times``: the token's real time (days since 1970-01-01 in datasets, seconds here), never the reference
  design's age-year approximation: ``[VS]`` at the visit start, events at their own time, ``[VE]`` and ``[REG]``
  at the visit end, an interval token at the *next* visit's start (the gap is known only then), ``[CLS]`` at the
  first visit's start. Times never decrease along a sequence, so "what was known at time t" is a prefix;
* ``visit_orders``: 1 for the first visit, 2 for the second …; 0 on ``[CLS]``; an interval token carries the
  visit before it;
* ``visit_segments``: 1 and 2 alternating by visit; 0 on ``[CLS]`` and interval tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from odyssey_batch.sequences.grammar import CLS, KIND_PREFIX, REG, VE, VS, TokenType, interval_token
from odyssey_batch.sequences.labs import LabBins
from odyssey_batch.sequences.timeline import DAY, YEAR, Event, Timeline
from odyssey_batch.sequences.vocab import lab_token

STREAMS = ("token_ids", "type_ids", "ages", "times", "visit_orders", "visit_segments")
STREAM_DTYPES = {
    "token_ids": np.int32,
    "type_ids": np.int8,
    "ages": np.float32,
    "times": np.float64,
    "visit_orders": np.int32,
    "visit_segments": np.int8,
}
CLS_ID, VS_ID = 3, 4  # grammar.SPECIAL_TOKENS


def event_token(event: Event, bins: LabBins | None) -> str:
    """The event's token; without ``bins``, a numeric lab's token lacks its bin (``bin_labs`` adds it)."""
    if event.kind == TokenType.LAB:
        numeric = event.value == event.value and bins is not None  # not NaN
        return lab_token(event.code, bins.bin(event.code, event.value) if numeric else None)  # type: ignore[union-attr]
    return f"{KIND_PREFIX[event.kind]}:{event.code}"


def vocabulary_key(event: Event) -> str:
    """What the vocabulary counts for an event: its token, or ``lab:<code>:q*`` for any value of a lab."""
    if event.kind == TokenType.LAB and event.value == event.value:
        return f"lab:{event.code}:q*"
    return f"{KIND_PREFIX[event.kind]}:{event.code}"


@dataclass
class TokenSequence:
    tokens: list[str]
    type_ids: np.ndarray
    ages: np.ndarray
    times: np.ndarray  # seconds since the epoch
    visit_orders: np.ndarray
    visit_segments: np.ndarray
    values: np.ndarray  # a numeric lab's value in its canonical unit, else NaN
    events: list[Event | None] | None = None  # the event behind each token (None for structural tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def known_at(self, when: float) -> int:
        """How many tokens were known at ``when`` (the sequence of a prediction point is this prefix)."""
        return 1 + int(np.searchsorted(self.times[1:], when, side="right"))


def to_sequence(timeline: Timeline, bins: LabBins | None, *, with_events: bool = False) -> TokenSequence:
    """The patient's tokens and side streams. Without ``bins`` numeric labs stay unbinned (``bin_labs``)."""
    visits = timeline.visits
    tokens: list[str] = [CLS]
    types: list[int] = [TokenType.CLS]
    times: list[float] = [visits[0].start if visits else 0.0]
    orders: list[int] = [0]
    segments: list[int] = [0]
    events: list[Event | None] = [None]
    for i, visit in enumerate(visits):
        order, segment, n = i + 1, 1 + i % 2, len(visit.events)
        if i:
            gap = math.floor((visit.start - visits[i - 1].end) / DAY)
            tokens += (interval_token(gap), VS)
            types += (TokenType.INTERVAL, TokenType.VS)
            times += (visit.start, visit.start)
            orders += (i, order)
            segments += (0, segment)
            events += (None, None)
        else:
            tokens.append(VS)
            types.append(TokenType.VS)
            times.append(visit.start)
            orders.append(order)
            segments.append(segment)
            events.append(None)
        tokens += [event_token(e, bins) for e in visit.events]
        tokens += (VE, REG)
        types += [e.kind for e in visit.events]
        types += (TokenType.VE, TokenType.REG)
        times += [e.time for e in visit.events]  # type: ignore[misc]
        times += (visit.end, visit.end)
        orders += [order] * (n + 2)
        segments += [segment] * (n + 2)
        events += visit.events
        events += (None, None)

    nan = math.nan
    values = np.asarray([e.value if e is not None and e.kind == TokenType.LAB else nan for e in events])
    time_array = np.asarray(times, dtype=np.float64)
    if timeline.birth is None:
        ages = np.zeros(len(tokens), dtype=np.float32)
    else:
        ages = ((time_array - timeline.birth) / YEAR).astype(np.float32)
    return TokenSequence(
        tokens,
        np.asarray(types, dtype=np.int8),
        ages,
        time_array,
        np.asarray(orders, dtype=np.int32),
        np.asarray(segments, dtype=np.int8),
        values,
        events if with_events else None,
    )


def bin_labs(tokens: list[str], values: np.ndarray, bins: LabBins) -> list[str]:
    """Tokens with the bin of every numeric lab added (for a sequence built without bins)."""
    out = list(tokens)
    for i in np.flatnonzero(~np.isnan(values)).tolist():
        code = out[i][len("lab:") :]
        out[i] = lab_token(code, bins.bin(code, float(values[i])))
    return out


def window_start(token_ids: np.ndarray, end: int, max_length: int) -> tuple[int, bool]:
    """Where the model input for the first ``end`` tokens starts (see ``window``), and whether it needs a
    synthetic ``[VS]`` (one visit alone is longer than the budget)."""
    if max_length < 3:
        raise ValueError("max_length must leave room for [CLS], [VS] and one event")
    if end <= max_length:
        return 0, False
    start = end - (max_length - 1)
    boundaries = np.flatnonzero(token_ids[start:end] == VS_ID)
    if boundaries.size:
        return start + int(boundaries[0]), False
    return start + 1, True  # room for [CLS] and a synthetic [VS]


def window(streams: dict[str, np.ndarray], end: int, max_length: int) -> dict[str, np.ndarray]:
    """The model input for the first ``end`` tokens of a sequence, at most ``max_length`` long.

    Keeps the most recent tokens, starting at a visit boundary (the first ``[VS]`` of the kept part) and
    prefixed with ``[CLS]``; when a single visit is longer than the budget, a synthetic ``[VS]`` opens it. Visit
    orders restart at 1 and segments at 1 from the first kept visit, as for a patient whose record began there.
    """
    start, synthetic = window_start(streams["token_ids"], end, max_length)
    if start == 0:
        return {name: streams[name][:end] for name in STREAMS}
    prefix = [(CLS_ID, TokenType.CLS), (VS_ID, TokenType.VS)] if synthetic else [(CLS_ID, TokenType.CLS)]
    kept = {name: streams[name][start:end] for name in STREAMS}
    visited = kept["visit_orders"][kept["visit_orders"] > 0]
    first_order = int(visited.min()) if visited.size else 1
    orders = np.where(kept["visit_orders"] > 0, kept["visit_orders"] - first_order + 1, 0)
    segments = np.where(kept["visit_segments"] > 0, (orders - 1) % 2 + 1, 0)
    n = len(prefix)
    result = {
        "token_ids": np.concatenate([np.array([p[0] for p in prefix]), kept["token_ids"]]),
        "type_ids": np.concatenate([np.array([p[1] for p in prefix]), kept["type_ids"]]),
        "ages": np.concatenate([np.repeat(kept["ages"][:1], n), kept["ages"]]),
        "times": np.concatenate([np.repeat(kept["times"][:1], n), kept["times"]]),
        "visit_orders": np.concatenate([np.array([0, 1][:n]), orders]),
        "visit_segments": np.concatenate([np.array([0, 1][:n]), segments]),
    }
    return {name: result[name].astype(STREAM_DTYPES[name]) for name in STREAMS}


def history_windows(streams: dict[str, np.ndarray], max_length: int) -> list[dict[str, np.ndarray]]:
    """A whole sequence as consecutive model inputs of at most ``max_length`` tokens, most recent first, each
    cut at a visit boundary (for pretraining on every token of a long history)."""
    out = []
    end = len(streams["token_ids"])
    while end > 1:
        start, _ = window_start(streams["token_ids"], end, max_length)
        out.append(window(streams, end, max_length))
        if start <= 1:
            break
        end = start
    return out
