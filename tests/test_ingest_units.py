"""Pure functions of ingest: times, references, code choice, normalization, COPY escaping, file naming."""

import pytest

from odyssey_batch.ingest import codes, fhirtime
from odyssey_batch.ingest.discover import type_from_name
from odyssey_batch.ingest.normalize import Context, UnresolvablePatient, normalize
from odyssey_batch.ingest.references import Target, resolve
from odyssey_batch.ingest.stage import copy_field, raw_fields


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        ("2020", "UTC", "2020-01-01T00:00:00+00:00"),
        ("2020-05", "UTC", "2020-05-01T00:00:00+00:00"),
        ("2020-05-17", "America/New_York", "2020-05-17T00:00:00-04:00"),
        ("2020-01-17", "America/New_York", "2020-01-17T00:00:00-05:00"),
        ("2013-01-13T21:45:04+00:00", "Europe/Paris", "2013-01-13T21:45:04+00:00"),
        ("2015-02-07T13:28:17.239+02:00", "UTC", "2015-02-07T13:28:17.239+02:00"),
        (None, "UTC", None),
    ],
)
def test_to_timestamp(value, tz, expected):
    assert fhirtime.to_timestamp(value, tz) == expected


def test_to_date_fills_partial_dates():
    assert fhirtime.to_date("1987-07") == "1987-07-01"
    assert fhirtime.to_date("1987") == "1987-01-01"
    assert fhirtime.to_date("1987-07-04") == "1987-07-04"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/123", Target("Patient", "123")),
        ("https://ehr.example.org/fhir/Patient/a-1.b", Target("Patient", "a-1.b")),
        ("Observation/o1/_history/3", Target("Observation", "o1")),
        ("#med1", Target(None, "med1", contained=True)),
        ("urn:uuid:4f6a", Target("Patient", "pid-9")),  # via the Bundle's fullUrl index
        ("urn:uuid:unknown", None),
        ("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999974493", None),
        ("", None),
    ],
)
def test_resolve_reference(reference, expected):
    assert resolve(reference, {"urn:uuid:4f6a": ("Patient", "pid-9")}) == expected


def test_pick_coding_prefers_system_then_position():
    concept = {
        "coding": [
            {"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"},
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9", "display": "Type 2 diabetes"},
        ],
        "text": "Diabetes",
    }
    assert codes.pick_coding(concept, "Condition") == ("ICD10CM", "E11.9", "Type 2 diabetes")
    assert codes.pick_coding(concept, "Procedure") == ("SNOMED", "44054006", "Diabetes")
    assert codes.pick_coding({"coding": [{"code": "x1"}], "text": "local thing"}, "Observation") == (
        "LOCAL", "x1", "local thing",
    )  # fmt: skip
    assert (
        codes.pick_coding({"coding": [{"system": "urn:oid:1.2.3", "code": "9"}]}, "Observation")[0] == "urn:oid:1.2.3"
    )
    assert codes.pick_coding({"text": "no codes"}, "Condition") is None


def test_normalize_observation_with_comparator_and_components():
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "category": [{"coding": [{"code": "vital-signs"}]}, {"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "effectivePeriod": {"start": "2021-03"},
        "valueQuantity": {
            "value": 0.5,
            "comparator": "<",
            "unit": "milligram per deciliter",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
        "component": [{"code": {"text": "uncoded"}, "valueString": "x"}],
    }
    out = normalize(obs, Context(default_tz="UTC"))
    assert out.patient_ref == "p1" and out.encounter_ref == "e1"
    assert out.ehr == {
        "observation_id": "o1", "category": "laboratory", "code_system": "LOINC", "code": "2160-0", "display": None,
        "effective_time": "2021-03-01T00:00:00+00:00", "value_num": 0.5, "unit": "mg/dL", "value_text": "<0.5",
        "status": "final", "patient_id": "p1", "encounter_id": "e1",
    }  # fmt: skip
    assert out.components == []  # an uncoded component is not a row


def test_normalize_patient_reference_rules():
    ctx = Context(default_tz="UTC")
    with pytest.raises(UnresolvablePatient):
        normalize({"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient?identifier=x|1"}}, ctx)
    with pytest.raises(UnresolvablePatient):
        normalize({"resourceType": "Condition", "id": "c", "subject": {"reference": "urn:uuid:nowhere"}}, ctx)
    grouped = normalize(
        {
            "resourceType": "Observation",
            "id": "o",
            "code": {"coding": [{"code": "1"}]},
            "subject": {"reference": "Group/g"},
        },
        ctx,
    )
    assert grouped.patient_ref is None and grouped.ehr is None and grouped.skipped == "no-patient"
    med = normalize({"resourceType": "MedicationRequest", "id": "m", "subject": {"reference": "Patient/p"},
                     "medicationReference": {"reference": "Medication/x"}}, ctx)  # fmt: skip
    assert med.medication_ref == "x" and med.ehr["medication_id"] == "x" and "code" not in med.ehr


def test_copy_field_escapes_copy_text_format():
    assert copy_field(None) == "\\N"
    assert copy_field('{"a":"b\\\\nc"}') == '{"a":"b\\\\\\\\nc"}'
    assert copy_field("tab\there\nnew\rline") == "tab\\there\\nnew\\rline"
    assert copy_field(3) == "3"


def test_raw_fields_keeps_bytes_text_cannot_hold():
    assert raw_fields(b'{"ok": true}') == ('{"ok": true}', None)
    text, original = raw_fields(b'{"name": "\xff"}')
    assert original == b'{"name": "\xff"}' and "\ufffd" in text
    assert raw_fields(b"a\x00b") == ("a\ufffdb", b"a\x00b")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Patient.ndjson", "Patient"),
        ("Observation.000.ndjson.gz", "Observation"),
        ("1a2b_MedicationRequest.ndjson", "MedicationRequest"),
        ("log.ndjson", None),
        ("export.ndjson", None),
        ("Patiant.ndjson", None),
    ],
)
def test_type_from_bulk_file_name(name, expected):
    assert type_from_name(name) == expected
