"""The data-quality expectations, declared as data.

Each suite validates one batch of rows: the rows of a table written by one ingest run (or all its rows), or a
run's bookkeeping. A check is either a built-in Great Expectations expectation (``expectation`` + ``kwargs``)
or an ``UnexpectedRowsExpectation``: SQL that selects the offending rows from ``{batch}``, naming **ids
only**, so that stored samples never hold names, values or other identifiers. ``critical`` failures reject
the run; ``warning`` failures are reported and stored.

Granularity: a check is ``feed``-level (the default: a volume drop, a lab code switching unit across the feed,
missing files, a schema break, a time in the future: any failure is the feed's and rejects the run) or
row-level. A row-level check (``record`` or ``patient``) selects the offending rows with the suite's key first;
they are excluded from everything downstream (``quality.exclusions``; ``patient``: the whole patient, where the
record is structural), and the run is rejected only when their share of the batch passes the check's threshold
(``Thresholds.max_failure_rate``, Great Expectations' ``mostly`` turned around).

Times in the future are critical: an event, a birth or death, a ``meta.lastUpdated`` or the manifest's
``transactionTime`` later than when the run started (the export was received), beyond
``Thresholds.future_tolerance_s`` for clock drift; events also may not lie after the export's
``transactionTime``. One such time would otherwise move every label's censoring horizon. For a run whose source
profile shifts dates (de-identification: MIMIC's run 2110-2210), clinical times are judged against the data
itself (``ops.ingest_run.data_end``), not the clock, and not against a transactionTime, which is the clock's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["critical", "warning"]
Level = Literal["feed", "record", "patient"]

# The FHIR resource type of each gated table's rows (what ops.dq_exclusion names).
RESOURCE_TYPES = {
    "ehr.patient": "Patient",
    "ehr.encounter": "Encounter",
    "ehr.condition": "Condition",
    "ehr.procedure": "Procedure",
    "ehr.medication_request": "MedicationRequest",
    "ehr.observation": "Observation",
}


@dataclass(frozen=True)
class Check:
    name: str
    severity: Severity
    description: str
    sql: str | None = None  # UnexpectedRowsExpectation over {batch}
    expectation: str | None = None  # a built-in expectation class of great_expectations.expectations
    kwargs: dict[str, Any] = field(default_factory=dict)
    level: Level = "feed"  # record / patient: a row-level check (sql only, the suite's key selected first)

    def __post_init__(self) -> None:
        if self.level != "feed" and not self.sql:
            raise ValueError(f"row-level check {self.name} needs sql selecting the offending rows' keys")


@dataclass(frozen=True)
class Suite:
    name: str  # e.g. ehr.encounter, cross_table.observation, ingest
    table: str  # the table whose rows form the batch
    checks: tuple[Check, ...]
    key: str | None = None  # the id column named in samples of built-in expectations
    scoping: Literal["run_or_all", "run", "all"] = "run_or_all"  # which rows form the batch (see runner)


@dataclass(frozen=True)
class Thresholds:
    code_systems: tuple[str, ...]
    max_quarantine_rate: float
    max_volume_drop: float
    future_tolerance_s: int = 300  # how far after the run's start a time may lie (clock drift)
    max_row_failure_rate: float = 0.001  # the share of a batch a row-level check may exclude before it rejects
    row_failure_rates: dict[str, float] = field(default_factory=dict)  # per check: "check" or "suite:check"

    def max_failure_rate(self, suite: str, check: str) -> float:
        """The largest failing share of a row-level check that excludes rows without rejecting the run."""
        for key in (f"{suite}:{check}", check):
            if key in self.row_failure_rates:
                return self.row_failure_rates[key]
        return self.max_row_failure_rate

    def received_by(self, run: str = "r.", clinical: bool = True) -> str:
        """SQL for the latest plausible time of a run's rows: when it started, plus the tolerance. ``run``: how
        its columns are qualified (GX aliases a batch itself unless the query joins; then name no alias).
        ``clinical``: for clinical times of a run with shifted dates, the latest time of its own data instead."""
        start = f"{run}started_at"
        if clinical:
            data_end = f"coalesce({run}data_end, {run}started_at)"
            start = f"CASE WHEN {run}shifted_dates THEN {data_end} ELSE {run}started_at END"
        return f"({start} + interval '{int(self.future_tolerance_s)} seconds')"


# Clinical event tables: (table, primary key, event time columns).
CLINICAL = {
    "condition": ("condition_id", ("onset_time", "recorded_time")),
    "procedure": ("procedure_id", ("performed_time",)),
    "medication_request": ("medication_request_id", ("authored_time",)),
    "observation": ("observation_id", ("effective_time",)),
}
EVENT_TABLES = {"encounter": ("encounter_id", ("start_time", "end_time")), **CLINICAL}

# Plausible physiological bounds for common labs, in their canonical UCUM unit (values outside are errors of
# entry or units, not patients).
LAB_BOUNDS: dict[str, tuple[str, float, float]] = {
    "2160-0": ("mg/dL", 0.05, 30.0),  # creatinine
    "2951-2": ("mmol/L", 90.0, 200.0),  # sodium
    "2823-3": ("mmol/L", 1.0, 12.0),  # potassium
    "2345-7": ("mg/dL", 10.0, 3000.0),  # glucose (serum/plasma)
    "2339-0": ("mg/dL", 10.0, 3000.0),  # glucose (blood)
    "718-7": ("g/dL", 1.0, 25.0),  # hemoglobin
    "6690-2": ("10*3/uL", 0.0, 500.0),  # white cells
    "2524-7": ("mmol/L", 0.0, 40.0),  # lactate
    "8480-6": ("mm[Hg]", 30.0, 300.0),  # systolic blood pressure
    "29463-7": ("kg", 0.2, 650.0),  # body weight
}

# Units with a documented conversion to the code's main unit (the tokenizer converts them): not a second unit.
# Besides the usual SI/conventional pairs, real Synthea exports write enzyme activities as both U/L and IU/L
# (the same unit) and eGFR as both mL/min/{1.73_m2} and mL/min.
LAB_CONVERSIONS: dict[tuple[str, str], tuple[str, float]] = {
    ("2160-0", "umol/L"): ("mg/dL", 1 / 88.42),  # creatinine
    ("2345-7", "mmol/L"): ("mg/dL", 18.016),  # glucose
    ("2339-0", "mmol/L"): ("mg/dL", 18.016),
    ("718-7", "g/L"): ("g/dL", 0.1),  # hemoglobin
    ("10834-0", "g/dL"): ("g/L", 10.0),  # globulin
    ("1742-6", "IU/L"): ("U/L", 1.0),  # ALT
    ("1920-8", "IU/L"): ("U/L", 1.0),  # AST
    ("6768-6", "IU/L"): ("U/L", 1.0),  # alkaline phosphatase
    ("33914-3", "mL/min"): ("mL/min/{1.73_m2}", 1.0),  # eGFR
}


def _values(rows: list[tuple]) -> str:
    def literal(v: object) -> str:
        return f"'{v}'" if isinstance(v, str) else repr(float(v))

    return ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in rows)


def _identity(table: str, key: str) -> tuple[Check, ...]:
    return (
        Check(
            f"{key}_not_null",
            "critical",
            f"every {table} has an id",
            expectation="ExpectColumnValuesToNotBeNull",
            kwargs={"column": key},
        ),
        Check(
            f"{key}_unique",
            "critical",
            f"no two {table} rows share an id",
            expectation="ExpectColumnValuesToBeUnique",
            kwargs={"column": key},
        ),
    )


def _codes(table: str, thresholds: Thresholds) -> tuple[Check, ...]:
    return (
        Check(
            "code_not_null",
            "critical",
            f"every {table} has a code",
            expectation="ExpectColumnValuesToNotBeNull",
            kwargs={"column": "code"},
        ),
        Check(
            "code_system_not_null",
            "critical",
            f"every {table} names its code system",
            expectation="ExpectColumnValuesToNotBeNull",
            kwargs={"column": "code_system"},
        ),
        Check(
            "code_system_allowed",
            "warning",
            "code systems are within the configured set",
            expectation="ExpectColumnValuesToBeInSet",
            kwargs={"column": "code_system", "value_set": list(thresholds.code_systems)},
        ),
    )


def _references(table: str, key: str) -> tuple[Check, ...]:
    checks = [
        Check(
            "patient_id_resolves",
            "critical",
            f"every {table} belongs to a patient in ehr.patient",
            sql=f"SELECT b.{key} FROM {{batch}} b LEFT JOIN ehr.patient p ON p.patient_id = b.patient_id "
            "WHERE p.patient_id IS NULL",
        ),
    ]
    if table != "encounter":
        checks.append(
            Check(
                "encounter_id_resolves",
                "critical",
                f"every {table} encounter reference names an encounter",
                sql=f"SELECT b.{key} FROM {{batch}} b LEFT JOIN ehr.encounter e ON e.encounter_id = b.encounter_id "
                "WHERE b.encounter_id IS NOT NULL AND e.encounter_id IS NULL",
            )
        )
    return tuple(checks)


def _times(table: str, key: str, columns: tuple[str, ...], thresholds: Thresholds) -> tuple[Check, ...]:
    earliest = f"least({', '.join('b.' + c for c in columns)})"
    latest = f"greatest({', '.join('b.' + c for c in columns)})"
    return (
        Check(
            "not_before_birth",
            "critical",
            f"no {table} before the patient's birth (a day of slack for zones)",
            sql=f"SELECT b.{key}, b.patient_id FROM {{batch}} b JOIN ehr.patient p USING (patient_id) "
            f"WHERE {earliest} < p.birth_date - interval '1 day'",
            level="record",
        ),
        # A warning, not critical: real exports carry post-mortem records (Synthea writes a Death Certification
        # encounter up to two weeks after the death), and the tokenizer never puts an event after death into
        # a sequence, so they cannot leak into labels or training. Stewards still see every one.
        Check(
            "not_after_death",
            "warning",
            f"no {table} more than a day after the patient's death",
            sql=f"SELECT b.{key}, b.patient_id FROM {{batch}} b JOIN ehr.patient p USING (patient_id) "
            f"WHERE p.death_time IS NOT NULL AND {latest} > p.death_time + interval '1 day'",
        ),
        # least() skips NULL: without a transactionTime, the run's start (plus the tolerance) is the bound.
        Check(
            "not_in_the_future",
            "critical",
            f"no {table} after the export's transaction time or after the run started "
            f"(+{thresholds.future_tolerance_s} s)",
            sql=f"SELECT b.{key} FROM {{batch}} b JOIN ops.ingest_run r ON r.run_id = b.run_id "
            f"WHERE {latest} > least(CASE WHEN NOT r.shifted_dates THEN r.transaction_time END, "
            f"{thresholds.received_by()})",
        ),
    )


def suites(thresholds: Thresholds, previous_counts: dict[str, int] | None = None) -> list[Suite]:
    """Every suite, with the thresholds of the configuration and the row counts of the previous check."""
    out = [
        Suite(
            "ehr.patient",
            "ehr.patient",
            key="patient_id",
            checks=(
                *_identity("patient", "patient_id"),
                # Structural: a patient whose life cannot be placed in time is excluded whole.
                Check(
                    "death_not_before_birth",
                    "critical",
                    "a death time is not before the birth date",
                    sql="SELECT patient_id FROM {batch} WHERE death_time < birth_date - interval '1 day'",
                    level="patient",
                ),
                Check(
                    "not_in_the_future",
                    "critical",
                    f"no birth or death after the run started (+{thresholds.future_tolerance_s} s)",
                    sql="SELECT b.patient_id FROM {batch} b JOIN ops.ingest_run r ON r.run_id = b.run_id "
                    f"WHERE greatest(b.birth_date::timestamptz, b.death_time) > {thresholds.received_by()}",
                ),
                Check(
                    "gender_known",
                    "warning",
                    "gender is one of FHIR's administrative genders",
                    expectation="ExpectColumnValuesToBeInSet",
                    kwargs={"column": "gender", "value_set": ["male", "female", "other", "unknown"], "mostly": 1.0},
                ),
            ),
        ),
        Suite(
            "ehr.encounter",
            "ehr.encounter",
            key="encounter_id",
            checks=(
                *_identity("encounter", "encounter_id"),
                Check(
                    "end_not_before_start",
                    "critical",
                    "no encounter ends before it starts",
                    sql="SELECT encounter_id FROM {batch} WHERE end_time < start_time",
                    level="record",
                ),
                # A warning: two visits of one type at the same instant look like a feed sending one twice, but real
                # exports have such pairs with different contents (Synthea: 6 pairs in 18,098 encounters).
                Check(
                    "no_duplicate_encounters",
                    "warning",
                    "no encounter sent twice under another id (same patient, class, type, start and end)",
                    sql="SELECT b.encounter_id FROM {batch} b JOIN ehr.encounter o ON o.patient_id = b.patient_id "
                    "AND o.class_code IS NOT DISTINCT FROM b.class_code "
                    "AND o.type_code IS NOT DISTINCT FROM b.type_code AND o.start_time = b.start_time "
                    "AND o.end_time IS NOT DISTINCT FROM b.end_time AND o.encounter_id <> b.encounter_id",
                ),
            ),
        ),
    ]
    for table, (key, _) in CLINICAL.items():
        checks = [*_identity(table, key), *_codes(table, thresholds)]
        if table == "observation":
            bounds = _values([(code, unit, low, high) for code, (unit, low, high) in LAB_BOUNDS.items()])
            conversions = _values([(code, unit) for code, unit in LAB_CONVERSIONS])
            checks += [
                Check(
                    "value_num_where_unit",
                    "warning",
                    "an observation with a unit has a numeric value",
                    sql="SELECT observation_id FROM {batch} WHERE unit IS NOT NULL AND value_num IS NULL",
                ),
                # A warning: the tokenizer converts what UCUM converts exactly and bins the rest per (code, unit)
                # (``sequences.labs``). A code switching unit across the whole feed is ``lab_unit_switched``.
                Check(
                    "one_unit_per_lab_code",
                    "warning",
                    "each lab code comes in one unit, or in one with a documented conversion (others are converted "
                    "where UCUM allows, else binned per unit)",
                    sql="WITH units AS (SELECT code, unit, count(*) AS n, "
                    "row_number() OVER (PARTITION BY code ORDER BY count(*) DESC, unit) AS rank "
                    "FROM ehr.observation WHERE category = 'laboratory' AND unit IS NOT NULL GROUP BY 1, 2) "
                    "SELECT b.observation_id FROM {batch} b "
                    "JOIN units u ON u.code = b.code AND u.unit = b.unit "
                    "WHERE u.rank > 1 AND b.category = 'laboratory' "
                    f"AND (b.code, b.unit) NOT IN ({conversions})",
                ),
                Check(
                    "lab_values_plausible",
                    "critical",
                    "common labs lie within physiologically possible bounds (in their canonical unit)",
                    sql="SELECT b.observation_id FROM {batch} b "
                    f"JOIN (VALUES {bounds}) AS l(code, unit, low, high) "
                    "ON l.code = b.code AND l.unit = b.unit "
                    "WHERE b.value_num < l.low OR b.value_num > l.high OR b.value_num = 'NaN'",
                    level="record",
                ),
                Check(
                    "lab_value_finite",
                    "critical",
                    "a numeric result is a finite number (not NaN or infinite)",
                    sql="SELECT observation_id FROM {batch} "
                    "WHERE value_num IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)",
                    level="record",
                ),
                # Feed-level: every result of a lab code in this run is in units that the code never came in
                # before (a feed that changed its unit for the code), whether or not it converts.
                Check(
                    "lab_unit_switched",
                    "critical",
                    "no lab code switches to units it never came in before, across all of a run's results",
                    sql="WITH now AS (SELECT DISTINCT x.run_id, x.code_system, x.code, x.unit FROM {batch} x "
                    "WHERE x.category = 'laboratory' AND x.unit IS NOT NULL), "
                    "before AS (SELECT DISTINCT o.run_id, o.code_system, o.code, o.unit FROM ehr.observation o "
                    "WHERE o.category = 'laboratory' AND o.unit IS NOT NULL "
                    "AND o.run_id < (SELECT max(run_id) FROM now)), "
                    "switched AS (SELECT n.run_id, n.code_system, n.code FROM now n "
                    "WHERE EXISTS (SELECT 1 FROM before p WHERE p.code_system = n.code_system AND p.code = n.code "
                    "AND p.run_id < n.run_id) GROUP BY 1, 2, 3 "
                    "HAVING NOT bool_or(EXISTS (SELECT 1 FROM before p WHERE p.code_system = n.code_system "
                    "AND p.code = n.code AND p.unit = n.unit AND p.run_id < n.run_id))) "
                    "SELECT b.observation_id FROM {batch} b "
                    "JOIN switched s ON s.run_id = b.run_id AND s.code_system = b.code_system AND s.code = b.code "
                    "WHERE b.category = 'laboratory' AND b.unit IS NOT NULL",
                ),
            ]
        out.append(Suite(f"ehr.{table}", f"ehr.{table}", tuple(checks), key=key))
    for table, (key, columns) in EVENT_TABLES.items():
        out.append(
            Suite(
                f"cross_table.{table}",
                f"ehr.{table}",
                (*_references(table, key), *_times(table, key, columns, thresholds)),
                key=key,
            )
        )
    out.append(
        Suite(
            "fhir.resource",
            "fhir.resource",
            (
                Check(
                    "last_updated_not_in_future",
                    "critical",
                    f"no meta.lastUpdated after the run started (+{thresholds.future_tolerance_s} s)",
                    sql="SELECT b.resource_type, b.resource_id FROM {batch} b "
                    "JOIN ops.ingest_run r ON r.run_id = b.run_id "
                    f"WHERE b.last_updated > {thresholds.received_by(clinical=False)}",
                ),
            ),
        )
    )

    rate = thresholds.max_quarantine_rate
    out.append(
        Suite(
            "ingest",
            "ops.ingest_run",
            scoping="run",
            checks=(
                Check(
                    "quarantine_rate",
                    "critical",
                    f"at most {rate:.0%} of the run's lines are quarantined",
                    sql="SELECT run_id FROM {batch} WHERE (counts->>'records')::float > 0 AND "
                    f"(counts->>'quarantined')::float / (counts->>'records')::float > {rate}",
                ),
                Check(
                    "manifest_counts_match",
                    "critical",
                    "every file has as many lines as the Bulk Data manifest says",
                    sql="SELECT f.run_id, f.file FROM ops.ingest_file f JOIN {batch} b USING (run_id) "
                    "WHERE f.manifest_count IS NOT NULL AND f.manifest_count <> f.records",
                ),
                Check(
                    "transaction_time_not_in_future",
                    "critical",
                    f"the manifest's transactionTime is not after the run started (+{thresholds.future_tolerance_s} s)",
                    sql=f"SELECT run_id FROM {{batch}} WHERE transaction_time > "
                    f"{thresholds.received_by('', clinical=False)}",
                ),
                Check(
                    "files_read_whole",
                    "critical",
                    "every file of the export was read to its end (no link, special file, unreadable name, corrupt "
                    "or truncated compression, or file over the size limits)",
                    sql="SELECT q.run_id, q.source, q.reason FROM ops.quarantine q JOIN {batch} b USING (run_id) "
                    "WHERE q.kind = 'file' AND q.reason NOT IN ('empty-file', 'missing-file')",
                ),
                Check(
                    "manifest_files_present",
                    "critical",
                    "every file the manifest lists was there",
                    sql="SELECT run_id FROM {batch} "
                    "WHERE jsonb_array_length(coalesce(counts->'missing_files', '[]')) > 0",
                ),
            ),
        )
    )
    if previous_counts:
        drop = thresholds.max_volume_drop
        for table, before in sorted(previous_counts.items()):
            minimum = int(before * (1.0 - drop))
            out.append(
                Suite(
                    f"volume.{table}",
                    f"ehr.{table}",
                    (
                        Check(
                            "row_count_not_dropped",
                            "critical",
                            f"ehr.{table} keeps at least {1 - drop:.0%} of its {before:,} rows at the last check",
                            expectation="ExpectTableRowCountToBeBetween",
                            kwargs={"min_value": minimum},
                        ),
                    ),
                    scoping="all",
                )
            )
    return out
