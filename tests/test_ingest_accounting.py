"""Every resource is accounted for: normalized into its ehr table, or excluded with a reason, per run and type.

A small export plants each way a resource of a modelled type used to vanish (a free-text-only medication, a
text-only procedure code, a medication reference that resolves nowhere, a Medication that is a mix without a
code, ...); real exports (Synthea, the SMART bulk sample, a subset of the MIMIC-IV demo) check the identity
read = normalized + excluded + quarantined + unchanged against counts computed from the files themselves.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

from odyssey_batch.ingest import codes, ingest
from odyssey_batch.ingest.normalize import EXCLUSION_REASONS
from odyssey_batch.quality.gate import validate
from odyssey_batch.settings import load_settings
from tests.conftest import shared_data
from tests.test_ingest_bad_input import assert_reconciled, dump, encounter, patient, write_export

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LONG_TEXT = "Compounded " + "very " * 60 + "special cream"


def _medication_request(mid: str, **medication: object) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": mid,
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "authoredOn": "2024-02-01T09:20:00Z",
        **medication,
    }


def accounting_export() -> dict[str, list[str]]:
    """One patient and one resource for each way of being normalized or excluded."""
    return {
        "Patient.ndjson": [dump(patient("p1", "1948-03-14", "female"))],
        "Encounter.ndjson": [
            dump(encounter("e1", "p1", "AMB", "185349003", "Check up", "2024-02-01T09:00:00Z", "2024-02-01T10:00:00Z"))
        ],
        "Procedure.ndjson": [
            dump(
                {
                    "resourceType": "Procedure",
                    "id": "pr1",
                    "status": "completed",
                    "code": {"text": "  Appendectomy,\tLaparoscopic "},
                    "subject": {"reference": "Patient/p1"},
                    "performedDateTime": "2024-02-01T09:30:00Z",
                }
            ),
        ],
        "Condition.ndjson": [
            dump(
                {
                    "resourceType": "Condition",
                    "id": "c1",
                    "subject": {"reference": "Patient/p1"},
                    "recordedDate": "2024-02-01",
                }
            ),  # no code at all
            dump(
                {
                    "resourceType": "Condition",
                    "id": "c2",
                    "code": {"text": "Acute   BRONCHITIS"},
                    "subject": {"reference": "Patient/p1"},
                    "onsetDateTime": "2024-01-28",
                }
            ),
        ],
        "Medication.ndjson": [
            dump(
                {
                    "resourceType": "Medication",
                    "id": "med-coded",
                    "code": {"coding": [{"system": RXNORM, "code": "313782", "display": "Acetaminophen 325 MG"}]},
                }
            ),
            dump({"resourceType": "Medication", "id": "med-text", "code": {"text": "House cough syrup"}}),
            dump(
                {
                    "resourceType": "Medication",
                    "id": "med-mix",
                    "ingredient": [{"itemReference": {"reference": "Medication/med-coded"}}],
                }
            ),
        ],
        "MedicationRequest.ndjson": [
            dump(_medication_request("m1", medicationCodeableConcept={"text": "Aspirin 81 mg tablet"})),
            dump(_medication_request("m2", medicationReference={"reference": "Medication/no-such-medication"})),
            dump(_medication_request("m3", medicationReference={"reference": "Medication/med-mix"})),
            dump(_medication_request("m4", medicationReference={"reference": "Medication/med-text"})),
            dump(_medication_request("m5", medicationReference={"reference": "Medication/med-coded"})),
            dump(_medication_request("m6", medicationCodeableConcept={"text": LONG_TEXT})),
        ],
        "Observation.ndjson": [
            dump(
                {
                    "resourceType": "Observation",
                    "id": "o1",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
                    "subject": {"reference": "Group/g1"},
                    "effectiveDateTime": "2024-02-01T09:10:00Z",
                    "valueQuantity": {"value": 36.9, "unit": "Cel"},
                }
            ),  # a Group's observation: no patient
        ],
        "Organization.ndjson": [dump({"resourceType": "Organization", "id": "org1", "name": "General Hospital"})],
    }


def by_type(result, *keys: str) -> dict[str, tuple]:
    return {t: tuple(c[k] for k in keys) for t, c in result.counts["by_type"].items()}


def test_text_code_is_normalized_and_bounded():
    assert codes.text_code("  Aspirin\n 81  MG\ttablet ") == "aspirin 81 mg tablet"
    assert codes.text_code("   ") is None and codes.text_code(None) is None and codes.text_code(3) is None
    long = codes.text_code(LONG_TEXT)
    assert long is not None and len(long) <= codes.TEXT_CODE_LENGTH and long.startswith("compounded very very")
    assert codes.pick_code({"text": " Acute   BRONCHITIS"}, "Condition") == (
        "TEXT",
        "acute bronchitis",
        "Acute   BRONCHITIS",
    )
    assert codes.pick_code({"text": "Acute bronchitis"}, "Condition", keep_text=False) is None
    # A coding always wins over the text.
    assert codes.pick_code({"coding": [{"code": "x1"}], "text": "t"}, "Condition") == ("LOCAL", "x1", "t")


def test_every_resource_is_normalized_or_excluded_with_a_reason(db_url, settings, tmp_path, query):
    result = ingest(str(write_export(tmp_path / "export", accounting_export())), settings, url=db_url)

    assert by_type(result, "records", "normalized", "excluded", "quarantined", "unchanged") == {
        "Patient": (1, 1, 0, 0, 0),
        "Encounter": (1, 1, 0, 0, 0),
        "Procedure": (1, 1, 0, 0, 0),
        "Condition": (2, 1, 1, 0, 0),
        "Medication": (3, 0, 3, 0, 0),
        "MedicationRequest": (6, 4, 2, 0, 0),
        "Observation": (1, 0, 1, 0, 0),
        "Organization": (1, 0, 1, 0, 0),
    }
    assert {t: c["excluded_reasons"] for t, c in result.counts["by_type"].items() if c["excluded"]} == {
        "Condition": {"no-code": 1},
        "Medication": {"not-modelled": 3},
        "MedicationRequest": {"medication-without-code": 1, "unresolved-medication": 1},
        "Observation": {"no-patient": 1},
        "Organization": {"not-modelled": 1},
    }
    assert (result.counts["records"], result.counts["normalized"], result.counts["excluded"]) == (16, 8, 8)
    assert_reconciled(result, query)  # also checks ops.ingest_type_count and ops.ingest_exclusion

    # Free text is kept as code system TEXT, its code normalized, its display as written.
    assert query("SELECT code_system, code, display FROM ehr.procedure") == [
        ("TEXT", "appendectomy, laparoscopic", "Appendectomy,\tLaparoscopic")
    ]
    assert query("SELECT condition_id, code_system, code FROM ehr.condition") == [("c2", "TEXT", "acute bronchitis")]
    rows = query(
        "SELECT medication_request_id, code_system, code, medication_id FROM ehr.medication_request ORDER BY 1"
    )
    assert rows == [
        ("m1", "TEXT", "aspirin 81 mg tablet", None),
        ("m4", "TEXT", "house cough syrup", "med-text"),
        ("m5", "RXNORM", "313782", "med-coded"),
        ("m6", "TEXT", codes.text_code(LONG_TEXT), None),
    ]
    assert len(rows[3][2]) == codes.TEXT_CODE_LENGTH
    # The excluded ones are still stored raw.
    assert query("SELECT count(*) FROM fhir.resource WHERE resource_id IN ('m2', 'm3', 'c1', 'o1')") == [(4,)]


def test_text_codes_can_be_excluded_by_setting(db_url, tmp_path, query):
    settings = load_settings(
        {"ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_KEEP_TEXT_CODES": "false", "ODYSSEY_INGEST_WORKERS": "1"}
    )
    assert settings.keep_text_codes is False
    result = ingest(str(write_export(tmp_path / "export", accounting_export())), settings, url=db_url)

    assert {t: c["excluded_reasons"] for t, c in result.counts["by_type"].items() if c["excluded"]} == {
        "Condition": {"no-code": 1, "text-only-code": 1},
        "Medication": {"not-modelled": 3},
        "MedicationRequest": {"medication-without-code": 1, "text-only-code": 3, "unresolved-medication": 1},
        "Observation": {"no-patient": 1},
        "Organization": {"not-modelled": 1},
        "Procedure": {"text-only-code": 1},
    }
    assert query("SELECT medication_request_id, code_system FROM ehr.medication_request") == [("m5", "RXNORM")]
    assert query("SELECT count(*) FROM ehr.condition") == query("SELECT count(*) FROM ehr.procedure") == [(0,)]
    assert_reconciled(result, query)


def test_a_new_version_without_a_row_removes_the_old_row_and_says_why(db_url, settings, tmp_path, query):
    files = accounting_export()
    first = ingest(str(write_export(tmp_path / "day1", files)), settings, url=db_url)
    assert query("SELECT code FROM ehr.medication_request WHERE medication_request_id = 'm5'") == [("313782",)]
    newer = _medication_request("m5", medicationReference={"reference": "Medication/med-mix"}, status="stopped")
    second = ingest(str(write_export(tmp_path / "day2", {"MedicationRequest.ndjson": [dump(newer)]})), settings,
                    url=db_url)  # fmt: skip

    assert second.run_id != first.run_id
    assert by_type(second, "records", "normalized", "excluded", "excluded_reasons") == {
        "MedicationRequest": (1, 0, 1, {"medication-without-code": 1})
    }
    assert query("SELECT count(*) FROM ehr.medication_request WHERE medication_request_id = 'm5'") == [(0,)]
    assert_reconciled(second, query)


def test_the_gate_accepts_text_codes(db_url, settings, tmp_path):
    """TEXT is an allowed code system by default: a load with free-text codes raises no code-system finding."""
    result = ingest(str(write_export(tmp_path / "export", accounting_export())), settings, url=db_url)
    verdict = validate(db_url, settings, result.run_id, data_docs=False)
    assert verdict.success, verdict.message()
    assert [f for f in verdict.findings if f.expectation == "code_system_allowed" and not f.success] == []


def test_the_run_summaries_show_normalized_and_excluded(db_url, tmp_path):
    from tests.test_cli import cli

    env = {"ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_INGEST_WORKERS": "1",
           "COLUMNS": "250"}  # fmt: skip
    export = write_export(tmp_path / "export", accounting_export())
    human = cli("ingest", str(export), env=env).stdout
    assert "16 resources read = 16 loaded (8 normalized + 8 excluded;" in human
    assert "+ 0 unchanged + 0 quarantined" in human
    assert "medication-without-code 1" in human and "unresolved-medication 1" in human and "not-modelled 4" in human
    runs = json.loads(cli("runs", "--json", env=env).stdout)
    assert [(r["records"], r["normalized"], r["excluded"], r["unchanged"], r["quarantined"]) for r in runs] == [
        (16, 8, 8, 0, 0)
    ]
    assert runs[0]["excluded_reasons"] == {
        "medication-without-code": 1, "no-code": 1, "no-patient": 1, "not-modelled": 4, "unresolved-medication": 1,
    }  # fmt: skip
    table = cli("runs", env=env).stdout
    assert "normalized" in table and "excluded" in table and "not-modelled 4" in table


# ----------------------------------------------------------------------------------------------------------------
# Real exports: the identity per type, against counts computed from the files
# ----------------------------------------------------------------------------------------------------------------

MIMIC = "fhir-mimic/mimic-iv-demo-fhir"
# Every MIMIC profile of a modelled type or needed to resolve one, less the two large observation files
# (labevents, datetimeevents: 130k Observations of the same shape as the micro ones kept here).
MIMIC_SUBSET = (
    "MimicPatient", "MimicEncounter", "MimicEncounterICU", "MimicCondition", "MimicProcedure", "MimicProcedureICU",
    "MimicMedication", "MimicMedicationMix", "MimicMedicationRequest", "MimicObservationMicroOrg",
    "MimicObservationMicroSusc", "MimicObservationMicroTest", "MimicObservationOutputevents", "MimicOrganization",
    "MimicLocation",
)  # fmt: skip


def _read(folder: Path, names: tuple[str, ...] | None = None) -> list[dict]:
    paths = [folder / f"{n}.ndjson.gz" for n in names] if names else sorted(folder.glob("*.ndjson.gz"))
    out = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


def assert_identity(result) -> None:
    for t, c in result.counts["by_type"].items():
        assert c["records"] == c["normalized"] + c["excluded"] + c["quarantined"] + c["unchanged"], (t, c)
        assert c["excluded"] == sum(c["excluded_reasons"].values()), (t, c)
    assert result.counts["records"] == sum(c["records"] for c in result.counts["by_type"].values())


def test_mimic_subset_every_resource_accounted_for(db_url, settings, tmp_path, query):
    """Real hospital data: MedicationRequests that point at a Medication mix (ingredients, no code) used to
    vanish, then to be excluded as medication-without-code; with the mimic-iv source profile (detected from
    meta.profile) a mix stands for its first ingredient, and every MedicationRequest is normalized."""
    source = shared_data(MIMIC)
    export = tmp_path / "mimic"
    export.mkdir()
    for name in MIMIC_SUBSET:
        shutil.copyfile(source / f"{name}.ndjson.gz", export / f"{name}.ndjson.gz")
    resources = _read(source, MIMIC_SUBSET)
    read = Counter(r["resourceType"] for r in resources)
    uncoded = {r["id"] for r in resources if r["resourceType"] == "Medication" and "code" not in r}
    to_uncoded = sum(
        1
        for r in resources
        if r["resourceType"] == "MedicationRequest"
        and r.get("medicationReference", {}).get("reference", "").removeprefix("Medication/") in uncoded
    )
    assert to_uncoded > 2000  # the demo's mixes

    result = ingest(str(export), settings, url=db_url)

    assert_identity(result)
    assert {t: c["records"] for t, c in result.counts["by_type"].items()} == dict(read)
    assert result.counts["quarantined"] == 0
    assert {
        t: c["excluded_reasons"]
        for t, c in result.counts["by_type"].items()
        if t in ("Patient", "Encounter", "Condition", "Procedure", "MedicationRequest", "Observation")
    } == {
        "Patient": {},
        "Encounter": {},
        "Condition": {},
        "Procedure": {},
        "Observation": {},
        "MedicationRequest": {},
    }
    for t, table in (("Patient", "patient"), ("Encounter", "encounter"), ("Condition", "condition"),
                     ("Procedure", "procedure"), ("MedicationRequest", "medication_request"),
                     ("Observation", "observation")):  # fmt: skip
        assert query(f"SELECT count(*) FROM ehr.{table}") == [(result.counts["by_type"][t]["normalized"],)], t
    assert result.counts["by_type"]["MedicationRequest"]["normalized"] == read["MedicationRequest"]
    assert query("SELECT count(*) FROM ehr.medication_request WHERE code_system = 'NDC'")[0][0] > to_uncoded


def test_smart_bulk_export_every_resource_accounted_for(db_url, settings):
    result = ingest(str(shared_data("fhir/smart-bulk-10-patients-partial")), settings, url=db_url)
    assert_identity(result)
    modelled = {"Patient", "Encounter", "Condition", "Procedure", "MedicationRequest", "Observation"}
    for t, c in result.counts["by_type"].items():
        assert (c["normalized"], c["excluded"]) == ((c["loaded"], 0) if t in modelled else (0, c["loaded"])), t


def test_hl7_examples_every_resource_accounted_for(db_url, settings):
    """275 official examples of many shapes: every one is normalized, excluded with a reason, or quarantined."""
    result = ingest(str(shared_data("fhir/hl7-r4-examples")), settings, url=db_url)
    assert_identity(result)
    reasons = Counter()
    for c in result.counts["by_type"].values():
        reasons.update(c["excluded_reasons"])
    assert set(reasons) <= set(EXCLUSION_REASONS) and reasons["no-patient"] > 0


SYNTHEA_BUNDLES = "fhir-large/synthea-smart-r4-bundles"
BUNDLE_FILES = (
    "hospitalInformation1559319163815.json.gz", "practitionerInformation1559319163815.json.gz",
    "Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json.gz",
    "Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json.gz",
    "Liz_Conn_27c911c6-f045-4ffa-af5d-6eba57ac94b2.json.gz",
)  # fmt: skip


def test_synthea_bundles_every_resource_accounted_for(db_url, settings, tmp_path, query):
    """Transaction Bundles (urn:uuid references, Claims and EOBs beside the clinical resources)."""
    source = shared_data(SYNTHEA_BUNDLES)
    export = tmp_path / "bundles"
    export.mkdir()
    read: Counter[str] = Counter()
    for name in BUNDLE_FILES:
        shutil.copyfile(source / name, export / name)
        with gzip.open(source / name, "rt", encoding="utf-8") as fh:
            read.update(e["resource"]["resourceType"] for e in json.load(fh)["entry"])

    result = ingest(str(export), settings, url=db_url)

    assert_identity(result)
    assert {t: c["records"] for t, c in result.counts["by_type"].items()} == dict(read)
    assert {"Claim", "ExplanationOfBenefit"} <= set(read)
    # Each patient Bundle repeats its Organization and Practitioner, with other content than the shared Bundles and
    # no version to tell which is newer: conflicting duplicates (the copy latest in the export is kept).
    assert result.counts["quarantine_reasons"] == {"conflicting-duplicate": result.counts["quarantined"]}
    assert {t for t, c in result.counts["by_type"].items() if c["quarantined"]} == {"Organization", "Practitioner"}
    for t, table in (("Patient", "patient"), ("Encounter", "encounter"), ("Condition", "condition"),
                     ("Procedure", "procedure"), ("MedicationRequest", "medication_request"),
                     ("Observation", "observation")):  # fmt: skip
        assert result.counts["by_type"][t]["normalized"] == read[t], t  # Synthea codes everything
        assert query(f"SELECT count(*) FROM ehr.{table}") == [(read[t],)], t
    assert result.counts["by_type"]["Claim"]["excluded_reasons"] == {"not-modelled": read["Claim"]}
