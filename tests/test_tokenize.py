"""Tokenization and labels against a real warehouse: real Synthea data, the synthetic export's exact truth,
leakage, determinism, the data-quality gate, and the commands."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from odyssey_batch.ingest import ingest
from odyssey_batch.labels.tasks import load_registry
from odyssey_batch.quality.gate import RunRejected, validate
from odyssey_batch.sequences.dataset import TokenizeOptions, tokenize
from odyssey_batch.sequences.extract import iter_records, patient_ids
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.sequences.timeline import build_timeline
from odyssey_batch.sequences.tokens import STREAMS, to_sequence
from odyssey_batch.settings import Settings
from odyssey_batch.synth import generate
from odyssey_batch.warehouse import connect
from tests.conftest import fresh_database, run_sql, shared_data
from tests.test_cli import cli

SYNTHEA_100 = "fhir/synthea-smart-100-ndjson"
OPTIONS = TokenizeOptions(min_count=2, chunk_patients=40)  # several chunks: the bounded-memory path


@pytest.fixture(scope="module")
def synthea(pg_admin_url, template_db, tmp_path_factory):
    """Synthea-100 loaded, validated and tokenized once."""
    settings = Settings(home=tmp_path_factory.mktemp("home"), ingest_workers=2)
    with fresh_database(pg_admin_url, template_db) as url:
        run = ingest(str(shared_data(SYNTHEA_100)), settings, url=url).run_id
        assert validate(url, settings, run, data_docs=False).success
        yield url, settings, tokenize(url, settings, OPTIONS)


# A separate, simple reference for the labels: plain SQL over the warehouse with the default registry's rules.
REFERENCE = """
WITH p AS (SELECT patient_id, death_time FROM ehr.patient),
imp AS (
    SELECT e.patient_id, e.encounter_id, e.start_time, e.end_time FROM ehr.encounter e JOIN p USING (patient_id)
    WHERE e.class_code = 'IMP' AND (p.death_time IS NULL OR e.start_time <= p.death_time)),
flagged AS (
    SELECT *, CASE WHEN start_time <= lag(end_time) OVER w + interval '6 hours' THEN 0 ELSE 1 END AS first
    FROM imp WINDOW w AS (PARTITION BY patient_id ORDER BY start_time, encounter_id)),
numbered AS (SELECT *, sum(first) OVER (PARTITION BY patient_id ORDER BY start_time, encounter_id) AS n FROM flagged),
stay AS (SELECT patient_id, n, min(start_time) s, max(end_time) e FROM numbered GROUP BY 1, 2),
discharge AS (
    SELECT stay.*, p.death_time FROM stay JOIN p USING (patient_id)
    WHERE e IS NOT NULL AND (p.death_time IS NULL OR p.death_time > e)),
dx AS (  -- when each diagnosis became known: recorded, else onset, never before its encounter
    SELECT c.patient_id, c.code_system, c.code,
           greatest(coalesce(c.recorded_time, c.onset_time), e.start_time) AS t
    FROM ehr.condition c LEFT JOIN ehr.encounter e USING (encounter_id) JOIN p ON p.patient_id = c.patient_id
    WHERE p.death_time IS NULL OR greatest(coalesce(c.recorded_time, c.onset_time), e.start_time) <= p.death_time),
first_dx AS (
    SELECT patient_id, min(t) FILTER (WHERE code IN ('38341003', '59621000') OR code ~ '^I1[0-6]') AS htn,
           min(t) FILTER (WHERE code IN ('89627008', '43339004', '34095006', '14140009') OR code ~ '^E8[67]') AS fe,
           min(t) FILTER (WHERE code IN ('55822004', '13644009', '302870006', '398036000') OR code ~ '^E78') AS lip
    FROM dx GROUP BY 1)
SELECT 'mortality_30d', count(*), count(*) FILTER (WHERE death_time <= e + interval '30 days') FROM discharge
UNION ALL
SELECT 'los_7d', count(*), count(*) FILTER (WHERE e - s > interval '7 days') FROM stay
WHERE e - s >= interval '24 hours'
UNION ALL
SELECT 'readmission_30d', count(*), count(*) FILTER (WHERE nxt <= e + interval '30 days') FROM (
    SELECT d.*, (SELECT min(s2.s) FROM stay s2 WHERE s2.patient_id = d.patient_id AND s2.s > d.e) AS nxt
    FROM discharge d) r
WHERE NOT coalesce(death_time <= e + interval '30 days' AND (nxt IS NULL OR nxt > death_time), false)
UNION ALL
SELECT 'hypertension_1y', count(*) FILTER (WHERE htn IS NULL OR htn > e),
       count(*) FILTER (WHERE htn > e AND htn <= e + interval '365 days 6 hours')
FROM discharge LEFT JOIN first_dx USING (patient_id)
UNION ALL
SELECT 'fluid_electrolyte_1y', count(*) FILTER (WHERE fe IS NULL OR fe > e),
       count(*) FILTER (WHERE fe > e AND fe <= e + interval '365 days 6 hours')
FROM discharge LEFT JOIN first_dx USING (patient_id)
UNION ALL
SELECT 'lipid_disorder_1y', count(*) FILTER (WHERE lip IS NULL OR lip > e),
       count(*) FILTER (WHERE lip > e AND lip <= e + interval '365 days 6 hours')
FROM discharge LEFT JOIN first_dx USING (patient_id)
"""


def test_label_counts_equal_a_reference_query_on_real_synthea(synthea):
    url, _, result = synthea
    reference = {task: (points, positives) for task, points, positives in run_sql(url, REFERENCE)}
    stored = {
        task: (points, positives)
        for task, points, positives in run_sql(
            url, "SELECT task, count(*), count(*) FILTER (WHERE label) FROM ehr.task_label GROUP BY 1"
        )
    }
    assert stored == reference
    assert {t: (c["points"], c["positive"]) for t, c in result.labels.items()} == reference
    # the real data has outcomes to learn from, and no point is censored (the data ends with the last record)
    assert reference["mortality_30d"][1] > 5 and reference["readmission_30d"][1] > 10
    assert run_sql(url, "SELECT count(*) FROM ehr.task_label WHERE censored OR label IS NULL") == [(0,)]


def test_dataset_files_manifest_and_streams(synthea):
    url, settings, result = synthea
    dataset = open_dataset(url, settings)
    manifest = dataset.manifest
    assert dataset.version == result.dataset_version_id and manifest["source_runs"] == result.source_runs
    assert manifest["split"]["salt"] == "odyssey-v1" and manifest["counts"]["patients"] == result.patients
    assert len(manifest["files"]["sequences"]) == 3  # 100 patients in chunks of 40
    assert (
        dataset.vocabulary.tokens[:3] == ("[PAD]", "[UNK]", "[MASK]") and len(dataset.vocabulary) == result.vocab_size
    )
    assert set(dataset.bins.edges) and all(len(e) <= 4 for e in dataset.bins.edges.values())
    tables = list(dataset.sequences())
    frame = pd.concat([t.to_pandas() for t in tables])
    assert len(frame) == 100 and frame.patient_id.is_unique
    assert frame.n_tokens.sum() == result.tokens
    for row in frame.itertuples():
        lengths = {len(getattr(row, s)) for s in STREAMS}
        assert lengths == {row.n_tokens}
        assert row.token_ids[0] == 3 and np.all(np.diff(row.times) >= 0)
    # splits stored with the sequences and the labels agree with the stable rule
    split_of = dict(zip(frame.patient_id, frame.split, strict=True))
    labels = dataset.labels().to_pandas()
    assert len(labels) == run_sql(url, "SELECT count(*) FROM ehr.task_label")[0][0]
    assert (labels.patient_id.map(split_of) == labels.split).all()
    # the cut of every point ends at or before its prediction time, and the next token is later
    by_patient = frame.set_index("patient_id")
    for row in labels.sample(200, random_state=1).itertuples():
        times = by_patient.loc[row.patient_id, "times"] * 86400.0
        when = row.prediction_time.timestamp()
        assert times[row.cut - 1] <= when + 1e-3 and (row.cut == len(times) or times[row.cut] > when - 1e-3)
    unk = result.unknown_rate
    assert 0 <= unk["train"] < unk["test"] < 0.2  # codes rarer than min_count in training are [UNK]


def test_editing_events_after_the_prediction_time_changes_nothing_before_it(synthea):
    url, _, _ = synthea
    dataset = open_dataset(url, synthea[1])
    bins, vocab, registry = dataset.bins, dataset.vocabulary, load_registry()
    conn = connect(url)
    try:
        records = [r for chunk in iter_records(conn, patient_ids(conn)[:60], 30) for r in chunk]
    finally:
        conn.close()
    from odyssey_batch.labels.points import task_points

    checked = 0
    for record in records:
        timeline = build_timeline(record)
        for point in task_points(timeline, registry, data_end=4e9):
            t = point.prediction_time
            before = to_sequence(timeline, bins)
            cut = before.known_at(t)
            # change every later event: another code, another value, another time (still after t), plus a new one
            edited = dataclasses.replace(record, events=[
                e if e.time is None or e.time <= t else e._replace(
                    code=e.code + "x", value=(e.value * 7 + 1) if e.value == e.value else 3.0, time=e.time + 3600)
                for e in record.events
            ] + [record.events[0]._replace(time=t + 1, code="SNOMED:999")])  # fmt: skip
            after = to_sequence(build_timeline(edited), bins)
            assert after.known_at(t) == cut
            assert np.array_equal(vocab.encode(after.tokens[:cut]), vocab.encode(before.tokens[:cut]))
            for stream in ("type_ids", "ages", "times", "visit_orders", "visit_segments"):
                assert np.array_equal(getattr(after, stream)[:cut], getattr(before, stream)[:cut]), stream
            checked += 1
    assert checked > 100


def test_tokenizing_twice_gives_the_same_vocabulary_and_sequences(synthea):
    url, settings, first = synthea
    second = tokenize(url, settings, OPTIONS)
    assert second.dataset_version_id == first.dataset_version_id + 1
    one, two = open_dataset(url, settings, first.dataset_version_id), open_dataset(url, settings)
    assert one.vocabulary == two.vocabulary and one.bins == two.bins
    for a, b in zip(one.sequences(), two.sequences(), strict=True):
        assert a.equals(b)
    assert one.labels().equals(two.labels())
    assert run_sql(url, "SELECT DISTINCT dataset_version_id FROM ehr.task_label") == [(second.dataset_version_id,)]


def test_labels_equal_the_synthetic_exports_exact_truth(pg_admin_url, template_db, tmp_path):
    """On a synthetic export every prediction point and label is known in advance (truth.parquet)."""
    settings = Settings(home=tmp_path / "home", ingest_workers=1)
    export = tmp_path / "export"
    generate(export, 160, 5)
    truth = pd.read_parquet(export / "truth.parquet")
    with fresh_database(pg_admin_url, template_db) as url:
        run = ingest(str(export), settings, url=url).run_id
        assert validate(url, settings, run, data_docs=False).success
        tokenize(url, settings, OPTIONS)
        ours = pd.DataFrame(
            run_sql(url, "SELECT task, patient_id, prediction_time, label, censored, index_encounter_id "
                         "FROM ehr.task_label"),
            columns=["task", "patient_id", "prediction_time", "label", "censored", "encounter_id"],
        )  # fmt: skip
    ours["prediction_time"] = pd.to_datetime(ours.prediction_time, utc=True)
    truth["prediction_time"] = pd.to_datetime(truth.prediction_time, utc=True)
    keys = ["task", "patient_id", "prediction_time"]
    merged = truth.merge(ours, on=keys, how="outer", suffixes=("_truth", ""), indicator=True)
    assert (merged._merge == "both").all(), merged[merged._merge != "both"][[*keys, "_merge"]].head()
    assert (merged.encounter_id == merged.encounter_id_truth).all()
    closed = merged[~merged.censored_truth]
    assert len(closed) > 1000 and set(closed.task) == set(load_registry().names)
    assert (closed.label == closed.label_truth).all()
    # where the export ends inside a window: positives already seen are labels, the rest is censored (NULL)
    open_ = merged[merged.censored_truth]
    assert open_.label.isna().sum() > 0 and (open_.label.dropna() == open_.label_truth[open_.label.notna()]).all()


def test_tokenize_refuses_a_rejected_run_until_accepted_and_show_patient(db_url, tmp_path):
    env = {"ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_INGEST_WORKERS": "1",
           "ODYSSEY_VOCAB_MIN_COUNT": "1"}  # fmt: skip
    # a zero threshold: the one planted row-level failure rejects the run (by default it would only be excluded)
    settings = Settings(home=tmp_path / "home", ingest_workers=1, dq_max_row_failure_rate=0.0)
    run = ingest(str(shared_data("fhir/smart-bulk-10-patients-partial")), settings, url=db_url).run_id
    refused = cli("tokenize", env=env, check=False)
    assert refused.returncode == 1 and f"run {run} has not been validated" in refused.stderr
    run_sql(db_url, "UPDATE ehr.encounter SET end_time = start_time - interval '1 hour' WHERE encounter_id = "
                    "(SELECT min(encounter_id) FROM ehr.encounter)")  # fmt: skip
    assert not validate(db_url, settings, run, data_docs=False).success
    with pytest.raises(RunRejected, match="rejected by the data-quality gate"):
        tokenize(db_url, settings)
    refused = cli("tokenize", env=env, check=False)
    assert refused.returncode == 1 and f"--accept-run {run}" in refused.stderr
    assert run_sql(db_url, "SELECT count(*) FROM ops.dataset_version") == [(0,)]

    accepted = cli("tokenize", "--accept-run", str(run), "--json", env=env, check=False)
    assert accepted.returncode == 0, accepted.stderr
    assert run_sql(db_url, "SELECT reason FROM ops.run_acceptance WHERE run_id = %s", (run,)) == [
        ("accepted with --accept-run",)
    ]
    busiest = "SELECT patient_id, count(*) FROM ehr.encounter GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1"
    pid, n_tokens = run_sql(db_url, busiest)[0]
    shown = cli("show-patient", pid, env=env, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "[CLS]" in shown.stdout and "visit 1 starts" in shown.stdout and "cond:SNOMED:" in shown.stdout
    assert pid not in shown.stdout  # the id is the query, not the output
    missing = cli("show-patient", "no-such-patient", env=env, check=False)
    assert missing.returncode == 2 and "no patient" in missing.stderr
    assert n_tokens > 0 and not math.isnan(float(n_tokens))
