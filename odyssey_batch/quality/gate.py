"""The gate: validate an ingest run, store every result, and mark the run validated or rejected.

A run with any failed ``critical`` expectation is ``rejected``; later stages call ``ensure_usable`` and refuse
to build on it unless someone accepted it explicitly (``accept_run``: who, when, why, in
``ops.run_acceptance``). Warnings are stored and reported but do not stop anything.

Row-level checks exclude their offending rows (``quality.exclusions``: ``ops.dq_exclusion``, shown in the
verdict) and fail, rejecting the run, only when their failing share passes the check's threshold.
"""

from __future__ import annotations

import datetime as dt
import getpass
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from odyssey_batch.profiles import load_profile
from odyssey_batch.quality import exclusions
from odyssey_batch.quality.checks import Thresholds, suites
from odyssey_batch.quality.runner import Finding, batch_query, run_suites
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location
from odyssey_batch.warehouse import connect

GATED_TABLES = ("patient", "encounter", "condition", "procedure", "medication_request", "observation")


class RunRejected(RuntimeError):
    """A later stage was asked to build on a run the gate rejected (or never validated)."""


@dataclass
class Verdict:
    run_id: int
    check_id: int
    scope: str
    success: bool
    findings: list[Finding]
    rows_checked: int
    seconds: float
    data_docs: str | None = None
    table_counts: dict[str, int] = field(default_factory=dict)
    excluded_patients: int = 0  # patients excluded whole by patient-level checks

    @property
    def exclusions(self) -> list[Finding]:
        """Row-level checks within their threshold that excluded rows (the run is not rejected for them)."""
        return [f for f in self.findings if f.row_level and f.success and f.excluded_rows]

    @property
    def excluded_records(self) -> int:
        return sum(f.excluded_rows for f in self.findings if f.level == "record")

    @property
    def critical_failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.success and f.severity == "critical"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.success and f.severity == "warning"]

    def message(self) -> str:
        """A readable verdict: for every failure, the table, the expectation and how many rows."""
        head = (
            f"ingest run {self.run_id} {'passed' if self.success else 'REJECTED'}: {len(self.findings)} expectations, "
            f"{len(self.critical_failures)} critical failures, {len(self.warnings)} warnings"
        )
        lines = [head]
        for f in [*self.critical_failures, *self.warnings]:
            count = f.unexpected_count if f.unexpected_count is not None else f.observed_value
            what = f"error: {f.error}" if f.error else f"{count} rows" if isinstance(count, int) else f"{count}"
            if f.row_level and f.failure_rate is not None:
                what += f" ({_share(f.failure_rate)} > {_share(f.max_failure_rate)} of its rows)"
            lines.append(f"  {f.severity:8} {f.suite}: {f.expectation} ({f.description}): {what}")
        if self.exclusions or self.excluded_patients:
            lines.append(f"  excluded from everything downstream: {self.excluded_records} records, "
                         f"{self.excluded_patients} patients whole (ops.dq_exclusion, check "
                         f"{self.check_id})")  # fmt: skip
        for f in self.exclusions:
            unit = "patients" if f.level == "patient" else "rows"
            lines.append(f"  excluded {f.suite}: {f.expectation} ({f.description}): {f.excluded_rows} {unit} "
                         f"({_share(f.failure_rate)} <= {_share(f.max_failure_rate)})")  # fmt: skip
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "check_id": self.check_id,
            "scope": self.scope,
            "success": self.success,
            "status": "validated" if self.success else "rejected",
            "expectations": len(self.findings),
            "critical_failures": [_finding_dict(f) for f in self.critical_failures],
            "warnings": [_finding_dict(f) for f in self.warnings],
            "exclusions": [_finding_dict(f) for f in self.exclusions],
            "excluded_records": self.excluded_records,
            "excluded_patients": self.excluded_patients,
            "rows_checked": self.rows_checked,
            "rows_per_s": round(self.rows_checked / self.seconds, 1) if self.seconds else None,
            "seconds": round(self.seconds, 2),
            "data_docs": self.data_docs,
        }


def _finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "suite": f.suite,
        "expectation": f.expectation,
        "severity": f.severity,
        "description": f.description,
        "unexpected_count": f.unexpected_count,
        "observed_value": f.observed_value,
        "error": f.error,
        "level": f.level,
        "excluded_rows": f.excluded_rows,
        "failure_rate": f.failure_rate,
        "max_failure_rate": f.max_failure_rate,
    }


def _share(rate: float | None) -> str:
    return "?" if rate is None else f"{rate * 100:.4f}".rstrip("0").rstrip(".") + "%"


def thresholds(settings: Settings, profile_systems: tuple[str, ...] = ()) -> Thresholds:
    """The configured thresholds; ``profile_systems``: the short names the runs' source profiles map local code
    systems to, allowed besides the configured ones."""
    systems = tuple(s.strip() for s in settings.dq_code_systems.split(",") if s.strip())
    systems += tuple(s for s in profile_systems if s not in systems)
    return Thresholds(
        systems,
        settings.dq_max_quarantine_rate,
        settings.dq_max_volume_drop,
        settings.dq_future_tolerance_s,
        settings.dq_max_row_failure_rate,
        exclusions.parse_rates(settings.dq_row_failure_rates),
    )


def _profile_systems(refs: list[str]) -> tuple[str, ...]:
    """The code-system short names of these source profiles (a profile file that is gone adds none)."""
    names: set[str] = set()
    for ref in refs:
        try:
            names.update(load_profile(ref).short_names())
        except ValueError:
            continue
    return tuple(sorted(names))


def _latest_run(cur) -> int:
    cur.execute("SELECT max(run_id) FROM ops.ingest_run WHERE status IN ('succeeded', 'validated', 'rejected')")
    run_id = cur.fetchone()[0]
    if run_id is None:
        raise LookupError("no finished ingest run to validate: run `odyssey-batch ingest` first")
    return run_id


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def validate(url: str, settings: Settings, run_id: int | None = None, *, data_docs: bool = True) -> Verdict:
    """Validate one ingest run's rows (``run_id``), or the whole warehouse for the latest run (None)."""
    started_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            whole = run_id is None
            if whole:
                run_id = _latest_run(cur)
            cur.execute("SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,))
            row = cur.fetchone()
            if row is None:
                raise LookupError(f"ingest run {run_id} does not exist")
            if row[0] not in ("succeeded", "validated", "rejected"):
                raise LookupError(f"ingest run {run_id} is {row[0]}: only finished runs can be validated")
            cur.execute(
                """SELECT c.table_name, c.row_count FROM ops.dq_table_count c
                   WHERE c.check_id = (SELECT max(check_id) FROM ops.dq_check)"""
            )
            previous = dict(cur.fetchall())
            cur.execute(
                "SELECT DISTINCT source_profile FROM ops.ingest_run WHERE source_profile IS NOT NULL"
                + ("" if whole else " AND run_id = %s"),
                () if whole else (run_id,),
            )
            profile_systems = _profile_systems([r[0] for r in cur.fetchall()])
            counts = {}
            for table in GATED_TABLES:
                cur.execute(f"SELECT count(*), count(*) FILTER (WHERE run_id = %s) FROM ehr.{table}", (run_id,))
                total, of_run = cur.fetchone()
                counts[table] = total if whole else of_run
                counts[f"_total_{table}"] = total
    finally:
        conn.close()

    limits = thresholds(settings, profile_systems)
    docs_dir = Path(tempfile.mkdtemp(prefix="odyssey-data-docs-")) if data_docs else None
    gated = suites(limits, previous)
    findings = run_suites(url, gated, run_id, whole_warehouse=whole, docs_dir=docs_dir)
    by_name = {(suite.name, check.name): (suite, check) for suite in gated for check in suite.checks}
    for f in findings:
        suite = by_name[(f.suite, f.expectation)][0]
        exclusions.judge(f, counts.get(suite.table.removeprefix("ehr."), 0), limits)
    success = not any(not f.success and f.severity == "critical" for f in findings)
    rows_checked = sum(v for k, v in counts.items() if not k.startswith("_"))
    seconds = time.perf_counter() - started

    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                """INSERT INTO ops.dq_check (run_id, scope, started_at, success, critical_failures, warnings,
                                             rows_checked)
                   VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING check_id""",
                (
                    run_id,
                    "warehouse" if whole else "run",
                    started_at,
                    success,
                    sum(1 for f in findings if not f.success and f.severity == "critical"),
                    sum(1 for f in findings if not f.success and f.severity == "warning"),
                    rows_checked,
                ),
            )
            check_id = cur.fetchone()[0]
            for f in findings:  # every offending row of a row-level check, within its threshold or not
                if f.row_level and f.unexpected_count and f.error is None:
                    suite, check = by_name[(f.suite, f.expectation)]
                    f.excluded_rows = exclusions.record(
                        cur, check_id, run_id, suite, check, batch_query(suite, run_id, whole)
                    )
            cur.execute("SELECT count(DISTINCT patient_id) FROM ops.dq_exclusion WHERE check_id = %s AND level = "
                        "'patient'", (check_id,))  # fmt: skip
            excluded_patients = cur.fetchone()[0]
            cur.execute(
                "UPDATE ops.dq_check SET excluded_records = %s, excluded_patients = %s WHERE check_id = %s",
                (sum(f.excluded_rows for f in findings if f.level == "record"), excluded_patients, check_id),
            )
            for f in findings:
                cur.execute(
                    """INSERT INTO ops.dq_result (check_id, run_id, suite, expectation, severity, success,
                                                  observed_value, unexpected_count, unexpected_sample,
                                                  excluded_rows, failure_rate, max_failure_rate)
                       VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s::jsonb, %s, %s, %s)""",
                    (
                        check_id,
                        run_id,
                        f.suite,
                        f.expectation,
                        f.severity,
                        f.success,
                        _json(f.error if f.error else f.observed_value),
                        f.unexpected_count,
                        _json(f.sample),
                        f.excluded_rows,
                        f.failure_rate,
                        f.max_failure_rate,
                    ),
                )
            for table in GATED_TABLES:
                cur.execute(
                    "INSERT INTO ops.dq_table_count VALUES (%s, %s, %s)", (check_id, table, counts[f"_total_{table}"])
                )
            cur.execute(
                "UPDATE ops.ingest_run SET status = %s WHERE run_id = %s",
                ("validated" if success else "rejected", run_id),
            )
    finally:
        conn.close()

    docs_uri = None
    if docs_dir is not None:
        docs_uri = publish_data_docs(docs_dir, settings, check_id)
        conn = connect(url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("UPDATE ops.dq_check SET data_docs = %s WHERE check_id = %s", (docs_uri, check_id))
        finally:
            conn.close()
    return Verdict(
        run_id,
        check_id,
        "warehouse" if whole else "run",
        success,
        findings,
        rows_checked,
        seconds,
        docs_uri,
        {k: v for k, v in counts.items() if not k.startswith("_")},
        excluded_patients,
    )


def publish_data_docs(docs_dir: Path, settings: Settings, check_id: int) -> str:
    """Copy the Data Docs site to the object store under ``data-docs/check-<id>/``; return where it lives."""
    location = open_location(settings.object_store_location, settings)
    prefix = f"data-docs/check-{check_id}"
    index = None
    for path in sorted(p for p in docs_dir.rglob("*") if p.is_file()):
        stored = location.put_file(f"{prefix}/{path.relative_to(docs_dir).as_posix()}", path)
        if path.relative_to(docs_dir).as_posix() == "index.html":
            index = stored
    return index or location.describe(prefix)


def accept_run(url: str, run_id: int, reason: str, accepted_by: str | None = None) -> str:
    """Record that ``accepted_by`` decided to build on a rejected run anyway; returns who accepted."""
    who = accepted_by or getpass.getuser()
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,))
            row = cur.fetchone()
            if row is None:
                raise LookupError(f"ingest run {run_id} does not exist")
            if row[0] != "rejected":
                raise ValueError(f"ingest run {run_id} is {row[0]}, not rejected: nothing to accept")
            cur.execute(
                "INSERT INTO ops.run_acceptance (run_id, accepted_by, reason) VALUES (%s, %s, %s)",
                (run_id, who, reason),
            )
    finally:
        conn.close()
    return who


FINISHED = ("succeeded", "validated", "rejected")  # ingest runs whose rows are in the warehouse


@dataclass(frozen=True)
class RunUse:
    """Whether later stages may build on an ingest run: validated, or rejected and accepted by someone."""

    run_id: int
    status: str
    accepted: bool

    @property
    def usable(self) -> bool:
        return self.status == "validated" or (self.status == "rejected" and self.accepted)


def run_uses(cur, run_ids: list[int] | None = None) -> dict[int, RunUse]:
    """The gate's answer for ``run_ids`` (default: every finished run, i.e. every run whose rows are in the
    warehouse), read with an open cursor. The one rule every stage downstream of the gate applies: tokenize
    refuses a dataset with an unusable run (``ensure_usable``), scoring holds back the patients it touched."""
    cur.execute(
        """SELECT r.run_id, r.status, EXISTS (SELECT 1 FROM ops.run_acceptance a WHERE a.run_id = r.run_id)
           FROM ops.ingest_run r
           WHERE (%(ids)s::bigint[] IS NULL AND r.status = ANY(%(finished)s)) OR r.run_id = ANY(%(ids)s::bigint[])
           ORDER BY r.run_id""",
        {"ids": run_ids, "finished": list(FINISHED)},
    )
    return {run: RunUse(run, status, accepted) for run, status, accepted in cur.fetchall()}


def unusable_runs(cur) -> list[int]:
    """The finished ingest runs no later stage may use (rejected and not accepted, or not validated yet)."""
    return [run for run, use in run_uses(cur).items() if not use.usable]


def patients_of_runs(cur, run_ids: list[int]) -> set[str]:
    """The patients with any resource whose current version came from ``run_ids`` (``fhir.resource`` holds the
    latest version of every resource with the run that loaded it; the ``ehr`` rows are normalized from it). A
    resource that an unusable run replaced is its version now, so its patient is included."""
    if not run_ids:
        return set()
    cur.execute(
        """SELECT DISTINCT patient_id FROM fhir.resource WHERE run_id = ANY(%s) AND patient_id IS NOT NULL""",
        (list(run_ids),),
    )
    return {row[0] for row in cur.fetchall()}


def held_back_for(cur, patient_id: str) -> list[int]:
    """The unusable ingest runs (``unusable_runs``) with a resource of this patient: none of the patient's data may
    be used while there is one (scoring holds the patient back, forecasting refuses)."""
    held = unusable_runs(cur)
    if not held:
        return []
    cur.execute("SELECT DISTINCT run_id FROM fhir.resource WHERE patient_id = %s AND run_id = ANY(%s) ORDER BY 1",
                (patient_id, held))  # fmt: skip
    return [row[0] for row in cur.fetchall()]


def ensure_usable(
    url: str, run_ids: list[int] | None = None, *, accept: set[int] | None = None, accepted_by: str | None = None
) -> list[int]:
    """The ingest runs a later stage may build on; raises RunRejected when one is not usable.

    ``run_ids`` defaults to every run whose rows are in the warehouse. A run is usable when validated, or when
    rejected and accepted (now, through ``accept`` — recorded with who and when — or earlier).
    """
    accept = accept or set()
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            uses = run_uses(cur, run_ids)
    finally:
        conn.close()
    if run_ids is None:
        run_ids = sorted(uses)
    problems = []
    for run in run_ids:
        use = uses.get(run, RunUse(run, "missing", False))
        if use.usable:
            continue
        if use.status == "rejected" and run in accept:
            accept_run(url, run, "accepted with --accept-run", accepted_by)
            continue
        if use.status == "rejected":
            problems.append(
                f"run {run} was rejected by the data-quality gate (see `odyssey-batch validate "
                f"--run-id {run}`); build on it anyway with --accept-run {run}"
            )
        elif use.status == "succeeded":
            problems.append(f"run {run} has not been validated: run `odyssey-batch validate --run-id {run}` first")
        else:
            problems.append(f"run {run} is {use.status}")
    if problems:
        raise RunRejected("; ".join(problems))
    return run_ids
