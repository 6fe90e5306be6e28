"""A patient's record as the warehouse holds it, and the timeline of visits built from it (pure functions).

Times are seconds since the Unix epoch (UTC), as floats. The rules are causal: what the timeline shows up to a
time t depends only on what was known at t, so that editing any event after a prediction time changes nothing
in that point's input (``tests/test_tokenize.py`` proves it on real data). Each rule is a deliberate choice
(README, *Sequences*):

* Nothing dated after the patient's death enters the timeline: not an event, not an encounter that starts
  after it (Synthea writes a death-certification encounter and a cause-of-death observation afterwards; they
  would leak mortality). Encounters that outlive the death end at it.
* Every encounter is a visit, with or without events (that a visit happened is information, and whether one
  shows must not depend on what is recorded later). Encounters whose periods overlap or touch are one visit
  (an emergency visit ending as the admission starts).
* Visit boundaries come from encounter periods only, never from event times (a late result must not move a
  visit's end). An encounter without an end lasts until the patient's next encounter starts (one second
  before it), or until the end of the data.
* An event sits in the visit whose span holds its time: its own encounter's, else (unlinked, or dated outside
  its encounter) any visit holding it, else it is dropped and counted (``outside_visit``). An event without a
  time takes its encounter's start; without either it is dropped and counted (``no_time``).
* A condition enters at the time it became known: ``recordedDate``, else its onset; an onset years before the
  visit that recorded it is moved to that visit's start (it was not known earlier). A condition with neither
  takes its encounter's start, or its end where the source profile says so (MIMIC's billing diagnoses).
* A date-only death (``death_until`` set) is a calendar day: events and encounters of that day still belong to
  the record; ``death`` stays the day's first instant (labels compare it with discharge times).
* With a source profile whose ``outside_encounters`` is ``day`` (``outpatient_zone`` set), events outside every
  encounter are not dropped: those of one calendar day in that zone, between the same two visits, form one
  outpatient visit from its first to its last event. Such a visit never straddles a real one, and no
  prediction time falls inside it, so its end (its last event) is known when any point's input is cut.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo

from odyssey_batch.sequences.grammar import EVENT_KINDS

DAY = 86400.0
YEAR = 365.25 * DAY
_KIND_ORDER = {kind: i for i, kind in enumerate(EVENT_KINDS)}


class Encounter(NamedTuple):
    encounter_id: str
    class_code: str | None
    start: float | None
    end: float | None
    admission: bool = False  # a hospital admission, as the source profile defines it
    part_of: str | None = None  # the admission a sub-encounter (an ICU stay) belongs to
    died_in_stay: bool = False  # its discharge disposition means the patient died during it


class Event(NamedTuple):
    """One condition, procedure, medication request or lab result. ``code`` is ``SYSTEM:code``; ``value`` is
    the numeric result in the code's canonical unit (NaN when there is none). A tuple: millions are made."""

    time: float | None
    kind: int  # a TokenType
    code: str
    encounter_id: str | None
    value: float = math.nan
    unit: str | None = None
    display: str | None = None


@dataclass(slots=True)
class PatientRecord:
    patient_id: str
    birth: float | None  # the birth date's first instant
    death: float | None
    encounters: list[Encounter] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    death_until: float | None = None  # a date-only death: the last instant of that day (else the death itself)
    outpatient_zone: str | None = None  # events outside encounters form per-day outpatient visits in this zone


@dataclass(slots=True)
class Visit:
    start: float
    end: float
    encounter_ids: tuple[str, ...]
    events: list[Event]


@dataclass(slots=True)
class Timeline:
    patient_id: str
    birth: float | None
    death: float | None
    encounters: list[Encounter]  # every encounter that started before death, with or without events
    visits: list[Visit]
    dropped: Counter[str] = field(default_factory=Counter)  # after_death, no_time, unlinked

    @property
    def events(self) -> list[Event]:
        return [e for v in self.visits for e in v.events]


def condition_known_time(onset: float | None, recorded: float | None, encounter_start: float | None) -> float | None:
    """When a diagnosis became known: recorded, else onset, never before the visit that recorded it."""
    when = recorded if recorded is not None else onset
    if when is not None and encounter_start is not None and when < encounter_start:
        return encounter_start
    return when


def build_timeline(record: PatientRecord, data_end: float | None = None) -> Timeline:
    """The patient's visits; ``data_end`` closes an encounter still open at the end of the data (default: the
    latest time in the record)."""
    death = record.death
    cutoff = record.death_until if record.death_until is not None else death  # the record ends here
    dropped: Counter[str] = Counter()
    encounters = [e for e in record.encounters if e.start is not None and (cutoff is None or e.start <= cutoff)]
    dropped["encounter_after_death"] = sum(1 for e in record.encounters if e.start is not None) - len(encounters)
    encounters.sort(key=lambda e: (e.start, e.encounter_id))
    starts = {e.encounter_id: e.start for e in encounters}

    events: list[Event] = []
    for event in record.events:
        if event.time is None:
            start = starts.get(event.encounter_id) if event.encounter_id is not None else None
            if start is None:
                dropped["no_time"] += 1
                continue
            event = event._replace(time=start)
        if cutoff is not None and event.time > cutoff:  # type: ignore[operator]
            dropped["after_death"] += 1
            continue
        events.append(event)

    if data_end is None:
        data_end = max([e.time for e in events] + [e.end or e.start for e in encounters], default=0.0)  # type: ignore[type-var]
    periods = []  # (start, end, encounter_id): an open encounter lasts until the next one starts
    for i, enc in enumerate(encounters):
        end = enc.end
        if end is None:
            later = next((e.start for e in encounters[i + 1 :] if e.start > enc.start), None)  # type: ignore[operator]
            end = later - 1.0 if later is not None else max(data_end, enc.start)  # type: ignore[operator, type-var]
        end = max(end, enc.start)  # type: ignore[type-var]
        if cutoff is not None:
            end = min(end, cutoff)
        periods.append((enc.start, end, enc.encounter_id))

    visits: list[Visit] = []
    home: dict[str, Visit] = {}
    for start, end, eid in periods:  # sorted by start
        if visits and start <= visits[-1].end:  # type: ignore[operator]
            last = visits[-1]
            last.end = max(last.end, end)
            last.encounter_ids = (*last.encounter_ids, eid)
        else:
            visits.append(Visit(start, end, (eid,), []))  # type: ignore[arg-type]
        home[eid] = visits[-1]

    visit_starts = [v.start for v in visits]
    outside: list[Event] = []
    for event in events:
        visit = home.get(event.encounter_id) if event.encounter_id is not None else None
        if visit is None or not visit.start <= event.time <= visit.end:  # type: ignore[operator]
            visit = _holding(visits, visit_starts, event.time)  # type: ignore[arg-type]
        if visit is None:
            outside.append(event)
        else:
            visit.events.append(event)
    if outside and record.outpatient_zone:
        visits = sorted(visits + _day_visits(outside, visit_starts, record.outpatient_zone), key=lambda v: v.start)
    elif outside:
        dropped["outside_visit"] += len(outside)
    for visit in visits:
        visit.events.sort(key=lambda e: (e.time, _KIND_ORDER[e.kind], e.code, e.value if e.value == e.value else -1))
    return Timeline(record.patient_id, record.birth, death, encounters, visits, +dropped)


def _day_visits(events: list[Event], visit_starts: list[float], zone: str) -> list[Visit]:
    """Outpatient visits of events outside every visit: one per calendar day in ``zone`` and gap between visits."""
    tz = ZoneInfo(zone)
    groups: dict[tuple[object, int], list[Event]] = {}
    for event in sorted(events, key=lambda e: e.time):  # type: ignore[arg-type, return-value]
        key = (datetime.fromtimestamp(event.time, tz).date(), bisect.bisect_right(visit_starts, event.time))  # type: ignore[arg-type]
        groups.setdefault(key, []).append(event)
    return [Visit(group[0].time, group[-1].time, (), group) for group in groups.values()]  # type: ignore[arg-type]


def _holding(visits: list[Visit], starts: list[float], time: float) -> Visit | None:
    i = bisect.bisect_right(starts, time) - 1
    return visits[i] if i >= 0 and visits[i].end >= time else None
