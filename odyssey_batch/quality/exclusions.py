"""Row-level exclusions: what the gate leaves out of everything downstream instead of rejecting a whole run.

A row-level check (``checks.Check.level`` ``record`` or ``patient``) selects the offending rows of its batch. The
gate judges it by its failing share (``judge``: rejected only above ``Thresholds.max_failure_rate``, which is
Great Expectations' ``mostly`` turned around) and records every offending row in ``ops.dq_exclusion`` with the
check and its reason (``record``): a ``record`` exclusion leaves that row out, a ``patient`` exclusion the whole
patient (the record is structural: a Patient whose death precedes its birth).

Downstream stages read the exclusions in force (``ops.dq_exclusion_current``: the latest check of each ingest
run, for rows whose current version is the one that run loaded) with ``current`` and skip what they list, counting
it (``Exclusions.skipped``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from odyssey_batch.quality.checks import RESOURCE_TYPES, Check, Suite, Thresholds
from odyssey_batch.quality.runner import Finding, rows_query


def parse_rates(text: str) -> dict[str, float]:
    """Per-check thresholds from ``check=rate,suite:check=rate`` (the ``dq_row_failure_rates`` setting)."""
    rates: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not sep or not name.strip() or not 0.0 <= rate <= 1.0:
            raise ValueError(f"dq_row_failure_rates: {item!r} is not check=rate with a rate between 0 and 1")
        rates[name.strip()] = rate
    return rates


def judge(finding: Finding, batch_rows: int, thresholds: Thresholds) -> None:
    """Set a row-level finding's failing share, its threshold and its success (the share within the threshold)."""
    if not finding.row_level:
        return
    finding.max_failure_rate = thresholds.max_failure_rate(finding.suite, finding.expectation)
    if finding.error is not None or finding.unexpected_count is None:
        return
    finding.failure_rate = finding.unexpected_count / batch_rows if batch_rows else 0.0
    finding.success = finding.failure_rate <= finding.max_failure_rate


def record(cur, check_id: int, run_id: int, suite: Suite, check: Check, batch: str) -> int:
    """Write the rows ``check`` finds in ``batch`` (the suite's batch query) to ``ops.dq_exclusion``; returns how
    many. Runs the check's own SQL, so every offending row is recorded (GX keeps a sample only)."""
    key = suite.key or ""
    offending = rows_query(str(check.sql), batch)
    cur.execute(
        f"""INSERT INTO ops.dq_exclusion (check_id, run_id, source_run_id, suite, check_name, resource_type,
                                          resource_id, patient_id, level, reason)
            SELECT DISTINCT %s, %s, t.run_id, %s, %s, %s, t.{key}, t.patient_id, %s, %s
            FROM ({offending}) f JOIN {suite.table} t ON t.{key} = f.{key}""",
        (check_id, run_id, suite.name, check.name, RESOURCE_TYPES[suite.table], check.level, check.description),
    )
    return cur.rowcount


@dataclass
class Exclusions:
    """The exclusions in force: whole patients, and single records by resource type. ``skipped`` counts what a
    reader left out because of them, per resource type (and ``patients``)."""

    patients: frozenset[str] = frozenset()
    records: dict[str, frozenset[str]] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False)  # each record counted once

    def __bool__(self) -> bool:
        return bool(self.patients or self.records)

    def keep_patients(self, ids: list[str]) -> list[str]:
        """``ids`` without the excluded patients (counted)."""
        kept = [p for p in ids if p not in self.patients]
        self.skipped["patients"] += len(ids) - len(kept)
        return kept

    def keep(self, resource_type: str, resource_id: str | None) -> bool:
        """Whether a record is kept; an excluded one is counted."""
        ids = self.records.get(resource_type)
        if ids and resource_id in ids:
            if (resource_type, resource_id) not in self._seen:  # an observation's components share its id
                self._seen.add((resource_type, resource_id))
                self.skipped[resource_type] += 1
            return False
        return True

    @property
    def skipped_records(self) -> int:
        return sum(n for kind, n in self.skipped.items() if kind != "patients")

    def summary(self) -> dict[str, int]:
        return {"patients": self.skipped["patients"], "records": self.skipped_records,
                **{k: v for k, v in sorted(self.skipped.items()) if k != "patients"}}  # fmt: skip


def current(cur, patient_id: str | None = None) -> Exclusions:
    """The exclusions in force (of one patient, or all), read with an open cursor."""
    cur.execute(
        """SELECT DISTINCT level, resource_type, resource_id, patient_id FROM ops.dq_exclusion_current
           WHERE %(patient)s::text IS NULL OR patient_id = %(patient)s""",
        {"patient": patient_id},
    )
    patients: set[str] = set()
    records: dict[str, set[str]] = {}
    for level, resource_type, resource_id, patient in cur.fetchall():
        if level == "patient":
            patients.add(patient)
        else:
            records.setdefault(resource_type, set()).add(resource_id)
    return Exclusions(frozenset(patients), {k: frozenset(v) for k, v in records.items()})
