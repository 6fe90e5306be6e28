import psycopg2
import pytest

from odyssey_batch.warehouse import applied_migrations, upgrade
from odyssey_batch.warehouse.migrations import available_migrations
from tests.conftest import run_sql

CONTRACT = {
    ("fhir", "resource"): "resource_type resource_id version_id last_updated body run_id source line_no",
    ("ehr", "patient"): "patient_id birth_date gender deceased death_time",
    ("ehr", "encounter"): "encounter_id patient_id class_code type_code start_time end_time",
    ("ehr", "condition"): "condition_id patient_id encounter_id code_system code display onset_time recorded_time",
    ("ehr", "procedure"): "procedure_id patient_id encounter_id code_system code display performed_time",
    ("ehr", "medication_request"): (
        "medication_request_id patient_id encounter_id code_system code display authored_time"
    ),
    ("ehr", "observation"): (
        "observation_id patient_id encounter_id category code_system code display effective_time value_num unit "
        "value_text"
    ),
    ("ops", "ingest_run"): "run_id source started_at finished_at status counts",
    ("ops", "quarantine"): "run_id source line_no resource_type error raw_text",
}


def test_contract_tables_and_columns_exist(db_url):
    for (schema, table), names in CONTRACT.items():
        columns = set(names.split())
        found = {r[0] for r in run_sql(db_url, "SELECT column_name FROM information_schema.columns "
                                       "WHERE table_schema = %s AND table_name = %s", (schema, table))}  # fmt: skip
        assert columns <= found, (schema, table, columns - found)
    kinds = dict(run_sql(db_url, "SELECT column_name, data_type FROM information_schema.columns "
                         "WHERE table_schema = 'ehr' AND table_name = 'encounter'"))  # fmt: skip
    assert kinds["start_time"] == kinds["end_time"] == "timestamp with time zone"
    assert run_sql(db_url, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'fhir' "
                   "AND table_name = 'resource' AND column_name = 'body'") == [("jsonb",)]  # fmt: skip


def test_upgrade_is_recorded_and_idempotent(db_url):
    versions = [m.version for m in available_migrations()]
    assert versions == sorted(versions) and versions[0] == 1
    assert sorted(applied_migrations(db_url)) == versions
    assert upgrade(db_url) == []  # already applied: nothing to do
    assert run_sql(db_url, "SELECT count(*) FROM ops.schema_migration")[0][0] == len(versions)


def test_edited_migration_is_refused(db_url):
    run_sql(db_url, "UPDATE ops.schema_migration SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(RuntimeError, match="was changed after it was applied"):
        upgrade(db_url)


def test_foreign_keys_guard_the_normalized_tables(db_url):
    run_sql(db_url, "INSERT INTO ops.ingest_run (source) VALUES ('t')")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        run_sql(db_url, "INSERT INTO ehr.encounter (encounter_id, patient_id, run_id) VALUES ('e', 'nobody', 1)")
