"""The synthetic export generator: valid FHIR through ingest, deterministic, and a truth that is an oracle."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from odyssey_batch.ingest import ingest
from odyssey_batch.synth import generate
from odyssey_batch.synth.risk import TASKS, pending_onset_truth
from tests.conftest import run_sql

# Documented label prevalence bounds of the default generator (README, Synthetic data).
PREVALENCE_BOUNDS = {
    "mortality_30d": (0.05, 0.16),
    "los_7d": (0.25, 0.45),
    "readmission_30d": (0.08, 0.20),
    "hypertension_1y": (0.07, 0.22),
    "fluid_electrolyte_1y": (0.08, 0.25),
    "lipid_disorder_1y": (0.10, 0.28),
}
END = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def ndjson(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as fh:
        return [line for line in fh.read().split(b"\n") if line]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """2,000 patients: enough points per task to measure prevalence, calibration and AUROC."""
    out = tmp_path_factory.mktemp("synth") / "cohort"
    generate(out, 2000, seed=11, workers=2)
    return out


@pytest.fixture(scope="module")
def truth(cohort: Path) -> pd.DataFrame:
    return pd.read_parquet(cohort / "truth.parquet")


def test_round_trip_through_ingest_with_zero_quarantine(tmp_path, db_url, settings):
    out = tmp_path / "export"
    result = generate(out, 150, seed=3, workers=1)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["transactionTime"] == "2026-01-01T00:00:00Z"
    for entry in manifest["output"]:
        assert entry["count"] == len(ndjson(out / entry["url"])) == result.counts[entry["type"]]

    loaded = ingest(str(out), settings, url=db_url)
    assert loaded.counts["quarantined"] == 0 and loaded.counts["file_problems"] == 0
    assert loaded.manifest_mismatches == []
    assert "truth.parquet" in loaded.ignored  # ingest never reads the truth
    assert {t: c["loaded"] for t, c in loaded.counts["by_type"].items()} == {
        t: n for t, n in result.counts.items() if n
    }
    assert run_sql(db_url, "SELECT count(*) FROM ehr.patient")[0][0] == 150
    # Nothing happens after the export's transaction time; every visit has an end after its start.
    latest = run_sql(
        db_url,
        """SELECT greatest((SELECT max(end_time) FROM ehr.encounter), (SELECT max(effective_time) FROM ehr.observation),
                           (SELECT max(death_time) FROM ehr.patient))""",
    )[0][0]
    assert latest < END
    assert run_sql(db_url, "SELECT count(*) FROM ehr.encounter WHERE end_time IS NULL OR end_time < start_time") == [
        (0,)
    ]
    assert dict(run_sql(db_url, "SELECT code_system, count(*) > 0 FROM ehr.condition GROUP BY 1")) == {
        "ICD10CM": True,
        "SNOMED": True,
    }
    assert run_sql(db_url, "SELECT DISTINCT class_code FROM ehr.encounter ORDER BY 1") == [
        ("AMB",),
        ("EMER",),
        ("IMP",),
    ]
    # Every prediction point names its stay, at the exact time the warehouse shows for it.
    truth = pd.read_parquet(out / "truth.parquet")
    stays = {
        encounter: (start, end)
        for encounter, start, end in run_sql(
            db_url, "SELECT encounter_id, start_time, end_time FROM ehr.encounter WHERE class_code = 'IMP'"
        )
    }
    for task, encounter, when in zip(truth["task"], truth["encounter_id"], truth["prediction_time"], strict=True):
        start, end = stays[encounter]
        assert when.to_pydatetime() == (start + dt.timedelta(hours=24) if task == "los_7d" else end), task
    # Inpatient stays from hours to weeks.
    hours = run_sql(
        db_url,
        """SELECT min(extract(epoch FROM end_time - start_time)), max(extract(epoch FROM end_time - start_time))
           FROM ehr.encounter WHERE class_code = 'IMP'""",
    )[0]
    assert hours[0] < 24 * 3600 and hours[1] > 14 * 24 * 3600


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    generate(tmp_path / "a", 300, seed=4, workers=1)  # two shards
    generate(tmp_path / "b", 300, seed=4, workers=2)
    generate(tmp_path / "c", 300, seed=5, workers=2)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b
    assert set(a) == set(c) and all(a[name] != c[name] for name in a if name != "manifest.json")
    with pytest.raises(FileExistsError):
        generate(tmp_path / "a", 10, seed=4)


def test_prevalence_within_documented_bounds_and_the_truth_is_calibrated(truth):
    assert set(truth["task"]) == set(TASKS)
    uncensored = truth[~truth["censored"]]
    for task, (low, high) in PREVALENCE_BOUNDS.items():
        points = uncensored[uncensored["task"] == task]
        assert len(points) > 1000, task
        prevalence = points["label"].mean()
        assert low <= prevalence <= high, (task, prevalence)
        # The truth is the probability the outcome was drawn from: calibrated on average. For the condition
        # tasks a death before the onset hides it, so the labels fall slightly short of the truth there.
        excess = points["probability"].mean() - prevalence
        if task.endswith("_1y"):
            assert -0.01 < excess < 0.04, task
        else:
            assert abs(excess) < 0.02, task
        # ...and informative, yet not perfect.
        assert 0.65 < roc_auc_score(points["label"], points["probability"]) < 0.95, task


def test_prediction_points_follow_the_task_definitions(truth):
    counts = truth.groupby(["task", "patient_id", "prediction_time"]).size()
    assert counts.max() == 1  # one point per task, patient and time
    mortality = truth[truth["task"] == "mortality_30d"].set_index(["patient_id", "prediction_time"])
    readmission = truth[truth["task"] == "readmission_30d"].set_index(["patient_id", "prediction_time"])
    # A death within 30 days leaves a readmission point only if the readmission came first.
    died = mortality[mortality["label"]].index
    assert readmission.loc[readmission.index.isin(died), "label"].all()
    assert len(readmission) < len(mortality)
    # The condition tasks stop once the group is diagnosed: at most one positive point per patient whose
    # windows do not overlap, and no point after the onset.
    for task in ("hypertension_1y", "fluid_electrolyte_1y", "lipid_disorder_1y"):
        points = truth[truth["task"] == task].sort_values("prediction_time")
        for _, group in points.groupby("patient_id"):
            positives = group[group["label"]]["prediction_time"]
            if len(positives):
                assert (group["prediction_time"] <= positives.max()).all()
                assert positives.max() - positives.min() < pd.Timedelta(days=366)


def _features(cohort: Path, points: pd.DataFrame) -> np.ndarray:
    """Simple features straight from the export: age, last creatinine and lactate, prior stays."""
    birth = {}
    for line in ndjson(cohort / "Patient.ndjson.gz"):
        p = orjson.loads(line)
        birth[p["id"]] = dt.datetime.fromisoformat(p["birthDate"]).replace(tzinfo=dt.UTC)
    labs: dict[tuple[str, str], list[tuple[dt.datetime, float]]] = defaultdict(list)
    for line in ndjson(cohort / "Observation.ndjson.gz"):
        if b'"2160-0"' in line or b'"2524-7"' in line:
            o = orjson.loads(line)
            patient = o["subject"]["reference"].split("/")[1]
            code = o["code"]["coding"][0]["code"]
            labs[(patient, code)].append(
                (dt.datetime.fromisoformat(o["effectiveDateTime"]), o["valueQuantity"]["value"])
            )
    stays: dict[str, list[dt.datetime]] = defaultdict(list)
    for line in ndjson(cohort / "Encounter.ndjson.gz"):
        if b'"IMP"' in line:
            e = orjson.loads(line)
            stays[e["subject"]["reference"].split("/")[1]].append(dt.datetime.fromisoformat(e["period"]["start"]))

    def last(patient: str, code: str, when: dt.datetime, default: float) -> float:
        before = [v for t, v in labs[(patient, code)] if t <= when]
        return before[-1] if before else default

    rows = []
    for patient, when in zip(points["patient_id"], points["prediction_time"], strict=True):
        when = when.to_pydatetime()
        rows.append(
            [
                (when - birth[patient]).days / 365.25,
                np.log(last(patient, "2160-0", when, 1.0)),
                last(patient, "2524-7", when, 1.0),
                sum(1 for start in stays[patient] if start < when),
            ]
        )
    return np.array(rows)


def test_a_simple_model_beats_chance_and_the_oracle_beats_it(cohort, truth):
    points = truth[(truth["task"] == "mortality_30d") & ~truth["censored"]].reset_index(drop=True)
    features = _features(cohort, points)
    in_test = points["patient_id"].map(lambda p: int(p[:8], 16) % 2 == 0).to_numpy()  # split by patient
    model = LogisticRegression(max_iter=1000).fit(features[~in_test], points["label"][~in_test])
    simple = roc_auc_score(points["label"][in_test], model.predict_proba(features[in_test])[:, 1])
    oracle = roc_auc_score(points["label"][in_test], points["probability"][in_test])
    assert simple > 0.65  # the signal is there
    assert oracle > simple + 0.02  # and the truth knows more than age and two labs


def test_pending_onset_truth_is_exact():
    # No earlier draw: the truth is the draw's probability.
    assert pending_onset_truth([], 0.0, 0.2) == pytest.approx(0.2)
    # A draw of 0.5 half a year ago: pending with probability 0.5 * 0.5 / (0.25 + 0.5) = 1/3, else p.
    assert pending_onset_truth([(0.0, 0.5)], 0.5, 0.1, window=1.0) == pytest.approx(1 / 3 + 2 / 3 * 0.1)
    # Its window has passed: nothing can be pending any more.
    assert pending_onset_truth([(0.0, 0.5)], 2.0, 0.1, window=1.0) == pytest.approx(0.1)
    # Monte Carlo check of the same rule.
    rng = np.random.default_rng(0)
    draws, hits, kept = [(0.0, 0.4), (0.3, 0.3)], 0, 0
    for _ in range(200_000):
        onset = None
        for t, p in draws:
            if onset is None and rng.random() < p:
                onset = t + rng.random()
        if onset is not None and onset <= 0.6:
            continue  # observed before now: no prediction point
        kept += 1
        if onset is None and rng.random() < 0.25:
            onset = 0.6 + rng.random()
        hits += onset is not None and onset <= 1.6
    assert hits / kept == pytest.approx(pending_onset_truth(draws, 0.6, 0.25, window=1.0), abs=0.005)


def test_messy_export_and_late_arriving_files(tmp_path, db_url, settings):
    out = tmp_path / "messy"
    result = generate(out, 300, seed=9, messy=True, workers=1)
    assert result.late_counts["Observation"] > 0
    main = ingest(str(out), settings, url=db_url)
    # The corrected duplicates are the only thing refused; the late folder is another export.
    assert set(main.counts["quarantine_reasons"]) == {"superseded"}
    assert "late/manifest.json" in main.ignored and main.manifest_mismatches == []
    late = ingest(str(out / "late"), settings, url=db_url)
    assert late.counts["quarantined"] == 0  # every late lab finds its patient in the warehouse
    assert late.counts["loaded"] == result.late_counts["Observation"]
    assert late.counts["updated"] > 0  # some corrections arrived late
    units = dict(run_sql(db_url, "SELECT unit, count(*) FROM ehr.observation WHERE code = '2160-0' GROUP BY 1"))
    assert set(units) == {"mg/dL", "umol/L"} and units["umol/L"] < units["mg/dL"] / 10
    assert run_sql(db_url, "SELECT count(*) > 0 FROM ehr.encounter WHERE end_time IS NULL AND class_code = 'AMB'") == [
        (True,)
    ]
