"""A crash or kill at any point leaves the warehouse consistent, and the next run completes the work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg2
import pytest

from odyssey_batch.cli.main import example_export
from odyssey_batch.ingest import ingest
from tests.conftest import run_sql, shared_data, table_fingerprints

SYNTHEA_100 = "fhir/synthea-smart-100-ndjson"
VISIBLE_TABLES = ("fhir.resource", "ehr.patient", "ehr.encounter", "ehr.observation", "ops.quarantine")


def _visible_rows(url: str) -> dict[str, int]:
    return {t: run_sql(url, f"SELECT count(*) FROM {t}")[0][0] for t in VISIBLE_TABLES}


def test_kill_during_staging_then_rerun_completes(db_url, settings, tmp_path):
    env = {
        **os.environ,
        "ODYSSEY_DATABASE_URL": db_url,
        "ODYSSEY_HOME": str(tmp_path / "home"),
        "ODYSSEY_INGEST_WORKERS": "1",
        "ODYSSEY_INGEST_CHUNK_LINES": "200",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "odyssey_batch.cli.main", "ingest", "--json", str(shared_data(SYNTHEA_100))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        staged_files = 0
        while time.monotonic() < deadline and staged_files < 3:
            time.sleep(0.05)
            staged_files = run_sql(db_url, "SELECT count(*) FROM ops.ingest_file")[0][0]
        assert staged_files >= 3, "ingest did not get going"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-run: the run is left 'running', its staged rows exist, and none of it is visible.
    assert run_sql(db_url, "SELECT status FROM ops.ingest_run") == [("running",)]
    assert run_sql(db_url, "SELECT count(*) > 0 FROM staging.resource") == [(True,)]
    assert set(_visible_rows(db_url).values()) == {0}

    result = ingest(str(shared_data(SYNTHEA_100)), settings, url=db_url)
    assert result.counts["loaded"] == result.counts["records"] == 25909
    assert run_sql(db_url, "SELECT run_id, status FROM ops.ingest_run ORDER BY run_id") == [
        (1, "abandoned"),
        (2, "succeeded"),
    ]
    assert run_sql(db_url, "SELECT count(*) FROM staging.resource") == [(0,)]
    assert _visible_rows(db_url)["fhir.resource"] == 25909


def test_failure_inside_the_merge_transaction_changes_nothing(db_url, settings):
    """A database error in the middle of the merge (after fhir.resource was written) rolls everything back."""
    tiny = example_export()
    run_sql(
        db_url,
        """CREATE FUNCTION test_boom() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'simulated crash while writing ehr.observation'; END $$;
           CREATE TRIGGER boom BEFORE INSERT ON ehr.observation FOR EACH STATEMENT EXECUTE FUNCTION test_boom();""",
    )
    with pytest.raises(psycopg2.Error, match="simulated crash"):
        ingest(str(tiny), settings, url=db_url)
    assert set(_visible_rows(db_url).values()) == {0}
    assert run_sql(db_url, "SELECT status, error LIKE '%%simulated crash%%' FROM ops.ingest_run") == [("failed", True)]
    assert run_sql(db_url, "SELECT count(*) FROM staging.resource") == [(0,)]

    run_sql(db_url, "DROP TRIGGER boom ON ehr.observation")
    result = ingest(str(tiny), settings, url=db_url)
    assert result.counts["loaded"] == 28
    assert table_fingerprints(db_url)["observation"][0] == 10
