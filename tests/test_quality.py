"""The data-quality gate with real Great Expectations on a real warehouse: real exports, planted defects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from odyssey_batch.ingest import ingest
from odyssey_batch.quality.gate import RunRejected, accept_run, ensure_usable, validate
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import create_database, drop_database, with_database
from tests.conftest import fresh_database, run_sql, shared_data

SYNTHEA_100 = "fhir/synthea-smart-100-ndjson"


def failures(verdict) -> dict[tuple[str, str], tuple[str, int | None]]:
    return {(f.suite, f.expectation): (f.severity, f.unexpected_count) for f in verdict.findings if not f.success}


@pytest.fixture(scope="module")
def clean(pg_admin_url, template_db, tmp_path_factory):
    """Synthea-100 loaded and validated once; each planted-defect test works on a copy."""
    settings = Settings(home=tmp_path_factory.mktemp("home"), ingest_workers=2)
    with fresh_database(pg_admin_url, template_db) as url:
        result = ingest(str(shared_data(SYNTHEA_100)), settings, url=url)
        verdict = validate(url, settings, result.run_id)
        yield url, result.run_id, verdict


@pytest.fixture
def planted(clean, pg_admin_url, tmp_path):
    """A copy of the clean, validated warehouse to plant one defect in. Row-level checks reject at any failing row
    here (threshold 0): each test plants one bad row and means the gate to see it as a failure."""
    url, run_id, _ = clean
    name = f"odyssey_planted_{os.getpid()}_{tmp_path.name[-12:]}".lower().replace("-", "_")
    source = urlsplit(url).path.lstrip("/")
    create_database(pg_admin_url, name, template=source)
    try:
        yield with_database(pg_admin_url, name), run_id, Settings(home=tmp_path / "home", dq_max_row_failure_rate=0.0)
    finally:
        drop_database(pg_admin_url, name)


def test_real_synthea_export_passes_every_critical_expectation(clean):
    url, run_id, verdict = clean
    assert verdict.success and verdict.critical_failures == []
    assert run_sql(url, "SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,)) == [("validated",)]
    # Decided and documented: Synthea's post-mortem records (Death Certification encounters up to two weeks
    # after death) are warnings, and so are 3 pairs of same-type encounters at the same instant.
    after_death = run_sql(
        url,
        """SELECT count(*) FROM ehr.encounter e JOIN ehr.patient p USING (patient_id)
           WHERE greatest(e.start_time, e.end_time) > p.death_time + interval '1 day'""",
    )[0][0]
    assert failures(verdict) == {
        ("ehr.encounter", "no_duplicate_encounters"): ("warning", 6),
        ("cross_table.encounter", "not_after_death"): ("warning", after_death),
        ("cross_table.observation", "not_after_death"): ("warning", 15),
    }
    stored = run_sql(url, "SELECT count(*), count(*) FILTER (WHERE NOT success) FROM ops.dq_result")[0]
    assert stored == (len(verdict.findings), 3)
    # Samples hold ids only.
    [(sample,)] = run_sql(
        url,
        "SELECT unexpected_sample FROM ops.dq_result WHERE expectation = 'not_after_death' AND suite LIKE '%encounter'",
    )
    assert sample and all(set(row) == {"encounter_id", "patient_id"} for row in sample)
    assert Path(verdict.data_docs).is_file() and verdict.data_docs.endswith("index.html")


def test_genuine_bulk_export_passes(db_url, settings):
    result = ingest(str(shared_data("fhir/smart-bulk-10-patients-partial")), settings, url=db_url)
    verdict = validate(db_url, settings, result.run_id, data_docs=False)
    assert verdict.success, verdict.message()


def test_hl7_examples_are_rejected_for_their_quarantine_rate_only(db_url, settings):
    """Decided: the official examples are not a cohort; 32 of 435 resources point at patients that are not
    examples or reuse ids, which is 7% quarantined: the gate is right to stop such an export."""
    result = ingest(str(shared_data("fhir/hl7-r4-examples")), settings, url=db_url)
    verdict = validate(db_url, settings, result.run_id, data_docs=False)
    assert [(f.suite, f.expectation) for f in verdict.critical_failures] == [("ingest", "quarantine_rate")]
    assert {f.expectation for f in verdict.warnings} == {"code_system_allowed"}


def _check(url, settings, expectation, severity, count, suite):
    verdict = validate(url, settings, data_docs=False)
    found = [f for f in verdict.findings if (f.suite, f.expectation) == (suite, expectation) and not f.success]
    assert len(found) == 1, verdict.message()
    assert (found[0].severity, found[0].unexpected_count) == (severity, count)
    others = [f for f in verdict.critical_failures if f is not found[0]]
    assert others == [], verdict.message()
    status = run_sql(url, "SELECT status FROM ops.ingest_run WHERE run_id = %s", (verdict.run_id,))[0][0]
    assert status == ("rejected" if severity == "critical" else "validated")
    assert verdict.success == (severity == "warning")
    if severity == "critical":
        assert f"{suite}: {expectation}" in verdict.message() and f"{count} rows" in verdict.message()
    return verdict


def test_planted_duplicate_encounter_id(planted):
    url, _, settings = planted
    run_sql(url, "ALTER TABLE ehr.encounter DROP CONSTRAINT encounter_pkey CASCADE")  # a warehouse without keys
    run_sql(url, "INSERT INTO ehr.encounter SELECT * FROM ehr.encounter ORDER BY encounter_id LIMIT 1")
    _check(url, settings, "encounter_id_unique", "critical", 2, "ehr.encounter")


def test_planted_encounter_ending_before_it_starts(planted):
    url, _, settings = planted
    run_sql(
        url,
        """UPDATE ehr.encounter SET end_time = start_time - interval '2 hours'
                    WHERE encounter_id = (SELECT min(encounter_id) FROM ehr.encounter WHERE class_code = 'IMP')""",
    )
    _check(url, settings, "end_not_before_start", "critical", 1, "ehr.encounter")


def test_planted_orphan_observation(planted):
    url, _, settings = planted
    run_sql(url, "ALTER TABLE ehr.observation DROP CONSTRAINT observation_patient_id_fkey")
    run_sql(
        url,
        "UPDATE ehr.observation SET patient_id = 'no-such-patient' WHERE observation_id = "
        "(SELECT min(observation_id) FROM ehr.observation)",
    )
    _check(url, settings, "patient_id_resolves", "critical", 1, "cross_table.observation")


def test_planted_lab_in_a_second_unit_is_a_warning(planted):
    """A second unit for a lab code is converted or binned per unit by the tokenizer (``sequences.labs``), not a
    rejection; a code switching unit across a whole feed is (``lab_unit_switched``, tests/test_gate_exclusions)."""
    url, _, settings = planted
    run_sql(
        url,
        "UPDATE ehr.observation SET unit = 'g/L' WHERE observation_id = "
        "(SELECT min(observation_id) FROM ehr.observation WHERE code = '2339-0')",
    )
    _check(url, settings, "one_unit_per_lab_code", "warning", 1, "ehr.observation")


def test_a_documented_unit_conversion_is_not_a_second_unit(planted):
    url, _, settings = planted
    run_sql(
        url,
        "UPDATE ehr.observation SET unit = 'mmol/L', value_num = value_num / 18.016 WHERE observation_id = "
        "(SELECT min(observation_id) FROM ehr.observation WHERE code = '2339-0')",
    )
    assert validate(url, settings, data_docs=False).success


def test_planted_impossible_lab_value(planted):
    url, _, settings = planted
    run_sql(
        url,
        "UPDATE ehr.observation SET value_num = 1e9 WHERE observation_id = "
        "(SELECT min(observation_id) FROM ehr.observation WHERE code = '2339-0' AND unit = 'mg/dL')",
    )
    _check(url, settings, "lab_values_plausible", "critical", 1, "ehr.observation")


def test_planted_event_after_death_is_a_warning(planted):
    url, _, settings = planted
    before = run_sql(
        url,
        """SELECT count(*) FROM ehr.observation o JOIN ehr.patient p USING (patient_id)
                             WHERE o.effective_time > p.death_time + interval '1 day'""",
    )[0][0]
    run_sql(
        url,
        """UPDATE ehr.observation o SET effective_time = p.death_time + interval '10 days'
                    FROM ehr.patient p WHERE p.patient_id = o.patient_id AND o.observation_id =
                      (SELECT min(o2.observation_id) FROM ehr.observation o2 JOIN ehr.patient p2 USING (patient_id)
                       WHERE p2.deceased AND o2.effective_time < p2.death_time)""",
    )
    _check(url, settings, "not_after_death", "warning", before + 1, "cross_table.observation")


def test_planted_drop_of_condition_rows(planted):
    url, _, settings = planted
    total = run_sql(url, "SELECT count(*) FROM ehr.condition")[0][0]
    run_sql(
        url,
        "DELETE FROM ehr.condition WHERE condition_id IN "
        "(SELECT condition_id FROM ehr.condition ORDER BY condition_id LIMIT %s)",
        (int(total * 0.6),),
    )
    verdict = validate(url, settings, data_docs=False)
    [found] = [f for f in verdict.critical_failures]
    assert (found.suite, found.expectation) == ("volume.condition", "row_count_not_dropped")
    assert found.observed_value == total - int(total * 0.6)
    assert not verdict.success


def test_manifest_count_mismatch_rejects(db_url, settings, tmp_path):
    from odyssey_batch.cli.main import example_export

    export = tmp_path / "export"
    export.mkdir()
    for path in example_export().iterdir():
        (export / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["output"][0]["count"] += 5
    (export / "manifest.json").write_text(json.dumps(manifest))
    result = ingest(str(export), settings, url=db_url)
    verdict = validate(db_url, settings, result.run_id, data_docs=False)
    assert [(f.expectation, f.unexpected_count) for f in verdict.critical_failures] == [("manifest_counts_match", 1)]


def test_a_file_not_read_to_its_end_rejects_the_run(db_url, settings, tmp_path):
    """A truncated gzip and a link (never followed) leave the feed incomplete: the gate stops it. An empty file and
    a good export beside them do not."""
    import gzip

    from odyssey_batch.cli.main import example_export

    export = tmp_path / "export"
    export.mkdir()
    for path in example_export().iterdir():
        (export / path.name).write_bytes(path.read_bytes())
    compressed = gzip.compress((export / "Observation.ndjson").read_bytes())
    (export / "Observation.ndjson").unlink()
    (export / "Observation.ndjson.gz").write_bytes(compressed[: len(compressed) // 2])
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["output"] = [o for o in manifest["output"] if o["type"] != "Observation"]
    (export / "manifest.json").write_text(json.dumps(manifest))
    outside = tmp_path / "outside.ndjson"
    outside.write_text("{}\n")
    (export / "Extra.ndjson").symlink_to(outside)
    (export / "Empty.ndjson").write_bytes(b"")

    result = ingest(str(export), settings, url=db_url)
    verdict = validate(db_url, settings, result.run_id, data_docs=False)

    assert [(f.expectation, f.unexpected_count) for f in verdict.critical_failures] == [("files_read_whole", 2)]
    assert "ingest: files_read_whole" in verdict.message()
    reasons = run_sql(db_url, "SELECT source, reason FROM ops.quarantine WHERE kind = 'file' ORDER BY source")
    assert [source for source, _ in reasons] == ["Empty.ndjson", "Extra.ndjson", "Observation.ndjson.gz"]
    assert dict(reasons)["Extra.ndjson"] == "symlink"


def test_later_stages_refuse_rejected_or_unvalidated_runs_unless_accepted(planted):
    url, run_id, settings = planted
    assert ensure_usable(url) == [run_id]  # validated
    run_sql(
        url,
        "UPDATE ehr.encounter SET end_time = start_time - interval '1 hour' WHERE encounter_id = "
        "(SELECT min(encounter_id) FROM ehr.encounter)",
    )
    assert not validate(url, settings, data_docs=False).success
    with pytest.raises(RunRejected, match=f"run {run_id} was rejected.*--accept-run {run_id}"):
        ensure_usable(url)
    assert ensure_usable(url, accept={run_id}, accepted_by="dr.steward") == [run_id]
    assert run_sql(url, "SELECT accepted_by, reason, accepted_at IS NOT NULL FROM ops.run_acceptance") == [
        ("dr.steward", "accepted with --accept-run", True)
    ]
    assert ensure_usable(url) == [run_id]  # the acceptance is remembered
    run_sql(url, "UPDATE ops.ingest_run SET status = 'succeeded'")
    with pytest.raises(RunRejected, match="has not been validated"):
        ensure_usable(url)
    with pytest.raises(ValueError, match="not rejected"):
        accept_run(url, run_id, "why not")


def test_validate_command_exits_non_zero_naming_table_expectation_and_rows(planted):
    url, run_id, settings = planted
    run_sql(
        url,
        "UPDATE ehr.encounter SET end_time = start_time - interval '1 hour' WHERE encounter_id = "
        "(SELECT min(encounter_id) FROM ehr.encounter)",
    )
    env = {**os.environ, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "COLUMNS": "200",
           "ODYSSEY_DQ_MAX_ROW_FAILURE_RATE": "0"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "odyssey_batch.cli.main", "validate", "--no-docs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert (
        "REJECTED" in proc.stdout and "ehr.encounter: end_not_before_start" in proc.stdout and "1 rows" in proc.stdout
    )
    accepted = subprocess.run(
        [
            sys.executable,
            "-m",
            "odyssey_batch.cli.main",
            "accept-run",
            str(run_id),
            "--reason",
            "known feed bug, fixed upstream",
            "--by",
            "steward",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert accepted.returncode == 0 and "accepted by steward" in accepted.stdout


# ----------------------------------------------------------------------------------------------------------------
# Times in the future: critical, whether or not the export has a transactionTime
# ----------------------------------------------------------------------------------------------------------------


def test_planted_future_event_rejects_the_run(planted):
    url, _, settings = planted  # Synthea-100 has no manifest: the bound is when the run started (+ tolerance)
    run_sql(
        url,
        "UPDATE ehr.observation SET effective_time = now() + interval '3 days' WHERE observation_id = "
        "(SELECT min(observation_id) FROM ehr.observation)",
    )
    verdict = _check(url, settings, "not_in_the_future", "critical", 1, "cross_table.observation")
    assert "cross_table.observation: not_in_the_future" in verdict.message()


def test_an_event_within_the_clock_tolerance_is_not_in_the_future(planted):
    url, _, settings = planted
    run_sql(
        url,
        "UPDATE ehr.observation o SET effective_time = r.started_at + interval '1 minute' FROM ops.ingest_run r "
        "WHERE r.run_id = o.run_id AND o.observation_id = (SELECT min(observation_id) FROM ehr.observation)",
    )
    assert validate(url, settings, data_docs=False).success
    verdict = validate(url, settings.with_overrides(dq_future_tolerance_s=30), data_docs=False)
    assert [(f.suite, f.expectation, f.unexpected_count) for f in verdict.critical_failures] == [
        ("cross_table.observation", "not_in_the_future", 1)
    ]


def test_planted_future_transaction_time_rejects_the_run(planted):
    url, run_id, settings = planted
    run_sql(url, "UPDATE ops.ingest_run SET transaction_time = started_at + interval '2 days' WHERE run_id = %s",
            (run_id,))  # fmt: skip
    _check(url, settings, "transaction_time_not_in_future", "critical", 1, "ingest")


def test_planted_future_last_updated_rejects_the_run(planted):
    url, _, settings = planted
    run_sql(
        url,
        "UPDATE fhir.resource SET last_updated = now() + interval '1 day' WHERE (resource_type, resource_id) IN "
        "(SELECT resource_type, resource_id FROM fhir.resource ORDER BY 1, 2 LIMIT 2)",
    )
    _check(url, settings, "last_updated_not_in_future", "critical", 2, "fhir.resource")


def test_planted_future_death_rejects_the_run(planted):
    url, _, settings = planted
    run_sql(
        url,
        "UPDATE ehr.patient SET death_time = now() + interval '10 days', deceased = true "
        "WHERE patient_id = (SELECT min(patient_id) FROM ehr.patient WHERE NOT deceased)",
    )
    _check(url, settings, "not_in_the_future", "critical", 1, "ehr.patient")


def test_an_export_with_a_future_event_is_loaded_then_rejected_by_the_gate(db_url, settings, tmp_path):
    """End to end: the event is valid FHIR, so ingest loads it; the gate rejects the run and says why."""
    from tests.test_ingest_bad_input import base_files, dump, observation, write_export

    files = base_files()
    files["Observation.ndjson"].append(
        dump(observation("o9", "p2", "e3", "2823-3", "Potassium", 4.1, "mmol/L", "2999-01-01T00:00:00Z"))
    )
    result = ingest(str(write_export(tmp_path / "export", files)), settings, url=db_url)
    assert result.counts["quarantined"] == 0 and result.counts["normalized"] == 11
    verdict = validate(db_url, settings, result.run_id, data_docs=False)
    assert not verdict.success
    assert [(f.suite, f.expectation, f.unexpected_count) for f in verdict.critical_failures] == [
        ("cross_table.observation", "not_in_the_future", 1)
    ]
    assert "cross_table.observation: not_in_the_future" in verdict.message() and "1 rows" in verdict.message()
    assert run_sql(db_url, "SELECT status FROM ops.ingest_run WHERE run_id = %s", (result.run_id,)) == [("rejected",)]
