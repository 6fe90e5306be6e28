"""Source profiles: loading and validation (built-in and a hospital's own TOML), detection from meta.profile,
code-system aliases, the zone of date-only values, admissions, and the death-date rule of labels."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from odyssey_batch.ingest import codes
from odyssey_batch.ingest.normalize import Context, normalize
from odyssey_batch.labels.points import inpatient_stays, task_points
from odyssey_batch.labels.tasks import load_registry
from odyssey_batch.profiles import GENERIC, detect_profile, load_profile
from odyssey_batch.profiles.profile import parse_profile
from odyssey_batch.sequences.extract import day_end
from odyssey_batch.sequences.grammar import TokenType
from odyssey_batch.sequences.timeline import DAY, Encounter, Event, PatientRecord, build_timeline

MIMIC = "http://mimic.mit.edu/fhir/mimic"
NY = ZoneInfo("America/New_York")
REGISTRY = load_registry()


def _t(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_builtin_profiles_load_and_generic_is_todays_behaviour():
    generic = load_profile("generic")
    assert load_profile("") is GENERIC
    for same in ("timezone", "shifted_dates", "admission_class_codes", "condition_time", "outside_encounters"):
        assert getattr(generic, same) == getattr(GENERIC, same)
    assert generic.code_systems == {} and generic.admission_class_codes == {"IMP"} and not generic.shifted_dates
    mimic = load_profile("mimic-iv")
    assert mimic.timezone == "America/New_York" and mimic.shifted_dates
    assert mimic.condition_time == "encounter_end" and mimic.outside_encounters == "day"
    assert mimic.medication_mix == "first_ingredient" and generic.medication_mix == "exclude"
    assert mimic.code_systems[f"{MIMIC}/CodeSystem/mimic-diagnosis-icd9"] == "ICD9CM"
    assert mimic.code_systems[f"{MIMIC}/CodeSystem/mimic-diagnosis-icd10"] == "ICD10CM"
    assert {"ICD9CM", "ICD10CM", "ICD10PCS", "NDC", "MIMIC_LABITEM"} <= set(mimic.short_names())


def test_a_hospitals_own_profile_and_what_is_refused(tmp_path: Path):
    own = tmp_path / "st-elsewhere.toml"
    own.write_text(
        'name = "st-elsewhere"\ntimezone = "Europe/Paris"\n'
        '[admission]\nclass_codes = ["IMP", "ACUTE"]\ndeath_dispositions = ["exp"]\n'
        '[code_systems]\n"urn:oid:1.2.250.1.213.2.5" = "CCAM"\n'
    )
    profile = load_profile(str(own))
    assert profile.name == "st-elsewhere" and profile.ref == str(own.resolve())
    assert profile.admission_class_codes == {"IMP", "ACUTE"} and profile.died_in_stay("exp")
    assert profile.zone() == "Europe/Paris" and profile.condition_time == "encounter_start"
    bad = {
        'name = "x"\ntimezone = "Mars/Olympus"\n': "not an IANA time zone",
        'name = "x"\ncolour = "red"\n': "unknown field(s) colour",
        'name = "x"\n[events]\ncondition_time = "whenever"\n': "condition_time must be one of",
        'name = "x"\n[admission]\nclass_codes = "IMP"\n': "class_codes must be a list",
        'name = "x"\n[code_systems]\n"http://a" = "A:B"\n': "short names",
        'name = "x y"\n': "name must be",
        'name = "x"\n[medications]\nmix = "average"\n': "mix must be one of",
    }
    for text, message in bad.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        load_profile.cache_clear()
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_profile(str(path))
    with pytest.raises(ValueError, match="unknown source profile"):
        load_profile("mimic-v")
    with pytest.raises(ValueError, match="no such file"):
        load_profile(str(tmp_path / "absent.toml"))


def test_detection_from_meta_profile():
    assert detect_profile([f"{MIMIC}/StructureDefinition/mimic-patient"]).name == "mimic-iv"
    assert detect_profile(["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]) is GENERIC
    assert detect_profile([]) is GENERIC


def test_aliases_name_local_code_systems_and_rank_them():
    aliases = load_profile("mimic-iv").code_systems
    concept = {"coding": [{"system": f"{MIMIC}/CodeSystem/mimic-diagnosis-icd9", "code": "4019"}]}
    assert codes.pick_coding(concept, "Condition") == (f"{MIMIC}/CodeSystem/mimic-diagnosis-icd9", "4019", None)
    assert codes.pick_coding(concept, "Condition", aliases) == ("ICD9CM", "4019", None)
    both = {"coding": [{"system": f"{MIMIC}/CodeSystem/mimic-d-items", "code": "1"},
                       {"system": f"{MIMIC}/CodeSystem/mimic-procedure-icd10", "code": "0DTJ4ZZ"}]}  # fmt: skip
    assert codes.pick_coding(both, "Procedure", aliases)[:2] == ("ICD10PCS", "0DTJ4ZZ")  # preferred system wins


def test_admissions_sub_encounters_and_dispositions_at_ingest():
    ctx = Context(default_tz="America/New_York", profile=load_profile("mimic-iv"))
    admission = {"resourceType": "Encounter", "id": "h1", "status": "finished", "class": {"code": "EMER"},
                 "subject": {"reference": "Patient/p"}, "period": {"start": "2180-06-26T18:27:00-04:00"},
                 "hospitalization": {"dischargeDisposition": {"coding": [{"code": "DIED"}]}}}  # fmt: skip
    icu = {"resourceType": "Encounter", "id": "icu1", "status": "finished", "class": {"code": "ACUTE"},
           "subject": {"reference": "Patient/p"}, "partOf": {"reference": "Encounter/h1"}}  # fmt: skip
    row = normalize(admission, ctx).ehr
    assert row["admission"] and row["died_in_stay"] and row["discharge_disposition"] == "DIED"
    sub = normalize(icu, ctx).ehr
    assert not sub["admission"] and sub["part_of"] == "h1"
    generic = normalize(admission, Context()).ehr  # the generic profile: class IMP only, no death dispositions
    assert not generic["admission"] and not generic["died_in_stay"]
    assert normalize({**admission, "class": {"code": "IMP"}}, Context()).ehr["admission"]


def test_a_date_only_death_is_a_calendar_date_in_the_source_zone():
    patient = {"resourceType": "Patient", "id": "p", "deceasedDateTime": "2180-09-09"}
    ny = normalize(patient, Context(default_tz="America/New_York", profile=load_profile("mimic-iv"))).ehr
    assert ny["death_time"] == "2180-09-09T00:00:00-04:00" and ny["death_date_only"]
    utc = normalize(patient, Context()).ehr
    assert utc["death_time"] == "2180-09-09T00:00:00+00:00"
    full = normalize({**patient, "deceasedDateTime": "2180-09-09T13:10:00-04:00"}, Context()).ehr
    assert full["death_date_only"] is False
    start = _t("2180-09-09T00:00:00-04:00")
    assert day_end(start, "America/New_York") == pytest.approx(_t("2180-09-10T00:00:00-04:00") - 0.001)
    # a day when the clocks change lasts 25 hours: the day still ends at the next local midnight
    fall = _t("2180-11-05T00:00:00-04:00")  # the first Sunday of November 2180
    assert day_end(fall, "America/New_York") + 0.001 - fall == 25 * 3600
    assert datetime.fromtimestamp(day_end(fall, "America/New_York") + 0.001, NY).hour == 0


def _record(death: str, discharge: str, died_in_stay: bool = False) -> PatientRecord:
    start = _t("2180-09-01T10:00:00-04:00")
    death_t = _t(f"{death}T00:00:00-04:00")
    enc = Encounter("h1", "EMER", start, _t(discharge), True, None, died_in_stay)
    lab = Event(_t(f"{death}T09:00:00-04:00"), TokenType.LAB, "MIMIC_LABITEM:50912", None, 1.0, "mg/dL")
    until = day_end(death_t, "America/New_York")
    birth = _t("2100-01-01T00:00:00-05:00")
    return PatientRecord("p", birth, death_t, [enc], [lab], death_until=until, outpatient_zone="America/New_York")


def test_the_death_date_rule_of_labels():
    # died on the local date of the discharge (discharged 15:00, death date the same day): a death in the stay
    same_day = build_timeline(_record("2180-09-09", "2180-09-09T15:00:00-04:00"))
    assert [s.first_encounter_id for s in inpatient_stays(same_day, REGISTRY)] == ["h1"]
    assert not [p for p in task_points(same_day, REGISTRY, _t("2181-01-01T00:00:00-05:00"))
                if p.task == "mortality_30d"]  # fmt: skip
    assert "after_death" not in same_day.dropped  # a lab on the death day is not "after" a date-only death
    # died the day after: a discharge point, positive for 30-day mortality
    next_day = build_timeline(_record("2180-09-10", "2180-09-09T15:00:00-04:00"))
    points = {p.task: p for p in task_points(next_day, REGISTRY, _t("2181-01-01T00:00:00-05:00"))}
    assert points["mortality_30d"].label is True
    # a discharge disposition meaning death is a death in the stay, whatever the death date says
    disposition = build_timeline(_record("2180-09-20", "2180-09-09T15:00:00-04:00", died_in_stay=True))
    assert not [p for p in task_points(disposition, REGISTRY, _t("2181-01-01T00:00:00-05:00"))
                if p.task == "mortality_30d"]  # fmt: skip


def test_events_outside_admissions_form_outpatient_days():
    start, end = _t("2180-09-01T10:00:00-04:00"), _t("2180-09-03T12:00:00-04:00")
    labs = [
        Event(_t("2180-08-20T08:00:00-04:00"), TokenType.LAB, "L:1", None),
        Event(_t("2180-08-20T23:30:00-04:00"), TokenType.LAB, "L:2", None),  # same local day (next day in UTC)
        Event(_t("2180-08-21T07:00:00-04:00"), TokenType.LAB, "L:3", None),
        Event(_t("2180-09-02T07:00:00-04:00"), TokenType.LAB, "L:4", None),  # inside the admission
        Event(_t("2180-09-03T13:00:00-04:00"), TokenType.LAB, "L:5", None),  # after it, same day as its end
    ]
    record = PatientRecord("p", None, None, [Encounter("h1", "EMER", start, end, True)], labs,
                           outpatient_zone="America/New_York")  # fmt: skip
    timeline = build_timeline(record)
    assert [[e.code for e in v.events] for v in timeline.visits] == [["L:1", "L:2"], ["L:3"], ["L:4"], ["L:5"]]
    assert [v.encounter_ids for v in timeline.visits] == [(), (), ("h1",), ()]
    assert not timeline.dropped
    dropped = build_timeline(PatientRecord("p", None, None, record.encounters, labs))  # generic: counted
    assert dropped.dropped == {"outside_visit": 4} and len(dropped.visits) == 1
    assert timeline.visits[0].end - timeline.visits[0].start == pytest.approx(15.5 * 3600)
    assert timeline.visits[1].start - timeline.visits[0].end < DAY


def test_parse_profile_rejects_a_missing_name():
    with pytest.raises(ValueError, match="name must be"):
        parse_profile({}, "<memory>")
