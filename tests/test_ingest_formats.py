"""The same patients as Synthea transaction Bundles and as Bulk NDJSON load to the same rows."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from odyssey_batch.ingest import ingest
from tests.conftest import fresh_database, run_sql, shared_data, table_fingerprints

BUNDLES = "fhir-large/synthea-smart-r4-bundles"
NDJSON = "fhir-large/synthea-smart-r4-ndjson"
N_PATIENTS = 8


def _subset(tmp_path: Path) -> tuple[Path, Path, set[str]]:
    """The N smallest patient Bundles (+ the shared hospital and practitioner Bundles), and the same patients
    cut out of the bulk NDJSON export."""
    bundles_dir, ndjson_dir = tmp_path / "bundles", tmp_path / "ndjson"
    bundles_dir.mkdir()
    ndjson_dir.mkdir()
    source = shared_data(BUNDLES)
    shared = sorted(p for p in source.glob("*Information*.json.gz"))
    assert len(shared) == 2
    patients = sorted((p for p in source.glob("*.json.gz") if p not in shared), key=lambda p: p.stat().st_size)
    patient_ids = set()
    for path in [*shared, *patients[:N_PATIENTS]]:
        shutil.copy(path, bundles_dir / path.name)
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for entry in json.load(fh)["entry"]:
                if entry["resource"]["resourceType"] == "Patient":
                    patient_ids.add(entry["resource"]["id"])
    assert len(patient_ids) == N_PATIENTS

    for path in sorted(shared_data(NDJSON).glob("*.ndjson.gz")):
        kept = []
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                resource = json.loads(line)
                subject = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
                if (
                    resource["resourceType"] in ("Organization", "Practitioner")
                    or (resource["resourceType"] == "Patient" and resource["id"] in patient_ids)
                    or subject.removeprefix("Patient/") in patient_ids
                ):
                    kept.append(line)
        with gzip.open(ndjson_dir / path.name, "wt", encoding="utf-8") as out:
            out.writelines(kept)
    return bundles_dir, ndjson_dir, patient_ids


def test_bundles_and_ndjson_give_the_same_rows(tmp_path, pg_admin_url, template_db, settings):
    bundles_dir, ndjson_dir, patient_ids = _subset(tmp_path)
    with (
        fresh_database(pg_admin_url, template_db) as from_bundles,
        fresh_database(pg_admin_url, template_db) as from_ndjson,
    ):
        b = ingest(str(bundles_dir), settings, url=from_bundles)
        n = ingest(str(ndjson_dir), settings, url=from_ndjson)
        assert n.counts["quarantined"] == 0
        # Bundles also carry billing (Claim, ExplanationOfBenefit) that the NDJSON export dropped, and repeat
        # Organizations/Practitioners; everything else is the same resources.
        assert b.counts["by_type"]["Claim"]["loaded"] > 0
        # The repeated ones that differ without a newer version are quarantined as conflicting copies.
        assert set(b.counts["quarantine_reasons"]) <= {"superseded", "conflicting-duplicate"}
        assert {t for t, c in b.counts["by_type"].items() if c["quarantined"]} <= {"Organization", "Practitioner"}
        prints_b, prints_n = table_fingerprints(from_bundles), table_fingerprints(from_ndjson)
        assert prints_b == prints_n
        assert prints_n["patient"][0] == N_PATIENTS and prints_n["observation"][0] > 100
        # urn:uuid references inside Bundles resolve to the same ids as Type/id references in NDJSON.
        assert {r[0] for r in run_sql(from_bundles, "SELECT DISTINCT patient_id FROM ehr.observation")} <= patient_ids
        assert run_sql(from_bundles, "SELECT count(*) FROM ehr.observation WHERE encounter_id IS NULL") == [(0,)]
        same_raw = run_sql(
            from_bundles,
            """SELECT count(*) FROM fhir.resource WHERE resource_type IN ('Patient', 'Encounter', 'Observation')""",
        )
        assert same_raw == run_sql(
            from_ndjson,
            "SELECT count(*) FROM fhir.resource WHERE resource_type IN ('Patient', 'Encounter', 'Observation')",
        )
