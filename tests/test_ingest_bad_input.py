"""Bad input: each way an export can be broken, one test each.

Every test builds a small valid export (3 Patients, 3 Encounters, 4 Observations as Bulk Data NDJSON) in
``tmp_path``, breaks exactly one thing, ingests it, and checks four things:
- the broken record (or file) is quarantined with the exact reason, its file name and line number;
- the quarantined row keeps the original text (or bytes), so the line can be recovered and fixed;
- every other resource still loaded, in ``fhir.resource`` and in the ``ehr.*`` tables;
- the run reconciles: records == loaded + quarantined + unchanged, with file problems counted apart.
"""

from __future__ import annotations

import copy
import datetime as dt
import gzip
import json
import zlib
from pathlib import Path

import pytest

from odyssey_batch.ingest import ingest

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


# ----------------------------------------------------------------------------------------------------------------
# The valid base export
# ----------------------------------------------------------------------------------------------------------------


def _meta(version: str = "1", last_updated: str = "2024-06-01T08:00:00Z") -> dict:
    return {"versionId": version, "lastUpdated": last_updated}


def patient(pid: str, birth_date: str, gender: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": _meta(),
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": f"MRN-{pid}"}],
        "name": [{"family": f"Family-{pid}", "given": ["Test"]}],
        "gender": gender,
        "birthDate": birth_date,
    }


def encounter(eid: str, pid: str, klass: str, snomed: str, display: str, start: str, end: str) -> dict:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "meta": _meta(),
        "status": "finished",
        "class": {"system": ACT_CODE, "code": klass},
        "type": [{"coding": [{"system": SNOMED, "code": snomed, "display": display}], "text": display}],
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": start, "end": end},
    }


def observation(oid: str, pid: str, eid: str, loinc: str, display: str, value: float, unit: str, when: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": _meta(),
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        "encounter": {"reference": f"Encounter/{eid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


PATIENTS = [
    patient("p1", "1948-03-14", "female"),
    patient("p2", "1960-07-02", "male"),
    patient("p3", "1987-07-01", "other"),  # no encounters yet: breaking p3 breaks nothing else
]
# fmt: off
ENCOUNTERS = [encounter(*row) for row in [
    ("e1", "p1", "AMB", "185349003", "Encounter for check up", "2024-02-01T09:00:00Z", "2024-02-01T09:30:00Z"),
    ("e2", "p1", "EMER", "50849002", "Emergency room admission", "2024-05-03T22:10:00+02:00", "2024-05-04T02:00:00Z"),
    ("e3", "p2", "IMP", "32485007", "Hospital admission", "2024-03-10T14:00:00Z", "2024-03-14T10:00:00Z"),
]]
OBSERVATIONS = [observation(*row) for row in [
    ("o1", "p1", "e1", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", 0.9, "mg/dL", "2024-02-01T09:10:00Z"),
    ("o2", "p1", "e2", "2951-2", "Sodium SerPl-sCnc", 128, "mmol/L", "2024-05-04T01:00:00+02:00"),
    ("o3", "p2", "e3", "2823-3", "Potassium [Moles/volume] in Serum or Plasma", 5.9, "mmol/L", "2024-03-10T15:00:00Z"),
    ("o4", "p2", "e3", "2345-7", "Glucose [Mass/volume] in Serum or Plasma", 182, "mg/dL", "2024-03-11T06:00:00Z"),
]]
# fmt: on

ALL = {
    "Patient": ["p1", "p2", "p3"],
    "Encounter": ["e1", "e2", "e3"],
    "Observation": ["o1", "o2", "o3", "o4"],
}
EHR_TABLE = {"Patient": "patient", "Encounter": "encounter", "Observation": "observation"}


def dump(resource: dict) -> str:
    """One NDJSON line, compact like a Bulk Data server writes it."""
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False)


def base_files() -> dict[str, list[str | bytes]]:
    """File name -> lines of the valid base export (fresh copies; tests edit them)."""
    return {
        "Patient.ndjson": [dump(r) for r in PATIENTS],
        "Encounter.ndjson": [dump(r) for r in ENCOUNTERS],
        "Observation.ndjson": [dump(r) for r in OBSERVATIONS],
    }


def ndjson_bytes(lines: list[str | bytes], *, trailing_newline: bool = True) -> bytes:
    data = b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines)
    return data + b"\n" if trailing_newline and lines else data


def write_export(folder: Path, files: dict[str, list[str | bytes] | bytes]) -> Path:
    """Write an export folder: a list value is NDJSON lines, a bytes value is the file's exact content."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else ndjson_bytes(content))
    return folder


def without(**removed: list[str]) -> dict[str, list[str]]:
    """The ids of the base export, less the ones named (by resource type)."""
    return {t: [i for i in ids if i not in removed.get(t, [])] for t, ids in ALL.items()}


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by every test
# ----------------------------------------------------------------------------------------------------------------


def column(query, statement: str, params: tuple | None = None) -> list:
    return [row[0] for row in query(statement, params)]


def loaded_ids(query) -> dict[str, list[str]]:
    """Ids per type in fhir.resource; asserts each has its ehr.* row and no ehr.* row lacks its resource."""
    out: dict[str, list[str]] = {}
    for resource_type, table in EHR_TABLE.items():
        raw = column(
            query, "SELECT resource_id FROM fhir.resource WHERE resource_type = %s ORDER BY 1", (resource_type,)
        )
        normalized = column(query, f"SELECT {table}_id FROM ehr.{table} ORDER BY 1")
        assert normalized == raw, f"ehr.{table} and fhir.resource disagree"
        out[resource_type] = raw
    others = column(
        query, "SELECT DISTINCT resource_type FROM fhir.resource WHERE resource_type <> ALL(%s)", (list(EHR_TABLE),)
    )
    assert others == [], f"unexpected resources loaded: {others}"
    return out


def quarantine(query, run_id: int) -> list[dict]:
    rows = query(
        """SELECT source, line_no, resource_type, resource_id, kind, reason, error, raw_text, raw_bytes
           FROM ops.quarantine WHERE run_id = %s ORDER BY source, line_no NULLS FIRST, quarantine_id""",
        (run_id,),
    )
    keys = ("source", "line_no", "resource_type", "resource_id", "kind", "reason", "error", "raw_text", "raw_bytes")
    return [{k: (bytes(v) if isinstance(v, memoryview) else v) for k, v in zip(keys, row, strict=True)} for row in rows]


def only_quarantined(query, run_id: int) -> dict:
    rows = quarantine(query, run_id)
    assert len(rows) == 1, rows
    return rows[0]


def where(row: dict) -> tuple:
    """(source, line_no, kind, reason, resource_id) of a quarantine row."""
    return row["source"], row["line_no"], row["kind"], row["reason"], row["resource_id"]


def assert_accounted(result, query) -> None:
    """Per type, read = normalized + excluded + quarantined + unchanged, as stored in ops.ingest_type_count and
    ops.ingest_exclusion, and normalized is what the run wrote to each ehr table."""
    c = result.counts
    stored = {
        t: {"records": read, "normalized": n, "excluded": x, "quarantined": q, "unchanged": u}
        for t, read, n, x, q, u in query(
            """SELECT resource_type, read, normalized, excluded, quarantined, unchanged FROM ops.ingest_type_count
               WHERE run_id = %s""",
            (result.run_id,),
        )
    }
    keys = ("records", "normalized", "excluded", "quarantined", "unchanged")
    assert stored == {t: {k: v[k] for k in keys} for t, v in c["by_type"].items()}
    exclusions: dict[str, dict[str, int]] = {}
    for t, reason, n in query(
        "SELECT resource_type, reason, resources FROM ops.ingest_exclusion WHERE run_id = %s", (result.run_id,)
    ):
        exclusions.setdefault(t, {})[reason] = n
    for t, v in c["by_type"].items():
        assert v["records"] == v["normalized"] + v["excluded"] + v["quarantined"] + v["unchanged"], (t, v)
        assert v["loaded"] == v["normalized"] + v["excluded"], (t, v)
        assert exclusions.get(t, {}) == v["excluded_reasons"] and sum(v["excluded_reasons"].values()) == v["excluded"]
    assert c["normalized"] + c["excluded"] == c["loaded"], c
    for t, table in EHR_TABLE.items():
        normalized = c["by_type"].get(t, {}).get("normalized", 0)
        assert query(f"SELECT count(*) FROM ehr.{table} WHERE run_id = %s", (result.run_id,)) == [(normalized,)], t


def assert_reconciled(result, query) -> None:
    """records == loaded + quarantined + unchanged, and the counts agree with what the database holds."""
    c = result.counts
    assert c["records"] == c["loaded"] + c["quarantined"] + c["unchanged"], c
    assert c["loaded"] == c["inserted"] + c["updated"], c
    by_kind = dict(query("SELECT kind, count(*) FROM ops.quarantine WHERE run_id = %s GROUP BY kind", (result.run_id,)))
    assert by_kind.get("line", 0) == c["quarantined"], (by_kind, c)
    assert by_kind.get("file", 0) == c["file_problems"], (by_kind, c)
    assert sum(c["quarantine_reasons"].values()) == c["quarantined"] + c["file_problems"], c
    assert sum(t["records"] for t in c["by_type"].values()) == c["records"], c
    assert query("SELECT coalesce(sum(records), 0) FROM ops.ingest_file WHERE run_id = %s", (result.run_id,)) == [
        (c["records"],)
    ]
    assert query("SELECT count(*) FROM fhir.resource WHERE run_id = %s", (result.run_id,)) == [(c["loaded"],)]
    assert query("SELECT status FROM ops.ingest_run WHERE run_id = %s", (result.run_id,)) == [("succeeded",)]
    assert_accounted(result, query)


def counts_of(result) -> tuple[int, int, int, int, int]:
    c = result.counts
    return c["records"], c["loaded"], c["quarantined"], c["unchanged"], c["file_problems"]


@pytest.fixture
def run(db_url, settings, tmp_path):
    """Write an export into tmp_path/<name> and ingest it into the test database."""

    def go(files: dict[str, list[str | bytes] | bytes], name: str = "export"):
        return ingest(str(write_export(tmp_path / name, files)), settings, url=db_url)

    return go


# ----------------------------------------------------------------------------------------------------------------
# The base export itself
# ----------------------------------------------------------------------------------------------------------------


def test_base_export_loads_cleanly(run, query):
    result = run(base_files())
    assert counts_of(result) == (10, 10, 0, 0, 0)
    assert loaded_ids(query) == ALL
    assert quarantine(query, result.run_id) == []
    assert_reconciled(result, query)


# ----------------------------------------------------------------------------------------------------------------
# Broken lines
# ----------------------------------------------------------------------------------------------------------------


def test_truncated_last_line(run, query):
    files = base_files()
    whole = files["Observation.ndjson"][3]
    cut = whole[: len(whole) // 2]  # the export stopped mid-line: no closing brace, no newline
    files["Observation.ndjson"][3] = cut
    data = ndjson_bytes(files["Observation.ndjson"], trailing_newline=False)
    assert not data.endswith(b"\n")

    result = run({**files, "Observation.ndjson": data})

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 4, "line", "invalid-json", None)
    assert "invalid JSON" in row["error"] and "truncated" in row["error"]
    assert row["raw_text"] == cut and row["raw_bytes"] is None
    assert loaded_ids(query) == without(Observation=["o4"])
    assert counts_of(result) == (10, 9, 1, 0, 0)
    assert result.counts["quarantine_reasons"] == {"invalid-json": 1}
    assert_reconciled(result, query)


def test_invalid_json_in_the_middle_of_a_file(run, query):
    files = base_files()
    broken = files["Observation.ndjson"][1].replace('"status":"final",', '"status":"final",,', 1)
    files["Observation.ndjson"][1] = broken
    files["Observation.ndjson"].insert(1, "")  # a blank line: skipped, but it keeps its line number

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 3, "line", "invalid-json", None)
    assert row["error"].startswith("invalid JSON:")
    assert row["raw_text"] == broken
    # The lines after the broken one were read too.
    assert loaded_ids(query) == without(Observation=["o2"])
    assert counts_of(result) == (10, 9, 1, 0, 0)
    assert_reconciled(result, query)


def test_unknown_resource_type(run, query):
    files = base_files()
    misspelt = files["Patient.ndjson"][2].replace('"resourceType":"Patient"', '"resourceType":"Patiant"')
    files["Patient.ndjson"][2] = misspelt

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Patient.ndjson", 3, "line", "unknown-resource-type", "p3")
    assert (row["resource_type"], row["resource_id"]) == ("Patiant", "p3")
    assert "'Patiant'" in row["error"]
    assert row["raw_text"] == misspelt
    assert loaded_ids(query) == without(Patient=["p3"])
    assert counts_of(result) == (10, 9, 1, 0, 0)
    assert_reconciled(result, query)


def test_resource_of_another_type_in_a_typed_file(run, query):
    files = base_files()
    stray = dump(
        observation(
            "o5", "p1", "e1", "718-7", "Hemoglobin [Mass/volume] in Blood", 13.1, "g/dL", "2024-02-01T09:10:00+00:00"
        )
    )
    files["Patient.ndjson"].insert(1, stray)  # an Observation on line 2 of Patient.ndjson

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Patient.ndjson", 2, "line", "resource-type-mismatch", "o5")
    assert (row["resource_type"], row["resource_id"]) == ("Observation", "o5")
    assert row["error"] == "a Observation in a file of Patient resources"
    assert row["raw_text"] == stray
    assert loaded_ids(query) == ALL  # p2 on line 3 still loaded; o5 did not sneak in
    assert counts_of(result) == (11, 10, 1, 0, 0)
    assert result.counts["by_type"]["Observation"] == {
        "records": 5, "loaded": 4, "normalized": 4, "excluded": 0, "excluded_reasons": {}, "unchanged": 0,
        "quarantined": 1,
    }  # fmt: skip
    assert_reconciled(result, query)


def test_missing_id(run, query):
    files = base_files()
    resource = copy.deepcopy(ENCOUNTERS[1])
    del resource["id"]
    files["Encounter.ndjson"][1] = dump(resource)
    files["Observation.ndjson"].pop(1)  # o2 points at e2; keep this test about the Encounter alone

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Encounter.ndjson", 2, "line", "missing-id", None)
    assert (row["resource_type"], row["resource_id"], row["error"]) == ("Encounter", None, "Encounter has no id")
    assert json.loads(row["raw_text"]) == resource
    assert loaded_ids(query) == without(Encounter=["e2"], Observation=["o2"])
    assert_reconciled(result, query)


def test_json_that_is_not_a_resource(run, query):
    files = base_files()
    files["Observation.ndjson"].insert(2, "[1, 2, 3]")
    files["Observation.ndjson"].insert(3, '{"id": "x1", "status": "final"}')

    result = run(files)

    rows = quarantine(query, result.run_id)
    assert [(r["line_no"], r["reason"], r["error"], r["raw_text"]) for r in rows] == [
        (3, "not-a-resource", "expected a JSON object, got list", "[1, 2, 3]"),
        (4, "not-a-resource", "missing resourceType", '{"id": "x1", "status": "final"}'),
    ]
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (12, 10, 2, 0, 0)
    assert_reconciled(result, query)


def test_observation_without_status(run, query):
    files = base_files()
    resource = copy.deepcopy(OBSERVATIONS[2])
    del resource["status"]
    files["Observation.ndjson"][2] = dump(resource)

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 3, "line", "fhir-validation", "o3")
    assert (row["resource_type"], row["resource_id"]) == ("Observation", "o3")
    assert row["error"].startswith("Observation.status:") and "required" in row["error"]
    assert json.loads(row["raw_text"]) == resource
    assert loaded_ids(query) == without(Observation=["o3"])
    assert counts_of(result) == (10, 9, 1, 0, 0)
    assert_reconciled(result, query)


def test_impossible_date(run, query):
    files = base_files()
    resource = {**OBSERVATIONS[1], "effectiveDateTime": "2020-13-45"}
    files["Observation.ndjson"][1] = dump(resource)

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 2, "line", "fhir-validation", "o2")
    assert row["error"].startswith("Observation.effectiveDateTime:")
    assert json.loads(row["raw_text"]) == resource
    assert loaded_ids(query) == without(Observation=["o2"])
    assert_reconciled(result, query)


def test_date_time_with_a_time_but_no_timezone(run, query):
    # R4 requires a zone whenever a time is given; guessing one would shift the event by hours.
    files = base_files()
    resource = {**ENCOUNTERS[2], "period": {"start": "2024-03-10T14:00:00", "end": "2024-03-14T10:00:00Z"}}
    files["Encounter.ndjson"][2] = dump(resource)

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Encounter.ndjson", 3, "line", "fhir-validation", "e3")
    assert row["error"].startswith("Encounter.period.start:")
    assert json.loads(row["raw_text"]) == resource
    # The labs taken during e3 still load; their link to the rejected encounter is cleared and counted.
    assert loaded_ids(query) == without(Encounter=["e3"])
    assert query("SELECT observation_id, encounter_id FROM ehr.observation WHERE patient_id = 'p2' ORDER BY 1") == [
        ("o3", None),
        ("o4", None),
    ]
    assert result.counts["unresolved_encounter_refs"] == 2
    assert counts_of(result) == (10, 9, 1, 0, 0)
    assert_reconciled(result, query)


def test_non_utf8_bytes_keep_the_exact_original(run, query):
    files = base_files()
    resource = copy.deepcopy(OBSERVATIONS[1])
    resource["code"]["text"] = "Natrémie (Hôpital Saint-Éloi)"
    latin1 = dump(resource).encode("latin-1")  # a Windows-1252 export: not UTF-8
    files["Observation.ndjson"][1] = latin1

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 2, "line", "invalid-utf8", None)
    first_bad = latin1.index("é".encode("latin-1"))
    assert row["error"] == f"line is not valid UTF-8 (invalid continuation byte at byte {first_bad})"
    assert row["raw_bytes"] == latin1  # byte for byte
    assert row["raw_text"] == latin1.decode("utf-8", errors="replace")
    assert json.loads(row["raw_bytes"].decode("latin-1")) == resource
    assert loaded_ids(query) == without(Observation=["o2"])
    assert counts_of(result) == (10, 9, 1, 0, 0)
    assert_reconciled(result, query)


def test_nul_escape_in_a_string(run, query):
    files = base_files()
    resource = copy.deepcopy(OBSERVATIONS[3])
    del resource["valueQuantity"]
    resource["valueString"] = "182\u0000mg/dL"
    line = dump(resource)
    assert "\\u0000" in line  # the JSON text holds the escape, which jsonb cannot store
    files["Observation.ndjson"][3] = line

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 4, "line", "unsupported-character", "o4")
    assert "NUL" in row["error"]
    assert row["raw_text"] == line and row["raw_bytes"] is None
    assert json.loads(row["raw_text"]) == resource
    assert loaded_ids(query) == without(Observation=["o4"])
    assert_reconciled(result, query)


def test_nul_escape_hidden_by_a_duplicate_key(run, query):
    files = base_files()
    line = files["Patient.ndjson"][2].replace('"gender":"other"', '"gender":"\\u0000","gender":"other"', 1)
    assert '"gender":"\\u0000","gender":"other"' in line
    files["Patient.ndjson"][2] = line

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Patient.ndjson", 3, "line", "unsupported-character", "p3")
    assert row["raw_text"] == line
    assert loaded_ids(query) == without(Patient=["p3"])
    assert_reconciled(result, query)


def test_raw_nul_byte_in_a_line(run, query):
    files = base_files()
    line = files["Observation.ndjson"][0].replace("Creatinine", "Creat\x00inine", 1).encode()
    files["Observation.ndjson"][0] = line

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 1, "line", "invalid-json", None)
    assert row["raw_bytes"] == line  # text columns cannot hold NUL: the bytes keep the original exactly
    assert row["raw_text"] == line.decode().replace("\x00", "\ufffd")
    assert loaded_ids(query) == without(Observation=["o1"])
    assert_reconciled(result, query)


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------


def test_orphan_reference(run, query):
    files = base_files()
    orphan = observation(
        "o5", "p9", "e1", "718-7", "Hemoglobin [Mass/volume] in Blood", 13.1, "g/dL", "2024-02-01T09:10:00+00:00"
    )
    files["Observation.ndjson"].append(dump(orphan))

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 5, "line", "orphan-reference", "o5")
    assert row["resource_type"] == "Observation"
    assert row["error"] == "Observation/o5 references Patient/p9, which is neither in this export nor in the warehouse"
    assert json.loads(row["raw_text"]) == orphan
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (11, 10, 1, 0, 0)
    assert_reconciled(result, query)


def test_unresolvable_patient_reference(run, query):
    files = base_files()
    resource = {**OBSERVATIONS[0], "subject": {"reference": "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|MRN-p1"}}
    files["Observation.ndjson"][0] = dump(resource)

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 1, "line", "unresolvable-reference", "o1")
    assert "subject.reference" in row["error"]
    assert json.loads(row["raw_text"]) == resource
    assert loaded_ids(query) == without(Observation=["o1"])
    assert_reconciled(result, query)


def test_patient_in_a_later_file_is_not_an_orphan(run, query):
    # Files are read in name order; the Observation file sorts before the Patient file that holds its subject.
    files = base_files()
    late = patient("p4", "2001-09-30", "female")
    obs = observation(
        "o5", "p4", "e1", "718-7", "Hemoglobin [Mass/volume] in Blood", 13.1, "g/dL", "2024-02-01T09:10:00+00:00"
    )
    obs["encounter"] = {"reference": "Encounter/e4"}
    visit = encounter(
        "e4", "p4", "AMB", "185349003", "Encounter for check up", "2024-07-01T08:00:00Z", "2024-07-01T08:20:00Z"
    )
    files["Observation.001.ndjson"] = [dump(obs)]
    files["Patient.002.ndjson"] = [dump(late)]
    files["Encounter.ndjson"].append(dump(visit))
    assert sorted(files)[:3] == ["Encounter.ndjson", "Observation.001.ndjson", "Observation.ndjson"]

    result = run(files)

    assert quarantine(query, result.run_id) == []
    assert query("SELECT file FROM ops.ingest_file WHERE run_id = %s ORDER BY staged_at, file", (result.run_id,)) == [
        ("Encounter.ndjson",),
        ("Observation.001.ndjson",),
        ("Observation.ndjson",),
        ("Patient.002.ndjson",),
        ("Patient.ndjson",),
    ]
    assert loaded_ids(query) == {
        "Patient": ["p1", "p2", "p3", "p4"],
        "Encounter": ["e1", "e2", "e3", "e4"],
        "Observation": ["o1", "o2", "o3", "o4", "o5"],
    }
    assert query("SELECT patient_id, encounter_id FROM ehr.observation WHERE observation_id = 'o5'") == [("p4", "e4")]
    assert counts_of(result) == (13, 13, 0, 0, 0)
    assert_reconciled(result, query)


def test_patient_already_in_the_warehouse_is_not_an_orphan(run, query):
    first = run(base_files(), name="day1")
    known = observation(
        "o5", "p1", "e2", "718-7", "Hemoglobin [Mass/volume] in Blood", 11.2, "g/dL", "2024-05-04T02:00:00+02:00"
    )
    unknown = observation(
        "o6", "p9", "e2", "718-7", "Hemoglobin [Mass/volume] in Blood", 9.8, "g/dL", "2024-05-04T02:00:00+02:00"
    )

    second = run({"Observation.ndjson": [dump(known), dump(unknown)]}, name="day2")

    assert quarantine(query, first.run_id) == []
    row = only_quarantined(query, second.run_id)
    assert where(row) == ("Observation.ndjson", 2, "line", "orphan-reference", "o6")
    assert query("SELECT patient_id, encounter_id, run_id FROM ehr.observation WHERE observation_id = 'o5'") == [
        ("p1", "e2", second.run_id)
    ]
    assert loaded_ids(query) == {**ALL, "Observation": ["o1", "o2", "o3", "o4", "o5"]}
    assert counts_of(second) == (2, 1, 1, 0, 0)
    assert_reconciled(second, query)


# ----------------------------------------------------------------------------------------------------------------
# Versions
# ----------------------------------------------------------------------------------------------------------------


def _version(resource: dict, version: str | None, last_updated: str | None, **changes) -> dict:
    out = {**copy.deepcopy(resource), **changes}
    out["meta"] = {k: v for k, v in (("versionId", version), ("lastUpdated", last_updated)) if v is not None}
    return out


def test_duplicate_versions_in_one_export_newest_wins(run, query):
    # The newest version comes FIRST in the file, so neither file order nor text order of the timestamps can
    # pick it: 2024-07-01T04:00:00Z is later than 2024-07-01T08:30:00+05:00 (= 03:30Z).
    newest = _version(
        OBSERVATIONS[0],
        "2",
        "2024-07-01T04:00:00Z",
        valueQuantity={"value": 1.4, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
    )
    older = _version(OBSERVATIONS[0], "1", "2024-07-01T08:30:00+05:00")
    files = base_files()
    files["Observation.ndjson"][0] = dump(newest)
    files["Observation.ndjson"].append(dump(older))
    files["Patient.001.ndjson"] = [files["Patient.ndjson"][0]]  # p1 again, byte for byte

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson", 5, "line", "superseded", "o1")
    assert row["error"] == (
        "superseded by a newer version of Observation/o1 in the same export (Observation.ndjson, line 1)"
    )
    assert json.loads(row["raw_text"]) == older
    assert query(
        "SELECT version_id, last_updated, body->'valueQuantity'->>'value' FROM fhir.resource "
        "WHERE resource_type = 'Observation' AND resource_id = 'o1'"
    ) == [("2", dt.datetime(2024, 7, 1, 4, 0, tzinfo=dt.UTC), "1.4")]
    assert query("SELECT value_num FROM ehr.observation WHERE observation_id = 'o1'") == [(1.4,)]
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (12, 10, 1, 1, 0)  # the identical p1 is unchanged, not quarantined
    assert result.counts["by_type"]["Patient"] == {
        "records": 4, "loaded": 3, "normalized": 3, "excluded": 0, "excluded_reasons": {}, "unchanged": 1,
        "quarantined": 0,
    }  # fmt: skip
    assert_reconciled(result, query)


def test_duplicate_version_ids_compare_as_numbers(run, query):
    # No lastUpdated: versionId decides, as a number ("10" > "9", though "10" < "9" as text).
    v10 = _version(
        OBSERVATIONS[2],
        "10",
        None,
        status="amended",
        valueQuantity={"value": 4.1, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
    )
    v9 = _version(OBSERVATIONS[2], "9", None)
    files = base_files()
    files["Observation.ndjson"][2] = dump(v10)
    files["Observation.ndjson"].append(dump(v9))

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert (row["line_no"], row["reason"], row["resource_id"]) == (5, "superseded", "o3")
    assert json.loads(row["raw_text"]) == v9
    assert query("SELECT value_num, status FROM ehr.observation WHERE observation_id = 'o3'") == [(4.1, "amended")]
    assert query("SELECT version_id FROM fhir.resource WHERE resource_id = 'o3'") == [("10",)]
    assert_reconciled(result, query)


def test_newer_version_in_a_later_run_replaces_the_row(run, query):
    first = run(base_files(), name="day1")
    newer = _version(
        OBSERVATIONS[0],
        "2",
        "2024-08-01T10:00:00Z",
        status="corrected",
        valueQuantity={"value": 1.7, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
    )

    second = run({"Observation.ndjson": [dump(newer), dump(OBSERVATIONS[1])]}, name="day2")

    assert quarantine(query, second.run_id) == []
    c = second.counts
    assert (c["records"], c["loaded"], c["inserted"], c["updated"], c["unchanged"]) == (2, 1, 0, 1, 1)
    assert query("SELECT version_id, run_id, body->>'status' FROM fhir.resource WHERE resource_id = 'o1'") == [
        ("2", second.run_id, "corrected")
    ]
    assert query("SELECT observation_id, value_num, status, run_id FROM ehr.observation ORDER BY 1") == [
        ("o1", 1.7, "corrected", second.run_id),
        ("o2", 128.0, "final", first.run_id),  # identical: left alone
        ("o3", 5.9, "final", first.run_id),
        ("o4", 182.0, "final", first.run_id),
    ]
    assert loaded_ids(query) == ALL
    assert_reconciled(second, query)


def test_older_version_in_a_later_run_is_stale(run, query):
    files = base_files()
    current = _version(
        OBSERVATIONS[0],
        "2",
        "2024-08-01T10:00:00Z",
        status="corrected",
        valueQuantity={"value": 1.7, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
    )
    files["Observation.ndjson"][0] = dump(current)
    first = run(files, name="day1")
    late = dump(OBSERVATIONS[0])  # version 1, lastUpdated 2024-06-01: arrives after version 2

    second = run({"Observation.ndjson": [late]}, name="day2")

    row = only_quarantined(query, second.run_id)
    assert where(row) == ("Observation.ndjson", 1, "line", "stale-version", "o1")
    assert row["error"].startswith("Observation/o1 version 1 (lastUpdated 2024-06-01")
    assert "older than the stored version 2 (lastUpdated 2024-08-01" in row["error"]
    assert json.loads(row["raw_text"]) == OBSERVATIONS[0]
    assert query("SELECT value_num, status, run_id FROM ehr.observation WHERE observation_id = 'o1'") == [
        (1.7, "corrected", first.run_id)
    ]
    assert query("SELECT version_id FROM fhir.resource WHERE resource_id = 'o1'") == [("2",)]
    assert counts_of(second) == (1, 0, 1, 0, 0)
    assert loaded_ids(query) == ALL
    assert_reconciled(second, query)


# ----------------------------------------------------------------------------------------------------------------
# Broken files
# ----------------------------------------------------------------------------------------------------------------


def test_empty_file(run, query):
    result = run({**base_files(), "Condition.ndjson": b""})

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Condition.ndjson", 0, "file", "empty-file", None)
    assert row["resource_type"] == "Condition" and "empty" in row["error"]
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (10, 10, 0, 0, 1)
    assert_reconciled(result, query)


def test_file_of_blank_lines_is_reported_empty(run, query):
    result = run({**base_files(), "Condition.ndjson": b"\n\n"})

    assert loaded_ids(query) == ALL
    assert_reconciled(result, query)
    row = only_quarantined(query, result.run_id)
    assert (row["source"], row["kind"], row["reason"]) == ("Condition.ndjson", "file", "empty-file")


def test_garbage_in_a_gzip_file(run, query):
    files = base_files()
    del files["Observation.ndjson"]
    garbage = b"<html><body>502 Bad Gateway</body></html>\n" * 20  # what a proxy returned instead of the file

    result = run({**files, "Observation.ndjson.gz": garbage})

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson.gz", 1, "file", "corrupt-gzip", None)
    assert row["resource_type"] == "Observation"
    assert row["error"].startswith("gzip stream is corrupt:")
    assert loaded_ids(query) == without(Observation=ALL["Observation"])
    assert counts_of(result) == (6, 6, 0, 0, 1)
    assert_reconciled(result, query)


def test_truncated_gzip_keeps_the_lines_before_the_damage(run, query):
    many = [
        dump(
            OBSERVATIONS[i % 4]
            | {
                "id": f"o{i + 1}",
                "effectiveDateTime": f"2024-03-{1 + i % 28:02d}T06:00:00Z",
                "valueQuantity": {**OBSERVATIONS[i % 4]["valueQuantity"], "value": i},
            }
        )
        for i in range(40)
    ]
    whole = gzip.compress(ndjson_bytes(many), compresslevel=9, mtime=0)
    cut = whole[: len(whole) * 2 // 3]  # the download stopped two thirds of the way
    readable = zlib.decompressobj(wbits=31).decompress(cut)  # what any gzip reader can still get out of it
    complete = readable.count(b"\n")
    assert 5 < complete < 35, complete
    files = base_files()
    del files["Observation.ndjson"]

    result = run({**files, "Observation.ndjson.gz": cut})

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Observation.ndjson.gz", complete + 1, "file", "corrupt-gzip", None)
    assert row["error"] == (
        f"gzip stream is truncated (ended before its end-of-stream marker); lines after {complete} could not be read"
    )
    assert loaded_ids(query) == {**ALL, "Observation": sorted(f"o{i + 1}" for i in range(complete))}
    assert counts_of(result) == (6 + complete, 6 + complete, 0, 0, 1)
    assert_reconciled(result, query)


# ----------------------------------------------------------------------------------------------------------------
# The Bulk Data manifest
# ----------------------------------------------------------------------------------------------------------------


def manifest(outputs: dict[str, int], errors: tuple[str, ...] = ()) -> bytes:
    base = "https://ehr.example.org/fhir/bulkfiles/5f0b"
    return json.dumps(
        {
            "transactionTime": "2024-08-02T01:00:00Z",
            "request": "https://ehr.example.org/fhir/$export?_type=Patient,Encounter,Observation",
            "requiresAccessToken": True,
            "output": [
                {"type": name.split(".")[0], "url": f"{base}/{name}", "count": n} for name, n in outputs.items()
            ],
            "error": [{"type": "OperationOutcome", "url": f"{base}/{name}"} for name in errors],
        }
    ).encode()


def test_manifest_count_that_does_not_match_the_file(run, query):
    files = {
        **base_files(),
        "manifest.json": manifest({"Patient.ndjson": 3, "Encounter.ndjson": 3, "Observation.ndjson": 5}),
    }

    result = run(files)

    assert result.manifest_mismatches == [{"file": "Observation.ndjson", "manifest_count": 5, "records": 4}]
    recorded = query(
        "SELECT counts->'manifest_mismatches', transaction_time FROM ops.ingest_run WHERE run_id = %s", (result.run_id,)
    )
    assert recorded == [(result.manifest_mismatches, dt.datetime(2024, 8, 2, 1, tzinfo=dt.UTC))]
    assert query(
        "SELECT file, manifest_count, records FROM ops.ingest_file WHERE run_id = %s ORDER BY 1", (result.run_id,)
    ) == [("Encounter.ndjson", 3, 3), ("Observation.ndjson", 5, 4), ("Patient.ndjson", 3, 3)]
    assert result.ignored == ["manifest.json"]
    assert quarantine(query, result.run_id) == []
    assert loaded_ids(query) == ALL  # a wrong count is reported, not a reason to drop data
    assert_reconciled(result, query)


def test_manifest_lists_a_file_that_is_absent(run, query):
    files = {
        **base_files(),
        "manifest.json": manifest(
            {"Patient.ndjson": 3, "Encounter.ndjson": 3, "Observation.ndjson": 4, "Condition.ndjson": 2}
        ),
    }

    result = run(files)

    row = only_quarantined(query, result.run_id)
    assert where(row) == ("Condition.ndjson", None, "file", "missing-file", None)
    assert "manifest" in row["error"] and "not found" in row["error"]
    assert result.manifest_mismatches == []
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (10, 10, 0, 0, 1)
    assert_reconciled(result, query)


def test_manifest_error_file_is_quarantined_as_export_errors(run, query):
    outcomes = [
        dump(
            {
                "resourceType": "OperationOutcome",
                "id": "err1",
                "issue": [
                    {
                        "severity": "error",
                        "code": "forbidden",
                        "diagnostics": "Access to Observation/o99 denied by consent",
                    }
                ],
            }
        ),
        dump(
            {
                "resourceType": "OperationOutcome",
                "id": "err2",
                "issue": [
                    {"severity": "error", "code": "exception", "diagnostics": "Timeout exporting Condition resources"}
                ],
            }
        ),
    ]
    files = {
        **base_files(),
        "manifest.json": manifest(
            {"Patient.ndjson": 3, "Encounter.ndjson": 3, "Observation.ndjson": 4}, errors=("OperationOutcome.ndjson",)
        ),
        "OperationOutcome.ndjson": outcomes,
    }

    result = run(files)

    rows = quarantine(query, result.run_id)
    assert [(r["source"], r["line_no"], r["kind"], r["reason"], r["resource_type"]) for r in rows] == [
        ("OperationOutcome.ndjson", 1, "line", "export-error", "OperationOutcome"),
        ("OperationOutcome.ndjson", 2, "line", "export-error", "OperationOutcome"),
    ]
    assert [r["raw_text"] for r in rows] == outcomes
    assert all("error file" in r["error"] for r in rows)
    assert query(
        "SELECT format, records, staged, quarantined FROM ops.ingest_file "
        "WHERE run_id = %s AND file = 'OperationOutcome.ndjson'",
        (result.run_id,),
    ) == [("export-error", 2, 0, 2)]
    assert loaded_ids(query) == ALL
    assert counts_of(result) == (12, 10, 2, 0, 0)
    assert result.counts["quarantine_reasons"] == {"export-error": 2}
    assert_reconciled(result, query)
