"""Real third-party exports from ../shared/data: counts against the files themselves, values, idempotency."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from odyssey_batch.ingest import ingest
from odyssey_batch.ingest.normalize import EHR_TABLES
from odyssey_batch.settings import Settings
from tests.conftest import fresh_database, run_sql, shared_data, table_fingerprints

SYNTHEA_100 = "fhir/synthea-smart-100-ndjson"
EHR_TABLE_OF = EHR_TABLES  # resource type -> ehr table


def read_ndjson(folder: Path) -> dict[str, list[dict]]:
    """Every resource of an export, by type, parsed straight from the files (independently of the product)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.ndjson.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                resource = json.loads(line)
                out.setdefault(resource["resourceType"], []).append(resource)
    return out


@pytest.fixture(scope="module")
def synthea_export() -> dict[str, list[dict]]:
    return read_ndjson(shared_data(SYNTHEA_100))


@pytest.fixture(scope="module")
def synthea_db(pg_admin_url, template_db, tmp_path_factory):
    """Synthea-100 loaded once (2 worker processes) for the read-only tests of this module."""
    settings = Settings(home=tmp_path_factory.mktemp("home"), ingest_workers=2, ingest_chunk_lines=700)
    with fresh_database(pg_admin_url, template_db) as url:
        result = ingest(str(shared_data(SYNTHEA_100)), settings, url=url)
        yield url, result


def test_every_line_is_loaded_and_counted_per_type(synthea_db, synthea_export):
    url, result = synthea_db
    expected = {t: len(rows) for t, rows in synthea_export.items()}
    assert sum(expected.values()) == 25909
    assert result.counts["records"] == result.counts["loaded"] == 25909
    assert result.counts["quarantined"] == 0 and result.counts["unchanged"] == 0
    assert {t: c["loaded"] for t, c in result.counts["by_type"].items()} == expected
    stored = dict(run_sql(url, "SELECT resource_type, count(*) FROM fhir.resource GROUP BY 1"))
    assert stored == expected


def test_normalized_tables_match_counts_computed_from_the_files(synthea_db, synthea_export):
    url, _ = synthea_db
    for resource_type, table in EHR_TABLE_OF.items():
        assert run_sql(url, f"SELECT count(*) FROM ehr.{table}")[0][0] == len(synthea_export[resource_type]), table
    classes = Counter(e["class"]["code"] for e in synthea_export["Encounter"])
    assert dict(run_sql(url, "SELECT class_code, count(*) FROM ehr.encounter GROUP BY 1")) == dict(classes)
    components = sum(
        1 for o in synthea_export["Observation"] for c in o.get("component", []) if c["code"].get("coding")
    )
    assert run_sql(url, "SELECT count(*) FROM ehr.observation_component")[0][0] == components
    labs = sum(
        1
        for o in synthea_export["Observation"]
        if any(c.get("code") == "laboratory" for cat in o.get("category", []) for c in cat.get("coding", []))
    )
    assert run_sql(url, "SELECT count(*) FROM ehr.observation WHERE category = 'laboratory'")[0][0] == labs
    deceased = sum(1 for p in synthea_export["Patient"] if "deceasedDateTime" in p)
    assert run_sql(url, "SELECT count(*) FROM ehr.patient WHERE deceased")[0][0] == deceased
    # Every reference in this export resolves inside it.
    for table in ("condition", "procedure", "medication_request", "observation"):
        assert run_sql(url, f"SELECT count(*) FROM ehr.{table} WHERE encounter_id IS NULL")[0][0] == 0


def test_spot_check_values(synthea_db):
    url, _ = synthea_db
    assert run_sql(
        url,
        "SELECT birth_date, gender, deceased FROM ehr.patient WHERE patient_id = %s",
        ("004b7f3b-eaaa-4eda-81dc-3a82854a363d",),
    ) == [(dt.date(1965, 9, 12), "female", False)]
    assert run_sql(
        url, "SELECT deceased, death_time FROM ehr.patient WHERE patient_id = '02f19698-ca4a-4a67-b343-0819ff6fce66'"
    ) == [(True, dt.datetime(2006, 12, 25, 21, 51, 36, tzinfo=dt.UTC))]
    assert run_sql(
        url,
        """SELECT patient_id, encounter_id, category, code_system, code, value_num, unit, effective_time
           FROM ehr.observation WHERE observation_id = 'd213f508-1af4-4d59-b677-4126ac3160a2'""",
    ) == [
        (
            "004b7f3b-eaaa-4eda-81dc-3a82854a363d",
            "d06dfe44-0feb-45b5-96ef-6346efbc8f3a",
            "laboratory",
            "LOINC",
            "2339-0",
            71.84667983327937,
            "mg/dL",
            dt.datetime(2013, 1, 13, 21, 45, 4, tzinfo=dt.UTC),
        )
    ]


def test_rerun_changes_no_row(synthea_db, settings):
    url, first = synthea_db
    before = table_fingerprints(url)
    resources_before = run_sql(
        url, "SELECT count(*), md5(string_agg(body::text || run_id, '' ORDER BY resource_id)) FROM fhir.resource"
    )
    again = ingest(str(shared_data(SYNTHEA_100)), settings, url=url)
    assert again.run_id != first.run_id
    assert again.counts["unchanged"] == 25909
    assert again.counts["loaded"] == again.counts["quarantined"] == 0
    assert table_fingerprints(url) == before
    assert (
        run_sql(
            url, "SELECT count(*), md5(string_agg(body::text || run_id, '' ORDER BY resource_id)) FROM fhir.resource"
        )
        == resources_before
    )
    assert run_sql(url, "SELECT count(*) FROM staging.resource")[0][0] == 0


def test_parallel_and_in_process_validation_load_the_same_rows(synthea_db, pg_admin_url, template_db, settings):
    url, _ = synthea_db  # loaded with 2 worker processes
    with fresh_database(pg_admin_url, template_db) as other:
        ingest(str(shared_data(SYNTHEA_100)), settings, url=other)  # 1 worker, in process
        assert table_fingerprints(other) == table_fingerprints(url)


def test_genuine_bulk_export_with_conditional_references(db_url, settings, query):
    """The SMART sample bulk export: `<Type>.000.ndjson.gz`, a log.ndjson, conditional Practitioner refs."""
    result = ingest(str(shared_data("fhir/smart-bulk-10-patients-partial")), settings, url=db_url)
    assert result.counts["quarantined"] == 0
    assert "log.ndjson.gz" in result.ignored
    assert {t: c["loaded"] for t, c in result.counts["by_type"].items()} == {
        "Procedure": 2056, "MedicationRequest": 1745, "DocumentReference": 1215, "Encounter": 1215,
        "Condition": 555, "Immunization": 161, "Location": 44, "Organization": 43, "Practitioner": 43,
        "PractitionerRole": 43, "Device": 16, "Patient": 13, "AllergyIntolerance": 11,
    }  # fmt: skip
    assert dict(query("SELECT class_code, count(*) FROM ehr.encounter GROUP BY 1")) == {
        "AMB": 1133, "IMP": 49, "EMER": 23, "HH": 9, "VR": 1,
    }  # fmt: skip
    assert query("SELECT count(*) FROM ehr.patient WHERE deceased") == [(3,)]
    # A conditional reference is kept as written in the raw resource.
    assert query(
        """SELECT count(*) FROM fhir.resource
           WHERE resource_type = 'Encounter'
             AND body->'participant'->0->'individual'->>'reference' LIKE 'Practitioner?identifier=%%'"""
    ) == [(1215,)]
    # All medication requests use medicationCodeableConcept with RxNorm codes.
    assert query("SELECT code_system, count(*) FROM ehr.medication_request GROUP BY 1") == [("RXNORM", 1745)]


def test_official_hl7_examples_parse_and_reconcile(db_url, settings, query):
    """275 official examples of many shapes: no crash, every resource accounted for, edge cases normalized."""
    result = ingest(str(shared_data("fhir/hl7-r4-examples")), settings, url=db_url)
    counts = result.counts
    assert counts["records"] == counts["loaded"] + counts["unchanged"] + counts["quarantined"]
    # Every example is valid FHIR; what is quarantined are references to patients that are not examples,
    # and examples that reuse an id with different content: one older version (Patient/45 in
    # Bundle-bundle-references.json) and 15 copies without version or lastUpdated that differ from a copy later
    # in the export (e.g. Observation/o1 of Bundle-ghp.json and of Bundle-report.json).
    assert set(counts["quarantine_reasons"]) == {"orphan-reference", "superseded", "conflicting-duplicate"}
    reasons = counts["quarantine_reasons"]
    assert (reasons["superseded"], reasons["conflicting-duplicate"]) == (1, 15)
    assert query("SELECT deceased FROM ehr.patient WHERE patient_id = 'pat1'") == [(False,)]
    deceased_boolean = query(
        """SELECT p.deceased, p.death_time FROM ehr.patient p JOIN fhir.resource r
           ON r.resource_type = 'Patient' AND r.resource_id = p.patient_id
           WHERE r.body ? 'deceasedBoolean' AND (r.body->>'deceasedBoolean')::boolean"""
    )
    assert deceased_boolean and all(row == (True, None) for row in deceased_boolean)
    # Encounter-emerg has only period.start; Encounter-example has no period at all.
    assert query("SELECT start_time IS NOT NULL, end_time FROM ehr.encounter WHERE encounter_id = 'emerg'") == [
        (True, None)
    ]
    assert query("SELECT start_time, end_time FROM ehr.encounter WHERE encounter_id = 'example'") == [(None, None)]
    # Observations whose subject is not a Patient (a Group, a Device...) stay raw only, and are reported.
    assert counts["by_type"]["Observation"]["excluded_reasons"]["no-patient"] > 0
    # Date-only periods ('2013-03-11' .. '2013-03-20' in Encounter-f203) are read as midnight UTC.
    assert query("SELECT start_time, end_time FROM ehr.encounter WHERE encounter_id = 'f203'") == [
        (dt.datetime(2013, 3, 11, tzinfo=dt.UTC), dt.datetime(2013, 3, 20, tzinfo=dt.UTC))
    ]


def test_every_resource_is_normalized_or_excluded_per_type(synthea_db, synthea_export):
    """read = normalized + excluded + quarantined + unchanged, per type, in the counts and in the database."""
    url, result = synthea_db
    stored = {
        t: (read, normalized, excluded, quarantined, unchanged)
        for t, read, normalized, excluded, quarantined, unchanged in run_sql(
            url,
            "SELECT resource_type, read, normalized, excluded, quarantined, unchanged FROM ops.ingest_type_count "
            "WHERE run_id = %s",
            (result.run_id,),
        )
    }
    expected = {
        t: (len(rows), len(rows), 0, 0, 0) if t in EHR_TABLE_OF else (len(rows), 0, len(rows), 0, 0)
        for t, rows in synthea_export.items()
    }
    assert stored == expected
    assert dict(
        run_sql(
            url,
            "SELECT resource_type, resources FROM ops.ingest_exclusion WHERE run_id = %s AND reason = 'not-modelled'",
            (result.run_id,),
        )
    ) == {t: len(rows) for t, rows in synthea_export.items() if t not in EHR_TABLE_OF}
    assert result.counts["excluded_reasons"] == {"not-modelled": sum(v[2] for v in expected.values())}
