"""Prediction points and their labels, from one patient's timeline (a pure function of it).

The rules are those of the registry (``tasks.toml``); times are seconds since the epoch. Labels read only what
happened in the outcome window; the model's input for a point is the part of the sequence known at its
prediction time (``TokenSequence.known_at``).
"""

from __future__ import annotations

from dataclasses import dataclass

from odyssey_batch.labels.tasks import Registry, Task
from odyssey_batch.sequences.grammar import TokenType
from odyssey_batch.sequences.timeline import DAY, Timeline

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Stay:
    """An inpatient stay: consecutive inpatient encounters, transfers merged."""

    start: float
    end: float | None  # None while ongoing
    first_encounter_id: str
    last_encounter_id: str
    died: bool = False  # an encounter of the stay was discharged with a disposition meaning death


@dataclass(frozen=True, slots=True)
class LabelPoint:
    task: str
    patient_id: str
    prediction_time: float
    label: bool | None  # None when censored
    censored: bool
    window_end: float
    index_encounter_id: str


def inpatient_stays(timeline: Timeline, registry: Registry) -> list[Stay]:
    """Hospital admissions (the registry's inpatient classes, or what the source profile calls an admission),
    transfers within ``transfer_gap_hours`` merged into one stay."""
    encounters = sorted(
        (e for e in timeline.encounters
         if (e.admission or e.class_code in registry.inpatient_classes) and e.start is not None),
        key=lambda e: (e.start, e.encounter_id),
    )  # fmt: skip
    gap = registry.transfer_gap_hours * HOUR
    stays: list[Stay] = []
    for enc in encounters:
        if stays and stays[-1].end is not None and enc.start <= stays[-1].end + gap:  # type: ignore[operator]
            last = stays[-1]
            end = None if enc.end is None else max(last.end, enc.end)  # type: ignore[type-var]
            stays[-1] = Stay(last.start, end, last.first_encounter_id, enc.encounter_id, last.died or enc.died_in_stay)
        elif stays and stays[-1].end is None:
            continue  # an admission inside an ongoing stay
        else:
            stays.append(Stay(enc.start, enc.end, enc.encounter_id, enc.encounter_id, enc.died_in_stay))  # type: ignore[arg-type]
    return stays


def first_diagnoses(timeline: Timeline, registry: Registry) -> dict[str, float]:
    """Per code set, the time of the patient's first diagnosis with one of its codes."""
    first: dict[str, float] = {}
    for event in timeline.events:
        if event.kind != TokenType.CONDITION:
            continue
        for name, code_set in registry.code_sets.items():
            if (name not in first or event.time < first[name]) and code_set.contains(event.code):  # type: ignore[operator]
                first[name] = event.time  # type: ignore[assignment]
    return first


def task_points(timeline: Timeline, registry: Registry, data_end: float) -> list[LabelPoint]:
    stays = inpatient_stays(timeline, registry)
    diagnosed = first_diagnoses(timeline, registry)
    points = []
    for task in registry.tasks:
        for i in range(len(stays)):
            point = _point(task, timeline, stays, i, diagnosed, data_end)
            if point is not None:
                points.append(point)
    return points


def trigger(task: Task, stay: Stay, death: float | None, data_end: float) -> tuple[float, str] | None:
    """The task's prediction time for a stay and the index encounter, or None when the stay triggers nothing by
    ``data_end`` (labels and nightly scoring share this rule)."""
    if task.trigger == "discharge":
        if stay.end is None or stay.died or (death is not None and death <= stay.end):
            return None  # ongoing, or the patient died during the stay (a date-only death: on or before its day)
        when, index = stay.end, stay.last_encounter_id
    else:
        when, index = stay.start + task.offset_hours * HOUR, stay.first_encounter_id
        length = (stay.end if stay.end is not None else data_end) - stay.start
        if length < task.min_stay_hours * HOUR:
            return None
    return None if when > data_end else (when, index)


def _point(
    task: Task, timeline: Timeline, stays: list[Stay], i: int, diagnosed: dict[str, float], data_end: float
) -> LabelPoint | None:
    stay, death = stays[i], timeline.death
    triggered = trigger(task, stay, death, data_end)
    if triggered is None:
        return None
    when, index = triggered

    if task.outcome == "stay_longer":
        window_end = stay.start + task.days * DAY
        if stay.end is not None:
            label: bool | None = stay.end > window_end
        else:
            label = True if data_end > window_end else None
        return LabelPoint(task.name, timeline.patient_id, when, label, label is None, window_end, index)

    window_end = when + task.days * DAY
    if task.outcome == "death":
        outcome = death
    elif task.outcome == "admission":
        outcome = next((s.start for s in stays[i + 1 :] if s.start > when), None)
    else:
        assert task.code_set is not None
        outcome = diagnosed.get(task.code_set.name)
        if outcome is not None and outcome <= when:
            return None  # already diagnosed
    happened = outcome is not None and when < outcome <= min(window_end, data_end)
    died_first = death is not None and when < death <= window_end and (not happened or outcome > death)  # type: ignore[operator]
    if task.exclude_death_before_outcome and died_first:
        return None  # death inside the window before any outcome
    if happened:
        label = True
    elif window_end <= data_end or (task.outcome != "death" and death is not None and death <= data_end):
        label = False  # the window is over, or the patient died: nothing can follow
    else:
        label = None  # censored: the window runs past the end of the data
    return LabelPoint(task.name, timeline.patient_id, when, label, label is None, window_end, index)
