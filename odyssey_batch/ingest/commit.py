"""Merging a staged run into the warehouse, in one transaction.

Until this transaction commits, analysts see nothing of the run; if it fails or the process is killed, Postgres
rolls it back and the staged rows wait to be purged by the next run. Merges are serialized: the transaction
first takes a transaction-level advisory lock (``MERGE_LOCK``), so that two ingests of different exports stage
in parallel but merge one after the other, each seeing what the other committed. The steps:

1. orphans: resources whose patient is neither in this export nor in the warehouse are quarantined;
2. duplicates inside the export: the newest version of each (type, id) wins (``meta.lastUpdated``, then a
   numeric ``meta.versionId``, then file order); identical copies count as unchanged, older ones are
   quarantined as superseded, and copies as new as the winner (same or no lastUpdated and versionId) but with
   other content as ``conflicting-duplicate`` (the copy latest in the export wins);
3. against the warehouse: identical resources are unchanged; older versions than the stored one are
   quarantined as stale; the rest replace or add to ``fhir.resource``. Which version is older: by
   ``meta.lastUpdated`` when both have one, else by a numeric ``meta.versionId`` when both have one, else by
   their *version times*: ``meta.lastUpdated``, or for a resource without it the ``transactionTime`` of the
   export that brought it, or when that is missing too the time its run started (when it was received). Equal
   times: the later run wins. So an older export ingested after a newer one never overwrites it, with or
   without ``meta``;
4. ``medicationReference`` is resolved to the Medication's code; encounter references that resolve nowhere
   are cleared (and counted); the normalized ``ehr.*`` rows are upserted;
5. every loaded resource is accounted for: normalized into its ``ehr`` table, or excluded with a reason (a
   modelled type without a usable code or patient, see ``normalize.EXCLUSION_REASONS``; ``not-modelled`` for the
   types kept raw only). Per type, read = normalized + excluded + quarantined + unchanged; the counts go to
   ``ops.ingest_type_count`` and ``ops.ingest_exclusion``;
6. the quarantine is published, the counts are reconciled (records = loaded + quarantined + unchanged) and the
   run is marked succeeded.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import orjson
import psycopg2.extensions
from psycopg2.extras import execute_values

from odyssey_batch.ingest import codes
from odyssey_batch.ingest.deletions import apply_deletions
from odyssey_batch.ingest.normalize import EHR_TABLES, EXCLUSION_REASONS, NOT_MODELLED
from odyssey_batch.ingest.references import resolve
from odyssey_batch.profiles import SourceProfile, load_profile


class RunStateError(RuntimeError):
    pass


# The transaction-level advisory lock that serializes merges (any constant; this one spells "odyssey").
MERGE_LOCK = 0x6F64797373657921

# A numeric meta.versionId, for ordering versions when lastUpdated is missing.
_VERSION_NUM = "CASE WHEN {t}.version_id ~ '^[0-9]{{1,18}}$' THEN {t}.version_id::bigint END"
# The version time of a resource of run {run}: its meta.lastUpdated, else its export's transactionTime, else
# when its run started.
_VERSION_TIME = "coalesce({t}.last_updated, {run}.transaction_time, {run}.started_at)"

_ORPHANS = """
CREATE TEMP TABLE run_known_patient ON COMMIT DROP AS
    SELECT DISTINCT resource_id AS patient_id FROM staging.resource
    WHERE run_id = %(run)s AND resource_type = 'Patient';
WITH orphan AS (
    DELETE FROM staging.resource s
    WHERE s.run_id = %(run)s AND s.patient_ref IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM run_known_patient k WHERE k.patient_id = s.patient_ref)
      AND NOT EXISTS (SELECT 1 FROM ehr.patient p WHERE p.patient_id = s.patient_ref)
    RETURNING s.*
)
INSERT INTO staging.quarantine (run_id, source, line_no, resource_type, resource_id, kind, reason, error, raw_text)
SELECT run_id, source, line_no, resource_type, resource_id, 'line', 'orphan-reference',
       format('%%s/%%s references Patient/%%s, which is neither in this export nor in the warehouse',
              resource_type, resource_id, patient_ref),
       body::text
FROM orphan;
"""

_DUPLICATES = f"""
CREATE TEMP TABLE run_rank ON COMMIT DROP AS
SELECT file_no, line_no,
       row_number() OVER w AS rn,
       first_value(file_no) OVER w AS win_file,
       first_value(line_no) OVER w AS win_line
FROM staging.resource s
WHERE s.run_id = %(run)s
WINDOW w AS (PARTITION BY resource_type, resource_id
             ORDER BY last_updated DESC NULLS LAST, {_VERSION_NUM.format(t="s")} DESC NULLS LAST,
                      file_no DESC, line_no DESC);
DELETE FROM run_rank WHERE rn = 1;
CREATE TEMP TABLE run_loser ON COMMIT DROP AS
SELECT l.file_no, l.line_no, l.resource_type, (l.body = w.body) AS identical, t.tie,
       CASE WHEN t.tie
            THEN format('conflicts with another copy of %%s/%%s in the same export (%%s, line %%s) that is as new '
                        '(versionId %%s, lastUpdated %%s) but differs; the copy latest in the export was kept',
                        l.resource_type, l.resource_id, w.source, w.line_no, coalesce(w.version_id, '-'),
                        coalesce(w.last_updated::text, '-'))
            ELSE format('superseded by a newer version of %%s/%%s in the same export (%%s, line %%s)',
                        l.resource_type, l.resource_id, w.source, w.line_no) END AS error
FROM run_rank r
JOIN staging.resource l ON l.run_id = %(run)s AND l.file_no = r.file_no AND l.line_no = r.line_no
JOIN staging.resource w ON w.run_id = %(run)s AND w.file_no = r.win_file AND w.line_no = r.win_line
CROSS JOIN LATERAL (
    SELECT l.last_updated IS NOT DISTINCT FROM w.last_updated
           AND {_VERSION_NUM.format(t="l")} IS NOT DISTINCT FROM {_VERSION_NUM.format(t="w")} AS tie) t;
-- Equally new copies with other content: which one is right cannot be told; they are quarantined apart.
CREATE TEMP TABLE run_conflict ON COMMIT DROP AS SELECT * FROM run_loser WHERE tie AND NOT identical;
DELETE FROM run_loser WHERE tie AND NOT identical;
"""

_AGAINST_WAREHOUSE = f"""
CREATE TEMP TABLE run_existing ON COMMIT DROP AS
SELECT s.file_no, s.line_no, s.resource_type,
       CASE WHEN s.body = r.body THEN 'unchanged'
            WHEN s.last_updated IS NOT NULL AND r.last_updated IS NOT NULL
                 THEN CASE WHEN s.last_updated < r.last_updated THEN 'stale' ELSE 'newer' END
            WHEN {_VERSION_NUM.format(t="s")} IS NOT NULL AND {_VERSION_NUM.format(t="r")} IS NOT NULL
                 THEN CASE WHEN {_VERSION_NUM.format(t="s")} < {_VERSION_NUM.format(t="r")}
                           THEN 'stale' ELSE 'newer' END
            WHEN {_VERSION_TIME.format(t="s", run="this_run")} < {_VERSION_TIME.format(t="r", run="stored_run")}
                 THEN 'stale'
            ELSE 'newer' END AS verdict,
       format('%%s/%%s version %%s (lastUpdated %%s) is older than the stored version %%s (lastUpdated %%s)%%s',
              s.resource_type, s.resource_id, coalesce(s.version_id, '-'), coalesce(s.last_updated::text, '-'),
              coalesce(r.version_id, '-'), coalesce(r.last_updated::text, '-'),
              CASE WHEN s.last_updated IS NULL OR r.last_updated IS NULL THEN
                  format('; version times %%s and %%s (lastUpdated, else the transactionTime of the export, '
                         'else when it was received)', {_VERSION_TIME.format(t="s", run="this_run")},
                         {_VERSION_TIME.format(t="r", run="stored_run")})
              ELSE '' END) AS error
FROM staging.resource s
JOIN fhir.resource r USING (resource_type, resource_id)
JOIN ops.ingest_run this_run ON this_run.run_id = s.run_id
JOIN ops.ingest_run stored_run ON stored_run.run_id = r.run_id
WHERE s.run_id = %(run)s;
DELETE FROM run_existing WHERE verdict = 'newer';
"""

_QUARANTINE_STAGED = """
INSERT INTO staging.quarantine (run_id, source, line_no, resource_type, resource_id, kind, reason, error, raw_text)
SELECT s.run_id, s.source, s.line_no, s.resource_type, s.resource_id, 'line', %(reason)s, x.error, s.body::text
FROM staging.resource s JOIN {table} x ON x.file_no = s.file_no AND x.line_no = s.line_no
WHERE s.run_id = %(run)s AND {condition};
DELETE FROM staging.resource s USING {table} x
WHERE s.run_id = %(run)s AND x.file_no = s.file_no AND x.line_no = s.line_no;
"""

_UPSERT_RESOURCES = """
WITH up AS (
    INSERT INTO fhir.resource AS r
        (resource_type, resource_id, version_id, last_updated, body, run_id, source, line_no, patient_id)
    SELECT resource_type, resource_id, version_id, last_updated, body, run_id, source, line_no, patient_ref
    FROM staging.resource WHERE run_id = %(run)s
    ON CONFLICT (resource_type, resource_id) DO UPDATE SET
        version_id = EXCLUDED.version_id, last_updated = EXCLUDED.last_updated, body = EXCLUDED.body,
        run_id = EXCLUDED.run_id, source = EXCLUDED.source, line_no = EXCLUDED.line_no,
        patient_id = EXCLUDED.patient_id, loaded_at = now()
    RETURNING r.resource_type, (xmax = 0) AS inserted
)
SELECT resource_type, count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
FROM up GROUP BY resource_type;
"""

_CLEAR_UNRESOLVED_ENCOUNTERS = """
WITH cleared AS (
    UPDATE staging.resource s SET ehr = jsonb_set(s.ehr, '{encounter_id}', 'null')
    WHERE s.run_id = %(run)s AND s.ehr IS NOT NULL AND s.ehr->>'encounter_id' IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM ehr.encounter e WHERE e.encounter_id = s.ehr->>'encounter_id')
    RETURNING 1
)
SELECT count(*) FROM cleared;
"""

# For a source whose dates are shifted (de-identification), the clock says nothing about "the future": the
# run's data_end is the latest time its own rows hold, the bound of the gate's future checks and of censoring.
_SHIFTED_DATA_END = """
UPDATE ops.ingest_run SET data_end = (SELECT max(t) FROM (
    SELECT max(greatest(start_time, end_time)) AS t FROM ehr.encounter WHERE run_id = %(run)s
    UNION ALL SELECT max(effective_time) FROM ehr.observation WHERE run_id = %(run)s
    UNION ALL SELECT max(greatest(onset_time, recorded_time, abatement_time)) FROM ehr.condition WHERE run_id = %(run)s
    UNION ALL SELECT max(performed_time) FROM ehr.procedure WHERE run_id = %(run)s
    UNION ALL SELECT max(authored_time) FROM ehr.medication_request WHERE run_id = %(run)s
    UNION ALL SELECT max(greatest(birth_date::timestamptz, death_time)) FROM ehr.patient WHERE run_id = %(run)s) x)
WHERE run_id = %(run)s;
"""

_PUBLISH_QUARANTINE = """
INSERT INTO ops.quarantine
    (run_id, source, line_no, resource_type, resource_id, kind, reason, error, raw_text, raw_bytes)
SELECT run_id, source, line_no, resource_type, resource_id, kind, reason, error, raw_text, raw_bytes
FROM staging.quarantine WHERE run_id = %(run)s
ORDER BY source, line_no NULLS FIRST;
"""


def purge_staging(cur: psycopg2.extensions.cursor, run_id: int) -> None:
    cur.execute("DELETE FROM staging.resource WHERE run_id = %s", (run_id,))
    cur.execute("DELETE FROM staging.quarantine WHERE run_id = %s", (run_id,))


def _table_columns(cur: psycopg2.extensions.cursor, table: str) -> list[str]:
    cur.execute(
        """SELECT column_name FROM information_schema.columns
           WHERE table_schema = 'ehr' AND table_name = %s AND column_name <> 'run_id'
           ORDER BY ordinal_position""",
        (table,),
    )
    return [row[0] for row in cur.fetchall()]


def _medication_codes(
    cur: psycopg2.extensions.cursor, ids: list[str], keep_text_codes: bool, aliases: dict[str, str], mixes: bool
) -> tuple[dict[str, tuple[str, str, str | None]], dict[str, str], dict[str, str]]:
    """For Medications by id: the chosen code of those with one; the reason of those without; and for a mix
    without a code of its own, the id of its first ingredient Medication (``ingredient[].itemReference``)."""
    coded: dict[str, tuple[str, str, str | None]] = {}
    reasons: dict[str, str] = {}
    ingredient_of: dict[str, str] = {}
    if not ids:
        return coded, reasons, ingredient_of
    cur.execute(
        "SELECT resource_id, body FROM fhir.resource WHERE resource_type = 'Medication' AND resource_id = ANY(%s)",
        (ids,),
    )
    for medication_id, body in cur.fetchall():
        concept = body.get("code")
        picked = codes.pick_code(concept, "Medication", keep_text_codes, aliases)
        if picked is not None:
            coded[medication_id] = picked
            continue
        for ingredient in body.get("ingredient") or () if mixes else ():
            item = ingredient.get("itemCodeableConcept") if isinstance(ingredient, dict) else None
            if item is not None:
                picked = codes.pick_code(item, "Medication", keep_text_codes, aliases)
                if picked is not None:
                    coded[medication_id] = picked
                    break
                continue
            reference = ingredient.get("itemReference") if isinstance(ingredient, dict) else None
            target = resolve(reference.get("reference")) if isinstance(reference, dict) else None
            if target is not None and target.resource_type == "Medication" and not target.contained:
                ingredient_of[medication_id] = target.resource_id
                break
        if medication_id not in coded and medication_id not in ingredient_of:
            reasons[medication_id] = "text-only-code" if codes.only_text(concept) else "medication-without-code"
    return coded, reasons, ingredient_of


def _resolve_medications(
    cur: psycopg2.extensions.cursor, run: dict[str, int], keep_text_codes: bool, profile: SourceProfile
) -> None:
    """Fill the code of MedicationRequests that reference a Medication; exclude the others with the reason:
    ``unresolved-medication`` (no such Medication in the warehouse), ``medication-without-code`` (neither it nor
    its first ingredient has a code) or ``text-only-code`` (free text, not kept). A Medication without a code of
    its own that is a mix (MIMIC's MedicationMix: a drug in a diluent) stands for its first ingredient where the
    source profile says so (``[medications] mix = "first_ingredient"``)."""
    aliases, mixes = profile.code_systems, profile.medication_mix == "first_ingredient"
    cur.execute(
        """SELECT DISTINCT medication_ref FROM staging.resource
           WHERE run_id = %(run)s AND resource_type = 'MedicationRequest' AND medication_ref IS NOT NULL""",
        run,
    )
    refs = [row[0] for row in cur.fetchall()]
    cur.execute(
        "CREATE TEMP TABLE run_medication (medication_id text PRIMARY KEY, coded jsonb, reason text) ON COMMIT DROP"
    )
    if refs:
        coded, reasons, ingredient_of = _medication_codes(cur, refs, keep_text_codes, aliases, mixes)
        if ingredient_of:  # one level of mix: the ingredients themselves are plain Medications
            ingredients = sorted(set(ingredient_of.values()))
            inner, inner_reasons, _ = _medication_codes(cur, ingredients, keep_text_codes, aliases, False)
            for mix, ingredient in ingredient_of.items():
                if ingredient in inner:
                    coded[mix] = inner[ingredient]
                else:
                    reasons[mix] = inner_reasons.get(ingredient, "medication-without-code")
        medications = [
            (medication_id, orjson.dumps(dict(zip(("code_system", "code", "display"), picked, strict=True))).decode(),
             None)
            for medication_id, picked in coded.items()
        ] + [(medication_id, None, reason) for medication_id, reason in reasons.items()]  # fmt: skip
        if medications:
            execute_values(cur, "INSERT INTO run_medication VALUES %s", medications)
        cur.execute(
            """UPDATE staging.resource s SET ehr = s.ehr || m.coded FROM run_medication m
               WHERE s.run_id = %(run)s AND s.resource_type = 'MedicationRequest'
                 AND s.medication_ref = m.medication_id AND m.coded IS NOT NULL""",
            run,
        )
    cur.execute(
        """UPDATE staging.resource s SET ehr = NULL, ehr_skipped = coalesce(
                      (SELECT m.reason FROM run_medication m WHERE m.medication_id = s.medication_ref),
                      'unresolved-medication')
           WHERE s.run_id = %(run)s AND s.resource_type = 'MedicationRequest' AND s.ehr IS NOT NULL
             AND s.ehr->>'code' IS NULL""",
        run,
    )


def _upsert_ehr_types(cur: psycopg2.extensions.cursor, run: dict[str, int], types: tuple[str, ...]) -> dict[str, int]:
    """Upsert the normalized rows of these types; delete rows of resources whose new version has none."""
    written: dict[str, int] = {}
    for resource_type in types:
        table = EHR_TABLES[resource_type]
        columns = _table_columns(cur, table)
        key = columns[0]
        params = {**run, "type": resource_type}
        cur.execute(
            f"""INSERT INTO ehr.{table} ({", ".join(columns)}, run_id)
                SELECT {", ".join("r." + c for c in columns)}, s.run_id
                FROM staging.resource s, jsonb_populate_record(NULL::ehr.{table}, s.ehr) r
                WHERE s.run_id = %(run)s AND s.resource_type = %(type)s AND s.ehr IS NOT NULL
                ON CONFLICT ({key}) DO UPDATE SET
                    {", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])}, run_id = EXCLUDED.run_id""",
            params,
        )
        written[table] = cur.rowcount
        cur.execute(
            f"""DELETE FROM ehr.{table} t USING staging.resource s
                WHERE s.run_id = %(run)s AND s.resource_type = %(type)s AND s.ehr IS NULL
                  AND t.{key} = s.resource_id""",
            params,
        )
    return written


def _upsert_components(cur: psycopg2.extensions.cursor, run: dict[str, int]) -> int:
    cur.execute(
        """DELETE FROM ehr.observation_component c USING staging.resource s
           WHERE s.run_id = %(run)s AND s.resource_type = 'Observation' AND c.observation_id = s.resource_id""",
        run,
    )
    cur.execute(
        """INSERT INTO ehr.observation_component
               (observation_id, seq, code_system, code, display, value_num, unit, value_text)
           SELECT s.resource_id, c.seq, c.code_system, c.code, c.display, c.value_num, c.unit, c.value_text
           FROM staging.resource s
           CROSS JOIN LATERAL jsonb_to_recordset(s.components) AS c(
               seq smallint, code_system text, code text, display text, value_num float8, unit text, value_text text)
           WHERE s.run_id = %(run)s AND s.resource_type = 'Observation' AND s.ehr IS NOT NULL
             AND s.components IS NOT NULL""",
        run,
    )
    return cur.rowcount


def _account(
    cur: psycopg2.extensions.cursor, run_id: int, loaded: Counter[str], written: dict[str, int]
) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Normalized resources per type and excluded ones per type and reason, from the run's loaded rows; raises
    when a resource is neither, or when the counts disagree with what was written."""
    cur.execute(
        """SELECT resource_type, ehr IS NOT NULL, ehr_skipped, count(*) FROM staging.resource
           WHERE run_id = %s GROUP BY 1, 2, 3""",
        (run_id,),
    )
    normalized: Counter[str] = Counter()
    excluded: dict[str, Counter[str]] = defaultdict(Counter)
    for resource_type, has_row, reason, n in cur.fetchall():
        if resource_type not in EHR_TABLES:
            excluded[resource_type][NOT_MODELLED] += n
        elif has_row:
            normalized[resource_type] += n
        elif reason in EXCLUSION_REASONS:
            excluded[resource_type][reason] += n
        else:
            raise RuntimeError(
                f"ingest run {run_id}: {n} {resource_type} resources have neither a row nor a known reason ({reason})"
            )
    for resource_type, table in EHR_TABLES.items():
        if normalized[resource_type] != written.get(table, 0):
            raise RuntimeError(
                f"ingest run {run_id} does not reconcile: {normalized[resource_type]} {resource_type} resources "
                f"normalized but {written.get(table, 0)} rows written to ehr.{table}"
            )
    for resource_type, n in loaded.items():
        accounted = normalized[resource_type] + sum(excluded[resource_type].values())
        if n != accounted:
            raise RuntimeError(
                f"ingest run {run_id} does not reconcile: {n} {resource_type} resources loaded but "
                f"{normalized[resource_type]} normalized + {accounted - normalized[resource_type]} excluded"
            )
    return normalized, excluded


def _record_accounting(cur: psycopg2.extensions.cursor, run_id: int, by_type: dict[str, dict[str, Any]]) -> None:
    execute_values(
        cur,
        """INSERT INTO ops.ingest_type_count
               (run_id, resource_type, read, normalized, excluded, quarantined, unchanged) VALUES %s""",
        [
            (run_id, t, c["records"], c["normalized"], c["excluded"], c["quarantined"], c["unchanged"])
            for t, c in by_type.items()
        ],
    )
    exclusions = [(run_id, t, reason, n) for t, c in by_type.items() for reason, n in c["excluded_reasons"].items()]
    if exclusions:
        execute_values(
            cur, "INSERT INTO ops.ingest_exclusion (run_id, resource_type, reason, resources) VALUES %s", exclusions
        )


def commit_run(conn: psycopg2.extensions.connection, run_id: int, *, keep_text_codes: bool = True,
               deletions: list[tuple[str, str]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Merge the staged run into the warehouse and return its reconciled counts. One transaction, serialized
    with every other merge. ``keep_text_codes``: whether a Medication whose code is free text only gives its
    MedicationRequests a ``TEXT`` code (as staging did for the codes inside the resources). ``deletions``: the
    (type, id) pairs of the export's ``deleted[]`` files, applied first (``deletions.apply_deletions``)."""
    run = {"run": run_id}
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MERGE_LOCK,))
        cur.execute("SELECT status, source_profile FROM ops.ingest_run WHERE run_id = %s FOR UPDATE", (run_id,))
        row = cur.fetchone()
        if row is None:
            raise RunStateError(f"ingest run {run_id} does not exist")
        if row[0] != "running":
            raise RunStateError(f"ingest run {run_id} is {row[0]}, not running; start a new run")
        profile = load_profile(row[1] or "")

        deleted = apply_deletions(cur, run_id, deletions or [])
        cur.execute(_ORPHANS, run)

        cur.execute(_DUPLICATES, run)
        cur.execute("SELECT resource_type, count(*) FROM run_loser WHERE identical GROUP BY 1")
        unchanged = Counter(dict(cur.fetchall()))
        cur.execute(
            _QUARANTINE_STAGED.format(table="run_conflict", condition="true"),
            {**run, "reason": "conflicting-duplicate"},
        )
        cur.execute(
            _QUARANTINE_STAGED.format(table="run_loser", condition="NOT x.identical"), {**run, "reason": "superseded"}
        )

        cur.execute(_AGAINST_WAREHOUSE, run)
        cur.execute("SELECT resource_type, count(*) FROM run_existing WHERE verdict = 'unchanged' GROUP BY 1")
        unchanged.update(dict(cur.fetchall()))
        cur.execute(
            _QUARANTINE_STAGED.format(table="run_existing", condition="x.verdict = 'stale'"),
            {**run, "reason": "stale-version"},
        )

        cur.execute(_UPSERT_RESOURCES, run)
        inserted: Counter[str] = Counter()
        updated: Counter[str] = Counter()
        for resource_type, n_inserted, n_updated in cur.fetchall():
            inserted[resource_type] += n_inserted
            updated[resource_type] += n_updated

        _resolve_medications(cur, run, keep_text_codes, profile)
        # Parents first; then encounter references that resolve nowhere are cleared; then the clinical rows.
        written = _upsert_ehr_types(cur, run, ("Patient", "Encounter"))
        cur.execute(_CLEAR_UNRESOLVED_ENCOUNTERS, run)
        unresolved_encounters = cur.fetchone()[0]
        written.update(_upsert_ehr_types(cur, run, tuple(t for t in EHR_TABLES if t not in ("Patient", "Encounter"))))
        normalized, excluded = _account(cur, run_id, inserted + updated, written)
        written["observation_component"] = _upsert_components(cur, run)

        cur.execute(_PUBLISH_QUARANTINE, run)
        cur.execute(
            """SELECT kind, reason, coalesce(resource_type, 'unknown'), count(*) FROM staging.quarantine
               WHERE run_id = %(run)s GROUP BY 1, 2, 3""",
            run,
        )
        quarantine_rows = cur.fetchall()
        cur.execute("SELECT coalesce(sum(records), 0) FROM ops.ingest_file WHERE run_id = %(run)s", run)
        records = int(cur.fetchone()[0])

        quarantined_by_type: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        file_problems = 0
        for kind, reason, resource_type, n in quarantine_rows:
            reasons[reason] += n
            if kind == "line":
                quarantined_by_type[resource_type] += n
            else:
                file_problems += n
        loaded = sum(inserted.values()) + sum(updated.values())
        quarantined = sum(quarantined_by_type.values())
        n_unchanged = sum(unchanged.values())
        if records != loaded + quarantined + n_unchanged:
            raise RuntimeError(
                f"ingest run {run_id} does not reconcile: {records} records read but {loaded} loaded + "
                f"{quarantined} quarantined + {n_unchanged} unchanged"
            )
        types = sorted(set(inserted) | set(updated) | set(unchanged) | set(quarantined_by_type))
        # Per type: read = normalized + excluded + quarantined + unchanged (loaded = normalized + excluded).
        by_type = {
            t: {
                "records": inserted[t] + updated[t] + unchanged[t] + quarantined_by_type[t],
                "loaded": inserted[t] + updated[t],
                "normalized": normalized[t],
                "excluded": sum(excluded[t].values()),
                "excluded_reasons": dict(sorted(excluded[t].items())),
                "unchanged": unchanged[t],
                "quarantined": quarantined_by_type[t],
            }
            for t in types
        }
        excluded_reasons: Counter[str] = Counter()
        for by_reason in excluded.values():
            excluded_reasons.update(by_reason)
        counts: dict[str, Any] = {
            "records": records,
            "loaded": loaded,
            "inserted": sum(inserted.values()),
            "updated": sum(updated.values()),
            "normalized": sum(normalized.values()),
            "excluded": sum(excluded_reasons.values()),
            "unchanged": n_unchanged,
            "quarantined": quarantined,
            "file_problems": file_problems,
            "quarantine_reasons": dict(sorted(reasons.items())),
            "excluded_reasons": dict(sorted(excluded_reasons.items())),
            "by_type": by_type,
            "rows_written": written,
            "unresolved_encounter_refs": unresolved_encounters,
            **deleted,
        }
        _record_accounting(cur, run_id, by_type)
        if profile.shifted_dates:
            cur.execute(_SHIFTED_DATA_END, run)
        purge_staging(cur, run_id)
        cur.execute(
            """UPDATE ops.ingest_run SET status = 'succeeded', finished_at = now(), counts = counts || %s::jsonb
               WHERE run_id = %s""",
            (orjson.dumps(counts).decode(), run_id),
        )
    return counts


ANALYZED_TABLES = (
    "fhir.resource", "ehr.patient", "ehr.encounter", "ehr.condition", "ehr.procedure", "ehr.medication_request",
    "ehr.observation", "ehr.observation_component", "ops.quarantine",
)  # fmt: skip


def refresh_statistics(conn: psycopg2.extensions.connection) -> None:
    """ANALYZE the tables a run wrote, so that the planner knows their new size (a fresh bulk load otherwise
    leaves it guessing: the quality checks ran 4x slower)."""
    with conn, conn.cursor() as cur:
        cur.execute(f"ANALYZE {', '.join(ANALYZED_TABLES)}")
