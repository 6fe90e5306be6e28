"""``odyssey-batch pull``: Bulk Data $export against a real FHIR server (sekmet-fhir, SMART Backend Services) and a
strict local server for what sekmet does not do (deleted[], requiresAccessToken false, 429, 503, HTTP-date
Retry-After, gzip, a token endpoint that fails and tokens that expire); kills during polling and downloading."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from odyssey_batch.ingest import ingest
from odyssey_batch.ingest.discover import ManifestError, plan_export
from odyssey_batch.pull.auth import AuthError
from odyssey_batch.pull.client import ExportRequest, escape_type_filter
from odyssey_batch.pull.landing import INCOMPLETE_MARKER
from odyssey_batch.pull.retry import RetryPolicy, parse_retry_after
from odyssey_batch.pull.run import PullOptions, pull
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location
from tests.conftest import REPO, SHARED_DATA, fresh_database, run_sql, table_fingerprints
from tests.fhir_server import admin_headers, synthea_bundle
from tests.strict_bulk_server import Behaviour, StrictBulkServer

TINY = REPO / "odyssey_batch" / "examples" / "tiny_export"


def _settings(tmp_path: Path, **values) -> Settings:
    return Settings(home=tmp_path / "home", ingest_workers=1, ingest_chunk_lines=500, pull_max_wait_s=2.0,
                    **values)  # fmt: skip


def _smart(server, client: str = "rs") -> dict[str, str]:
    if client == "rs":
        return {"pull_client_id": "odyssey-rs", "pull_private_key": server.rsa_pem, "pull_key_id": "rs-1"}
    return {"pull_client_id": "odyssey-es", "pull_private_key": server.ec_jwks}  # kid and ES384 from the JWK


# ------------------------------------------------------------------------------------------------ pure pieces


def test_retry_after_seconds_http_date_and_caps():
    import datetime as dt

    now = dt.datetime(2026, 12, 5, 2, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Sat, 05 Dec 2026 02:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sat, 05 Dec 2026 01:00:00 GMT", now) == 0.0  # in the past: now
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    policy = RetryPolicy(first_wait=1, max_wait=300, factor=2)
    assert policy.wait(0, "86400") == 300  # a day-long Retry-After is capped
    assert [policy.wait(a, None) for a in (0, 1, 2, 9)] == [1, 2, 4, 300]  # capped exponential backoff


def test_one_type_value_and_escaped_commas_in_type_filters():
    filters = ("Observation?code=a,b", "Patient?active=true")
    request = ExportRequest(level="group", group="g 1", types=("Patient", "Observation"), type_filters=filters,
                            since="2026-01-01T00:00:00Z")  # fmt: skip
    params = request.params()
    assert [k for k, _ in params].count("_type") == 1 and ("_type", "Patient,Observation") in params
    assert ("_typeFilter", "Observation?code=a%2Cb,Patient?active=true") in params
    assert request.path() == "Group/g%201/$export" and request.scope == "group/g 1"
    body = request.parameters()
    assert {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"} in body["parameter"]
    assert escape_type_filter("Condition?code=x") == "Condition?code=x"


# ------------------------------------------------------------------------------------- against sekmet-fhir


def _folder_of(bundle: dict, folder: Path) -> Path:
    """The bundle's resources as a Bulk Data folder (NDJSON per type), for ingesting the same patients directly."""
    folder.mkdir(parents=True)
    by_type: dict[str, list[str]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for resource_type, lines in by_type.items():
        (folder / f"{resource_type}.ndjson").write_text("\n".join(lines) + "\n")
    return folder


def test_full_pull_equals_ingesting_the_same_patients_from_a_folder(fhir_server, pg_admin_url, template_db,
                                                                   tmp_path):  # fmt: skip
    settings = _settings(tmp_path, **_smart(fhir_server, "rs"))
    landing = tmp_path / "landing"
    bundle, _ = synthea_bundle(SHARED_DATA, len(fhir_server.patients))
    with fresh_database(pg_admin_url, template_db) as pulled, fresh_database(pg_admin_url, template_db) as direct:
        result = pull(PullOptions(server=fhir_server.base_url, to=str(landing)), settings, url=pulled)
        assert result.status == "complete" and result.since is None and not result.resumed
        assert result.resources == len(bundle["entry"]) and result.requires_access_token
        folder = Path(result.destination)
        assert folder.parent == landing and not (folder / INCOMPLETE_MARKER).exists()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert all("/" not in e["url"] for e in manifest["output"])  # local names, ingest reads them
        loaded = ingest(result.destination, settings, url=pulled)
        assert loaded.counts["quarantined"] == 0 and loaded.manifest_mismatches == []
        ingest(str(_folder_of(bundle, tmp_path / "direct")), settings, url=direct)
        assert table_fingerprints(pulled) == table_fingerprints(direct)
        assert run_sql(pulled, "SELECT count(*) FROM fhir.resource") == run_sql(
            direct, "SELECT count(*) FROM fhir.resource"
        )
        row = run_sql(pulled, "SELECT status, scope, transaction_time IS NOT NULL, status_url IS NOT NULL "
                              "FROM ops.bulk_pull")  # fmt: skip
        assert row == [("complete", "system", True, True)]


def test_type_and_type_filter_with_an_es384_jwk_set(fhir_server, db_url, tmp_path):
    """_type as one value and a _typeFilter whose query holds a comma (two codes, OR): sekmet splits _typeFilter on
    commas, so the escaped comma is what keeps the query whole."""
    settings = _settings(tmp_path, **_smart(fhir_server, "es"))
    codes = ("8302-2", "29463-7")  # body height, body weight
    query = "Observation?code=" + ",".join(f"http://loinc.org|{c}" for c in codes)
    bundle, _ = synthea_bundle(SHARED_DATA, len(fhir_server.patients))
    expected = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
                   and any(c.get("code") in codes for c in e["resource"]["code"].get("coding", [])))  # fmt: skip
    result = pull(PullOptions(server=fhir_server.base_url, types=("Patient", "Observation"), type_filters=(query,),
                              to=str(tmp_path / "landing")), settings, url=db_url)  # fmt: skip
    manifest = json.loads((Path(result.destination) / "manifest.json").read_text())
    counts = {e["type"]: e["count"] for e in manifest["output"]}
    assert counts == {"Patient": len(fhir_server.patients), "Observation": expected} and expected > 0
    assert "_type=Patient%2CObservation" in manifest["request"]  # one _type, comma separated


def test_incremental_pull_brings_exactly_the_changes(fhir_server, db_url, tmp_path):
    settings = _settings(tmp_path, **_smart(fhir_server, "rs"))
    landing = str(tmp_path / "landing")
    options = PullOptions(server=fhir_server.base_url, to=landing)
    first = pull(options, settings, url=db_url)
    ingest(first.destination, settings, url=db_url)
    headers = admin_headers(fhir_server)
    base = fhir_server.base_url
    obs_id, value_before = run_sql(db_url, "SELECT observation_id, value_num FROM ehr.observation "
                                           "WHERE value_num IS NOT NULL ORDER BY 1 LIMIT 1")[0]  # fmt: skip
    condition_id = run_sql(db_url, "SELECT condition_id FROM ehr.condition ORDER BY 1 LIMIT 1")[0][0]
    original = httpx.get(f"{base}/Observation/{obs_id}", headers=headers).json()
    original_condition = httpx.get(f"{base}/Condition/{condition_id}", headers=headers).json()
    changed = {**original, "valueQuantity": {**original["valueQuantity"], "value": value_before + 1000}}
    try:
        assert httpx.put(f"{base}/Observation/{obs_id}", json=changed, headers=headers).status_code in (200, 201)
        assert httpx.delete(f"{base}/Condition/{condition_id}", headers=headers).status_code in (200, 204)
        second = pull(options, settings, url=db_url)
        assert second.since == first.transaction_time and second.first_byte_s is not None
        manifest = json.loads((Path(second.destination) / "manifest.json").read_text())
        assert [(e["type"], e["count"]) for e in manifest["output"]] == [("Observation", 1)]
        assert "_since=" in manifest["request"]
        # sekmet 0.1.1 writes no deleted[]: the deletion is not reported (tested with the strict server below).
        assert manifest["deleted"] == []
        counts = ingest(second.destination, settings, url=db_url).counts
        assert (counts["records"], counts["updated"], counts["inserted"]) == (1, 1, 0)
        assert run_sql(db_url, "SELECT value_num FROM ehr.observation WHERE observation_id = %s", (obs_id,)) == [
            (value_before + 1000,)
        ]
        print(f"\nincremental pull: time to first byte {second.first_byte_s:.3f} s, whole pull {second.seconds:.3f} s")
    finally:  # the server is shared by the session: put things back
        httpx.put(f"{base}/Observation/{obs_id}", json=original, headers=headers)
        httpx.put(f"{base}/Condition/{condition_id}", json=original_condition, headers=headers)


def test_a_wrong_key_is_refused_with_the_servers_reason_and_no_secret(fhir_server, db_url, tmp_path):
    settings = _settings(tmp_path, pull_client_id="odyssey-rs", pull_private_key=fhir_server.other_pem,
                         pull_key_id="rs-1")  # fmt: skip
    with pytest.raises(AuthError) as caught:
        pull(PullOptions(server=fhir_server.base_url, to=str(tmp_path / "landing")), settings, url=db_url)
    message = str(caught.value)
    assert "invalid_client" in message and "verification failed" in message
    assert "PRIVATE KEY" not in message
    assert run_sql(db_url, "SELECT status FROM ops.bulk_pull") == [("failed",)]
    assert not (tmp_path / "landing").exists()


# -------------------------------------------------------------------------------- against the strict server


def _tiny_lines(name: str) -> list[str]:
    return (TINY / f"{name}.ndjson").read_text().splitlines()


def _strict_behaviour() -> Behaviour:
    observation = json.loads(_tiny_lines("Observation")[0])
    observation["meta"] = {"lastUpdated": "2026-12-01T00:00:00Z"}
    observation["valueQuantity"]["value"] = 999.0
    deleted = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Condition/tiny-c1"}},
        {"request": {"method": "DELETE", "url": "Patient/tiny-p3"}},
    ]}  # fmt: skip
    issue = {"severity": "error", "code": "processing", "diagnostics": "Observation/x could not be read"}
    error = {"resourceType": "OperationOutcome", "issue": [issue]}
    bodies = {"obs.ndjson": observation, "err.ndjson": error, "del.ndjson": deleted}
    files = {name: (json.dumps(body) + "\n").encode() for name, body in bodies.items()}
    return Behaviour(files=files, output=[{"type": "Observation", "url": "obs.ndjson", "count": 1}],
                     error=[{"type": "OperationOutcome", "url": "err.ndjson"}],
                     deleted=[{"type": "Bundle", "url": "del.ndjson"}])  # fmt: skip


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()  # fmt: skip


def test_strict_server_deleted_errors_quirks_and_no_token_on_file_urls(db_url, tmp_path):
    settings = _settings(tmp_path, pull_client_id="odyssey", pull_private_key=_pem())
    ingest(str(TINY), settings, url=db_url)
    tiny_p3_rows = run_sql(db_url, "SELECT count(*) FROM ehr.condition WHERE patient_id = 'tiny-p3'")[0][0]
    behaviour = _strict_behaviour()
    behaviour.token_uses = 2  # tokens "expire" after two requests: a 401 gets a new one
    behaviour.hold.set()
    with StrictBulkServer(behaviour) as server:
        result = pull(PullOptions(server=server.base_url, types=("Observation", "Condition"),
                                  type_filters=("Observation?code=a,b", "Condition?clinical-status=active"),
                                  to=str(tmp_path / "landing")), settings, url=db_url)  # fmt: skip
    # 429 on the first kick-off, then accepted; one _type; the comma inside a query escaped
    assert len(behaviour.kickoffs) == 2
    query = parse_qs(behaviour.kickoffs[-1])
    assert query["_type"] == ["Observation,Condition"]
    assert query["_typeFilter"] == ["Observation?code=a%2Cb,Condition?clinical-status=active"]
    assert behaviour.polls == 3  # 202 (Retry-After as an HTTP date), 503 transient, 200
    assert behaviour.tokens_issued >= 2  # the flaky token endpoint was retried, expired tokens replaced
    assert behaviour.file_auth and all(auth is None for _, auth in behaviour.file_auth)  # requiresAccessToken false
    assert behaviour.deletes == 1  # the finished job's status URL was released
    folder = Path(result.destination)
    assert sorted(p.name for p in folder.iterdir()) == ["Observation.000.ndjson.gz", "deleted.000.ndjson.gz",
                                                        "error.000.ndjson.gz", "manifest.json"]  # fmt: skip
    counts = ingest(result.destination, settings, url=db_url).counts
    assert counts["deleted_by_type"]["Condition"] == 1 + tiny_p3_rows and counts["deleted_by_type"]["Patient"] == 1
    assert run_sql(
        db_url, "SELECT count(*) FROM ehr.condition WHERE condition_id = 'tiny-c1' OR patient_id = 'tiny-p3'"
    ) == [(0,)]
    assert run_sql(db_url, "SELECT count(*) FROM ehr.patient WHERE patient_id = 'tiny-p3'") == [(0,)]
    assert run_sql(
        db_url, "SELECT count(*) FROM fhir.resource WHERE patient_id = 'tiny-p3' OR resource_id = 'tiny-p3'"
    ) == [(0,)]
    assert run_sql(db_url, "SELECT count(*) FROM ops.deleted_resource WHERE resource_id = 'tiny-c1'") == [(1,)]
    assert run_sql(db_url, "SELECT reason FROM ops.quarantine WHERE source LIKE '%%error.000%%'") == [("export-error",)]
    observation_id = json.loads(_tiny_lines("Observation")[0])["id"]
    assert run_sql(db_url, "SELECT value_num FROM ehr.observation WHERE observation_id = %s", (observation_id,)) == [
        (999.0,)
    ]


def test_a_second_export_of_the_same_server_waits_for_the_first(db_url, tmp_path):
    from odyssey_batch.pull.state import PullBusy, lock_key
    from odyssey_batch.warehouse import connect

    holder = connect(db_url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key("http://127.0.0.1:9/fhir"),))
        with pytest.raises(PullBusy):
            pull(PullOptions(server="http://127.0.0.1:9/fhir/", to=str(tmp_path)), _settings(tmp_path), url=db_url)
    finally:
        holder.close()


def _cli(db_url: str, tmp_path: Path, server: str, token: str, landing: Path) -> subprocess.Popen:
    env = {**os.environ, "ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"),
           "ODYSSEY_PULL_BEARER_TOKEN": token, "ODYSSEY_PULL_MAX_WAIT_S": "0.5", "PYTHONPATH": str(REPO)}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "odyssey_batch.cli.main", "pull", "--server", server,
                             "--to", str(landing), "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def test_killed_pulls_resume_polling_and_downloading_without_a_second_export(db_url, tmp_path):
    settings = _settings(tmp_path, pull_bearer_token="static-bearer-token-123")
    ingest(str(TINY), settings, url=db_url)
    behaviour = _strict_behaviour()
    behaviour.busy_first = False
    landing = tmp_path / "landing"
    with StrictBulkServer(behaviour) as server:
        token = server.static_token("static-bearer-token-123")
        # 1. killed while the server exports
        process = _cli(db_url, tmp_path, server.base_url, token, landing)
        _wait_for(lambda: behaviour.polls >= 2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert run_sql(db_url, "SELECT status, status_url IS NOT NULL FROM ops.bulk_pull") == [("exporting", True)]
        # 2. resumed, then killed while downloading: one file stored, another one stalls
        behaviour.hold.set()
        behaviour.stall = {"del.ndjson"}
        process = _cli(db_url, tmp_path, server.base_url, token, landing)
        _wait_for(lambda: run_sql(db_url, "SELECT count(*) FROM ops.bulk_pull, jsonb_object_keys(files_done)")[0][0]
                  >= 2)  # fmt: skip
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert run_sql(db_url, "SELECT status FROM ops.bulk_pull") == [("downloading",)]
        (folder,) = list(landing.iterdir())
        assert (folder / INCOMPLETE_MARKER).exists()
        with pytest.raises(ManifestError, match="still being written"):  # nobody ingests half an export
            plan_export(open_location(str(folder), settings))
        # 3. resumed again: finishes what is missing
        behaviour.release.set()
        result = pull(PullOptions(server=server.base_url, to=str(landing)), settings, url=db_url)
    assert result.resumed and result.destination == str(folder)
    assert len(behaviour.kickoffs) == 1  # never a second export
    fetched = [name for name, _ in behaviour.file_auth]
    assert fetched.count("obs.ndjson") == 1 and fetched.count("err.ndjson") == 1  # stored ones are not fetched again
    assert not (folder / INCOMPLETE_MARKER).exists()
    assert ingest(result.destination, settings, url=db_url).counts["deleted"] >= 2


def test_pull_lands_on_s3_and_ingest_reads_it_there(db_url, s3_server, tmp_path):
    import uuid

    from odyssey_batch.storage.location import s3_client

    bucket = f"landing-{uuid.uuid4().hex[:12]}"
    settings = _settings(tmp_path, s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.admin.access_key,
                         s3_secret_key=s3_server.admin.secret_key, s3_region="us-east-1",
                         pull_bearer_token="static-bearer-token-123")  # fmt: skip
    s3_client(settings).make_bucket(bucket)
    ingest(str(TINY), settings, url=db_url)
    behaviour = _strict_behaviour()
    behaviour.busy_first = False
    behaviour.hold.set()
    with StrictBulkServer(behaviour) as server:
        server.static_token("static-bearer-token-123")
        result = pull(PullOptions(server=server.base_url, to=f"s3://{bucket}/fhir"), settings, url=db_url)
    names = sorted(f.name for f in open_location(result.destination, settings).list_files())
    assert names == ["Observation.000.ndjson.gz", "deleted.000.ndjson.gz", "error.000.ndjson.gz", "manifest.json"]
    counts = ingest(result.destination, settings, url=db_url).counts
    assert counts["updated"] == 1 and counts["deleted"] >= 2
    with open_location(result.destination, settings).open("Observation.000.ndjson.gz") as raw, gzip.open(raw) as fh:
        assert json.loads(fh.readline())["valueQuantity"]["value"] == 999.0
