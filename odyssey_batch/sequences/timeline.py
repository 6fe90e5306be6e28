"""A patient's record as the warehouse holds it, and the timeline of visits built from it (pure functions).

Times are seconds since the Unix epoch (UTC), as floats. Rules, each a deliberate choice (README, *Sequences*):

* Nothing dated after the patient's death enters the timeline: not an event, not an encounter that starts
  after it (Synthea writes a death-certification encounter and a cause-of-death observation afterwards; they
  would leak mortality). Visits that outlive the death are clipped at it.
* A condition enters at the time it became known: ``recordedDate``, else its onset; an onset years before the
  visit that recorded it is moved to that visit's start (it was not known earlier).
* An event without a time takes its encounter's start; without either it is dropped and counted.
* A visit is a group of encounters whose spans overlap or touch (an emergency visit ending as the admission
  starts is one visit); a span runs from the earliest to the latest of the encounter's period and its events.
  Encounters without events make no visit (but still count as stays for the labels).
* An event linked to no known encounter joins the encounter whose period holds its time, else the visit whose
  span holds it, else it is dropped and counted (``unlinked``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from odyssey_batch.sequences.grammar import EVENT_KINDS, TokenType

DAY = 86400.0
YEAR = 365.25 * DAY
_KIND_ORDER = {kind: i for i, kind in enumerate(EVENT_KINDS)}


@dataclass(frozen=True, slots=True)
class Encounter:
    encounter_id: str
    class_code: str | None
    start: float | None
    end: float | None


@dataclass(frozen=True, slots=True)
class Event:
    """One condition, procedure, medication request or lab result. ``code`` is ``SYSTEM:code``; ``value`` is
    the numeric result in the code's canonical unit (NaN when there is none)."""

    time: float | None
    kind: TokenType
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


def build_timeline(record: PatientRecord) -> Timeline:
    death = record.death
    dropped: Counter[str] = Counter()
    encounters = [e for e in record.encounters if e.start is not None and (death is None or e.start <= death)]
    dropped["encounter_after_death"] = sum(1 for e in record.encounters if e.start is not None) - len(encounters)
    by_id = {e.encounter_id: e for e in encounters}

    linked: dict[str, list[Event]] = {}
    loose: list[Event] = []
    for event in record.events:
        enc = by_id.get(event.encounter_id) if event.encounter_id is not None else None
        if event.time is None:
            if enc is None:
                dropped["no_time"] += 1
                continue
            event = _at(event, enc.start)
        if death is not None and event.time > death:  # type: ignore[operator]
            dropped["after_death"] += 1
            continue
        if enc is None:  # not linked: the encounter whose period holds it, if any
            enc = next((e for e in encounters if e.start <= event.time <= (e.end or e.start)), None)  # type: ignore[operator]
        if enc is None:
            loose.append(event)
        else:
            linked.setdefault(enc.encounter_id, []).append(event)

    # spans of the encounters that have events, then overlapping or touching spans merge into visits
    spans = []
    for enc in encounters:
        events = linked.get(enc.encounter_id)
        if not events:
            continue
        times = [e.time for e in events]
        start = min(enc.start, *times)  # type: ignore[type-var]
        end = max(enc.end if enc.end is not None else enc.start, *times)  # type: ignore[type-var]
        spans.append((start, end, enc.encounter_id, events))
    spans.sort(key=lambda s: (s[0], s[1], s[2]))
    visits: list[Visit] = []
    for start, end, eid, events in spans:
        if visits and start <= visits[-1].end:
            last = visits[-1]
            last.end = max(last.end, end)
            last.encounter_ids = (*last.encounter_ids, eid)
            last.events.extend(events)
        else:
            visits.append(Visit(start, end, (eid,), list(events)))

    for event in loose:
        home = next((v for v in visits if v.start <= event.time <= v.end), None)  # type: ignore[operator]
        if home is None:
            dropped["unlinked"] += 1
        else:
            home.events.append(event)

    for visit in visits:
        visit.events.sort(key=lambda e: (e.time, _KIND_ORDER[e.kind], e.code, e.value if e.value == e.value else -1))
        if death is not None and visit.end > death:
            visit.end = death
    return Timeline(record.patient_id, record.birth, death, encounters, visits, +dropped)


def _at(event: Event, time: float | None) -> Event:
    return Event(time, event.kind, event.code, event.encounter_id, event.value, event.unit, event.display)
