"""Nightly scoring on a real warehouse: eligibility per task on hand-built timelines, one pass per patient equal
to a pass per task, atomic runs that replace the same as-of date, partitions equal to one run, a failure that
leaves the previous run intact, explanations, drift, and the command."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from odyssey_batch.labels.tasks import load_registry
from odyssey_batch.registry import promote
from odyssey_batch.registry.bundle import load_model, register_run
from odyssey_batch.scoring import run as scoring
from odyssey_batch.scoring.cohorts import eligible, record_as_of
from odyssey_batch.scoring.scorer import Request, one_pass, separate_passes
from odyssey_batch.sequences.grammar import TokenType, task_token
from odyssey_batch.sequences.timeline import DAY, Encounter, Event, PatientRecord, build_timeline
from odyssey_batch.sequences.tokens import window
from odyssey_batch.settings import Settings
from odyssey_batch.training.data import load_sequences
from odyssey_batch.training.finetune import FinetuneOptions, finetune
from odyssey_batch.training.pretrain import PretrainOptions
from tests.conftest import pretrained_warehouse, run_sql

pytestmark = pytest.mark.usefixtures("one_thread")
HOUR = 3600.0
T = dt.datetime(2025, 6, 1, tzinfo=dt.UTC).timestamp()
TASKS = ["mortality_30d", "los_7d", "readmission_30d", "hypertension_1y", "fluid_electrolyte_1y",
         "lipid_disorder_1y"]  # fmt: skip
HYPERTENSION = "SNOMED:38341003"


def patient(pid: str, encounters: list[tuple[str, float, float | None]], *, death: float | None = None,
            events: list[Event] = ()) -> PatientRecord:  # fmt: skip
    return PatientRecord(pid, T - 60 * 365 * DAY, death,
                         [Encounter(f"{pid}-e{i}", klass, start, end) for i, (klass, start, end) in
                          enumerate(encounters)], list(events))  # fmt: skip


def tasks_of(record: PatientRecord, as_of: float = T, **kw) -> dict[str, float]:
    timeline = build_timeline(record_as_of(record, as_of), as_of)
    return {e.task: e.prediction_time for e in eligible(timeline, load_registry(), TASKS, as_of, **kw)}


def test_eligibility_per_task_on_hand_built_timelines():
    # discharged 10 hours ago: the discharge tasks and the condition tasks, scored at the discharge
    discharged = patient("a", [("IMP", T - 5 * DAY, T - 10 * HOUR)])
    assert tasks_of(discharged) == {t: T - 10 * HOUR for t in TASKS if t != "los_7d"}
    # discharged 2 days ago: only the condition tasks look back that far (30 days)
    assert set(tasks_of(patient("b", [("IMP", T - 6 * DAY, T - 2 * DAY)]))) == {
        "hypertension_1y", "fluid_electrolyte_1y", "lipid_disorder_1y"}  # fmt: skip
    # in hospital for 30 hours: length of stay, scored 24 h after admission; 10 hours: nothing yet
    assert tasks_of(patient("c", [("IMP", T - 30 * HOUR, None)])) == {"los_7d": T - 6 * HOUR}
    assert tasks_of(patient("d", [("IMP", T - 10 * HOUR, None)])) == {}
    # the stay ends after the scoring time: at the scoring time it is still open (nothing from the future)
    assert tasks_of(patient("e", [("IMP", T - 30 * HOUR, T + 5 * DAY)])) == {"los_7d": T - 6 * HOUR}
    # a death before the scoring time: no score; an outpatient visit: no trigger
    assert tasks_of(patient("f", [("IMP", T - 5 * DAY, T - 10 * HOUR)], death=T - 2 * HOUR)) == {}
    assert tasks_of(patient("g", [("AMB", T - 10 * HOUR, T - 9 * HOUR)])) == {}
    # already diagnosed with hypertension at the discharge: not at risk of a first diagnosis
    known = patient("h", [("IMP", T - 5 * DAY, T - 10 * HOUR)],
                    events=[Event(T - 4 * DAY, TokenType.CONDITION, HYPERTENSION, "h-e0")])  # fmt: skip
    assert "hypertension_1y" not in tasks_of(known) and "lipid_disorder_1y" in tasks_of(known)
    # a diagnosis recorded after the scoring time is not known yet
    later = patient("i", [("IMP", T - 5 * DAY, T - 10 * HOUR)],
                    events=[Event(T + DAY, TokenType.CONDITION, HYPERTENSION, "i-e0")])  # fmt: skip
    assert "hypertension_1y" in tasks_of(later)
    # the active cohort: everyone seen in the last 30 days, every task, as of the scoring time
    assert tasks_of(patient("j", [("AMB", T - 20 * DAY, T - 20 * DAY + HOUR)]), cohort="active") == {
        t: T for t in TASKS}  # fmt: skip
    assert tasks_of(patient("k", [("AMB", T - 40 * DAY, T - 40 * DAY + HOUR)]), cohort="active") == {}


@pytest.fixture(scope="module")
def champion(pg_admin_url, template_db, tmp_path_factory):
    """A synthetic warehouse with a promoted tiny model."""
    home = tmp_path_factory.mktemp("home")
    options = PretrainOptions(preset="tiny", max_length=128, steps=6)
    with pretrained_warehouse(pg_admin_url, template_db, home, 150, 11, options, explain_band="low") as (
        url,
        settings,
        parent,
    ):  # explain every score; fmt: skip
        tuned = finetune(url, settings, parent, FinetuneOptions(max_length=128, batch_size=32, epochs=1, lr=3e-3))
        version = register_run(url, settings, tuned.training_run_id).model_version
        run_sql(url, """INSERT INTO ops.model_evaluation (model_version, task, split, method, metric, value)
                        VALUES (%s, 'los_7d', 'test', 'model', 'auroc', 0.7)""", (version,))  # fmt: skip
        assert promote(url, version).promote
        # a scoring time with discharges in the last 30 days: the latest inpatient discharge, plus one hour
        last = run_sql(url, "SELECT max(end_time) FROM ehr.encounter WHERE class_code = 'IMP'")[0][0]
        yield {"url": url, "settings": settings, "version": version, "as_of": last + dt.timedelta(hours=1)}


def test_one_pass_scores_equal_a_pass_per_task(champion):
    url, settings = champion["url"], champion["settings"]
    loaded = load_model(url, settings, champion["version"])
    from odyssey_batch.sequences.store import open_dataset

    _, rows = load_sequences(open_dataset(url, settings, loaded.dataset_version), "validation")
    requests = [Request(window(s, len(s["token_ids"]) - k, loaded.max_length - 1), float(s["times"][-1]) + 1, TASKS)
                for s in rows[:20] for k in (0, 3)]  # fmt: skip
    token_ids = {t: loaded.vocabulary.id(task_token(t)) for t in TASKS}
    one = one_pass(loaded.model, requests, token_ids, batch_size=7)
    each = separate_passes(loaded.model, requests, token_ids, batch_size=5)
    assert len(one) == len(requests) and all(len(x) == len(TASKS) for x in one)
    np.testing.assert_allclose(np.concatenate(one), np.concatenate(each), rtol=1e-4, atol=1e-5)
    assert np.ptp(np.concatenate(one)) > 0  # not a constant


def same_scores(a: list[tuple], b: list[tuple]) -> bool:
    """The same (patient, task, prediction time) keys, bands and probabilities (batches of other lengths may differ
    in float32's last bits)."""
    left = {(p, t, w): (x, band) for p, t, x, band, w in a}
    right = {(p, t, w): (x, band) for p, t, x, band, w in b}
    return left.keys() == right.keys() and all(
        left[k][1] == right[k][1] and left[k][0] == pytest.approx(right[k][0], rel=1e-4, abs=1e-7) for k in left
    )


def latest(url: str) -> list[tuple]:
    return run_sql(url, "SELECT patient_id, task, probability, risk_band, prediction_time FROM risk.latest_score")


def test_scoring_runs_are_atomic_partitioned_and_replace_the_same_date(champion, monkeypatch):
    url, settings, as_of = champion["url"], champion["settings"], champion["as_of"]
    first = scoring.score(url, settings, as_of)
    assert first.status == "succeeded" and first.n_scores > 0 and first.model_version == champion["version"]
    scores = latest(url)
    assert len(scores) == first.n_scores and len({s[0] for s in scores}) == first.n_patients
    assert all(0.0 <= p <= 1.0 for _, _, p, _, _ in scores)
    lookback = {t.name: dt.timedelta(hours=t.score_lookback_hours) for t in load_registry().tasks}
    assert all(as_of - lookback[task] < when <= as_of for _, task, _, _, when in scores)
    # the bands follow each task's validation threshold
    loaded = load_model(url, settings, champion["version"])
    for _, task, p, risk, _ in scores:
        assert risk == scoring.band(p, loaded.threshold(task), settings.risk_medium_fraction)
    # explanations (of every score here: band `low` and above): concept tokens known at the prediction time
    explained = run_sql(
        url,
        """SELECT e.patient_id, e.task, e.rank, e.token, e.event_time, s.prediction_time,
                                       s.risk_band
                                FROM risk.latest_explanation e JOIN risk.latest_score s USING (patient_id, task)""",
    )
    assert {(p, t) for p, t, *_ in explained} == {(p, t) for p, t, *_ in scores}
    assert all(t <= when for *_, t, when, _ in explained)
    assert all(token.split(":")[0] in ("cond", "proc", "med", "lab") for _, _, _, token, *_ in explained)
    assert {r[2] for r in explained} <= set(range(1, 6))

    # patients read a few at a time give the same scores (chunks of 7: every chunk after the first too)
    chunked = scoring.score(url, settings, as_of, scoring.ScoreOptions(chunk_patients=7))
    assert chunked.n_scores == first.n_scores and same_scores(latest(url), scores)

    # the same date again in 3 partitions: the same scores, the first run replaced in one transaction
    second = scoring.score(url, settings, as_of, scoring.ScoreOptions(partitions=3))
    assert run_sql(url, "SELECT run_id, status FROM risk.scoring_run ORDER BY run_id") == [(second.run_id, "succeeded")]
    assert same_scores(latest(url), scores)
    partitions = run_sql(url, "SELECT partition, n_scores FROM risk.scoring_partition WHERE run_id = %s ORDER BY 1",
                         (second.run_id,))  # fmt: skip
    assert [p for p, _ in partitions] == [0, 1, 2] and sum(n for _, n in partitions) == second.n_scores

    # a failure in the middle of a run: the previous run stays, the failed one leaves no rows
    real = scoring._score

    def breaks_on_partition_1(conn, settings_, loaded_, run, partition, options, report):
        if partition == 1:
            raise RuntimeError("injected failure")
        return real(conn, settings_, loaded_, run, partition, options, report)

    monkeypatch.setattr(scoring, "_score", breaks_on_partition_1)
    with pytest.raises(RuntimeError, match="injected failure"):
        scoring.score(url, settings, as_of, scoring.ScoreOptions(partitions=2))
    runs = run_sql(url, "SELECT run_id, status FROM risk.scoring_run ORDER BY run_id")
    assert runs[0] == (second.run_id, "succeeded") and runs[1][1] == "failed"
    assert run_sql(url, "SELECT count(*) FROM risk.score WHERE run_id = %s", (runs[1][0],)) == [(0,)]
    assert same_scores(latest(url), scores)


RISK_TABLES = {"risk.scoring_run": "run_id", "risk.scoring_partition": "run_id, partition",
               "risk.score": "run_id, patient_id, task", "risk.explanation": "run_id, patient_id, task, rank",
               "risk.score_distribution": "run_id, task"}  # fmt: skip


def published(url: str, *, without: tuple[int, ...] = ()) -> dict[str, list[tuple]]:
    """The full contents of every risk table (every column), but for the runs ``without``."""
    return {table: run_sql(url, f"SELECT * FROM {table} WHERE run_id <> ALL(%s) ORDER BY {key}", (list(without),))
            for table, key in RISK_TABLES.items()}  # fmt: skip


def run_state(url: str, run_id: int) -> tuple[str, str | None]:
    return run_sql(url, "SELECT status, error FROM risk.scoring_run WHERE run_id = %s", (run_id,))[0]


def test_a_failure_handler_after_the_commit_changes_nothing_published(champion, monkeypatch):
    url, settings, as_of = champion["url"], champion["settings"], champion["as_of"]
    committed = scoring.score(url, settings, as_of, scoring.ScoreOptions(partitions=2))
    before = published(url)
    assert before["risk.score"] and before["risk.explanation"] and before["risk.scoring_run"][-1][0] == committed.run_id
    # the commit task timed out (or its worker died) after its transaction committed: Airflow's failure leaf
    # calls the clean-up through the same step the DAG uses
    monkeypatch.setenv("ODYSSEY_DATABASE_URL", url)
    monkeypatch.setenv("ODYSSEY_HOME", str(settings.home))
    from odyssey_batch.orchestration import steps

    assert steps.fail_scoring(committed.run_id, "a partition or the commit failed in Airflow") is False
    assert scoring.fail_run(url, committed.run_id, RuntimeError("injected after the commit")) is False
    assert published(url) == before
    # a retried commit, or a retried partition, of the committed run is refused and changes nothing
    with pytest.raises(scoring.RunNotRunning, match="is succeeded, not running"):
        scoring.commit_run(url, settings, committed.run_id)
    with pytest.raises(scoring.RunNotRunning, match="is succeeded, not running"):
        scoring.score_partition(url, settings, committed.run_id, 1)
    assert published(url) == before


def test_a_dead_or_failed_run_is_never_committed_and_its_rows_go(champion):
    url, settings, as_of = champion["url"], champion["settings"], champion["as_of"]
    before = published(url)
    # a run whose process died after scoring its partition, before the commit
    dead = scoring.start_run(url, settings, as_of)
    scoring.score_partition(url, settings, dead, 0)
    assert run_sql(url, "SELECT count(*) > 0 FROM risk.score WHERE run_id = %s", (dead,)) == [(True,)]
    run_sql(url, "UPDATE risk.scoring_run SET heartbeat_at = now() - interval '31 minutes' WHERE run_id = %s", (dead,))
    late = scoring.start_run(url, settings, as_of)  # the next run of its kind sweeps it
    status, error = run_state(url, dead)
    assert status == "abandoned" and "no heartbeat since" in error and "more than 30 minutes" in error
    assert run_sql(url, "SELECT count(*) FROM risk.score WHERE run_id = %s", (dead,)) == [(0,)]
    assert run_sql(url, "SELECT count(*) FROM risk.explanation WHERE run_id = %s", (dead,)) == [(0,)]
    with pytest.raises(scoring.RunNotRunning, match=r"is abandoned .*no heartbeat since.*not running"):
        scoring.commit_run(url, settings, dead)
    with pytest.raises(scoring.RunNotRunning, match="is abandoned"):
        scoring.score_partition(url, settings, dead, 0)
    assert run_sql(url, "SELECT count(*) FROM risk.score WHERE run_id = %s", (dead,)) == [(0,)]
    # a failed run: never committed either
    assert run_state(url, late) == ("running", None)
    assert scoring.fail_run(url, late, RuntimeError("a partition failed for good")) is True
    with pytest.raises(scoring.RunNotRunning, match=r"is failed .*a partition failed for good"):
        scoring.commit_run(url, settings, late)
    assert run_state(url, late)[0] == "failed" and run_state(url, dead)[0] == "abandoned"
    assert published(url, without=(dead, late)) == before


def test_a_partition_is_not_written_into_a_run_that_failed_meanwhile(champion, monkeypatch):
    url, settings, as_of = champion["url"], champion["settings"], champion["as_of"]
    before = published(url)
    run = scoring.start_run(url, settings, as_of, scoring.ScoreOptions(partitions=2))
    real = scoring._score

    def another_partition_fails_for_good(conn, *args):
        scored = real(conn, *args)
        assert scored.rows
        scoring.fail_run(url, run, RuntimeError("partition 1 failed for good"))  # the failure leaf, meanwhile
        return scored

    monkeypatch.setattr(scoring, "_score", another_partition_fails_for_good)
    with pytest.raises(scoring.RunNotRunning, match="is failed"):
        scoring.score_partition(url, settings, run, 0, scoring.ScoreOptions(partitions=2))
    assert run_sql(url, "SELECT count(*) FROM risk.score WHERE run_id = %s", (run,)) == [(0,)]
    assert run_sql(url, "SELECT partition, status FROM risk.scoring_partition WHERE run_id = %s", (run,)) == [
        (0, "failed")
    ]
    assert published(url, without=(run,)) == before


def test_a_retried_start_reuses_its_run(champion):
    url, settings, as_of = champion["url"], champion["settings"], champion["as_of"]
    key = "nightly/scheduled__2026-01-02T02:00:00+00:00"
    first = scoring.start_run(url, settings, as_of, scoring.ScoreOptions(partitions=2), run_key=key)
    assert scoring.start_run(url, settings, as_of, scoring.ScoreOptions(partitions=2), run_key=key) == first
    assert run_sql(url, "SELECT count(*) FROM risk.scoring_run WHERE status = 'running'") == [(1,)]
    other = scoring.start_run(url, settings, as_of, scoring.ScoreOptions(partitions=1), run_key=key)
    assert other != first and run_state(url, first) == (
        "abandoned", "abandoned: superseded by a retried start of the same work with other options")  # fmt: skip
    scoring.score_partition(url, settings, other, 0)
    assert scoring.commit_run(url, settings, other).status == "succeeded"
    # the next night's key is other work: a new run
    assert scoring.start_run(url, settings, as_of, run_key=key.replace("01-02", "01-03")) != other


def test_a_retried_finetune_registers_one_candidate(champion, monkeypatch):
    url, settings = champion["url"], champion["settings"]
    monkeypatch.setenv("ODYSSEY_DATABASE_URL", url)
    monkeypatch.setenv("ODYSSEY_HOME", str(settings.home))
    from odyssey_batch.orchestration import steps

    parent = run_sql(url, "SELECT max(training_run_id) FROM ops.training_run WHERE kind = 'pretrain'")[0][0]
    key = "retrain/manual__2026-01-04/finetune"
    # the first try died while training: its run was left running under the key
    died = run_sql(url, """INSERT INTO ops.training_run (kind, dataset_version_id, preset, backend, device, seed,
                                                         options, parent_run_id, run_key)
                           SELECT 'finetune', dataset_version_id, preset, backend, device, seed, options,
                                  training_run_id, %s
                           FROM ops.training_run WHERE training_run_id = %s RETURNING training_run_id""",
                   (key, parent))[0][0]  # fmt: skip
    versions_before = run_sql(url, "SELECT count(*) FROM ops.model_version")[0][0]
    version = steps.finetune_model(parent, 1, 128, 0, key)
    assert run_sql(url, "SELECT status, error FROM ops.training_run WHERE training_run_id = %s", (died,)) == [
        ("abandoned", "abandoned: its try of the work ended without finishing; a retry took over")]  # fmt: skip
    # the task failed after registering (say, pushing its result): the retry registers nothing new
    assert steps.finetune_model(parent, 1, 128, 0, key) == version
    assert run_sql(url, "SELECT count(*) FROM ops.model_version")[0][0] == versions_before + 1
    assert run_sql(url, "SELECT status, count(*) FROM ops.training_run WHERE run_key = %s GROUP BY 1 ORDER BY 1",
                   (key,)) == [("abandoned", 1), ("succeeded", 1)]  # fmt: skip
    assert run_sql(url, "SELECT status FROM ops.model_version WHERE model_version = %s", (version,)) == [
        ("candidate",)]  # fmt: skip


def test_scoring_holds_back_patients_of_an_unaccepted_rejected_run_until_it_is_accepted(champion, tmp_path):
    from odyssey_batch.ingest import ingest
    from odyssey_batch.quality.gate import accept_run, validate

    url, as_of = champion["url"], champion["as_of"]
    settings = Settings(**{**champion["settings"].__dict__, "explain_band": "none"})
    active = scoring.ScoreOptions(cohort="active")  # everyone seen in the last 30 days
    good = scoring.score(url, settings, as_of, active)
    assert good.held_back_runs == [] and good.held_back_patients == 0
    scores = latest(url)
    # a later export re-delivers one encounter of each of three scored patients (changed), beside broken lines:
    # the gate rejects it, but the merge replaced those encounters in the warehouse
    touched = sorted({p for p, *_ in scores})[:3]
    assert len({p for p, *_ in scores}) > 10
    bodies = run_sql(url, """SELECT DISTINCT ON (patient_id) body FROM fhir.resource
                             WHERE resource_type = 'Encounter' AND patient_id = ANY(%s)
                             ORDER BY patient_id, resource_id""", (touched,))  # fmt: skip
    export = tmp_path / "later-export"
    export.mkdir()
    lines = [json.dumps({**body, "language": "en", "meta": {"versionId": "2", "lastUpdated": "2026-01-01T00:00:00Z"}})
             for (body,) in bodies] + ["{not json"] * 3  # fmt: skip
    (export / "Encounter.ndjson").write_text("\n".join(lines) + "\n")
    run = ingest(str(export), settings, url=url).run_id
    assert run_sql(url, "SELECT DISTINCT patient_id FROM ehr.encounter WHERE run_id = %s ORDER BY 1", (run,)) == [
        (p,) for p in touched]  # fmt: skip

    def held_back(result) -> None:
        assert result.held_back_runs == [run] and result.held_back_patients == 3
        now = latest(url)
        assert not {p for p, *_ in now} & set(touched)
        assert same_scores(now, [s for s in scores if s[0] not in touched])  # everyone else as before
        assert run_sql(url, "SELECT held_back_runs, held_back_patients FROM risk.scoring_runs WHERE run_id = %s",
                       (result.run_id,)) == [([run], 3)]  # fmt: skip

    held_back(scoring.score(url, settings, as_of, active))  # not validated yet: held back
    assert not validate(url, settings, run, data_docs=False).success
    held_back(scoring.score(url, settings, as_of, active))  # rejected, nobody accepted it: held back
    # forecasting refuses such a patient too (another patient is forecast as before)
    from odyssey_batch.forecast.render import patient_history
    from odyssey_batch.quality.gate import RunRejected
    from odyssey_batch.sequences.store import open_dataset

    dataset = open_dataset(url, settings, load_model(url, settings, champion["version"]).dataset_version)
    with pytest.raises(RunRejected, match=f"ingest run\\(s\\) {run}, rejected by the data-quality gate"):
        patient_history(url, dataset, touched[0])
    other = sorted({p for p, *_ in scores} - set(touched))[0]
    assert patient_history(url, dataset, other).streams["token_ids"].size > 0
    accept_run(url, run, "checked with the sending hospital", accepted_by="test")
    accepted = scoring.score(url, settings, as_of, active)
    assert accepted.held_back_runs == [] and accepted.held_back_patients == 0
    assert {p for p, *_ in latest(url)} == {p for p, *_ in scores}
    assert patient_history(url, dataset, touched[0]).streams["token_ids"].size > 0


def test_drift_against_previous_runs_and_the_command(champion):
    url, as_of = champion["url"], champion["as_of"]
    settings = Settings(**{**champion["settings"].__dict__, "explain_band": "none"})
    for days in (3, 2, 1):  # earlier nights
        scoring.score(url, settings, as_of - dt.timedelta(days=days), scoring.ScoreOptions(cohort="active"))
    tonight = scoring.score(url, settings, as_of, scoring.ScoreOptions(cohort="active"))
    stored = run_sql(url, "SELECT task, n, histogram, psi FROM risk.score_distribution WHERE run_id = %s",
                     (tonight.run_id,))  # fmt: skip
    assert {t for t, *_ in stored} == set(TASKS)
    for _, n, histogram, value in stored:
        assert n > 0 and sum(histogram) == pytest.approx(1.0) and value is not None and value >= 0
    strict = Settings(**{**settings.__dict__, "drift_max_unknown_rate": -1.0})
    flagged = scoring.score(url, strict, as_of, scoring.ScoreOptions(cohort="active"))
    assert flagged.drift_flagged and any("unknown-token rate" in r for r in flagged.drift["reasons"])
    assert run_sql(url, "SELECT drift_flagged FROM risk.scoring_runs WHERE run_id = %s", (flagged.run_id,)) == [(True,)]

    env = {**os.environ, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "COLUMNS": "160"}
    day = (as_of + dt.timedelta(days=1)).date().isoformat()
    args = ["score", "--as-of", day, "--cohort", "active", "--json"]
    proc = subprocess.run([sys.executable, "-m", "odyssey_batch.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded" and result["as_of"].startswith(day)
    assert set(result["scores_by_task"]) == set(TASKS)
    run_sql(url, "UPDATE ops.model_version SET status = 'retired'")
    none = subprocess.run([sys.executable, "-m", "odyssey_batch.cli.main", "score", "--as-of", day], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert none.returncode == 2 and "no champion" in none.stderr
