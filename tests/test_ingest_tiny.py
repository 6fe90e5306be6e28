"""The shipped tiny export: every field we normalize, checked value by value."""

from __future__ import annotations

import datetime as dt

import pytest

from odyssey_batch.cli.main import example_export
from odyssey_batch.ingest import ingest


@pytest.fixture
def loaded(db_url, settings):
    return ingest(str(example_export()), settings, url=db_url)


def test_counts_reconcile_and_match_the_manifest(loaded, scalar):
    assert loaded.counts["records"] == 28
    assert loaded.counts["loaded"] == 28
    assert loaded.counts["quarantined"] == 0
    assert loaded.manifest_mismatches == []
    assert scalar("SELECT transaction_time FROM ops.ingest_run WHERE run_id = %s", (loaded.run_id,)) == dt.datetime(
        2026, 1, 10, 9, 0, tzinfo=dt.UTC
    )
    assert scalar("SELECT count(*) FROM fhir.resource") == 28
    assert scalar("SELECT sum(manifest_count) FROM ops.ingest_file WHERE run_id = %s", (loaded.run_id,)) == 28


def test_patients_deceased_and_partial_birth_date(loaded, query):
    rows = query("SELECT patient_id, birth_date, gender, deceased, death_time FROM ehr.patient ORDER BY 1")
    assert rows == [
        ("tiny-p1", dt.date(1948, 3, 14), "female", False, None),
        ("tiny-p2", dt.date(1939, 11, 2), "male", True, dt.datetime(2025, 9, 20, 6, 30, tzinfo=dt.UTC)),
        ("tiny-p3", dt.date(1987, 7, 1), "other", False, None),  # '1987-07' -> first day of the month
    ]


def test_encounters_classes_and_periods(loaded, query):
    rows = query("SELECT encounter_id, class_code, type_system, type_code, start_time, end_time FROM ehr.encounter "
                 "WHERE patient_id = 'tiny-p2' ORDER BY start_time")  # fmt: skip
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("tiny-e3", "EMER", "SNOMED", "50849002"),
        ("tiny-e4", "IMP", "SNOMED", "32485007"),
    ]
    assert rows[1][5] - rows[1][4] == dt.timedelta(days=14, hours=6, minutes=20)


def test_condition_coding_is_chosen_by_system_not_position(loaded, query):
    # tiny-c4 lists SNOMED first and ICD-10-CM second; conditions prefer ICD-10-CM.
    rows = query("SELECT code_system, code, onset_time FROM ehr.condition WHERE condition_id = 'tiny-c4'")
    assert rows == [("ICD10CM", "E78.5", dt.datetime(2025, 11, 1, tzinfo=dt.UTC))]  # partial onset '2025-11'
    assert query("SELECT code_system, code FROM ehr.condition WHERE condition_id = 'tiny-c3'") == [
        ("SNOMED", "233604007")
    ]


def test_three_ways_of_naming_a_medication(loaded, query):
    rows = query(
        "SELECT medication_request_id, code_system, code, medication_id FROM ehr.medication_request ORDER BY 1"
    )
    assert rows == [
        ("tiny-mr1", "RXNORM", "197361", "tiny-med1"),  # medicationReference -> Medication resource
        ("tiny-mr2", "RXNORM", "308182", None),  # medicationCodeableConcept
        ("tiny-mr3", "RXNORM", "617314", None),  # contained Medication
    ]


def test_labs_values_units_and_components(loaded, query):
    assert query(
        "SELECT category, code_system, code, value_num, unit FROM ehr.observation WHERE observation_id = 'tiny-o5'"
    ) == [("laboratory", "LOINC", "2160-0", 2.4, "mg/dL")]
    assert query("SELECT value_num, value_text FROM ehr.observation WHERE observation_id = 'tiny-o10'") == [
        (None, "Yellow color")
    ]
    assert query("SELECT seq, code, value_num, unit FROM ehr.observation_component ORDER BY seq") == [
        (1, "8480-6", 152.0, "mm[Hg]"),
        (2, "8462-4", 94.0, "mm[Hg]"),
    ]


def test_every_clinical_row_links_to_its_encounter(loaded, scalar):
    for table in ("condition", "procedure", "medication_request", "observation"):
        assert scalar(f"SELECT count(*) FROM ehr.{table} WHERE encounter_id IS NULL") == 0, table
