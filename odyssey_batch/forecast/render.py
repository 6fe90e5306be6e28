"""Readable rows of a forecast: a patient's last real tokens, then the generated ones, with what they mean.

A concept's meaning is its kind and code (``diagnosis ICD10CM:I10``), with the warehouse's display text when the
code appears in the patient's own history (``… (Essential hypertension)``) and, for a lab, its value bin (very
low … very high: the training split's quintiles). A generated interval token shows the range of gaps it stands
for; generated dates are the earliest the interval tokens allow (``generate.INTERVAL_DAYS``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from odyssey_batch.forecast.generate import Generated
from odyssey_batch.sequences.grammar import (
    CLS,
    KIND_PREFIX,
    LONG_TERM,
    MONTH_TOKENS,
    REG,
    UNK,
    VE,
    VS,
    WEEK_TOKENS,
    TokenType,
)
from odyssey_batch.sequences.labs import LabBins
from odyssey_batch.sequences.timeline import DAY
from odyssey_batch.sequences.view import KIND_NAMES
from odyssey_batch.sequences.vocab import concept_kind

if TYPE_CHECKING:
    from odyssey_batch.sequences.store import Dataset

Streams = dict[str, np.ndarray]
_LAB_BIN = re.compile(r"^lab:(.+):q(\d+)$")


@dataclass
class ForecastRow:
    date: str  # YYYY-MM-DD (UTC)
    age: float
    visit: int
    token: str
    meaning: str
    probability: float | None  # the model's probability of a generated token; None for a real one
    generated: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PatientHistory:
    """One patient's whole sequence under a dataset's vocabulary and bins (``times`` in days, as stored)."""

    streams: Streams
    tokens: list[str]
    meanings: list[str]  # of each real token, from its event (display, value and unit, bin)
    displays: dict[str, str]  # concept code (a lab without its bin) -> the warehouse's display text


def interval_meaning(token: str) -> str:
    """The gaps an interval token stands for (``grammar.interval_token``)."""
    if token in WEEK_TOKENS:
        k = WEEK_TOKENS.index(token)
        return f"next visit {7 * k}–{7 * k + 6} days later"
    if token in MONTH_TOKENS:
        k = MONTH_TOKENS.index(token)
        low, high = (28, 29) if k == 0 else (30 * k, 365 if k == 12 else 30 * k + 29)
        return f"next visit {low}–{high} days later"
    if token == LONG_TERM:
        return "next visit more than a year later"
    return ""


def concept_meaning(token: str, displays: dict[str, str], bins: LabBins | None = None) -> str:
    """``diagnosis ICD10CM:I10 (Essential hypertension)``; a lab with its bin: ``result LOINC:2160-0
    (Creatinine) high``."""
    kind = concept_kind(token)
    if kind is None:
        return ""
    match = _LAB_BIN.match(token) if kind == TokenType.LAB else None
    code_token = f"lab:{match.group(1)}" if match else token
    code = code_token.split(":", 1)[1]
    text = f"{KIND_NAMES[kind]} {code}"
    if displays.get(code_token):
        text += f" ({displays[code_token]})"
    if match and bins is not None:
        text += f" {bins.describe(match.group(1), int(match.group(2)))}"
    elif match:
        text += f" bin {int(match.group(2)) + 1}"
    return text


def token_meaning(token: str, visit: int, displays: dict[str, str], bins: LabBins | None = None) -> str:
    """What any token means, for a reader."""
    if token == VS:
        return f"visit {visit} starts"
    if token == VE:
        return f"visit {visit} ends"
    if token == REG:
        return "visit summary position"
    if token == CLS:
        return "start of the record"
    if token == UNK:
        return "a code outside the vocabulary"
    return interval_meaning(token) or concept_meaning(token, displays, bins) or token


def _date(days: float) -> str:
    return dt.datetime.fromtimestamp(days * DAY, dt.UTC).strftime("%Y-%m-%d")


def history_rows(history: PatientHistory, last: int) -> list[ForecastRow]:
    """The last ``last`` real tokens of the patient's sequence."""
    s = history.streams
    start = max(0, len(history.tokens) - last)
    return [
        ForecastRow(
            _date(float(s["times"][i])),
            round(float(s["ages"][i]), 1),
            int(s["visit_orders"][i]),
            history.tokens[i],
            history.meanings[i],
            None,
            False,
        )
        for i in range(start, len(history.tokens))
    ]


def generated_rows(
    generated: list[Generated], displays: dict[str, str], bins: LabBins | None = None, visit_offset: int = 0
) -> list[ForecastRow]:
    """Rows of generated tokens; ``visit_offset`` renumbers visits from a window's (which restart at 1) to the
    whole sequence's."""
    rows = []
    for g in generated:
        visit = g.visit_order + visit_offset if g.visit_order > 0 else 0
        rows.append(
            ForecastRow(
                _date(g.time_days),
                round(g.age, 1),
                visit,
                g.token,
                token_meaning(g.token, visit, displays, bins),
                round(g.probability, 4),
                True,
            )
        )
    return rows


def patient_history(url: str, dataset: Dataset, patient_id: str) -> PatientHistory:
    """The patient's sequence rebuilt from the warehouse with ``dataset``'s vocabulary and lab bins (as
    ``sequences.view.patient_view`` and tokenization build it), with each token's meaning. Refused (``RunRejected``)
    while an ingest run the gate did not let through (``quality.gate.held_back_for``) holds data of the patient."""
    from odyssey_batch.quality.gate import RunRejected, held_back_for
    from odyssey_batch.sequences.dataset import encode
    from odyssey_batch.sequences.view import patient_sequence
    from odyssey_batch.warehouse import connect

    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            held = held_back_for(cur, patient_id)
    finally:
        conn.close()
    if held:  # the quality gate protects forecasts as it protects scores
        runs = ", ".join(map(str, held))
        raise RunRejected(f"the patient's record holds data from ingest run(s) {runs}, rejected by the data-quality "
                          "gate and not accepted (or not validated yet): validate it, accept it with "
                          "`odyssey-batch accept-run RUN --reason ...`, or load a corrected export")  # fmt: skip
    _, sequence = patient_sequence(url, dataset, patient_id)
    bins, vocabulary = dataset.bins, dataset.vocabulary
    streams = encode(sequence, vocabulary)
    displays: dict[str, str] = {}
    meanings = []
    for i, token in enumerate(sequence.tokens):
        event = sequence.events[i]  # type: ignore[index]
        visit = int(sequence.visit_orders[i])
        if event is None:
            meanings.append(token_meaning(token, visit, displays, bins))
            continue
        code_token = f"{KIND_PREFIX[TokenType(event.kind)]}:{event.code}"
        if event.display:
            displays.setdefault(code_token, event.display)
        text = f"{KIND_NAMES[TokenType(event.kind)]} {event.code}" + (f" ({event.display})" if event.display else "")
        if event.kind == TokenType.LAB and event.value == event.value:
            value = f"{event.value:g} {event.unit or ''}".rstrip()
            text += f" = {value}, {bins.describe(event.code, bins.bin(event.code, event.value))}"
        if vocabulary.id(token) == vocabulary.unk_id:
            text += " [not in the vocabulary]"
        meanings.append(text)
    return PatientHistory({k: np.asarray(v) for k, v in streams.items()}, list(sequence.tokens), meanings, displays)
