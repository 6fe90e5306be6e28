"""Read patients' records out of the warehouse, a range of patient ids at a time (bounded memory).

Patients are taken in ``patient_id`` order in chunks; each chunk is six range queries over the ``ehr`` tables'
``patient_id`` indexes. Nothing here decides what enters a sequence: that is ``timeline.build_timeline``. The
warehouse's source profile (the one its latest ingest run recorded) says when a condition without a time
became known, the zone of outpatient days, and how long a date-only death day lasts; every reader (tokenize,
scoring, forecasting, ``show-patient``) thus builds the same timelines.

What the data-quality gate excluded (``quality.exclusions``: whole patients, single records) is never read: the
readers take the exclusions in force and count what they skip. Numeric labs are placed in their lab (and converted)
by ``labs.LabUnits`` when one is given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg2.extensions

from odyssey_batch.profiles import SourceProfile, load_profile
from odyssey_batch.quality.exclusions import Exclusions, current
from odyssey_batch.sequences.grammar import TokenType
from odyssey_batch.sequences.labs import LabUnits, canonical_value
from odyssey_batch.sequences.timeline import Encounter, Event, PatientRecord, condition_known_time

_EPOCH = "extract(epoch FROM {})::float8"


def _t(column: str) -> str:
    return _EPOCH.format(column)


def _queries(display: bool) -> dict[str, str]:
    d = ", display" if display else ", NULL"
    od = ", o.display" if display else ", NULL"
    cd = ", c.display" if display else ", NULL"
    return {
        "patient": f"""SELECT patient_id, {_t("birth_date")}, {_t("death_time")}, coalesce(death_date_only, false)
                       FROM ehr.patient WHERE {{where}}""",
        "encounter": f"""SELECT patient_id, encounter_id, class_code, {_t("start_time")}, {_t("end_time")},
                                coalesce(admission, false), part_of, coalesce(died_in_stay, false)
                         FROM ehr.encounter WHERE {{where}}""",
        "condition": f"""SELECT patient_id, condition_id, encounter_id, code_system, code, {_t("onset_time")},
                                {_t("recorded_time")}{d}
                         FROM ehr.condition WHERE code IS NOT NULL AND {{where}}""",
        "procedure": f"""SELECT patient_id, procedure_id, encounter_id, code_system, code, {_t("performed_time")}{d}
                         FROM ehr.procedure WHERE code IS NOT NULL AND {{where}}""",
        "medication": f"""SELECT patient_id, medication_request_id, encounter_id, code_system, code,
                                 {_t("authored_time")}{d}
                          FROM ehr.medication_request WHERE code IS NOT NULL AND {{where}}""",
        # an observation with components and no value of its own (a blood-pressure panel) is its components
        "observation": f"""SELECT o.patient_id, o.observation_id, o.encounter_id, o.code_system, o.code,
                                  {_t("o.effective_time")}, o.value_num, o.unit{od}
                           FROM ehr.observation o
                           WHERE o.code IS NOT NULL AND {{where}}
                             AND (o.value_num IS NOT NULL OR NOT EXISTS (
                                  SELECT 1 FROM ehr.observation_component c WHERE c.observation_id = o.observation_id))
                           UNION ALL
                           SELECT o.patient_id, o.observation_id, o.encounter_id, c.code_system, c.code,
                                  {_t("o.effective_time")}, c.value_num, c.unit{cd}
                           FROM ehr.observation o JOIN ehr.observation_component c USING (observation_id)
                           WHERE c.code IS NOT NULL AND {{where}}""",
    }


def warehouse_profile(conn: psycopg2.extensions.connection) -> SourceProfile:
    """The source profile of the warehouse: the one its latest finished ingest run used (generic if none)."""
    with conn.cursor() as cur:
        cur.execute(
            """SELECT source_profile FROM ops.ingest_run
               WHERE status IN ('succeeded', 'validated', 'rejected') AND source_profile IS NOT NULL
               ORDER BY run_id DESC LIMIT 1"""
        )
        row = cur.fetchone()
    return load_profile(row[0] if row else "")


def day_end(start: float, zone: str | None) -> float:
    """The last instant (1 ms before the next midnight) of the calendar day that starts at ``start``."""
    if not zone:
        return start + 86400.0 - 0.001
    tz = ZoneInfo(zone)
    day = datetime.fromtimestamp(start, tz).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() - 0.001


KINDS = {"condition": "Condition", "procedure": "Procedure", "medication": "MedicationRequest",
         "observation": "Observation", "encounter": "Encounter"}  # fmt: skip


def patient_ids(conn: psycopg2.extensions.connection, exclusions: Exclusions | None = None) -> list[str]:
    """Every patient's id, sorted, without the patients the gate excluded (counted in ``exclusions.skipped``)."""
    with conn.cursor() as cur:
        cur.execute("SELECT patient_id FROM ehr.patient ORDER BY patient_id")
        ids = [r[0] for r in cur.fetchall()]
    return exclusions.keep_patients(ids) if exclusions is not None else ids


def lab_unit_counts(conn: psycopg2.extensions.connection) -> Counter[tuple[str, str]]:
    """Numeric results per (lab code, unit) in the warehouse, units after the per-code conversions: what
    ``LabUnits.fit`` needs."""
    counts: Counter[tuple[str, str]] = Counter()
    with conn.cursor() as cur:
        cur.execute(
            """SELECT code_system, code, unit, count(*) FROM (
                   SELECT code_system, code, unit FROM ehr.observation WHERE value_num IS NOT NULL AND unit IS NOT NULL
                   UNION ALL
                   SELECT code_system, code, unit FROM ehr.observation_component
                   WHERE value_num IS NOT NULL AND unit IS NOT NULL) x
               GROUP BY 1, 2, 3"""
        )
        for system, code, unit, n in cur.fetchall():
            counts[(f"{system}:{code}", canonical_value(system, code, unit, 1.0)[1])] += n
    return counts


def iter_records(
    conn: psycopg2.extensions.connection,
    ids: list[str],
    chunk: int = 2000,
    *,
    display: bool = False,
    profile: SourceProfile | None = None,
    exclusions: Exclusions | None = None,
    units: LabUnits | None = None,
) -> Iterator[list[PatientRecord]]:
    """The records of ``ids`` (sorted, as ``patient_ids`` returns them), ``chunk`` patients at a time."""
    profile = profile or warehouse_profile(conn)
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        yield read_records(conn, "{p}patient_id BETWEEN %(lo)s AND %(hi)s", {"lo": part[0], "hi": part[-1]}, display,
                           profile, exclusions, units)  # fmt: skip


def read_patient(conn: psycopg2.extensions.connection, patient_id: str, *, display: bool = True,
                 units: LabUnits | None = None) -> PatientRecord:  # fmt: skip
    """One patient's record, without what the gate excluded; LookupError for an unknown or excluded patient."""
    with conn.cursor() as cur:
        exclusions = current(cur, patient_id)
    if patient_id in exclusions.patients:
        raise LookupError("the data-quality gate excluded this patient (see ops.dq_exclusion_current)")
    records = read_records(conn, "{p}patient_id = %(id)s", {"id": patient_id}, display, warehouse_profile(conn),
                           exclusions, units)  # fmt: skip
    if not records:
        raise LookupError("no patient with that id in the warehouse")
    return records[0]


def read_patients(
    conn: psycopg2.extensions.connection,
    ids: list[str],
    *,
    display: bool = False,
    exclusions: Exclusions | None = None,
    units: LabUnits | None = None,
) -> list[PatientRecord]:
    """The records of the given patients (any order; unknown and excluded ids are skipped)."""
    if exclusions is not None:
        ids = exclusions.keep_patients(list(ids))
    return read_records(conn, "{p}patient_id = ANY(%(ids)s)", {"ids": list(ids)}, display, warehouse_profile(conn),
                        exclusions, units)  # fmt: skip


def read_records(
    conn: psycopg2.extensions.connection,
    where: str,
    params: dict,
    display: bool,
    profile: SourceProfile | None = None,
    exclusions: Exclusions | None = None,
    units: LabUnits | None = None,
) -> list[PatientRecord]:
    """The records selected by ``where``, read the way the source ``profile`` says; with ``exclusions``, excluded
    patients and records are left out (and counted); with ``units``, numeric labs are placed in their lab and
    converted (``LabUnits.place``)."""
    profile = profile or warehouse_profile(conn)
    zone = profile.timezone or None
    outpatient_zone = profile.zone("UTC") if profile.outside_encounters == "day" else None
    at_end = profile.condition_time == "encounter_end"
    queries = _queries(display)
    records: dict[str, PatientRecord] = {}
    skip = exclusions or Exclusions()
    patients = skip.patients
    keep = skip.keep if skip else (lambda kind, rid: True)
    with conn.cursor() as cur:
        cur.execute(queries["patient"].format(where=where.format(p="")), params)
        for pid, birth, death, date_only in cur.fetchall():
            if pid not in patients:
                until = day_end(death, zone) if date_only and death is not None else None
                records[pid] = PatientRecord(pid, birth, death, death_until=until, outpatient_zone=outpatient_zone)
        starts: dict[str, float | None] = {}
        ends: dict[str, float | None] = {}
        cur.execute(queries["encounter"].format(where=where.format(p="")), params)
        for pid, eid, klass, start, end, admission, part_of, died in cur.fetchall():
            if pid in records and keep("Encounter", eid):
                records[pid].encounters.append(Encounter(eid, klass, start, end, admission, part_of, died))
                starts[eid] = start
                ends[eid] = end
        for record in records.values():  # a stay discharged as a death, with no death date: it ended in death
            if record.death is None:
                record.death = min((e.end for e in record.encounters if e.died_in_stay and e.end is not None),
                                   default=None)  # fmt: skip
        cur.execute(queries["condition"].format(where=where.format(p="")), params)
        for pid, rid, eid, system, code, onset, recorded, name in cur.fetchall():
            if pid not in records or not keep("Condition", rid):
                continue
            if at_end and onset is None and recorded is None and eid is not None:
                when = ends.get(eid) if ends.get(eid) is not None else starts.get(eid)  # billing: known at discharge
            else:
                when = condition_known_time(onset, recorded, starts.get(eid))
            records[pid].events.append(Event(when, TokenType.CONDITION, f"{system}:{code}", eid, display=name))
        for table, kind in (("procedure", TokenType.PROCEDURE), ("medication", TokenType.MEDICATION)):
            cur.execute(queries[table].format(where=where.format(p="")), params)
            for pid, rid, eid, system, code, when, name in cur.fetchall():
                if pid in records and keep(KINDS[table], rid):
                    records[pid].events.append(Event(when, kind, f"{system}:{code}", eid, display=name))
        cur.execute(queries["observation"].format(where=where.format(p="o.")), params)
        for pid, rid, eid, system, code, when, value, unit, name in cur.fetchall():
            if pid not in records or not keep("Observation", rid):
                continue
            lab = f"{system}:{code}"
            if value is None:
                number = math.nan
            else:
                number, unit = canonical_value(system, code, unit, float(value))
                if units is not None:
                    lab, number, unit = units.place(lab, unit, number)
            records[pid].events.append(Event(when, TokenType.LAB, lab, eid, number, unit, name))
    return list(records.values())
