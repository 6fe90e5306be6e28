"""A login that is only a member of ``odyssey_pipeline`` runs every command and DAG step; only the owner migrates.

Each test creates a uniquely named login role in ``odyssey_pipeline`` (roles are cluster-wide), connects as it
through the real entry point (or the DAG steps), and drops it afterwards.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.errors
import pytest

from odyssey_batch.warehouse import connect, upgrade
from odyssey_batch.warehouse.migrations import available_migrations
from tests.conftest import pretrained_warehouse, run_sql, shared_data
from tests.test_cli import cli

SMART_BULK = "fhir/smart-bulk-10-patients-partial"
NEEDED = max(m.version for m in available_migrations())


def as_user(url: str, user: str, password: str = "") -> str:
    """The same URL, logging in as ``user``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}" if password else f"{user}@{host}", parts.path,
                       parts.query, parts.fragment))  # fmt: skip


@contextmanager
def pipeline_login(db_url: str) -> Iterator[tuple[str, str]]:
    """(role, URL) of a new login whose only privileges come from odyssey_pipeline; dropped afterwards."""
    role = f"pipeline_{uuid.uuid4().hex[:12]}"
    run_sql(db_url, f"CREATE ROLE {role} LOGIN IN ROLE odyssey_pipeline")
    try:
        yield role, as_user(db_url, role)
    finally:
        run_sql(db_url, f"DROP ROLE {role}")


def owned_by(db_url: str, role: str) -> list[tuple]:
    """Objects the role owns outside temporary schemas (a pipeline login must create none)."""
    return run_sql(
        db_url,
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relowner = %s::regrole AND n.nspname NOT LIKE 'pg_temp%%' AND n.nspname NOT LIKE 'pg_toast%%' "
        "UNION ALL SELECT nspname, '' FROM pg_namespace WHERE nspowner = %s::regrole",
        (role, role),
    )


def test_pipeline_login_ingests_validates_and_tokenizes(db_url, tmp_path):
    with pipeline_login(db_url) as (role, url):
        env = {"ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_INGEST_WORKERS": "1"}
        assert json.loads(cli("db", "upgrade", "--json", env=env).stdout) == {"applied_now": [],
                                                                              "schema_version": NEEDED}  # fmt: skip
        ingested = json.loads(cli("ingest", str(shared_data(SMART_BULK)), "--json", env=env).stdout)
        assert ingested["status"] == "succeeded" and ingested["records"] == 7160
        assert ingested["loaded"] == 7160 and ingested["quarantined"] == 0
        assert [r["run_id"] for r in json.loads(cli("runs", "--json", env=env).stdout)] == [ingested["run_id"]]
        assert json.loads(cli("quarantine", "--json", env=env).stdout)["reasons"] == []
        verdict = json.loads(cli("validate", "--json", env=env).stdout)
        assert verdict["success"] and verdict["run_id"] == ingested["run_id"]
        dataset = json.loads(cli("tokenize", "--min-count", "1", "--max-length", "128", "--json", env=env).stdout)
        assert dataset["dataset_version_id"] == 1 and sum(dataset["patients"].values()) == 13
        pretrained = json.loads(cli("train", "pretrain", "--preset", "tiny", "--steps", "2", "--max-length", "128",
                                    "--threads", "1", "--json", env=env).stdout)  # fmt: skip
        assert pretrained["steps"] == 2
        patient = run_sql(db_url, "SELECT min(patient_id) FROM ehr.patient")[0][0]
        assert json.loads(cli("show-patient", patient, "--json", env=env).stdout)["tokens"]
        # Everything was written by the login, as rows only: it owns no table, sequence or schema.
        assert run_sql(db_url, "SELECT status FROM ops.ingest_run") == [("validated",)]
        assert run_sql(db_url, "SELECT count(*) FROM ehr.patient") == [(13,)]
        assert owned_by(db_url, role) == []


def test_pipeline_login_finetunes_evaluates_scores_and_forecasts(pg_admin_url, template_db, tmp_path):
    from odyssey_batch.training.pretrain import PretrainOptions

    options = PretrainOptions(preset="tiny", max_length=64, steps=4)
    home = tmp_path / "home"
    with (
        pretrained_warehouse(pg_admin_url, template_db, home, 80, 21, options) as (db_url, _, parent),
        pipeline_login(db_url) as (role, url),
    ):
        env = {"ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(tmp_path / "home")}
        tuned = json.loads(cli("train", "finetune", "--from", str(parent), "--epochs", "1", "--max-length", "64",
                               "--threads", "1", "--json", env=env).stdout)  # fmt: skip
        version = tuned["model_version"]
        evaluated = json.loads(cli("evaluate", str(version), "--baselines", "none", "--resamples", "20",
                                   "--promote", "--threads", "1", "--json", env=env).stdout)  # fmt: skip
        assert evaluated["promotion"]["promoted"]
        data_end = run_sql(db_url, "SELECT max(start_time)::date::text FROM ehr.encounter")[0][0]
        scored = json.loads(cli("score", "--as-of", data_end, "--cohort", "active", "--active-days", "3650",
                                "--threads", "1", "--json", env=env).stdout)  # fmt: skip
        assert scored["status"] == "succeeded" and scored["n_scores"] > 0
        patient = run_sql(db_url, "SELECT min(patient_id) FROM risk.latest_score")[0][0]
        forecast = json.loads(cli("forecast", patient, "--steps", "3", "--threads", "1", "--json", env=env).stdout)
        assert forecast["pretrain_run"] == parent and forecast["steps"] == 3 and forecast["history"]
        assert json.loads(cli("models", "list", "--json", env=env).stdout)["models"][0]["status"] == "champion"
        assert run_sql(db_url, "SELECT count(*) FROM risk.latest_score") == [(scored["n_scores"],)]
        assert owned_by(db_url, role) == []


def test_dag_steps_run_as_the_pipeline_login(db_url, tmp_path, monkeypatch):
    from odyssey_batch.orchestration import steps

    landing = tmp_path / "landing"
    landing.mkdir()
    shutil.copytree(shared_data(SMART_BULK), landing / "2026-01-01")
    with pipeline_login(db_url) as (role, url):
        monkeypatch.setenv("AIRFLOW_CONN_ODYSSEY_WAREHOUSE", url.replace("postgresql://", "postgres://", 1))
        monkeypatch.setenv("ODYSSEY_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("ODYSSEY_INGEST_WORKERS", "1")
        [source] = steps.new_exports(str(landing))
        assert steps.ingest_export(source)["status"] == "succeeded"
        assert steps.new_exports(str(landing)) == []
        assert steps.quality_gate() == {"validated": [1]}
        assert steps.build_dataset()["dataset_version"] == 1
        assert owned_by(db_url, role) == []


def test_pipeline_login_cannot_create_objects(db_url):
    # A warehouse made on PostgreSQL 14 or earlier: PUBLIC may create in schema public until migration 11 runs.
    run_sql(db_url, "GRANT CREATE ON SCHEMA public TO PUBLIC")
    run_sql(db_url, "DELETE FROM ops.schema_migration WHERE version = 11")
    assert [m.version for m in upgrade(db_url)] == [11]
    assert run_sql(db_url, "SELECT has_schema_privilege('public', 'public', 'CREATE')") == [(False,)]
    with pipeline_login(db_url) as (role, url):
        conn = connect(url)
        try:
            conn.autocommit = True
            for statement in ("CREATE TABLE public.x (i integer)", "CREATE TABLE ehr.x (i integer)",
                              "CREATE TABLE risk.x (i integer)", "CREATE SCHEMA mine", "CREATE VIEW ops.v AS SELECT 1",
                              "CREATE INDEX ON ehr.patient (gender)", "ALTER TABLE ehr.patient ADD COLUMN x integer",
                              "DROP TABLE ehr.patient"):  # fmt: skip
                with pytest.raises(psycopg2.errors.InsufficientPrivilege), conn.cursor() as cur:
                    cur.execute(statement)
            with conn.cursor() as cur:  # what ingest needs: temporary tables, sequences
                cur.execute("CREATE TEMP TABLE t ON COMMIT DROP AS SELECT 1 AS i")
                cur.execute("INSERT INTO ops.ingest_run (source) VALUES ('t') RETURNING run_id")
                assert cur.fetchone()[0] >= 1
                cur.execute("DISCARD TEMP")
        finally:
            conn.close()
        assert owned_by(db_url, role) == []


def test_pipeline_login_reads_but_cannot_rewrite_the_migration_bookkeeping(db_url):
    """Every command checks ops.schema_migration; only the owner may say which migrations ran."""
    applied = run_sql(db_url, "SELECT version, checksum FROM ops.schema_migration ORDER BY version")
    with pipeline_login(db_url) as (_, url):
        assert run_sql(url, "SELECT version, checksum FROM ops.schema_migration ORDER BY version") == applied
        for statement in ("UPDATE ops.schema_migration SET checksum = 'x'",
                          f"DELETE FROM ops.schema_migration WHERE version = {NEEDED}",
                          "INSERT INTO ops.schema_migration (version, name, checksum) VALUES (9999, 'f', 'x')",
                          "TRUNCATE ops.schema_migration"):  # fmt: skip
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                run_sql(url, statement)
    assert run_sql(db_url, "SELECT version, checksum FROM ops.schema_migration ORDER BY version") == applied


def test_tables_the_owner_adds_later_are_the_pipelines(db_url):
    """Default privileges: a table a later migration creates in a warehouse schema needs no grant of its own."""
    run_sql(db_url, "CREATE TABLE ops.later (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x text)")
    with pipeline_login(db_url) as (_, url):
        assert run_sql(url, "INSERT INTO ops.later (x) VALUES ('a') RETURNING id") == [(1,)]
        assert run_sql(url, "UPDATE ops.later SET x = 'b' RETURNING x") == [("b",)]
        assert run_sql(url, "DELETE FROM ops.later RETURNING id") == [(1,)]


def test_commands_refuse_a_schema_that_is_not_current(db_url, tmp_path, monkeypatch):
    from odyssey_batch.orchestration import steps

    run_sql(db_url, "DELETE FROM ops.schema_migration WHERE version = %s", (NEEDED,))
    behind = max(m.version for m in available_migrations() if m.version < NEEDED)
    message = (f"the warehouse schema is at version {behind}, this odyssey-batch needs {NEEDED}: run "
               "`odyssey-batch db upgrade` as the owner")  # fmt: skip
    with pipeline_login(db_url) as (_, url):
        env = {"ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(tmp_path / "home"), "COLUMNS": "400"}
        for command in (["runs"], ["quarantine"], ["validate"], ["tokenize"], ["models", "list"], ["score"],
                        ["ingest", str(tmp_path)], ["show-patient", "p"], ["forecast", "p"]):  # fmt: skip
            proc = cli(*command, env=env, check=False)
            assert proc.returncode == 2, (command, proc.stderr)
            assert message in proc.stderr and "Traceback" not in proc.stderr, command
        # The login may not migrate: a clear refusal, and nothing changed.
        proc = cli("db", "upgrade", env=env, check=False)
        assert proc.returncode == 1 and "migrations must run as the warehouse's owner" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert NEEDED not in dict(run_sql(db_url, "SELECT version, name FROM ops.schema_migration"))
        # The DAGs refuse the same way, without retries.
        monkeypatch.setenv("AIRFLOW_CONN_ODYSSEY_WAREHOUSE", url)
        with pytest.raises(steps.PermanentError, match="needs"):
            steps.context()
        # The owner upgrades; then the login works.
        owner_env = {**env, "ODYSSEY_DATABASE_URL": db_url}
        assert json.loads(cli("db", "upgrade", "--json", env=owner_env).stdout)["applied_now"] == [NEEDED]
        assert json.loads(cli("runs", "--json", env=env).stdout) == []
        assert steps.context()[0] == url
        # A warehouse upgraded by a newer odyssey-batch is refused too.
        run_sql(db_url, "INSERT INTO ops.schema_migration (version, name, checksum) VALUES (9999, 'future', 'x')")
        proc = cli("runs", env=env, check=False)
        assert proc.returncode == 2 and f"at version 9999, newer than this odyssey-batch ({NEEDED})" in proc.stderr


def test_a_login_outside_the_pipeline_role_is_told_what_to_grant(db_url, tmp_path):
    role = f"nobody_{uuid.uuid4().hex[:12]}"
    run_sql(db_url, f"CREATE ROLE {role} LOGIN")
    try:
        env = {"ODYSSEY_DATABASE_URL": as_user(db_url, role), "ODYSSEY_HOME": str(tmp_path / "home"), "COLUMNS": "400"}
        proc = cli("runs", env=env, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        expected = "may not read the warehouse's schema version (ops.schema_migration): make it a member of "
        assert expected + "odyssey_pipeline" in proc.stderr
    finally:
        run_sql(db_url, f"DROP ROLE {role}")


def test_embedded_warehouse_migrates_on_first_start(tmp_path):
    """The embedded server belongs to this installation: its first command creates the schema."""
    env = {"ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_DATABASE_URL": ""}
    try:
        assert json.loads(cli("runs", "--json", env=env).stdout) == []
        url = cli("db", "url", env=env).stdout.strip()
        assert max(v for (v,) in run_sql(url, "SELECT version FROM ops.schema_migration")) == NEEDED
    finally:
        cli("db", "stop", env=env, check=False)
