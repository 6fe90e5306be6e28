"""A gate at the right granularity, with real Great Expectations on a real warehouse: row-level failures exclude
their records (or patients) below a per-check threshold and reject above it; tokenize and scoring skip what was
excluded and say how many; lab units are converted where UCUM allows, else binned per (code, unit)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from urllib.parse import urlsplit

import pytest

from odyssey_batch.ingest import ingest
from odyssey_batch.quality.exclusions import parse_rates
from odyssey_batch.quality.gate import validate
from odyssey_batch.sequences.dataset import TokenizeOptions, tokenize
from odyssey_batch.sequences.labs import LabUnits
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.sequences.ucum import factor
from odyssey_batch.settings import Settings, load_settings
from odyssey_batch.warehouse import create_database, drop_database, with_database
from tests.conftest import fresh_database, run_sql, shared_data

SYNTHEA_100 = "fhir/synthea-smart-100-ndjson"
# Three numeric lab results of three living patients, each inside its encounter (so each is one event token).
THREE_LABS = """SELECT o.observation_id FROM ehr.observation o JOIN ehr.patient p USING (patient_id)
                JOIN ehr.encounter e USING (encounter_id)
                WHERE o.category = 'laboratory' AND o.value_num IS NOT NULL AND NOT p.deceased
                  AND o.effective_time BETWEEN e.start_time AND coalesce(e.end_time, e.start_time)
                  AND NOT EXISTS (SELECT 1 FROM ehr.observation_component c WHERE c.observation_id = o.observation_id)
                  AND o.patient_id IN (SELECT patient_id FROM ehr.patient WHERE NOT deceased ORDER BY patient_id
                                       LIMIT 3)
                ORDER BY o.patient_id, o.observation_id"""


@pytest.fixture(scope="module")
def loaded(pg_admin_url, template_db, tmp_path_factory):
    """Synthea-100 loaded and validated once, tokenized once (the clean reference); tests work on copies."""
    settings = Settings(home=tmp_path_factory.mktemp("home"), ingest_workers=2)
    with fresh_database(pg_admin_url, template_db) as url:
        run_id = ingest(str(shared_data(SYNTHEA_100)), settings, url=url).run_id
        assert validate(url, settings, run_id, data_docs=False).success
        clean = tokenize(url, settings, TokenizeOptions(min_count=1))
        yield url, run_id, clean


@pytest.fixture
def warehouse(loaded, pg_admin_url, tmp_path):
    url, run_id, clean = loaded
    name = f"odyssey_gate_{os.getpid()}_{tmp_path.name[-12:]}".lower().replace("-", "_")
    create_database(pg_admin_url, name, template=urlsplit(url).path.lstrip("/"))
    try:
        yield with_database(pg_admin_url, name), run_id, clean, Settings(home=tmp_path / "home")
    finally:
        drop_database(pg_admin_url, name)


def plant_labs_before_birth(url: str) -> list[tuple[str, str]]:
    """Move one lab result of each of three living patients to ten days before their birth."""
    chosen = run_sql(url, f"SELECT DISTINCT ON (patient_id) observation_id, patient_id FROM ({THREE_LABS}) x "
                          "JOIN ehr.observation USING (observation_id) "
                          "ORDER BY patient_id, observation_id")  # fmt: skip
    assert len(chosen) == 3
    run_sql(url, """UPDATE ehr.observation o SET effective_time = p.birth_date - interval '10 days'
                    FROM ehr.patient p WHERE p.patient_id = o.patient_id AND o.observation_id = ANY(%s)""",
            ([o for o, _ in chosen],))  # fmt: skip
    return chosen


def finding(verdict, suite: str, name: str):
    [found] = [f for f in verdict.findings if (f.suite, f.expectation) == (suite, name)]
    return found


def test_a_few_bad_rows_are_excluded_and_the_run_passes(warehouse):
    url, run_id, clean, settings = warehouse
    chosen = plant_labs_before_birth(url)
    observations = run_sql(url, "SELECT count(*) FROM ehr.observation")[0][0]
    verdict = validate(url, settings, data_docs=False)
    assert verdict.success and verdict.critical_failures == [], verdict.message()
    found = finding(verdict, "cross_table.observation", "not_before_birth")
    assert found.success and found.excluded_rows == 3 and found.unexpected_count == 3
    assert found.failure_rate == pytest.approx(3 / observations) and found.max_failure_rate == 0.001
    assert verdict.exclusions == [found] and verdict.excluded_records == 3 and verdict.excluded_patients == 0
    message = verdict.message()
    assert "passed" in message and "excluded from everything downstream: 3 records, 0 patients whole" in message
    assert "excluded cross_table.observation: not_before_birth" in message and "3 rows" in message
    assert run_sql(url, "SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,)) == [("validated",)]
    # the queryable table: one row per excluded record, with the check, the level and the reason
    rows = run_sql(url, """SELECT resource_type, resource_id, patient_id, level, check_name, suite, source_run_id,
                                  reason FROM ops.dq_exclusion_current ORDER BY patient_id""")  # fmt: skip
    assert [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("Observation", o, p, "record", "not_before_birth", "cross_table.observation", run_id) for o, p in chosen
    ]
    assert all("before the patient's birth" in r[7] for r in rows)
    assert run_sql(url, """SELECT excluded_rows, failure_rate, max_failure_rate FROM ops.dq_result
                           WHERE check_id = %s AND expectation = 'not_before_birth'
                             AND suite = 'cross_table.observation'""",
                   (verdict.check_id,)) == [(3, pytest.approx(3 / observations), 0.001)]  # fmt: skip
    assert run_sql(url, "SELECT excluded_records, excluded_patients FROM ops.dq_check WHERE check_id = %s",
                   (verdict.check_id,)) == [(3, 0)]  # fmt: skip

    # tokenize leaves exactly those three results out, and says so
    result = tokenize(url, settings, TokenizeOptions(min_count=1))
    assert result.excluded == {"patients": 0, "records": 3, "Observation": 3}
    assert result.events == clean.events - 3 and result.dropped == clean.dropped
    assert result.patients == clean.patients
    assert run_sql(url, "SELECT excluded_patients, excluded_records, summary->'excluded' FROM ops.dataset_version "
                        "WHERE dataset_version_id = %s", (result.dataset_version_id,)) == [
        (0, 3, {"patients": 0, "records": 3, "Observation": 3})]  # fmt: skip
    assert open_dataset(url, settings, result.dataset_version_id).excluded == result.excluded


def test_the_same_share_above_a_threshold_rejects_and_overrides_apply_per_check(warehouse):
    url, run_id, _, settings = warehouse
    plant_labs_before_birth(url)
    observations = run_sql(url, "SELECT count(*) FROM ehr.observation")[0][0]
    share = 3 / observations

    strict = settings.with_overrides(dq_max_row_failure_rate=share / 2)
    verdict = validate(url, strict, data_docs=False)
    assert not verdict.success
    [found] = verdict.critical_failures
    assert (found.suite, found.expectation, found.unexpected_count) == (
        "cross_table.observation",
        "not_before_birth",
        3,
    )
    assert found.failure_rate == pytest.approx(share) and found.max_failure_rate == pytest.approx(share / 2)
    assert "REJECTED" in verdict.message() and "cross_table.observation: not_before_birth" in verdict.message()
    assert run_sql(url, "SELECT status FROM ops.ingest_run WHERE run_id = %s", (run_id,)) == [("rejected",)]
    # the rows are recorded all the same (a steward who accepts the run still builds without them)
    assert run_sql(url, "SELECT count(*) FROM ops.dq_exclusion_current") == [(3,)]

    # a per-check override lifts it for that check only; a zero threshold for it rejects at any row
    lenient = strict.with_overrides(dq_row_failure_rates="not_before_birth=0.01")
    assert validate(url, lenient, data_docs=False).success
    zero = settings.with_overrides(dq_row_failure_rates="cross_table.observation:not_before_birth=0")
    verdict = validate(url, zero, data_docs=False)
    assert [(f.suite, f.expectation) for f in verdict.critical_failures] == [
        ("cross_table.observation", "not_before_birth")]  # fmt: skip
    other = settings.with_overrides(dq_row_failure_rates="cross_table.encounter:not_before_birth=0")
    assert validate(url, other, data_docs=False).success
    # each check replaces the exclusions in force of its run: still the same three
    assert run_sql(url, "SELECT count(*), count(DISTINCT check_id) FROM ops.dq_exclusion_current") == [(3, 1)]
    assert run_sql(url, "SELECT count(*) FROM ops.dq_exclusion") == [(12,)]


def test_row_failure_rate_settings_are_parsed_and_checked():
    env = {"ODYSSEY_DQ_MAX_ROW_FAILURE_RATE": "0.02", "ODYSSEY_DQ_ROW_FAILURE_RATES": "a=0.01, s.t:b=0"}
    settings = load_settings(env)
    assert settings.dq_max_row_failure_rate == 0.02
    assert parse_rates(settings.dq_row_failure_rates) == {"a": 0.01, "s.t:b": 0.0}
    for bad in ("a", "a=x", "a=1.5", "=0.1", "a=-0.1"):
        with pytest.raises(ValueError, match="dq_row_failure_rates"):
            parse_rates(bad)


def test_a_structural_record_excludes_the_patient_from_tokenize(warehouse):
    url, _, clean, settings = warehouse
    [(pid,)] = run_sql(url, "SELECT patient_id FROM ehr.patient WHERE NOT deceased ORDER BY patient_id LIMIT 1")
    run_sql(url, "UPDATE ehr.patient SET death_time = birth_date - interval '30 days' WHERE patient_id = %s", (pid,))
    # one patient of 100 is 1%, above the default 0.1%: a steward allows up to 2% for this check
    assert not validate(url, settings, data_docs=False).success
    settings = settings.with_overrides(dq_row_failure_rates="death_not_before_birth=0.02")
    verdict = validate(url, settings, data_docs=False)
    assert verdict.success, verdict.message()
    found = finding(verdict, "ehr.patient", "death_not_before_birth")
    assert found.success and found.excluded_rows == 1 and verdict.excluded_patients == 1
    assert "0 records, 1 patients whole" in verdict.message()
    assert run_sql(url, "SELECT resource_type, resource_id, patient_id, level FROM ops.dq_exclusion_current") == [
        ("Patient", pid, pid, "patient")]  # fmt: skip

    result = tokenize(url, settings, TokenizeOptions(min_count=1))
    assert result.excluded == {"patients": 1, "records": 0}
    assert sum(result.patients.values()) == sum(clean.patients.values()) - 1
    assert run_sql(url, "SELECT count(*) FROM ehr.task_label WHERE patient_id = %s", (pid,)) == [(0,)]
    dataset = open_dataset(url, settings, result.dataset_version_id)
    assert all(pid not in t.column("patient_id").to_pylist() for t in dataset.sequences())
    with pytest.raises(LookupError, match="excluded this patient"):
        from odyssey_batch.sequences.view import patient_view

        patient_view(url, dataset, pid)


def test_a_lab_code_switching_unit_across_the_feed_rejects(warehouse, tmp_path):
    url, _, _, settings = warehouse
    code = "2339-0"  # glucose, in mg/dL throughout the first export
    bodies = run_sql(
        url,
        """SELECT body FROM fhir.resource WHERE resource_type = 'Observation'
                             AND body->'code'->'coding'->0->>'code' = %s ORDER BY resource_id LIMIT 5""",
        (code,),
    )

    def export(unit: str, scale: float, name: str) -> int:
        folder = tmp_path / name
        folder.mkdir()
        lines = []
        for (body,) in bodies:
            quantity = body["valueQuantity"]
            quantity = {**quantity, "value": round(quantity["value"] * scale, 4), "unit": unit, "code": unit}
            lines.append(json.dumps({**body, "valueQuantity": quantity, "meta": {"versionId": name}}))
        (folder / "Observation.ndjson").write_text("\n".join(lines) + "\n")
        return ingest(str(folder), settings, url=url).run_id

    same = export("mg/dL", 1.01, "same-unit")  # new values, the unit the code always had: passes
    verdict = validate(url, settings, same, data_docs=False)
    assert verdict.success and finding(verdict, "ehr.observation", "lab_unit_switched").success
    switched = export("g/L", 0.01, "switched")  # every result of the code now in g/L: the feed changed
    verdict = validate(url, settings, switched, data_docs=False)
    assert [(f.suite, f.expectation, f.unexpected_count) for f in verdict.critical_failures] == [
        ("ehr.observation", "lab_unit_switched", 5)]  # fmt: skip
    # across the warehouse, a code in a second unit is a warning now (the tokenizer converts g/L exactly)
    assert finding(verdict, "ehr.observation", "one_unit_per_lab_code").severity == "warning"


def test_ucum_conversions_are_exact_and_nothing_else_converts():
    assert factor("g/L", "mg/dL") == pytest.approx(100.0)
    assert factor("mg/dL", "g/L") == pytest.approx(0.01)
    assert factor("umol/L", "mmol/L") == pytest.approx(0.001)
    assert factor("10*3/uL", "10*9/L") == 1.0 and factor("/uL", "10*6/L") == 1.0
    assert factor("[lb_av]", "kg") == pytest.approx(0.45359237)
    assert factor("%", "L/L") == pytest.approx(0.01)
    assert factor("mL/min/{1.73_m2}", "L/h/{1.73_m2}") == pytest.approx(0.06)
    for a, b in [("mg/dL", "mmol/L"), ("mmol/L", "meq/L"), ("Cel", "[degF]"), ("mm[Hg]", "kPa"), ("U/L", "[IU]/L"),
                 ("mL/min/{1.73_m2}", "mL/min"), ("mmHg", "mm[Hg]"), ("mg/(24.h)", "mg/d")]:  # fmt: skip
        assert factor(a, b) is None, (a, b)


def test_lab_units_pick_a_main_unit_convert_or_bin_per_unit():
    units = LabUnits.fit({("L:1", "mg/dL"): 90, ("L:1", "g/L"): 20, ("L:1", "mmol/L"): 100, ("L:2", "%"): 5})
    # mg/dL and g/L convert into each other (110 results) and outweigh mmol/L (100): mg/dL is the main unit
    assert units.main == {"L:1": "mg/dL", "L:2": "%"}
    assert units.place("L:1", "mg/dL", 120.0) == ("L:1", 120.0, "mg/dL")
    assert units.place("L:1", "g/L", 1.2) == ("L:1", pytest.approx(120.0), "mg/dL")
    assert units.place("L:1", "mmol/L", 6.6) == ("L:1[mmol/L]", 6.6, "mmol/L")
    assert units.place("L:1", None, 3.0) == ("L:1", 3.0, None)
    assert units.place("L:3", "g/L", 3.0) == ("L:3", 3.0, "g/L")  # a code the units never saw: as it is


def test_tokenize_converts_exact_units_and_bins_the_rest_per_code_and_unit(warehouse):
    url, _, clean, settings = warehouse
    codes = run_sql(url, """SELECT code FROM ehr.observation WHERE unit = 'mg/dL' AND category = 'laboratory'
                            AND code NOT IN ('2339-0', '2345-7', '2160-0') AND value_num IS NOT NULL
                            GROUP BY code ORDER BY count(*) DESC, code LIMIT 2""")  # fmt: skip
    converted, separate = codes[0][0], codes[1][0]
    picked = "SELECT observation_id FROM ehr.observation WHERE code = %s ORDER BY observation_id LIMIT 40"
    before = dict(run_sql(url, "SELECT observation_id, value_num FROM ehr.observation WHERE observation_id IN "
                               f"({picked})", (converted,)))  # fmt: skip
    run_sql(url, f"UPDATE ehr.observation SET unit = 'g/L', value_num = value_num / 100 "
                 f"WHERE observation_id IN ({picked})",
            (converted,))  # fmt: skip
    run_sql(url, f"UPDATE ehr.observation SET unit = 'mmol/L' WHERE observation_id IN ({picked})", (separate,))
    verdict = validate(url, settings, data_docs=False)
    assert verdict.success, verdict.message()
    assert finding(verdict, "ehr.observation", "one_unit_per_lab_code").unexpected_count == 80  # a warning

    result = tokenize(url, settings, TokenizeOptions(min_count=1))
    dataset = open_dataset(url, settings, result.dataset_version_id)
    tokens = set(dataset.vocabulary.tokens)
    units = dataset.bins.units.main
    assert units[f"LOINC:{converted}"] == "mg/dL" and units[f"LOINC:{separate}"] == "mg/dL"
    # g/L was converted to mg/dL: no lab of its own, and the code keeps its bins and token format
    assert not any(t.startswith(f"lab:LOINC:{converted}[") for t in tokens)
    assert f"lab:LOINC:{converted}:q0" in tokens
    # mmol/L does not convert without a molar mass: binned on its own, per (code, unit)
    assert f"LOINC:{separate}[mmol/L]" in dataset.bins.edges
    assert any(t.startswith(f"lab:LOINC:{separate}[mmol/L]:q") for t in tokens)
    assert f"lab:LOINC:{separate}:q0" in tokens
    assert result.events == clean.events

    from odyssey_batch.sequences.extract import read_patients
    from odyssey_batch.warehouse import connect

    conn = connect(url)
    try:
        pids = [p for (p,) in run_sql(url, f"SELECT DISTINCT patient_id FROM ehr.observation WHERE observation_id IN "
                                          f"({picked})", (converted,))]  # fmt: skip
        values = [e.value for r in read_patients(conn, pids, units=dataset.bins.units) for e in r.events
                  if e.code == f"LOINC:{converted}" and e.unit == "mg/dL"]  # fmt: skip
    finally:
        conn.close()
    for original in before.values():  # every converted value is back at its mg/dL value (exactly, to rounding)
        assert any(math.isclose(v, original, rel_tol=1e-12) for v in values)


def test_scoring_skips_excluded_patients_and_counts_them(pg_admin_url, template_db, tmp_path):
    from odyssey_batch.registry import promote
    from odyssey_batch.registry.bundle import register_run
    from odyssey_batch.scoring import run as scoring
    from odyssey_batch.training.finetune import FinetuneOptions, finetune
    from odyssey_batch.training.pretrain import PretrainOptions
    from tests.conftest import pretrained_warehouse

    options = PretrainOptions(preset="tiny", max_length=64, steps=2)
    with pretrained_warehouse(pg_admin_url, template_db, tmp_path / "home", 60, 5, options,
                              explain_band="none") as (url, settings, parent):  # fmt: skip
        tuned = finetune(url, settings, parent, FinetuneOptions(max_length=64, batch_size=32, epochs=1))
        assert tuned.excluded == {"patients": 0, "records": 0}
        version = register_run(url, settings, tuned.training_run_id).model_version
        run_sql(url, """INSERT INTO ops.model_evaluation (model_version, task, split, method, metric, value)
                        VALUES (%s, 'los_7d', 'test', 'model', 'auroc', 0.7)""", (version,))  # fmt: skip
        assert promote(url, version).promote
        last = run_sql(url, "SELECT max(end_time) FROM ehr.encounter")[0][0]
        as_of = last + dt.timedelta(hours=1)
        active = scoring.ScoreOptions(cohort="active", active_days=365.0)
        first = scoring.score(url, settings, as_of, active)
        scored = sorted({p for (p,) in run_sql(url, "SELECT patient_id FROM risk.latest_score")})
        assert first.excluded_patients == 0 and len(scored) > 3
        # the gate excludes two scored patients whole (the exclusions in force, as the gate writes them)
        [(check_id, run_id)] = run_sql(url, "SELECT max(check_id), max(run_id) FROM ops.dq_check")
        run_sql(url, """INSERT INTO ops.dq_exclusion (check_id, run_id, source_run_id, suite, check_name, resource_type,
                                                      resource_id, patient_id, level, reason)
                        SELECT %s, %s, %s, 'ehr.patient', 'death_not_before_birth', 'Patient', p, p, 'patient', 'test'
                        FROM unnest(%s::text[]) p""", (check_id, run_id, run_id, scored[:2]))  # fmt: skip
        second = scoring.score(url, settings, as_of, active)  # replaces the first run of that as-of
        assert second.excluded_patients == 2 and second.n_patients == first.n_patients - 2
        assert run_sql(url, "SELECT count(*) FROM risk.score WHERE run_id = %s AND patient_id = ANY(%s)",
                       (second.run_id, scored[:2])) == [(0,)]  # fmt: skip
        assert run_sql(url, "SELECT excluded_patients FROM risk.scoring_runs WHERE run_id = %s", (second.run_id,)) == [
            (2,)]  # fmt: skip
