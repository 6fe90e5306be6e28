"""Who gets a score tonight, and as of when: pure functions of a patient's record and the scoring time.

* ``record_as_of`` keeps what the warehouse knew at the scoring time: encounters started by then (one still open
  then is open), events timed by then, a death by then. A late-arriving record of something that happened
  before is kept — it is in the warehouse now — but nothing after the scoring time is ever read.
* ``eligible`` applies the task registry. Cohort ``triggers`` (the default): a task's prediction point is
  its trigger, as in training and labels (``labels.points.trigger``), and a patient is eligible when that
  trigger happened in the task's look-back window ``(as_of − score_lookback_hours, as_of]`` — the discharges of
  the last day for mortality and readmission, the stays that reached 24 hours in the last day for the length of
  stay, the discharges of the last 30 days for the condition tasks (patients already diagnosed are not at
  risk of a first diagnosis). Cohort ``active``: every patient alive with an encounter in the last
  ``active_days`` days, every task, scored as of the scoring time.
"""

from __future__ import annotations

from dataclasses import dataclass

from odyssey_batch.labels.points import first_diagnoses, inpatient_stays, trigger
from odyssey_batch.labels.tasks import Registry
from odyssey_batch.sequences.timeline import DAY, PatientRecord, Timeline

HOUR = 3600.0
COHORTS = ("triggers", "active")


@dataclass(frozen=True, slots=True)
class Eligible:
    task: str
    prediction_time: float  # seconds since the epoch
    index_encounter_id: str | None


def record_as_of(record: PatientRecord, as_of: float) -> PatientRecord:
    """The record as the warehouse knew it at ``as_of``: nothing that happened after it."""
    encounters = [
        e if e.end is not None and e.end <= as_of else e._replace(end=None, died_in_stay=False)  # not discharged yet
        for e in record.encounters
        if e.start is not None and e.start <= as_of
    ]
    kept = {e.encounter_id for e in encounters}
    events = [
        e
        for e in record.events
        if (e.time is not None and e.time <= as_of) or (e.time is None and e.encounter_id in kept)
    ]
    death = record.death if record.death is not None and record.death <= as_of else None
    return PatientRecord(record.patient_id, record.birth, death, encounters, events,
                         record.death_until if death is not None else None, record.outpatient_zone)  # fmt: skip


def eligible(
    timeline: Timeline,
    registry: Registry,
    tasks: list[str],
    as_of: float,
    *,
    cohort: str = "triggers",
    active_days: float = 30.0,
) -> list[Eligible]:
    """The (task, prediction time) pairs to score for one patient (timeline built from ``record_as_of``)."""
    if cohort not in COHORTS:
        raise ValueError(f"cohort must be one of {', '.join(COHORTS)}, not {cohort!r}")
    if timeline.death is not None:
        return []
    chosen = [t for t in registry.tasks if t.name in tasks]
    diagnosed = first_diagnoses(timeline, registry)
    out = []
    if cohort == "active":
        since = as_of - active_days * DAY
        if any(max(e.start, e.end or as_of) > since for e in timeline.encounters if e.start is not None):
            for task in chosen:
                known = diagnosed.get(task.code_set.name) if task.code_set else None
                if known is None or known > as_of:
                    out.append(Eligible(task.name, as_of, None))
        return out
    stays = inpatient_stays(timeline, registry)
    for task in chosen:
        latest = None
        for stay in stays:
            triggered = trigger(task, stay, timeline.death, as_of)
            if triggered is None or not as_of - task.score_lookback_hours * HOUR < triggered[0] <= as_of:
                continue
            if task.code_set is not None:
                known = diagnosed.get(task.code_set.name)
                if known is not None and known <= triggered[0]:
                    continue  # already diagnosed: not at risk of a first diagnosis
            if latest is None or triggered[0] > latest[0]:
                latest = triggered
        if latest is not None:
            out.append(Eligible(task.name, latest[0], latest[1]))
    return out
