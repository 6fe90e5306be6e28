"""No password reaches the screen or a log, in any form a warehouse URL or DSN can take; quarantine listings mask
resource ids unless asked."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from odyssey_batch import redaction
from odyssey_batch.cli.main import example_export
from odyssey_batch.redaction import dsn_password, mask_ids, redact
from tests.conftest import run_sql
from tests.test_cli import cli


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://alice:S3cret/x@db:5432/w", "postgresql://alice:***@db:5432/w"),
        ("postgresql+psycopg2://alice:S3cret@db/w failed", "postgresql+psycopg2://alice:***@db/w failed"),
        ("postgresql://db/w?sslmode=require&password=S3cret&x=1", "postgresql://db/w?sslmode=require&password=***&x=1"),
        ("host=db password=S3cret dbname=w", "host=db password=*** dbname=w"),
        ("host=db password = 'S3 c\\'ret' dbname=w", "host=db password = *** dbname=w"),
        ("host=db sslpassword=S3cret", "host=db sslpassword=***"),
        ('{"password": "S3cret", "user": "alice"}', '{"password": "***", "user": "alice"}'),
        ("{'s3_secret_key': 'S3cret'}", "{'s3_secret_key': '***'}"),
        ("ODYSSEY_S3_SECRET_KEY=S3cret PGPASSWORD=S3cret", "ODYSSEY_S3_SECRET_KEY=*** PGPASSWORD=***"),
        ("postgresql://alice@db/w and https://example.org/a:b", "postgresql://alice@db/w and https://example.org/a:b"),
        ("Patient.birthDate: invalid date", "Patient.birthDate: invalid date"),
        (
            "(psycopg2.errors.X) boom\n[SQL: SELECT 1 WHERE id = %(p)s]\n[parameters: {'p': 'mrn-1]'}]\n(Background on",
            "(psycopg2.errors.X) boom\n[SQL: SELECT 1 WHERE id = %(p)s]\n[parameters: ***]\n(Background on",
        ),
        (
            'violates foreign key constraint\nDETAIL:  Key (patient_id)=(mrn-1 (x)) is not present in table "patient".',
            'violates foreign key constraint\nDETAIL:  Key (patient_id)=(***) is not present in table "patient".',
        ),
        (
            "DETAIL:  Failing row contains (7, mrn-1, -0.5).\nCONTEXT: x",
            "DETAIL:  Failing row contains (***).\nCONTEXT: x",
        ),
    ],
)
def test_redact_hides_every_password_form(text, expected):
    assert redact(text) == expected


def test_remembered_secrets_are_hidden_wherever_they_appear():
    secret = f"Pw-{uuid.uuid4().hex[:8]}"
    # libpq quotes the malformed part of a DSN in its error: only knowing the secret hides it there.
    url = f"postgresql://alice:{secret}%zz@db/w"
    assert dsn_password(url) == f"{secret}%zz"
    assert redact(f'invalid percent-encoded token: "{secret}%zz"') == f'invalid percent-encoded token: "{secret}%zz"'
    redaction.remember_secrets(dsn_password(url))
    assert secret not in redact(f'invalid percent-encoded token: "{secret}%zz"')
    assert dsn_password(f"host=db password='{secret}' dbname=w") == secret
    assert dsn_password("postgresql://alice:p%40ss@db/w") == "p@ss" and dsn_password("host=db") is None


def test_log_records_are_redacted_with_their_tracebacks(caplog):
    redaction.install_log_redaction()
    redaction.install_log_redaction()  # idempotent
    log = logging.getLogger("odyssey_batch.tests")
    with caplog.at_level(logging.INFO):
        log.info("connecting to %s", "postgresql://alice:S3cretLog@db/w")
        try:
            raise RuntimeError("could not use host=db password=S3cretExc")
        except RuntimeError:
            log.exception("failed with %r", {"password": "S3cretArg"})
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert "postgresql://alice:***@db/w" in text and "password=***" in text and "'password': '***'" in text
    assert "RuntimeError" in text and not any(s in text for s in ("S3cretLog", "S3cretExc", "S3cretArg"))


@pytest.mark.parametrize(
    ("text", "ids", "expected"),
    [
        ("Patient/mrn-123 cannot be resolved", [], "Patient/*** cannot be resolved"),
        (
            "subject.reference 'urn:uuid:6c7a-11' of Observation obs-9",
            ["obs-9"],
            "subject.reference 'urn:uuid:***' of Observation ***",
        ),
        ("file /data/fhir/Patient.000.ndjson line 3", [None], "file /data/fhir/Patient.000.ndjson line 3"),
    ],
)
def test_mask_ids(text, ids, expected):
    assert mask_ids(text, ids) == expected


def password_urls(secret: str) -> dict[str, str]:
    """The warehouse URL in every form libpq takes, each with ``secret`` as its password, all unreachable."""
    return {
        "userinfo": f"postgresql://alice:{secret}@127.0.0.1:1/warehouse",
        "query": f"postgresql://alice@127.0.0.1:1/warehouse?password={secret}&connect_timeout=2",
        "key-value": f"host=127.0.0.1 port=1 user=alice password={secret} dbname=warehouse",
        "key-value quoted": f"host=127.0.0.1 port=1 user=alice password='{secret} x' dbname=warehouse",
        "malformed": f"postgresql://alice:{secret}%zz@127.0.0.1:1/warehouse",
        "unknown host": f"postgresql://alice:{secret}@no-such-host.invalid/warehouse",
    }


@pytest.mark.parametrize("form", list(password_urls("x")))
def test_no_command_prints_the_password(form, tmp_path):
    secret = f"Pw-{uuid.uuid4().hex[:10]}"
    url = password_urls(secret)[form]
    env = {"ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_S3_SECRET_KEY": secret}
    outputs = []
    for command in (["db", "status"], ["db", "status", "--json"], ["db", "start"], ["db", "upgrade"], ["runs"],
                    ["--traceback", "runs"], ["ingest", str(example_export())], ["--traceback", "validate"],
                    ["score", "--as-of", "2026-01-01"]):  # fmt: skip
        proc = cli(*command, env=env, check=False)
        outputs.append((command, proc.returncode, proc.stdout + proc.stderr))
    for command, code, text in outputs:
        assert secret not in text, (command, text)
        if command[:2] != ["db", "status"]:
            assert code != 0 and "error" in text.lower(), (command, text)
    # --traceback shows where it failed, still redacted.
    assert "Traceback (most recent call last)" in outputs[5][2]
    assert "Traceback" not in outputs[4][2] and "--traceback" in outputs[4][2]
    # `db url` is the one documented exception.
    assert cli("db", "url", env=env).stdout.strip() == url


BAD_LINES = {
    "Patient.ndjson": '{"resourceType": "Patient", "id": "mrn-778899", "birthDate": "1990-02-30"}',
    "Encounter.ndjson": '{"resourceType": "Encounter", "id": "enc-445566", "status": "finished", "class": {"code": '
    '"AMB"}, "subject": {"reference": "Patient/mrn-112233"}, "period": {"start": "2020-01-01T00:00:00Z"}}',
    "Condition.ndjson": '{"resourceType": "Condition", "id": "cond-778", "subject": {"reference": "urn:uuid:abc-999"}, '
    '"code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}}',
}
IDENTIFIERS = ("mrn-778899", "enc-445566", "mrn-112233", "cond-778", "abc-999")


def test_quarantine_masks_resource_ids_unless_asked(db_url, tmp_path):
    env = {"ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_INGEST_WORKERS": "1"}
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_text((example_export() / "Patient.ndjson").read_text())
    for name, line in BAD_LINES.items():
        with (export / name).open("a") as fh:
            fh.write(line + "\n")
    ingested = cli("ingest", str(export), env=env).stdout
    assert "3 quarantined" in ingested and not any(i in ingested for i in IDENTIFIERS)
    # The warehouse keeps every id (and the messages name them): only the listing masks them.
    stored = " ".join(f"{i} {e}" for i, e in run_sql(db_url, "SELECT resource_id, error FROM ops.quarantine"))
    assert all(i in stored for i in IDENTIFIERS)
    human = cli("quarantine", env=env).stdout
    masked = json.loads(cli("quarantine", "--json", env=env).stdout)
    for text in (human, json.dumps(masked)):
        assert not any(i in text for i in IDENTIFIERS), text
    assert "Encounter/*** references Patient/***" in human and "'urn:uuid:***'" in human
    examples = {e["resource_type"]: e for r in masked["reasons"] for e in r["examples"]}
    assert masked["ids_shown"] is False and sorted(examples) == ["Condition", "Encounter", "Patient"]
    assert examples["Patient"]["resource_id"] == "***" and examples["Patient"]["line_no"] == 4
    assert "birthDate" in examples["Patient"]["error"]
    shown = json.loads(cli("quarantine", "--json", "--show-ids", env=env).stdout)
    assert shown["ids_shown"] is True
    assert {e["resource_id"] for r in shown["reasons"] for e in r["examples"]} == {"mrn-778899", "enc-445566",
                                                                                   "cond-778"}  # fmt: skip
    human = cli("quarantine", "--show-ids", env=env).stdout
    assert all(i in human for i in IDENTIFIERS), human
