"""Real hospital data: the MIMIC-IV Clinical Database Demo v2.2 on FHIR (``../shared/data/fhir-mimic``).

A fast test loads three patients' lines of every file (with the mimic-iv profile detected from meta.profile) and
checks exact counts; a slow one runs the whole documented command sequence on the full demo (README, "Running
on MIMIC-IV"): ingest -> validate -> tokenize -> pretrain -> finetune -> evaluate -> score (with explanations)
-> forecast.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from odyssey_batch.ingest import ingest
from odyssey_batch.quality.gate import validate
from odyssey_batch.sequences.dataset import TokenizeOptions, tokenize
from odyssey_batch.settings import Settings
from tests.conftest import run_sql, shared_data

DEMO = "fhir-mimic/mimic-iv-demo-fhir"
# Three of the demo's patients: one who died in hospital (discharge disposition DIED, date-only death), one who
# died later after two ICU stays, one with one admission and one ICU stay.
PATIENTS = ("28776290-4349-56d3-8c13-adc554feabb8", "af0e5009-d87d-52a8-ac8a-676e471c41f1",
            "740b7686-fa6d-5574-9779-f17ed7661cbe")  # fmt: skip
SHARED_TYPES = ("MimicMedication.", "MimicMedicationMix.", "MimicLocation.", "MimicOrganization.")
# Labs such as 50889 (C-reactive protein) come in mg/L and mg/dL: a warning (converted where UCUM allows, else
# binned per (code, unit)), never a rejection.
UNIT_CHECK = "one_unit_per_lab_code"


def _subset(target: Path, patients: tuple[str, ...]) -> Counter[str]:
    """Every line of the demo that belongs to one of ``patients`` (and all Medications, Locations and the
    Organization); returns the lines per resourceType."""
    target.mkdir()
    refs = [f"Patient/{p}" for p in patients]
    ids = [f'"id": "{p}"' for p in patients]
    per_type: Counter[str] = Counter()
    for path in sorted(shared_data(DEMO).glob("*.ndjson.gz")):
        keep_all = path.name.startswith(SHARED_TYPES)
        lines = []
        with gzip.open(path, "rt") as fh:
            for line in fh:
                if keep_all or any(r in line for r in refs) or (path.name.startswith("MimicPatient.")
                                                                and any(i in line for i in ids)):  # fmt: skip
                    lines.append(line)
                    per_type[json.loads(line)["resourceType"]] += 1
        with gzip.open(target / path.name, "wt") as out:
            out.writelines(lines)
    return per_type


def test_three_mimic_patients_load_completely_with_the_detected_profile(db_url, tmp_path):
    per_type = _subset(tmp_path / "export", PATIENTS)
    settings = Settings(home=tmp_path / "home", ingest_workers=1)
    result = ingest(str(tmp_path / "export"), settings, url=db_url)
    counts = result.counts
    assert result.source_profile == "mimic-iv"
    assert counts["records"] == sum(per_type.values()) == 2_888 and counts["quarantined"] == 0
    by_type = counts["by_type"]
    assert {t: c["records"] for t, c in by_type.items()} == dict(per_type)
    modelled = ("Patient", "Encounter", "Condition", "Procedure", "MedicationRequest", "Observation")
    for resource_type in modelled:  # every modelled resource normalized: no reference "resolves nowhere"
        assert by_type[resource_type]["normalized"] == per_type[resource_type], resource_type
    assert {t for t, c in by_type.items() if c["excluded"]} == set(per_type) - set(modelled)
    assert counts["excluded_reasons"] == {"not-modelled": sum(per_type.values()) - counts["normalized"]}
    assert per_type["Patient"] == 3 and per_type["Encounter"] == 9 and per_type["MedicationRequest"] == 134

    rows = run_sql(db_url, """SELECT count(*) FILTER (WHERE admission), count(part_of),
                                     count(*) FILTER (WHERE died_in_stay) FROM ehr.encounter""")  # fmt: skip
    assert rows == [(5, 4, 1)]  # 5 hospital admissions (classes EMER/OBSENC/AMB), 4 ICU stays, one death
    assert run_sql(db_url, "SELECT count(*) FROM ehr.condition WHERE code_system NOT IN ('ICD9CM', 'ICD10CM')") == [
        (0,)
    ]
    assert run_sql(db_url, "SELECT count(*) FROM ehr.medication_request WHERE code IS NULL") == [(0,)]
    deaths = run_sql(db_url, "SELECT death_time::text, death_date_only FROM ehr.patient WHERE death_time IS NOT "
                     "NULL ORDER BY 1", ())  # fmt: skip
    # date-only deaths are calendar dates in America/New_York (the server's session zone may differ)
    assert [d[1] for d in deaths] == [True, True]
    assert run_sql(db_url, "SELECT source_profile, shifted_dates, data_end IS NOT NULL FROM ops.ingest_run") == [
        ("mimic-iv", True, True)
    ]

    verdict = validate(db_url, settings, result.run_id, data_docs=False)
    # shifted dates are not "in the future"; every MIMIC code system is allowed; several units only warn
    assert verdict.success and verdict.critical_failures == []
    assert not [f for f in verdict.findings if f.expectation == "code_system_allowed" and not f.success]

    data = tokenize(db_url, settings, TokenizeOptions(min_count=1))
    assert data.source_profile == "mimic-iv"
    assert data.dropped == {}  # no clinical event is left out (labs outside admissions are outpatient days)
    clinical = sum(by_type[t]["normalized"] for t in ("Condition", "Procedure", "MedicationRequest", "Observation"))
    assert data.events == clinical
    assert data.events_by_type == {
        "condition": per_type["Condition"],
        "procedure": per_type["Procedure"],
        "medication": per_type["MedicationRequest"],
        "lab": per_type["Observation"],
    }
    # Checked by hand against the encounters: 5 admissions (EMER 4, AMB 1); the one that ended in death (DIED,
    # 18 h) is no discharge point and too short for los_7d; af0e5009 came back 11 days after a discharge;
    # hypertension and lipid disorders were coded at every patient's first discharge (no point), 28776290 got no
    # fluid/electrolyte code at the later stay.
    assert {t: (c["points"], c["positive"]) for t, c in data.labels.items()} == {
        "mortality_30d": (4, 0),
        "los_7d": (4, 0),
        "readmission_30d": (4, 1),
        "hypertension_1y": (0, 0),
        "fluid_electrolyte_1y": (1, 0),
        "lipid_disorder_1y": (0, 0),
    }


@pytest.mark.slow
def test_the_whole_pipeline_on_the_mimic_demo(db_url, tmp_path):
    """The command sequence of the README's "Running on MIMIC-IV", on the full demo (100 patients)."""
    from tests.test_cli import cli

    env = {"ODYSSEY_DATABASE_URL": db_url, "ODYSSEY_HOME": str(tmp_path / "home"), "ODYSSEY_INGEST_WORKERS": "2",
           "ODYSSEY_EXPLAIN_BAND": "low", "ODYSSEY_SOURCE_PROFILE": "mimic-iv"}  # fmt: skip

    seconds: dict[str, float] = {}

    def run(*args: str, check: bool = True) -> dict:
        started = time.perf_counter()
        proc = cli(*args, "--json", env=env, check=check, timeout=600)
        seconds[" ".join(args[:2] if args[0] == "train" else args[:1])] = round(time.perf_counter() - started, 1)
        return json.loads(proc.stdout)

    loaded = run("ingest", str(shared_data(DEMO)))
    assert loaded["records"] == 245_511 and loaded["quarantined"] == 0 and loaded["source_profile"] == "mimic-iv"
    by_type = loaded["by_type"]
    assert {t: by_type[t]["normalized"] for t in ("Patient", "Encounter", "Condition", "Procedure",
                                                  "MedicationRequest", "Observation")} == {
        "Patient": 100, "Encounter": 415, "Condition": 4_506, "Procedure": 2_190, "MedicationRequest": 17_552,
        "Observation": 135_636,
    }  # fmt: skip
    assert loaded["excluded_reasons"] == {"not-modelled": 85_112}

    verdict = run("validate", "--run-id", str(loaded["run_id"]), "--no-docs", check=False)
    assert verdict["success"] and verdict["critical_failures"] == [], verdict["critical_failures"]
    warned = {f["expectation"] for f in verdict["warnings"]}
    assert UNIT_CHECK in warned and warned <= {UNIT_CHECK, "not_after_death"}, warned

    data = run("tokenize")
    assert data["dropped"] == {} and data["events"] == 159_884
    assert all(c["points"] > 0 and c["positive"] > 0 for c in data["labels"].values()), data["labels"]
    pretrained = run("train", "pretrain", "--preset", "tiny", "--steps", "20", "--max-length", "256",
                     "--batch-size", "8", "--threads", "2")  # fmt: skip
    tuned = run("train", "finetune", "--from", str(pretrained["training_run_id"]), "--epochs", "1",
                "--max-length", "256", "--threads", "2")  # fmt: skip
    version = str(tuned["model_version"])
    evaluation = run("evaluate", version, "--baselines", "none", "--resamples", "50", "--threads", "2")
    assert {row["task"] for row in evaluation["table"]} == set(data["labels"])  # 100 patients: wide intervals
    cli("models", "promote", version, "--force", "--reason", "first model on MIMIC", env=env)
    # shifted dates: the scoring time is the end of the data, and every patient of the demo counts as active
    scored = run("score", "--cohort", "active", "--active-days", "40000", "--as-of", data["data_end"], "--threads", "2")
    assert scored["n_scores"] > 0
    assert run_sql(db_url, "SELECT count(*) FROM risk.explanation")[0][0] > 0
    patient = run_sql(db_url, "SELECT patient_id FROM ehr.patient ORDER BY patient_id LIMIT 1")[0][0]
    forecast = run("forecast", patient, "--steps", "8", "--seed", "1", "--threads", "2")
    assert forecast
    print(json.dumps({"seconds": seconds, "ingest": loaded, "validate": verdict, "tokenize": data,
                      "evaluate": evaluation["table"], "score": scored}, default=str))  # fmt: skip
