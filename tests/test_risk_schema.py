"""The risk schema (migration 0006): analysts' views show succeeded runs only; the roles see what they should."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from odyssey_batch.warehouse import create_database, drop_database, libpq_url, upgrade, with_database
from odyssey_batch.warehouse.migrations import available_migrations
from tests.conftest import run_sql

MIGRATION = Path(__file__).resolve().parents[1] / "sql" / "0006_risk_scores.sql"
SCHEMAS = ("fhir", "ehr", "ops", "staging", "risk")
TABLES = ("scoring_run", "scoring_partition", "score", "explanation", "score_distribution")

VIEW_COLUMNS = {
    "latest_score": "patient_id task probability risk_band as_of prediction_time model_version run_id",
    "patient_risk": (
        "patient_id as_of mortality_30d los_7d readmission_30d hypertension_1y fluid_electrolyte_1y lipid_disorder_1y "
        "highest_band scores"
    ),
    "high_risk_today": "patient_id task probability risk_band as_of prediction_time model_version run_id",
    "latest_explanation": "patient_id task rank token display event_time attribution run_id",
    "scoring_runs": (
        "run_id as_of model_version dataset_version cohort started_at finished_at n_patients n_scores patients_per_s "
        "unknown_rate drift_flagged drift held_back_runs held_back_patients excluded_patients"
    ),
}

DAY1, DAY2, DAY3, DAY4 = (datetime(2024, 1, day, 6, tzinfo=UTC) for day in (1, 2, 3, 4))

# run (also its cohort name) -> (as_of, status, scores: (patient, task, probability, band)).
RUNS = {
    "day1": (
        DAY1,
        "succeeded",
        [
            ("p1", "mortality_30d", 0.2, "low"),
            ("p1", "los_7d", 0.9, "high"),
            ("p2", "mortality_30d", 0.8, "high"),
            ("p3", "readmission_30d", 0.95, "high"),  # p3 is not scored again: its latest is day1's
            ("p3", "sepsis_6h", 0.5, "medium"),  # a custom task: no column of its own in patient_risk
        ],
    ),
    "day2_failed": (DAY2, "failed", [("p1", "los_7d", 0.55, "medium"), ("p10", "los_7d", 0.9, "high")]),
    "day2": (
        DAY2,
        "succeeded",
        [
            ("p1", "mortality_30d", 0.7, "high"),
            ("p1", "los_7d", 0.3, "low"),
            ("p2", "mortality_30d", 0.6, "medium"),
            ("p2", "hypertension_1y", 0.85, "high"),
            ("p4", "lipid_disorder_1y", 0.99, "high"),
            ("p6", "los_7d", 0.4, "medium"),
            ("p6", "mortality_30d", 0.1, "low"),
            ("p7", "readmission_30d", 0.05, "low"),
            ("p8", "mortality_30d", 0.95, "high"),
        ],
    ),
    "day3_running": (
        DAY3,
        "running",
        [("p1", "mortality_30d", 0.01, "low"), ("p5", "fluid_electrolyte_1y", 0.9, "high")],
    ),
    "day4_failed": (DAY4, "failed", [("p1", "los_7d", 0.99, "high"), ("p9", "mortality_30d", 0.9, "high")]),
}
# Explanations: two ranks for (p1, mortality_30d) in every run, one for (p3, readmission_30d) in day1.
EXPLAINED = [("p1", "mortality_30d", 2), ("p3", "readmission_30d", 1)]
HIDDEN_PATIENTS = {"p5", "p9", "p10"}  # scored only by runs that are not succeeded


@pytest.fixture
def scored(db_url: str) -> dict[str, int]:
    """Two succeeded runs (day1, day2), failed runs for day2 and day4, a running one for day3; returns run ids."""
    dataset = run_sql(
        db_url, "INSERT INTO ops.dataset_version (source_runs) VALUES ('{}') RETURNING dataset_version_id"
    )[0][0]
    models = [
        run_sql(
            db_url,
            "INSERT INTO ops.model_version (dataset_version, preset, config, artifact_uri, checksum) "
            "VALUES (%s, 'tiny', '{}', %s, 'sha') RETURNING model_version",
            (dataset, f"models/v{i}"),
        )[0][0]
        for i in (1, 2)
    ]
    runs = {}
    for i, (name, (as_of, status, scores)) in enumerate(RUNS.items()):
        model = models[0] if as_of == DAY1 else models[1]
        run = run_sql(
            db_url,
            "INSERT INTO risk.scoring_run (as_of, model_version, dataset_version, cohort, partitions, status, "
            "n_patients, n_scores, finished_at) VALUES (%s, %s, %s, %s, 2, %s, %s, %s, %s + interval '1 hour') "
            "RETURNING run_id",
            (as_of, model, dataset, name, status, len({s[0] for s in scores}), len(scores), as_of),
        )[0][0]
        runs[name] = run
        for partition in (0, 1):
            run_sql(
                db_url,
                "INSERT INTO risk.scoring_partition (run_id, partition, status) VALUES (%s, %s, %s)",
                (run, partition, status),
            )
        for patient, task, probability, band in scores:
            run_sql(
                db_url,
                "INSERT INTO risk.score (run_id, partition, as_of, patient_id, task, prediction_time, probability, "
                "risk_band, model_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (run, i % 2, as_of, patient, task, as_of - timedelta(hours=1), probability, band, model),
            )
        for patient, task, ranks in EXPLAINED:
            if (patient, task) not in {(s[0], s[1]) for s in scores}:
                continue
            for rank in range(1, ranks + 1):
                run_sql(
                    db_url,
                    "INSERT INTO risk.explanation (run_id, partition, patient_id, task, rank, token, display, "
                    "event_time, attribution) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (run, i % 2, patient, task, rank, f"{name}/{rank}", f"token {rank}", as_of, 1.0 / rank),
                )
        run_sql(
            db_url,
            "INSERT INTO risk.score_distribution (run_id, task, n, mean, histogram, band_shares) "
            "VALUES (%s, 'mortality_30d', 1, 0.5, %s, '{\"low\": 1}')",
            (run, [0.1] * 10),
        )
    return runs


def _latest_expected(runs: dict[str, int]) -> list[tuple]:
    """(patient, task, probability, band, as_of, run) of the newest succeeded run scoring each pair."""
    latest: dict[tuple[str, str], tuple] = {}
    for name in ("day1", "day2"):  # oldest first: later runs overwrite
        as_of, _, scores = RUNS[name]
        for patient, task, probability, band in scores:
            latest[patient, task] = (patient, task, probability, band, as_of, runs[name])
    return sorted(latest.values())


def test_view_columns(db_url):
    for view, names in VIEW_COLUMNS.items():
        found = run_sql(
            db_url,
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'risk' AND table_name = %s "
            "ORDER BY ordinal_position",
            (view,),
        )
        assert [r[0] for r in found] == names.split(), view
    assert run_sql(db_url, "SELECT relname FROM pg_class WHERE relnamespace = 'risk'::regnamespace AND relkind = 'v' "
                   "AND NOT coalesce(reloptions @> '{security_barrier=true}', false) ORDER BY 1") == []  # fmt: skip


def test_latest_score_reads_the_newest_succeeded_run(db_url, scored):
    rows = run_sql(
        db_url,
        "SELECT patient_id, task, probability, risk_band, as_of, run_id FROM risk.latest_score ORDER BY 1, 2",
    )
    assert rows == _latest_expected(scored)
    assert not {r[0] for r in rows} & HIDDEN_PATIENTS
    # prediction_time and model_version come from the score row of that run.
    detail = run_sql(
        db_url,
        "SELECT l.prediction_time, l.model_version, m.dataset_version FROM risk.latest_score l "
        "JOIN ops.model_version m USING (model_version) WHERE patient_id = 'p1' AND task = 'mortality_30d'",
    )
    assert detail == [(DAY2 - timedelta(hours=1), 2, 1)]


def test_patient_risk_pivots_latest_scores(db_url, scored):
    rows = run_sql(
        db_url,
        "SELECT patient_id, as_of, mortality_30d, los_7d, readmission_30d, hypertension_1y, fluid_electrolyte_1y, "
        "lipid_disorder_1y, highest_band, scores FROM risk.patient_risk ORDER BY 1",
    )
    assert rows == [
        ("p1", DAY2, 0.7, 0.3, None, None, None, None, "high", {"mortality_30d": 0.7, "los_7d": 0.3}),
        ("p2", DAY2, 0.6, None, None, 0.85, None, None, "high", {"mortality_30d": 0.6, "hypertension_1y": 0.85}),
        ("p3", DAY1, None, None, 0.95, None, None, None, "high", {"readmission_30d": 0.95, "sepsis_6h": 0.5}),
        ("p4", DAY2, None, None, None, None, None, 0.99, "high", {"lipid_disorder_1y": 0.99}),
        ("p6", DAY2, 0.1, 0.4, None, None, None, None, "medium", {"mortality_30d": 0.1, "los_7d": 0.4}),
        ("p7", DAY2, None, None, 0.05, None, None, None, "low", {"readmission_30d": 0.05}),
        ("p8", DAY2, 0.95, None, None, None, None, None, "high", {"mortality_30d": 0.95}),
    ]


def test_high_risk_today_is_the_latest_succeeded_as_of(db_url, scored):
    # p3's high readmission score is day1's (older as_of); day3 (running) and day4 (failed) are newer but unpublished.
    rows = run_sql(db_url, "SELECT patient_id, task, probability, risk_band, as_of, run_id FROM risk.high_risk_today")
    day2 = scored["day2"]
    assert rows == [
        ("p2", "hypertension_1y", 0.85, "high", DAY2, day2),
        ("p4", "lipid_disorder_1y", 0.99, "high", DAY2, day2),
        ("p8", "mortality_30d", 0.95, "high", DAY2, day2),
        ("p1", "mortality_30d", 0.7, "high", DAY2, day2),
    ]


def test_latest_explanation_joins_the_scores_run(db_url, scored):
    rows = run_sql(
        db_url,
        "SELECT patient_id, task, rank, token, display, event_time, attribution, run_id FROM risk.latest_explanation "
        "ORDER BY 1, 2, 3",
    )
    assert rows == [
        ("p1", "mortality_30d", 1, "day2/1", "token 1", DAY2, 1.0, scored["day2"]),
        ("p1", "mortality_30d", 2, "day2/2", "token 2", DAY2, 0.5, scored["day2"]),
        ("p3", "readmission_30d", 1, "day1/1", "token 1", DAY1, 1.0, scored["day1"]),
    ]


def test_scoring_runs_lists_succeeded_runs_only(db_url, scored):
    rows = run_sql(db_url, "SELECT run_id, as_of, cohort, n_patients, n_scores FROM risk.scoring_runs ORDER BY 1")
    assert rows == [(scored["day1"], DAY1, "day1", 3, 5), (scored["day2"], DAY2, "day2", 6, 9)]


def test_one_succeeded_run_per_as_of_and_publishing(db_url, scored):
    insert = (
        "INSERT INTO risk.scoring_run (as_of, model_version, dataset_version, cohort, status) "
        "VALUES (%s, 1, 1, 'again', %s) RETURNING run_id"
    )
    with pytest.raises(psycopg2.errors.UniqueViolation):
        run_sql(db_url, insert, (DAY2, "succeeded"))
    # The scoring code's publication: a new run for the same as_of replaces the old one in one transaction.
    rerun = run_sql(db_url, insert, (DAY2, "running"))[0][0]
    run_sql(
        db_url,
        "INSERT INTO risk.score (run_id, partition, as_of, patient_id, task, prediction_time, probability, risk_band, "
        "model_version) VALUES (%s, 0, %s, 'p1', 'mortality_30d', %s, 0.3, 'low', 1)",
        (rerun, DAY2, DAY2),
    )
    assert run_sql(db_url, "SELECT probability FROM risk.latest_score WHERE patient_id = 'p1' "
                   "AND task = 'mortality_30d'") == [(0.7,)]  # fmt: skip
    run_sql(
        db_url,
        "DELETE FROM risk.scoring_run WHERE as_of = %(as_of)s AND status = 'succeeded'; "
        "UPDATE risk.scoring_run SET status = 'succeeded', finished_at = now() WHERE run_id = %(run)s",
        {"as_of": DAY2, "run": rerun},
    )
    assert run_sql(db_url, "SELECT run_id FROM risk.scoring_runs ORDER BY 1") == [(scored["day1"],), (rerun,)]
    # Day2's rows went with its run; p1's mortality now comes from the rerun, the rest falls back to day1.
    assert run_sql(db_url, "SELECT count(*) FROM risk.score WHERE run_id = %s", (scored["day2"],)) == [(0,)]
    assert run_sql(db_url, "SELECT patient_id, task, probability, run_id FROM risk.latest_score WHERE patient_id "
                   "IN ('p1', 'p4') ORDER BY 1, 2") == [("p1", "los_7d", 0.9, scored["day1"]),
                                                        ("p1", "mortality_30d", 0.3, rerun)]  # fmt: skip


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        ("UPDATE risk.score SET probability = 1.5", psycopg2.errors.CheckViolation),
        ("UPDATE risk.score SET probability = -0.01", psycopg2.errors.CheckViolation),
        ("UPDATE risk.score SET risk_band = 'extreme'", psycopg2.errors.CheckViolation),
        ("UPDATE risk.explanation SET rank = 0", psycopg2.errors.CheckViolation),
        ("UPDATE risk.scoring_run SET status = 'done'", psycopg2.errors.CheckViolation),
        ("UPDATE risk.scoring_run SET partitions = 0", psycopg2.errors.CheckViolation),
        ("UPDATE risk.scoring_partition SET status = 'done'", psycopg2.errors.CheckViolation),
        ("UPDATE risk.scoring_run SET model_version = 999", psycopg2.errors.ForeignKeyViolation),
        (
            "UPDATE risk.score SET run_id = 999 WHERE run_id = (SELECT min(run_id) FROM risk.score)",
            psycopg2.errors.ForeignKeyViolation,
        ),
    ],
)
def test_constraints_refuse_bad_rows(db_url, scored, statement, error):
    with pytest.raises(error):
        run_sql(db_url, statement)


@contextmanager
def login(db_url: str, prefix: str, group: str) -> Iterator[psycopg2.extensions.connection]:
    """A connection as a new login role in ``group``; the role is dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    run_sql(db_url, f"CREATE ROLE {name} LOGIN IN ROLE {group}")
    conn = None
    try:
        conn = psycopg2.connect(libpq_url(db_url), user=name, application_name="odyssey-batch-tests")
        yield conn
    finally:
        if conn is not None:
            try:  # temporary objects belong to the role: drop them now, not when the backend exits
                conn.rollback()
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("DISCARD TEMP")
            finally:
                conn.close()
        run_sql(db_url, f"DROP ROLE {name}")


def _fetch(conn: psycopg2.extensions.connection, statement: str) -> list[tuple] | None:
    with conn.cursor() as cur:
        cur.execute(statement)
        return cur.fetchall() if cur.description else None


def test_analyst_reads_the_views_and_nothing_else(db_url, scored):
    with login(db_url, "analyst", "odyssey_analyst") as conn:
        conn.autocommit = True
        for view in VIEW_COLUMNS:
            mine = _fetch(conn, f"SELECT * FROM risk.{view}")
            assert mine, view
            assert sorted(mine, key=repr) == sorted(run_sql(db_url, f"SELECT * FROM risk.{view}"), key=repr), view
        denied = [f"risk.{t}" for t in TABLES] + [
            "ehr.patient",
            "ehr.task_label",
            "ops.model_version",
            "ops.schema_migration",
            "fhir.resource",
            "staging.resource",
        ]
        for table in denied:
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                _fetch(conn, f"SELECT 1 FROM {table} LIMIT 1")
        refused = [
            "INSERT INTO risk.score (run_id, partition, as_of, patient_id, task, prediction_time, probability, "
            "risk_band, model_version) VALUES (1, 0, now(), 'x', 't', now(), 0.5, 'low', 1)",
            "UPDATE risk.scoring_runs SET cohort = 'mine'",
            "DELETE FROM risk.scoring_runs",
            "CREATE TABLE risk.mine (x integer)",
            "CREATE VIEW risk.mine AS SELECT 1",
        ]
        for statement in refused:
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                _fetch(conn, statement)
        for statement in ("DELETE FROM risk.latest_score", "UPDATE risk.patient_risk SET los_7d = 0"):
            with pytest.raises((psycopg2.errors.InsufficientPrivilege, psycopg2.errors.ObjectNotInPrerequisiteState)):
                _fetch(conn, statement)
        # security_barrier: the analyst's own function in a WHERE clause only ever sees published rows.
        with conn.cursor() as cur:
            cur.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
            cur.execute(
                "CREATE FUNCTION pg_temp.peek(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE COST 0.0000001 "
                "AS $$ BEGIN RAISE NOTICE 'peek %', $1; RETURN true; END $$"
            )
        del conn.notices[:]
        _fetch(conn, "SELECT * FROM risk.latest_score WHERE pg_temp.peek(patient_id)")
        _fetch(conn, "SELECT * FROM risk.scoring_runs WHERE pg_temp.peek(cohort)")
        seen = {notice.split("peek ", 1)[1].strip() for notice in conn.notices}
        assert seen and not seen & (HIDDEN_PATIENTS | {"day2_failed", "day3_running", "day4_failed"}), seen
    # Nothing was changed by the analyst.
    assert run_sql(db_url, "SELECT count(*) FROM risk.score") == [(sum(len(r[2]) for r in RUNS.values()),)]


def test_pipeline_reads_and_writes_its_tables(db_url, scored):
    with login(db_url, "pipeline", "odyssey_pipeline") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM ehr.patient")
            cur.execute("SELECT count(*) FROM ehr.task_label")
            cur.execute("SELECT count(*) FROM fhir.resource")
            cur.execute("INSERT INTO ops.ingest_run (source) VALUES ('t') RETURNING run_id")
            cur.execute("INSERT INTO staging.quarantine (run_id, source, kind, reason, error) VALUES (1, 's', 'file', "
                        "'r', 'e')")  # fmt: skip
            cur.execute("INSERT INTO ops.dataset_version (source_runs) VALUES ('{}') RETURNING dataset_version_id")
            dataset = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO ops.model_version (dataset_version, preset, config, artifact_uri, checksum) "
                "VALUES (%s, 'tiny', '{}', 'm', 's') RETURNING model_version",
                (dataset,),
            )
            model = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO risk.scoring_run (as_of, model_version, dataset_version, cohort) "
                "VALUES (now(), %s, %s, 'all') RETURNING run_id",
                (model, dataset),
            )
            run = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO risk.scoring_partition (run_id, partition, status) VALUES (%s, 0, 'running')", (run,)
            )
            cur.execute(
                "INSERT INTO risk.score (run_id, partition, as_of, patient_id, task, prediction_time, probability, "
                "risk_band, model_version) VALUES (%s, 0, now(), 'p1', 'los_7d', now(), 0.5, 'medium', %s)",
                (run, model),
            )
            cur.execute("UPDATE risk.scoring_run SET status = 'succeeded' WHERE run_id = %s", (run,))
            cur.execute("DELETE FROM risk.scoring_run WHERE run_id = %s", (scored["day1"],))
            cur.execute("SELECT run_id FROM risk.latest_score WHERE patient_id = 'p1' AND task = 'los_7d'")
            assert cur.fetchall() == [(run,)]
        conn.rollback()
    assert run_sql(db_url, "SELECT count(*) FROM risk.scoring_run") == [(len(RUNS),)]


def test_grants_are_exactly_as_documented(db_url):
    analyst = run_sql(
        db_url,
        "SELECT n.nspname, c.relname, a.privilege_type FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
        "aclexplode(c.relacl) a WHERE a.grantee = 'odyssey_analyst'::regrole ORDER BY 2",
    )
    assert analyst == [("risk", view, "SELECT") for view in sorted(VIEW_COLUMNS)]
    for schema in SCHEMAS:
        usage = run_sql(db_url, "SELECT has_schema_privilege('odyssey_analyst', %s, 'USAGE'), "
                        "has_schema_privilege('odyssey_analyst', %s, 'CREATE')", (schema, schema))  # fmt: skip
        assert usage == [(schema == "risk", False)], schema
    # Nothing in the warehouse schemas is granted to PUBLIC (grantee 0), nor by default to future objects.
    public = run_sql(
        db_url,
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
        "aclexplode(c.relacl) a WHERE n.nspname = ANY(%(s)s) AND a.grantee = 0 "
        "UNION ALL SELECT n.nspname, '' FROM pg_namespace n, aclexplode(n.nspacl) a "
        "WHERE n.nspname = ANY(%(s)s) AND a.grantee = 0 "
        "UNION ALL SELECT 'default', '' FROM pg_default_acl d, aclexplode(d.defaclacl) a WHERE a.grantee = 0",
        {"s": list(SCHEMAS)},
    )
    assert public == []
    # The pipeline has every DML privilege on every table and sequence of those schemas, except that it only
    # reads the migration bookkeeping (migration 15).
    missing = run_sql(
        db_url,
        "SELECT n.nspname || '.' || c.relname, p FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
        "unnest(CASE WHEN c.relkind = 'S' THEN ARRAY['USAGE', 'SELECT'] "
        "            ELSE ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE'] END) p "
        "WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p', 'v', 'S') "
        "AND NOT CASE WHEN c.relkind = 'S' THEN has_sequence_privilege('odyssey_pipeline', c.oid, p) "
        "             ELSE has_table_privilege('odyssey_pipeline', c.oid, p) END",
        (list(SCHEMAS),),
    )
    assert sorted(missing) == [("ops.schema_migration", p) for p in ("DELETE", "INSERT", "UPDATE")]
    roles = run_sql(db_url, "SELECT rolname, rolcanlogin, rolsuper FROM pg_roles WHERE rolname IN "
                    "('odyssey_analyst', 'odyssey_pipeline') ORDER BY 1")  # fmt: skip
    assert roles == [("odyssey_analyst", False, False), ("odyssey_pipeline", False, False)]


def test_roles_block_runs_again(pg_admin_url, db_url):
    text = MIGRATION.read_text(encoding="utf-8")
    roles_and_grants = text[text.index("DO $$") :]
    # The template database already ran it, so the roles exist: running it again (twice) changes nothing.
    run_sql(db_url, roles_and_grants)
    run_sql(db_url, roles_and_grants)
    # Another warehouse on the same server: every migration applies although the roles already exist.
    name = f"odyssey_test_{uuid.uuid4().hex[:10]}"
    create_database(pg_admin_url, name)
    try:
        url = with_database(pg_admin_url, name)
        assert [m.version for m in upgrade(url)] == [m.version for m in available_migrations()]
        assert run_sql(url, "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a "
                       "WHERE a.grantee = 'odyssey_analyst'::regrole") == [(len(VIEW_COLUMNS),)]  # fmt: skip
    finally:
        drop_database(pg_admin_url, name)
