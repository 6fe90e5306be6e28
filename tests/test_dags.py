"""The Airflow 3 DAGs with a real Airflow: they import fast and have the intended structure, schedules and asset
links; ``dag.test()`` runs the whole pipeline on a real warehouse (ingest → quality → sequences → retrain →
nightly scoring, rows in risk.latest_score); and an export the gate rejects produces no sequences and no scores.

Airflow runs in subprocesses (``tests/dag_runner.py``) with their own AIRFLOW_HOME and SQLite metadata database:
Airflow reads its configuration once per process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from odyssey_batch.synth import generate
from tests.conftest import REPO, fresh_database, run_sql, shared_data
from tests.test_roles import pipeline_login

DAGS = ["fhir_export", "fhir_ingest", "data_quality", "build_sequences", "retrain", "nightly_scoring"]
RUNNER = str(REPO / "tests" / "dag_runner.py")


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "GX_ANALYTICS_ENABLED": "false",
           "ODYSSEY_INGEST_WORKERS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def test_dags_import_fast_with_the_intended_structure(airflow_env):
    proc = subprocess.run([sys.executable, RUNNER, "--describe", *DAGS], env=airflow_env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    described = json.loads(proc.stdout.strip().splitlines()[-1])
    dags = described["dags"]
    assert set(dags) == set(DAGS) and described["heavy"] == []  # nothing heavy imported at parse time
    assert all(d["seconds"] < 1.0 for d in dags.values()), {k: d["seconds"] for k, d in dags.items()}
    # asset links: ingest → quality → sequences
    assert dags["fhir_ingest"]["tasks"]["publish"]["outlets"] == ["odyssey_ingested"]
    assert dags["data_quality"]["schedule"] == ["odyssey_ingested"]
    assert dags["data_quality"]["tasks"]["gate"]["outlets"] == ["odyssey_validated"]
    assert dags["build_sequences"]["schedule"] == ["odyssey_validated"]
    assert dags["build_sequences"]["tasks"]["tokenize"]["outlets"] == ["odyssey_dataset"]
    assert dags["fhir_ingest"]["tasks"]["load"]["upstream"] == ["find_exports"]
    # the nightly pull: pull -> load, which publishes the same asset as fhir_ingest
    assert dags["fhir_export"]["schedule"] == "0 1 * * *"
    assert dags["fhir_export"]["tasks"]["load"]["upstream"] == ["pull"]
    assert dags["fhir_export"]["tasks"]["pull"]["pool"] == "fhir_export"  # the scheduler needs it to exist
    assert dags["fhir_export"]["tasks"]["load"]["outlets"] == ["odyssey_ingested"]
    # schedules: weekly retraining with its params, nightly scoring at 02:00
    assert dags["retrain"]["schedule"] == "@weekly"
    assert {"mode", "preset", "finetune_epochs", "seeds"} <= set(dags["retrain"]["params"])
    assert dags["retrain"]["tasks"]["finetune"]["upstream"] == ["pretrain"]
    assert dags["nightly_scoring"]["schedule"] == "0 2 * * *"
    scoring = dags["nightly_scoring"]["tasks"]
    assert scoring["commit"]["upstream"] == ["score", "start"] and scoring["commit"]["outlets"] == ["odyssey_scores"]
    assert scoring["mark_failed"]["retries"] == 0
    for dag in dags.values():  # retries with backoff and a time limit on every working task
        for task_id, task in dag["tasks"].items():
            if task_id not in ("partitions_of", "publish", "mark_failed"):
                assert task["retries"] >= 1 and task["timeout"], (task_id, task)


def run_dag(dag_id: str, env: dict[str, str], conf: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, RUNNER, dag_id, "--conf", json.dumps(conf or {})], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = proc.stdout + proc.stderr
    return result


def test_the_whole_pipeline_with_dag_test(airflow_env, pg_admin_url, template_db, tmp_path):
    landing = tmp_path / "landing"
    generate(landing / "2026-01-01", 60, 3)
    # The DAGs run as a login that is only a member of odyssey_pipeline: they never need the owner.
    with fresh_database(pg_admin_url, template_db) as url, pipeline_login(url) as (_, pipeline_url):
        env = {**airflow_env, "ODYSSEY_DATABASE_URL": pipeline_url, "ODYSSEY_HOME": str(tmp_path / "home"),
               "AIRFLOW_VAR_ODYSSEY_LANDING": str(landing)}  # fmt: skip
        ingested = run_dag("fhir_ingest", env)
        assert ingested["state"] == "success" and ingested["tasks"]["load[0]"] == "success"
        assert ingested["asset_events"] == ["odyssey_ingested"]
        assert run_sql(url, "SELECT count(*) FROM ehr.patient") == [(60,)]
        again = run_dag("fhir_ingest", env)  # nothing new in the landing location: nothing loaded or published
        assert again["state"] == "success" and again["asset_events"] == []
        assert run_sql(url, "SELECT count(*) FROM ops.ingest_run") == [(1,)]
        assert run_dag("data_quality", env)["asset_events"] == ["odyssey_validated"]
        assert run_dag("build_sequences", env)["asset_events"] == ["odyssey_dataset"]
        trained = run_dag("retrain", env, {"mode": "full", "preset": "tiny", "pretrain_steps": 4,
                                           "finetune_epochs": 1, "max_length": 64})  # fmt: skip
        assert trained["state"] == "success" and trained["asset_events"] == ["odyssey_models"]
        assert run_sql(url, "SELECT status FROM ops.model_version") == [("champion",)]
        scored = run_dag("nightly_scoring", env, {"as_of": "2025-12-31T00:00:00+00:00", "partitions": 2,
                                                  "cohort": "active"})  # fmt: skip
        assert scored["state"] == "success" and scored["tasks"]["mark_failed"] == "skipped"
        assert {scored["tasks"]["score[0]"], scored["tasks"]["score[1]"]} == {"success"}
        rows = run_sql(url, """SELECT count(DISTINCT patient_id), min(probability), max(probability),
                                      count(*) FILTER (WHERE task IN ('mortality_30d', 'los_7d', 'readmission_30d'))
                               FROM risk.latest_score""")[0]  # fmt: skip
        # the active cohort: every patient seen in 30 days, every task (condition tasks unless diagnosed already)
        assert rows[0] > 0 and 0 <= rows[1] <= rows[2] <= 1 and rows[3] == 3 * rows[0]
        assert run_sql(url, "SELECT status, partitions FROM risk.scoring_run") == [("succeeded", 2)]


def test_a_rejected_export_produces_no_sequences_and_no_scores(airflow_env, pg_admin_url, template_db, tmp_path):
    landing = tmp_path / "landing"
    shutil.copytree(shared_data("fhir/hl7-r4-examples"), landing / "2026-01-02")  # 7% quarantined: rejected
    with fresh_database(pg_admin_url, template_db) as url:
        env = {**airflow_env, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(tmp_path / "home"),
               "AIRFLOW_VAR_ODYSSEY_LANDING": str(landing)}  # fmt: skip
        assert run_dag("fhir_ingest", env)["state"] == "success"
        gate = run_dag("data_quality", env)
        assert gate["state"] == "failed" and gate["tasks"]["gate"] == "failed" and gate["asset_events"] == []
        assert "REJECTED" in gate["log"] and "quarantine_rate" in gate["log"]
        sequences = run_dag("build_sequences", env)  # had it been triggered anyway, it refuses
        assert sequences["state"] == "failed" and sequences["asset_events"] == []
        assert run_sql(url, "SELECT count(*) FROM ops.dataset_version WHERE status = 'ready'") == [(0,)]
        scoring = run_dag("nightly_scoring", env, {"as_of": "2026-01-02T02:00:00+00:00", "partitions": 1})
        assert scoring["state"] == "failed" and scoring["tasks"]["start"] == "failed"
        assert "no champion" in scoring["log"]
        assert run_sql(url, "SELECT count(*) FROM risk.score") == [(0,)]


TINY = REPO / "odyssey_batch" / "examples" / "tiny_export"


def _rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip


def test_fhir_export_pulls_loads_and_then_pulls_only_the_changes(airflow_env, pg_admin_url, template_db, tmp_path):
    """fhir_export end to end against tests/strict_bulk_server.py on loopback (SMART Backend Services, 429 on the
    first kick-off, a flaky token endpoint, HTTP-date Retry-After, a transient 503, gzip): the first run lands the
    whole export and loads it; the second, ``--since auto``, asks for what changed since the first transactionTime
    and loads only that (one updated Observation, one deleted Condition)."""
    import datetime as dt
    from functools import partial
    from urllib.parse import parse_qs

    from odyssey_batch.pull.landing import INCOMPLETE_MARKER
    from tests.strict_bulk_server import Behaviour, StrictBulkServer

    utc = partial(dt.datetime, tzinfo=dt.UTC)
    types = ("Patient", "Encounter", "Condition", "Procedure", "Medication", "MedicationRequest", "Observation")
    files = {f"{t}.ndjson": (TINY / f"{t}.ndjson").read_bytes() for t in types}
    counts = {t: len(files[f"{t}.ndjson"].splitlines()) for t in types}
    behaviour = Behaviour(files=files, output=[{"type": t, "url": f"{t}.ndjson", "count": counts[t]} for t in types])
    behaviour.hold.set()
    landing = tmp_path / "landing"
    with StrictBulkServer(behaviour) as server, fresh_database(pg_admin_url, template_db) as url, \
            pipeline_login(url) as (_, pipeline_url):  # fmt: skip
        connection = {"conn_type": "http", "host": server.base_url, "login": "odyssey-batch",
                      "password": _rsa_pem(), "extra": {"group": "nightly", "types": ",".join(types),
                                                        "kid": "rs-1", "scope": "system/*.rs"}}  # fmt: skip
        env = {**airflow_env, "ODYSSEY_DATABASE_URL": pipeline_url, "ODYSSEY_HOME": str(tmp_path / "home"),
               "AIRFLOW_VAR_ODYSSEY_LANDING": str(landing), "AIRFLOW_CONN_FHIR_EXPORT": json.dumps(connection),
               "ODYSSEY_PULL_MAX_WAIT_S": "0.5"}  # fmt: skip
        first = run_dag("fhir_export", env)
        assert first["state"] == "success" and first["tasks"] == {"pull": "success", "load": "success"}
        assert first["asset_events"] == ["odyssey_ingested"]
        assert "PRIVATE KEY" not in first["log"] and server.TOKEN_PREFIX not in first["log"]  # no key, no token
        (folder,) = landing.iterdir()  # one complete Bulk Data folder, committed last
        assert not (folder / INCOMPLETE_MARKER).exists()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["transactionTime"] == "2026-12-05T02:00:00Z"
        assert {e["type"]: e["count"] for e in manifest["output"]} == counts
        kickoff = parse_qs(behaviour.kickoffs[-1])  # the 429 first, then accepted: one _type, no _since
        assert len(behaviour.kickoffs) == 2 and kickoff["_type"] == [",".join(types)] and "_since" not in kickoff
        assert run_sql(url, "SELECT status, counts->>'records', counts->>'quarantined' FROM ops.ingest_run") == [
            ("succeeded", str(sum(counts.values())), "0")
        ]
        assert run_sql(url, "SELECT (SELECT count(*) FROM ehr.patient), (SELECT count(*) FROM ehr.condition), "
                            "(SELECT count(*) FROM ehr.observation)") == [(3, 4, 10)]  # fmt: skip
        assert run_sql(url, "SELECT status, scope, transaction_time = '2026-12-05T02:00:00Z', destination "
                            "FROM ops.bulk_pull") == [("complete", "group/nightly", True, folder.name)]  # fmt: skip

        # the next night: one Observation changed, one Condition deleted; --since auto asks only for those
        observation = json.loads(files["Observation.ndjson"].splitlines()[0])
        observation["meta"] = {"lastUpdated": "2026-12-05T12:00:00Z"}
        observation["valueQuantity"]["value"] = 999.0
        deleted = {"resourceType": "Bundle", "type": "transaction",
                   "entry": [{"request": {"method": "DELETE", "url": "Condition/tiny-c1"}}]}  # fmt: skip
        behaviour.files = {"obs.ndjson": json.dumps(observation).encode() + b"\n",
                           "del.ndjson": json.dumps(deleted).encode() + b"\n"}  # fmt: skip
        behaviour.output = [{"type": "Observation", "url": "obs.ndjson", "count": 1}]
        behaviour.deleted = [{"type": "Bundle", "url": "del.ndjson"}]
        behaviour.transaction_time = "2026-12-06T02:00:00Z"
        second = run_dag("fhir_export", env)
        assert second["state"] == "success" and second["asset_events"] == ["odyssey_ingested"]
        since = parse_qs(behaviour.kickoffs[-1])["_since"]
        assert len(behaviour.kickoffs) == 3 and since == ["2026-12-05T02:00:00.000Z"]  # the first transactionTime
        (newer,) = set(landing.iterdir()) - {folder}
        assert not (newer / INCOMPLETE_MARKER).exists()
        runs = run_sql(url, "SELECT status, counts->>'records', counts->>'updated', counts->>'inserted', "
                            "counts->>'deleted' FROM ops.ingest_run ORDER BY run_id")  # fmt: skip
        assert runs[1] == ("succeeded", "1", "1", "0", "1")
        assert run_sql(url, "SELECT value_num FROM ehr.observation WHERE observation_id = %s",
                       (observation["id"],)) == [(999.0,)]  # fmt: skip
        assert run_sql(url, "SELECT (SELECT count(*) FROM ehr.patient), (SELECT count(*) FROM ehr.condition), "
                            "(SELECT count(*) FROM ehr.observation)") == [(3, 3, 10)]  # fmt: skip
        pulls = run_sql(url, "SELECT status, since, transaction_time FROM ops.bulk_pull ORDER BY pull_id")
        first_time, second_time = utc(2026, 12, 5, 2), utc(2026, 12, 6, 2)
        assert pulls == [("complete", None, first_time), ("complete", first_time, second_time)]
        assert behaviour.deletes == 2  # each finished job's status URL was released


def test_dag_files_stay_thin():
    """Each DAG file only wires tasks: the work is in odyssey_batch (no SQL, no model code in dags/)."""
    for path in sorted(Path(REPO / "dags").glob("*.py")):
        text = path.read_text()
        assert "SELECT" not in text and "torch" not in text and len(text.splitlines()) < 100, path.name
