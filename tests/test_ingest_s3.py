"""Ingest from ``s3://bucket/prefix`` against a real S3 server on loopback (SeaweedFS, ``tests/s3_server.py``).

The server enforces credentials: one identity may do everything, another may only list, unknown keys and wrong
secrets are refused, as a production S3 or MinIO refuses them. Uploads go through the product's own client
(``odyssey_batch.storage.location.s3_client``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio.error import S3Error

from odyssey_batch.cli.main import example_export
from odyssey_batch.ingest import ingest
from odyssey_batch.settings import Settings
from odyssey_batch.storage.location import s3_client
from tests.conftest import fresh_database, run_sql, shared_data, table_fingerprints
from tests.s3_server import REGION, S3Server

BUCKET = "hospital-exports"
TINY = "tiny/2026-01-10"
SYNTHEA = "synthea/2021-06-01"
SYNTHEA_DIR = "fhir/synthea-smart-100-ndjson"
SYNTHEA_COUNTS = {
    "patient": 100,
    "encounter": 3126,
    "condition": 797,
    "procedure": 2525,
    "medication_request": 885,
    "observation": 15404,
}


@dataclass(frozen=True)
class S3:
    server: S3Server

    @property
    def list_only_access_key(self) -> str:
        return self.server.list_only.access_key

    @property
    def list_only_secret_key(self) -> str:
        return self.server.list_only.secret_key

    def settings(self, base: Settings, access_key: str | None = None, secret_key: str | None = None) -> Settings:
        admin = self.server.admin
        return base.with_overrides(
            s3_endpoint=self.server.endpoint,
            s3_access_key=admin.access_key if access_key is None else access_key,
            s3_secret_key=admin.secret_key if secret_key is None else secret_key,
            s3_region=REGION,
        )


def _upload(client, folder: Path, prefix: str) -> list[str]:
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in names:
        client.fput_object(BUCKET, f"{prefix}/{name}", str(folder / name))
    return names


@pytest.fixture(scope="module")
def s3(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3:
    """The session's S3 server with the tiny export and Synthea-100 uploaded."""
    store = S3(s3_server)
    client = s3_client(store.settings(Settings(home=tmp_path_factory.mktemp("s3-home"))))
    client.make_bucket(BUCKET)
    _upload(client, example_export(), TINY)
    _upload(client, shared_data(SYNTHEA_DIR), SYNTHEA)
    return store


@pytest.fixture
def s3_settings(s3: S3, settings: Settings) -> Settings:
    return s3.settings(settings)


@pytest.fixture
def other_db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    with fresh_database(pg_admin_url, template_db) as url:
        yield url


def snapshot(url: str) -> dict[str, tuple[int, str]]:
    """(row count, md5 of all rows) of every ehr table and of fhir.resource, run ids and load times left out."""
    prints = table_fingerprints(url)
    prints["fhir.resource"] = run_sql(
        url,
        """SELECT count(*), coalesce(md5(string_agg(r, '|' ORDER BY r)), '')
           FROM (SELECT (to_jsonb(t) - 'run_id' - 'loaded_at')::text AS r FROM fhir.resource t) x""",
    )[0]
    return prints


def ingest_runs(url: str) -> list[tuple]:
    return run_sql(url, "SELECT source, status, error FROM ops.ingest_run ORDER BY run_id")


@pytest.fixture(scope="module")
def synthea_from_folder(pg_admin_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory):
    """Synthea-100 ingested from the local folder into its own database: the reference for the S3 run."""
    settings = Settings(home=tmp_path_factory.mktemp("local-home"), ingest_workers=1, ingest_chunk_lines=500)
    with fresh_database(pg_admin_url, template_db) as url:
        result = ingest(str(shared_data(SYNTHEA_DIR)), settings, url=url)
        return result, snapshot(url)


# ----------------------------------------------------------------------------------------------------------------


def test_synthea_from_s3_gives_the_same_rows_as_from_the_folder(s3_settings, db_url, scalar, synthea_from_folder):
    local, local_rows = synthea_from_folder

    result = ingest(f"s3://{BUCKET}/{SYNTHEA}", s3_settings, url=db_url)

    assert result.source == f"s3://{BUCKET}/{SYNTHEA}"
    assert scalar("SELECT source FROM ops.ingest_run WHERE run_id = %s", (result.run_id,)) == result.source
    assert result.counts == local.counts
    assert result.counts["records"] == result.counts["loaded"] == 25909
    assert result.counts["quarantined"] == result.counts["file_problems"] == 0
    assert (result.files, result.ignored) == (local.files, local.ignored) == (14, ["LICENSE.upstream.txt", "README.md"])
    rows = snapshot(db_url)
    assert {t: rows[t][0] for t in SYNTHEA_COUNTS} == SYNTHEA_COUNTS
    assert rows["fhir.resource"][0] == 25909
    assert rows == local_rows  # every ehr.* row and every raw resource, value for value


def test_tiny_export_from_s3_honors_its_manifest(s3_settings, db_url, other_db_url, query, settings):
    result = ingest(f"s3://{BUCKET}/{TINY}", s3_settings, url=db_url)
    local = ingest(str(example_export()), settings, url=other_db_url)

    assert result.manifest_mismatches == []
    assert result.ignored == ["README.md", "manifest.json"]
    assert query(
        "SELECT transaction_time, counts->>'manifest' FROM ops.ingest_run WHERE run_id = %s", (result.run_id,)
    ) == [(dt.datetime(2026, 1, 10, 9, 0, tzinfo=dt.UTC), "manifest.json")]
    assert query(
        "SELECT file, resource_type, manifest_count, records FROM ops.ingest_file WHERE run_id = %s ORDER BY file",
        (result.run_id,),
    ) == [
        ("Condition.ndjson", "Condition", 4, 4),
        ("Encounter.ndjson", "Encounter", 5, 5),
        ("Medication.ndjson", "Medication", 1, 1),
        ("MedicationRequest.ndjson", "MedicationRequest", 3, 3),
        ("Observation.ndjson", "Observation", 10, 10),
        ("Patient.ndjson", "Patient", 3, 3),
        ("Procedure.ndjson", "Procedure", 2, 2),
    ]
    assert result.counts == local.counts
    assert result.counts["records"] == result.counts["loaded"] == 28
    assert snapshot(db_url) == snapshot(other_db_url)


def test_manifest_problems_are_reported_over_s3(s3_settings, db_url, query, tmp_path):
    prefix = "broken/2026-02-01"
    client = s3_client(s3_settings)
    tiny = example_export()
    issue = {"severity": "error", "code": "too-costly", "diagnostics": "Condition export exceeded the time limit"}
    outcome = json.dumps({"resourceType": "OperationOutcome", "issue": [issue]})
    files_url = "https://ehr.example.org/exports/broken"
    manifest = {
        "transactionTime": "2026-02-01T03:00:00Z",
        "request": "https://ehr.example.org/fhir/$export",
        "requiresAccessToken": True,
        "output": [
            {"type": "Patient", "url": f"{files_url}/Patient.ndjson", "count": 4},  # the file holds 3
            {"type": "Condition", "url": f"{files_url}/Condition.ndjson", "count": 4},  # never uploaded
        ],
        "error": [{"type": "OperationOutcome", "url": f"{files_url}/errors.ndjson"}],
    }
    client.fput_object(BUCKET, f"{prefix}/Patient.ndjson", str(tiny / "Patient.ndjson"))
    for name, body in (("manifest.json", json.dumps(manifest)), ("errors.ndjson", outcome + "\n")):
        local = tmp_path / name
        local.write_text(body)
        client.fput_object(BUCKET, f"{prefix}/{name}", str(local))

    result = ingest(f"s3://{BUCKET}/{prefix}", s3_settings, url=db_url)

    assert result.manifest_mismatches == [{"file": "Patient.ndjson", "manifest_count": 4, "records": 3}]
    assert query(
        "SELECT source, line_no, kind, reason, raw_text FROM ops.quarantine WHERE run_id = %s ORDER BY source",
        (result.run_id,),
    ) == [
        ("Condition.ndjson", None, "file", "missing-file", None),
        ("errors.ndjson", 1, "line", "export-error", outcome),
    ]
    c = result.counts
    assert (c["records"], c["loaded"], c["quarantined"], c["unchanged"], c["file_problems"]) == (4, 3, 1, 0, 1)
    assert query("SELECT patient_id FROM ehr.patient ORDER BY 1") == [("tiny-p1",), ("tiny-p2",), ("tiny-p3",)]


def test_missing_bucket_is_a_clear_error(s3_settings, db_url):
    with pytest.raises(FileNotFoundError, match=r"^no such bucket: no-such-bucket$"):
        ingest("s3://no-such-bucket/exports", s3_settings, url=db_url)
    assert ingest_runs(db_url) == []


def test_prefix_without_files_is_a_clear_error(s3_settings, db_url):
    with pytest.raises(FileNotFoundError, match=rf"found in s3://{BUCKET}/nothing/here$"):
        ingest(f"s3://{BUCKET}/nothing/here", s3_settings, url=db_url)
    assert ingest_runs(db_url) == []


@pytest.mark.parametrize(
    ("access_key", "secret_key"),
    [("nobody-we-know", "whatever-secret"), (None, "not-the-secret")],
    ids=["unknown-access-key", "wrong-secret"],
)
def test_wrong_credentials_fail_loudly(s3, settings, db_url, access_key, secret_key):
    bad = s3.settings(settings, access_key=access_key, secret_key=secret_key)

    with pytest.raises(S3Error) as failure:
        ingest(f"s3://{BUCKET}/{SYNTHEA}", bad, url=db_url)

    assert failure.value.code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
    assert failure.value.response.status == 403
    assert ingest_runs(db_url) == []  # refused before anything was registered, let alone loaded


def test_credentials_that_cannot_read_objects_fail_the_run(s3, settings, db_url, scalar):
    # Listing works, so the run starts (Synthea has no manifest to read first); reading the first file is refused.
    lister = s3.settings(settings, access_key=s3.list_only_access_key, secret_key=s3.list_only_secret_key)

    with pytest.raises(S3Error) as failure:
        ingest(f"s3://{BUCKET}/{SYNTHEA}", lister, url=db_url)

    assert failure.value.code == "AccessDenied"
    [(source, status, error)] = ingest_runs(db_url)
    assert (source, status) == (f"s3://{BUCKET}/{SYNTHEA}", "failed")
    assert error.startswith("S3Error:") and "AccessDenied" in error
    assert scalar("SELECT count(*) FROM fhir.resource") == 0
    assert scalar("SELECT count(*) FROM staging.resource") == 0


def test_gzip_object_stored_with_content_encoding_gzip_loads(s3_settings, db_url):
    # What `aws s3 cp --content-encoding gzip` (or a gateway that sets the header for .gz files) leaves behind.
    prefix = "content-encoding/2021-06-01"
    client = s3_client(s3_settings)
    client.fput_object(
        BUCKET,
        f"{prefix}/Patient.ndjson.gz",
        str(shared_data(SYNTHEA_DIR) / "Patient.ndjson.gz"),
        content_type="application/fhir+ndjson",
        metadata={"Content-Encoding": "gzip"},
    )
    assert client.stat_object(BUCKET, f"{prefix}/Patient.ndjson.gz").metadata["content-encoding"] == "gzip"

    result = ingest(f"s3://{BUCKET}/{prefix}", s3_settings, url=db_url)

    assert result.counts["quarantine_reasons"] == {}
    assert (result.counts["records"], result.counts["loaded"]) == (100, 100)
