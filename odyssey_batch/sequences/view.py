"""One patient's timeline and tokens side by side, for a clinician (``odyssey-batch show-patient``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from odyssey_batch.sequences.extract import read_patient
from odyssey_batch.sequences.grammar import TokenType
from odyssey_batch.sequences.store import Dataset
from odyssey_batch.sequences.timeline import DAY, Timeline, build_timeline
from odyssey_batch.sequences.tokens import TokenSequence, to_sequence
from odyssey_batch.warehouse import connect

KIND_NAMES = {TokenType.CONDITION: "diagnosis", TokenType.PROCEDURE: "procedure",
              TokenType.MEDICATION: "medication", TokenType.LAB: "result"}  # fmt: skip


@dataclass
class TokenRow:
    time: str
    age: float
    visit: int
    kind: str
    token: str
    token_id: int
    meaning: str


def patient_sequence(url: str, dataset: Dataset, patient_id: str) -> tuple[Timeline, TokenSequence]:
    """One patient's timeline and tokens rebuilt from the warehouse as tokenization builds them, with
    ``dataset``'s data end and lab bins, each token keeping the event behind it (display text included)."""
    conn = connect(url)
    try:
        record = read_patient(conn, patient_id, display=True, units=dataset.bins.units)
    finally:
        conn.close()
    data_end = dt.datetime.fromisoformat(dataset.manifest["data_end"]).timestamp()
    timeline = build_timeline(record, data_end)
    return timeline, to_sequence(timeline, dataset.bins, with_events=True)


def patient_view(url: str, dataset: Dataset, patient_id: str) -> tuple[list[TokenRow], dict]:
    """The patient's tokens under ``dataset``'s vocabulary and bins, each with what it means."""
    timeline, sequence = patient_sequence(url, dataset, patient_id)
    bins, vocab = dataset.bins, dataset.vocabulary
    rows = []
    classes = {e.encounter_id: e.class_code for e in timeline.encounters}
    visit_classes = {
        i + 1: sorted({classes.get(e) or "?" for e in v.encounter_ids}) for i, v in enumerate(timeline.visits)
    }
    previous_end = None
    for i, token in enumerate(sequence.tokens):
        kind = TokenType(int(sequence.type_ids[i]))
        event = sequence.events[i]
        order = int(sequence.visit_orders[i])
        if event is not None:
            meaning = f"{KIND_NAMES[kind]}: {event.display or event.code}"
            if kind == TokenType.LAB and event.value == event.value:
                index = bins.bin(event.code, event.value)
                meaning += f" = {event.value:g} {event.unit or ''}".rstrip() + f" ({bins.describe(event.code, index)})"
        elif kind == TokenType.VS:
            meaning = f"visit {order} starts ({', '.join(visit_classes.get(order, []))})"
        elif kind == TokenType.VE:
            meaning = f"visit {order} ends"
            previous_end = sequence.times[i]
        elif kind == TokenType.INTERVAL:
            gap = (sequence.times[i] - previous_end) / DAY if previous_end is not None else 0.0
            meaning = f"{gap:.0f} days until the next visit"
        elif kind == TokenType.REG:
            meaning = "visit summary position"
        else:
            meaning = "start of the record"
        token_id = vocab.id(token)
        if token_id == vocab.unk_id and kind >= TokenType.CONDITION:
            meaning += " [not in the vocabulary]"
        rows.append(
            TokenRow(
                dt.datetime.fromtimestamp(sequence.times[i], dt.UTC).strftime("%Y-%m-%d %H:%M"),
                round(float(sequence.ages[i]), 1),
                order,
                kind.name.lower(),
                token,
                token_id,
                meaning,
            )
        )
    summary = {
        "patient_id": patient_id,
        "dataset_version": dataset.version,
        "visits": len(timeline.visits),
        "tokens": len(sequence),
        "dropped": dict(timeline.dropped),
    }
    return rows, summary
