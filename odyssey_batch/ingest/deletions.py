"""Resources a source deleted: the ``deleted[]`` files of a Bulk Data manifest, applied in the merge transaction.

An export with ``_since`` lists the resources deleted since then in ``deleted[]``: NDJSON files of Bundles (type
``transaction``) whose entries are ``request: {method: DELETE, url: "Patient/123"}``. ``read_deletions`` reads them
(bounded: one line at a time, ``max_line_bytes``), ``apply_deletions`` runs inside ``commit_run``'s transaction,
before the orphan check:

- a resource this same export also brings (deleted, then created again under its id) is not deleted;
- a stored version newer than the export's ``transactionTime`` (loaded from a later export) is not deleted;
- otherwise its ``fhir.resource`` row and its ``ehr`` rows are deleted and a tombstone is written to
  ``ops.deleted_resource`` (ids, version, when; never the body). A deleted **Patient** takes its whole record with
  it (every ``fhir.resource`` row and ``ehr`` row of the patient), so nothing of it is tokenized or scored again;
  a deleted Encounter leaves its conditions and observations without an encounter (``ON DELETE SET NULL``).

Lines that are not such Bundles, and entries that are not ``DELETE Type/id``, become file problems
(``invalid-deletion``) of the run; the rest still applies.
"""

from __future__ import annotations

import gzip
from collections import Counter
from typing import Any

import orjson
import psycopg2.extensions
from psycopg2.extras import execute_values

from odyssey_batch.ingest.normalize import EHR_TABLES
from odyssey_batch.ingest.validate import model_class
from odyssey_batch.storage import Location


def parse_line(line: bytes) -> tuple[list[tuple[str, str]], list[str]]:
    """The (type, id) pairs one deleted[] line names, and what was wrong with it."""
    try:
        bundle = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return [], [f"not JSON: {exc}"]
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return [], ["not a Bundle"]
    found, problems = [], []
    for index, entry in enumerate(bundle.get("entry") or []):
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or str(request.get("method", "")).upper() != "DELETE":
            problems.append(f"entry {index} is not a DELETE request")
            continue
        target = str(request.get("url", "")).split("?", 1)[0].strip("/").split("/")
        if len(target) < 2 or model_class(target[-2]) is None or not target[-1]:
            problems.append(f"entry {index}: request.url is not Type/id")
            continue
        found.append((target[-2], target[-1]))
    return found, problems


Problem = tuple[str, int, str]  # (file, line, what is wrong)


def read_deletions(
    location: Location, names: list[str], max_line_bytes: int
) -> tuple[list[tuple[str, str]], list[Problem]]:
    """Every (type, id) the deleted[] files name, and ``(file, line, problem)`` for what could not be read."""
    found: dict[tuple[str, str], None] = {}
    problems: list[Problem] = []
    for name in names:
        with location.open(name) as raw:
            stream = gzip.GzipFile(fileobj=raw) if name.lower().endswith(".gz") else raw
            try:
                for line_no, line in enumerate(iter(lambda s=stream: s.readline(max_line_bytes + 1), b""), 1):
                    if len(line) > max_line_bytes:
                        problems.append((name, line_no, f"line longer than {max_line_bytes} bytes"))
                        break
                    if not line.strip():
                        continue
                    pairs, wrong = parse_line(line)
                    found.update(dict.fromkeys(pairs))
                    problems += [(name, line_no, w) for w in wrong]
            except (OSError, EOFError) as exc:
                problems.append((name, 0, f"unreadable: {exc}"))
    return list(found), problems


def apply_deletions(cur: psycopg2.extensions.cursor, run_id: int, deletions: list[tuple[str, str]]) -> dict[str, Any]:
    """Delete what ``deletions`` names (see the module docstring); returns the counts for the run."""
    if not deletions:
        return {"deleted": 0}
    run = {"run": run_id}
    cur.execute("CREATE TEMP TABLE run_deleted (resource_type text, resource_id text) ON COMMIT DROP")
    execute_values(cur, "INSERT INTO run_deleted VALUES %s", deletions, page_size=1000)
    cur.execute(
        """DELETE FROM run_deleted d USING staging.resource s
           WHERE s.run_id = %(run)s AND s.resource_type = d.resource_type AND s.resource_id = d.resource_id""",
        run,
    )
    recreated = cur.rowcount
    # The listed resources, and for a deleted Patient everything of that patient.
    cur.execute(
        """INSERT INTO run_deleted
           SELECT r.resource_type, r.resource_id FROM fhir.resource r
           JOIN run_deleted d ON d.resource_type = 'Patient' AND r.patient_id = d.resource_id
           WHERE r.resource_type <> 'Patient'
             AND NOT EXISTS (SELECT 1 FROM staging.resource s WHERE s.run_id = %(run)s
                             AND s.resource_type = r.resource_type AND s.resource_id = r.resource_id)""",
        run,
    )
    cur.execute(
        """WITH gone AS (
               DELETE FROM fhir.resource r USING (SELECT DISTINCT * FROM run_deleted) d, ops.ingest_run this_run
               WHERE r.resource_type = d.resource_type AND r.resource_id = d.resource_id
                 AND this_run.run_id = %(run)s
                 AND (this_run.transaction_time IS NULL OR r.last_updated IS NULL
                      OR r.last_updated <= this_run.transaction_time)
               RETURNING r.resource_type, r.resource_id, r.version_id, r.last_updated, r.patient_id,
                         this_run.transaction_time)
           INSERT INTO ops.deleted_resource
               (resource_type, resource_id, run_id, deleted_at, version_id, last_updated, patient_id)
           SELECT resource_type, resource_id, %(run)s, transaction_time, version_id, last_updated, patient_id
           FROM gone
           ON CONFLICT DO NOTHING
           RETURNING resource_type""",
        run,
    )
    by_type = Counter(row[0] for row in cur.fetchall())
    cur.execute(
        """SELECT table_name FROM information_schema.columns
           WHERE table_schema = 'ehr' AND column_name = 'patient_id' AND table_name NOT IN ('patient', 'encounter')
           ORDER BY table_name""",
    )
    patient_tables = [row[0] for row in cur.fetchall()]
    tombstones = "SELECT resource_id FROM ops.deleted_resource WHERE run_id = %(run)s AND resource_type = %(type)s"
    for resource_type, table in EHR_TABLES.items():
        if resource_type in ("Patient", "Encounter"):
            continue
        key = f"{table}_id"
        cur.execute(f"DELETE FROM ehr.{table} WHERE {key} IN ({tombstones})", {**run, "type": resource_type})
    for table in patient_tables:  # rows of deleted patients that no resource of theirs brought (derived rows)
        cur.execute(f"DELETE FROM ehr.{table} WHERE patient_id IN ({tombstones})", {**run, "type": "Patient"})
    cur.execute(f"DELETE FROM ehr.encounter WHERE encounter_id IN ({tombstones})", {**run, "type": "Encounter"})
    cur.execute(f"DELETE FROM ehr.encounter WHERE patient_id IN ({tombstones})", {**run, "type": "Patient"})
    cur.execute(f"DELETE FROM ehr.patient WHERE patient_id IN ({tombstones})", {**run, "type": "Patient"})
    listed = len(set(deletions))
    return {
        "deleted": sum(by_type.values()),
        "deleted_by_type": dict(sorted(by_type.items())),
        "deletions_listed": listed,
        "deletions_recreated": recreated,
    }
