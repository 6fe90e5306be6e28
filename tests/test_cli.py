"""The command line as users meet it: through the installed entry point, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from odyssey_batch.cli.main import example_export
from odyssey_batch.warehouse import create_database, with_database
from tests.conftest import run_sql

COMMANDS = ["db", "ingest", "runs", "quarantine", "synth", "demo"]


def cli(*args: str, env: dict[str, str], check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "odyssey_batch.cli.main", *args],
        env={**os.environ, "COLUMNS": "160", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> dict[str, str]:
    return {"ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_INGEST_WORKERS": "1"}


def test_help_explains_every_command(env):
    top = cli("--help", env=env).stdout
    for command in COMMANDS:
        assert command in top
    for command in [*COMMANDS, "db url", "db upgrade", "db status", "db stop", "db start"]:
        text = cli(*command.split(), "--help", env=env).stdout
        assert "Usage" in text and len(text.splitlines()) > 4, command
    assert "quarantine" in cli("ingest", "--help", env=env).stdout


def test_ingest_runs_and_quarantine_as_json(env, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    lines = (example_export() / "Patient.ndjson").read_text().splitlines()
    (export / "Patient.ndjson").write_text(
        "\n".join([*lines, '{"resourceType": "Patient", "id": "bad", "birthDate": "1990-02-30"}']) + "\n"
    )
    result = json.loads(cli("ingest", str(export), "--json", env=env).stdout)
    assert (result["records"], result["loaded"], result["quarantined"]) == (4, 3, 1)
    assert result["quarantine_reasons"] == {"fhir-validation": 1}

    runs = json.loads(cli("runs", "--json", env=env).stdout)
    assert [(r["run_id"], r["status"], r["loaded"]) for r in runs] == [(result["run_id"], "succeeded", 3)]

    quarantined = json.loads(cli("quarantine", "--json", env=env).stdout)
    [reason] = quarantined["reasons"]
    assert reason["reason"] == "fhir-validation" and reason["count"] == 1
    assert reason["examples"][0]["line_no"] == 4 and "birthDate" in reason["examples"][0]["error"]

    human = cli("quarantine", env=env).stdout
    assert "fhir-validation" in human and "Patient.ndjson:4" in human


def test_ingest_human_summary_reconciles(env):
    out = cli("ingest", str(example_export()), env=env).stdout
    assert "28 resources read = 28 loaded" in out and "0 quarantined" in out


def test_ingest_of_a_missing_folder_fails_clearly(env, tmp_path):
    proc = cli("ingest", str(tmp_path / "nowhere"), env=env, check=False)
    assert proc.returncode == 1
    assert "no such folder" in proc.stderr


def test_db_url_and_upgrade_on_a_configured_warehouse(env, db_url):
    assert cli("db", "url", env=env).stdout.strip() == db_url
    upgraded = json.loads(cli("db", "upgrade", "--json", env=env).stdout)
    assert upgraded["applied_now"] == [] and upgraded["schema_version"] >= 1
    status = json.loads(cli("db", "status", "--json", env=env).stdout)
    assert status["mode"] == "external"


def test_demo_on_the_embedded_server_and_db_url(tmp_path):
    """The README's first command: no configuration at all, an embedded server under ODYSSEY_HOME. The demo works
    in a database and object store of its own, created afresh, and leaves the user's warehouse alone."""
    home = tmp_path / "demo-home"
    env = {"ODYSSEY_HOME": str(home), "ODYSSEY_DATABASE_URL": ""}
    try:
        # The user's own embedded warehouse (migrated on its first start), with the tiny example in it.
        assert json.loads(cli("ingest", str(example_export()), "--json", env=env).stdout)["loaded"] == 28
        mine = cli("db", "url", env=env).stdout.strip()
        # Left-overs of an earlier demo, which this one must not build on.
        create_database(with_database(mine, "postgres"), "odyssey_demo")
        run_sql(with_database(mine, "odyssey_demo"), "CREATE TABLE earlier_demo (x integer)")
        (home / "demo" / "objects" / "datasets" / "v7").mkdir(parents=True)
        demo = json.loads(cli("demo", "--json", env=env, timeout=900).stdout)
        demo_url = demo["warehouse"]["url"]
        assert "/odyssey_demo?" in demo_url and demo_url != mine
        assert demo["warehouse"]["object_store"] == str(home / "demo" / "objects")
        assert run_sql(demo_url, "SELECT to_regclass('public.earlier_demo')") == [(None,)]
        assert sorted(p.name for p in (home / "demo" / "objects" / "datasets").iterdir()) == ["v1"]
        synth, ingested = demo["synth"], demo["ingest"]
        assert synth["patients"] == 300 and synth["resources"] == ingested["records"] > 10_000
        assert ingested["loaded"] == ingested["records"] and ingested["quarantined"] == 0
        assert demo["tables"]["ehr.patient"] == 300
        assert demo["tables"]["ehr.observation"] == synth["counts"]["Observation"]
        assert demo["validate"]["success"] and demo["tokenize"]["patients"]["train"] > 200
        assert demo["tokenize"]["labels"]["mortality_30d"]["positive"] > 10
        assert demo["pretrain"]["steps"] == 100 and demo["pretrain"]["val_loss"] < 10
        first = demo["finetune"]["model_version"]
        assert demo["evaluate"]["model_version"] == first and demo["promotion"]["promoted"]
        methods = {(r["task"], r["method"]) for r in demo["evaluate"]["table"]}
        assert {m for t, m in methods if t == "mortality_30d"} == {"model", "logreg", "gbt", "oracle"}
        assert len({t for t, _ in methods}) == 6 and demo["evaluate"]["report"]["report/report.html"]
        assert demo["score"]["status"] == "succeeded" and demo["score"]["n_patients"] > 0
        latest = run_sql(demo_url, "SELECT count(*), count(DISTINCT patient_id) FROM risk.latest_score")
        assert latest == [(demo["score"]["n_scores"], demo["score"]["n_patients"])]
        top = demo["top_risk"]["mortality_30d"]
        assert 0 < len(top) <= 10 and [r["probability"] for r in top] == sorted((r["probability"] for r in top),
                                                                               reverse=True)  # fmt: skip
        # Only the demo's own patients are shown, and only from its own run.
        shown = {r["patient_id"] for rows in demo["top_risk"].values() for r in rows}
        scored = {p for (p,) in run_sql(demo_url, "SELECT patient_id FROM risk.score WHERE run_id = %s",
                                        (demo["score"]["run_id"],))}  # fmt: skip
        assert shown and shown <= scored
        # The server keeps running between commands, so psql (here psycopg2) can use the printed URL.
        assert run_sql(demo_url, "SELECT count(*) FROM ehr.encounter") == [(synth["counts"]["Encounter"],)]
        # The user's warehouse and object store are untouched: the tiny example only, no model, no scores.
        assert cli("db", "url", env=env).stdout.strip() == mine and "host=" in mine
        assert run_sql(mine, "SELECT count(*) FROM ehr.patient") == [(3,)]
        assert run_sql(mine, "SELECT count(*) FROM ops.model_version") == [(0,)]
        assert run_sql(mine, "SELECT count(*) FROM risk.score") == [(0,)]
        assert not (home / "objects" / "datasets").exists()
        assert not {p for (p,) in run_sql(mine, "SELECT patient_id FROM ehr.patient")} & shown
        assert json.loads(cli("db", "status", "--json", env=env).stdout)["embedded_running"] is True
    finally:
        cli("db", "stop", env=env, check=False)
    assert json.loads(cli("db", "status", "--json", env=env).stdout)["embedded_running"] is False


def test_synth_writes_an_export_and_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "export"
    data = json.loads(cli("synth", "--patients", "40", "--seed", "2", "--json", str(out), env={}).stdout)
    assert data["patients"] == 40 and data["counts"]["Patient"] == 40
    assert sorted(p.name for p in out.iterdir()) == [
        "Condition.ndjson.gz", "Encounter.ndjson.gz", "MedicationRequest.ndjson.gz", "Observation.ndjson.gz",
        "Patient.ndjson.gz", "Procedure.ndjson.gz", "manifest.json", "truth.parquet",
    ]  # fmt: skip
    again = cli("synth", "--patients", "40", str(out), env={}, check=False)
    assert again.returncode == 1 and "not empty" in again.stderr
    human = cli("synth", "--patients", "40", "--seed", "2", str(tmp_path / "other"), env={}).stdout
    assert "40 patients" in human and "mortality_30d" in human
