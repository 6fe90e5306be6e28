"""Which version wins, whatever the order or overlap of ingests.

- An older version never overwrites a newer one: by ``meta.lastUpdated``; without it, by the export's
  ``transactionTime``; without that either, by when the export was received (the run's start).
- Merges are serialized (a transaction-level advisory lock): two ingests of different exports merging at the
  same moment end in the same state as one after the other, in either order.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

from odyssey_batch.ingest import begin_run, commit_run, ingest, stage_files
from odyssey_batch.ingest.commit import MERGE_LOCK
from odyssey_batch.ingest.discover import plan_export
from odyssey_batch.storage import open_location
from odyssey_batch.warehouse import connect
from tests.conftest import fresh_database, run_sql, table_fingerprints
from tests.test_ingest_bad_input import ENCOUNTERS, OBSERVATIONS, PATIENTS, assert_reconciled, dump, write_export

OLD_EXPORT = "2024-09-01T00:00:00Z"
NEW_EXPORT = "2024-10-01T00:00:00Z"


def _strip_meta(resource: dict) -> dict:
    out = copy.deepcopy(resource)
    out.pop("meta", None)
    return out


def export(folder: Path, resources: dict[str, list[dict]], transaction_time: str | None) -> Path:
    """An NDJSON export, with a Bulk Data manifest carrying ``transaction_time`` when given."""
    files: dict[str, list[str] | bytes] = {f"{t}.ndjson": [dump(r) for r in rows] for t, rows in resources.items()}
    if transaction_time is not None:
        manifest = {
            "transactionTime": transaction_time,
            "request": "https://ehr.example/fhir/$export",
            "requiresAccessToken": False,
            "output": [{"type": t, "url": f"{t}.ndjson", "count": len(rows)} for t, rows in resources.items()],
            "error": [],
        }
        files["manifest.json"] = json.dumps(manifest).encode()
    return write_export(folder, files)


def _with_value(observation: dict, value: float, status: str) -> dict:
    out = copy.deepcopy(observation)
    out["valueQuantity"]["value"] = value
    out["status"] = status
    return out


def _observation_values(query) -> list[tuple]:
    return query("SELECT observation_id, value_num, status FROM ehr.observation ORDER BY 1")


def _resources(strip_meta: bool, value: float, status: str) -> dict[str, list[dict]]:
    prepare = _strip_meta if strip_meta else copy.deepcopy
    return {
        "Patient": [prepare(r) for r in PATIENTS],
        "Encounter": [prepare(r) for r in ENCOUNTERS],
        "Observation": [prepare(_with_value(OBSERVATIONS[0], value, status)), *map(prepare, OBSERVATIONS[1:])],
    }


def test_older_export_without_meta_does_not_overwrite_a_newer_one(db_url, settings, tmp_path, query):
    newer = ingest(str(export(tmp_path / "new", _resources(True, 1.7, "corrected"), NEW_EXPORT)), settings, url=db_url)
    older = ingest(str(export(tmp_path / "old", _resources(True, 0.9, "final"), OLD_EXPORT)), settings, url=db_url)

    assert newer.counts["loaded"] == 10
    assert (older.counts["quarantined"], older.counts["unchanged"], older.counts["loaded"]) == (1, 9, 0)
    assert older.counts["quarantine_reasons"] == {"stale-version": 1}
    [(reason, error)] = query("SELECT reason, error FROM ops.quarantine WHERE run_id = %s", (older.run_id,))
    assert reason == "stale-version" and error.startswith("Observation/o1 version - (lastUpdated -)")
    assert "version times 2024-09-01 00:00:00+00 and 2024-10-01 00:00:00+00" in error
    assert query("SELECT value_num, status, run_id FROM ehr.observation WHERE observation_id = 'o1'") == [
        (1.7, "corrected", newer.run_id)
    ]
    assert_reconciled(older, query)


def test_newer_export_without_meta_replaces_an_older_one(db_url, settings, tmp_path, query):
    ingest(str(export(tmp_path / "old", _resources(True, 0.9, "final"), OLD_EXPORT)), settings, url=db_url)
    newer = ingest(str(export(tmp_path / "new", _resources(True, 1.7, "corrected"), NEW_EXPORT)), settings, url=db_url)

    assert (newer.counts["loaded"], newer.counts["updated"], newer.counts["quarantined"]) == (1, 1, 0)
    assert query("SELECT value_num, status FROM ehr.observation WHERE observation_id = 'o1'") == [(1.7, "corrected")]


def test_without_meta_or_transaction_time_the_later_received_export_wins(db_url, settings, tmp_path, query):
    ingest(str(export(tmp_path / "first", _resources(True, 0.9, "final"), None)), settings, url=db_url)
    second = ingest(str(export(tmp_path / "second", _resources(True, 1.7, "corrected"), None)), settings, url=db_url)

    assert (second.counts["updated"], second.counts["quarantined"]) == (1, 0)
    assert query("SELECT value_num FROM ehr.observation WHERE observation_id = 'o1'") == [(1.7,)]


def test_a_version_without_meta_compares_its_export_time_with_a_stored_last_updated(db_url, settings, tmp_path, query):
    # Stored: o1 with meta.lastUpdated 2024-06-01 (from the base resources). A copy without meta from an export
    # of 2024-05-01 is older; one from an export of 2024-10-01 is newer.
    ingest(str(export(tmp_path / "base", _resources(False, 0.9, "final"), None)), settings, url=db_url)
    early = _strip_meta(_with_value(OBSERVATIONS[0], 3.3, "amended"))
    stale = ingest(str(export(tmp_path / "early", {"Observation": [early]}, "2024-05-01T00:00:00Z")), settings,
                   url=db_url)  # fmt: skip
    assert stale.counts["quarantine_reasons"] == {"stale-version": 1}
    assert query("SELECT value_num FROM ehr.observation WHERE observation_id = 'o1'") == [(0.9,)]
    late = ingest(str(export(tmp_path / "late", {"Observation": [early]}, NEW_EXPORT)), settings, url=db_url)
    assert (late.counts["updated"], late.counts["quarantined"]) == (1, 0)
    assert query("SELECT value_num, status FROM ehr.observation WHERE observation_id = 'o1'") == [(3.3, "amended")]


def _stage(url: str, folder: Path, settings) -> int:
    """Begin a run for an export folder and stage it; the merge is left to the caller."""
    location = open_location(str(folder), settings)
    conn = connect(url)
    try:
        plan = plan_export(location)
        run_id = begin_run(conn, location.uri, plan)
        stage_files(conn, run_id, location, plan.files, settings)
    finally:
        conn.close()
    return run_id


def _commit(url: str, run_id: int, errors: list[BaseException]) -> None:
    conn = connect(url)
    try:
        commit_run(conn, run_id)
    except BaseException as exc:  # reported to the test thread
        errors.append(exc)
    finally:
        conn.close()


def _state(url: str) -> tuple:
    resources = run_sql(
        url, "SELECT resource_type, resource_id, version_id, md5(body::text) FROM fhir.resource ORDER BY 1, 2"
    )
    return table_fingerprints(url), resources


def _overlapping_exports(tmp_path: Path) -> tuple[Path, Path]:
    """Two exports of the same resources: the newer with meta (version 2) and without; the older as version 1."""
    newer = {
        "Patient": copy.deepcopy(PATIENTS),
        "Encounter": [_strip_meta(e) for e in ENCOUNTERS],  # no meta: ordered by the exports' transactionTime
        "Observation": [
            {**_with_value(o, o["valueQuantity"]["value"] + 1, "amended"),
             "meta": {"versionId": "2", "lastUpdated": "2024-08-01T00:00:00Z"}}
            for o in OBSERVATIONS
        ],
    }  # fmt: skip
    for e in newer["Encounter"]:
        e["status"] = "cancelled"
    older = {
        "Patient": copy.deepcopy(PATIENTS),
        "Encounter": [_strip_meta(e) for e in ENCOUNTERS],
        "Observation": copy.deepcopy(OBSERVATIONS),
    }
    return export(tmp_path / "newer", newer, NEW_EXPORT), export(tmp_path / "older", older, OLD_EXPORT)


def test_concurrent_merges_end_as_sequential_ones_in_either_order(pg_admin_url, template_db, settings, tmp_path):
    newer, older = _overlapping_exports(tmp_path)
    states = []
    for order in ((newer, older), (older, newer)):
        with fresh_database(pg_admin_url, template_db) as url:
            for folder in order:
                ingest(str(folder), settings, url=url)
            states.append(_state(url))
    assert states[0] == states[1]  # the version rules make the order irrelevant

    with fresh_database(pg_admin_url, template_db) as url:
        runs = [_stage(url, newer, settings), _stage(url, older, settings)]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_commit, args=(url, run, errors)) for run in reversed(runs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert run_sql(url, "SELECT status FROM ops.ingest_run ORDER BY run_id") == [("succeeded",), ("succeeded",)]
        assert _state(url) == states[0]
        assert run_sql(url, "SELECT body->>'status' FROM fhir.resource WHERE resource_id = 'e1'") == [("cancelled",)]
        assert run_sql(url, "SELECT value_num FROM ehr.observation WHERE observation_id = 'o1'") == [(1.9,)]


def test_a_merge_waits_for_the_one_in_progress(db_url, settings, tmp_path, query):
    """The merge lock, made visible: while another session holds it, a merge waits and publishes nothing."""
    newer, _ = _overlapping_exports(tmp_path)
    run_id = _stage(db_url, newer, settings)
    holder = connect(db_url)
    holder.autocommit = True
    errors: list[BaseException] = []
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MERGE_LOCK,))
        thread = threading.Thread(target=_commit, args=(db_url, run_id, errors))
        thread.start()
        waiting = []
        for _ in range(200):
            waiting = query(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            if waiting == [(1,)]:
                break
            time.sleep(0.05)
        assert waiting == [(1,)]
        assert thread.is_alive()
        assert query("SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,)) == [("running",)]
        assert query("SELECT count(*) FROM fhir.resource") == [(0,)]
    finally:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (MERGE_LOCK,))
        holder.close()
    thread.join(timeout=60)
    assert errors == [] and not thread.is_alive()
    assert query("SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,)) == [("succeeded",)]
    assert query("SELECT count(*) FROM fhir.resource") == [(10,)]
