"""The sequence grammar, side streams, truncation, lab bins, vocabulary, splits and task labels, on hand-built
patients (pure functions, no database)."""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter

import numpy as np
import pytest

from odyssey_batch.labels.points import task_points
from odyssey_batch.labels.tasks import load_registry, parse_registry
from odyssey_batch.sequences.grammar import SPECIAL_TOKENS, TokenType, interval_token
from odyssey_batch.sequences.labs import LabBins, canonical_value
from odyssey_batch.sequences.splits import SplitRule
from odyssey_batch.sequences.timeline import DAY, Encounter, Event, PatientRecord, build_timeline
from odyssey_batch.sequences.tokens import STREAMS, to_sequence, window
from odyssey_batch.sequences.vocab import Vocabulary

HOUR = 3600.0
T0 = dt.datetime(2020, 1, 6, 9, 0, tzinfo=dt.UTC).timestamp()
BIRTH = dt.datetime(1960, 1, 1, tzinfo=dt.UTC).timestamp()
NO_BINS = LabBins(5, {})
C, P, M, L = TokenType.CONDITION, TokenType.PROCEDURE, TokenType.MEDICATION, TokenType.LAB


def enc(eid: str, start: float, hours: float | None, klass: str = "AMB") -> Encounter:
    return Encounter(eid, klass, start, None if hours is None else start + hours * HOUR)


def ev(eid: str | None, time: float | None, kind: TokenType = P, code: str = "SNOMED:1", value: float = math.nan):
    return Event(time, kind, code, eid, value)


def patient(encounters, events, death=None) -> PatientRecord:
    return PatientRecord("p1", BIRTH, death, list(encounters), list(events))


def tokens_of(record: PatientRecord, bins: LabBins = NO_BINS) -> list[str]:
    return to_sequence(build_timeline(record), bins).tokens


# ------------------------------------------------------------------------------------------------ grammar
@pytest.mark.parametrize(
    ("days", "token"),
    [(0, "[W_0]"), (6, "[W_0]"), (7, "[W_1]"), (27, "[W_3]"), (28, "[M_0]"), (29, "[M_0]"), (30, "[M_1]"),
     (59, "[M_1]"), (365, "[M_12]"), (366, "[LT]")],
)  # fmt: skip
def test_interval_tokens_on_each_boundary(days, token):
    assert interval_token(days) == token
    # and from real times: the gap is whole days from one visit's end to the next one's start
    first_end = T0 + 2 * HOUR
    second = first_end + days * DAY + 3 * HOUR
    record = patient([enc("a", T0, 2), enc("b", second, 1)], [ev("a", T0 + HOUR), ev("b", second)])
    assert tokens_of(record) == ["[CLS]", "[VS]", "proc:SNOMED:1", "[VE]", "[REG]", token, "[VS]", "proc:SNOMED:1",
                                 "[VE]", "[REG]"]  # fmt: skip


def test_interval_tokens_refuse_a_negative_gap():
    with pytest.raises(ValueError, match="overlapping"):
        interval_token(-1)


def test_one_visit_patient():
    record = patient([enc("a", T0, 1)], [ev("a", T0 + 600, L, "LOINC:x"), ev("a", T0 + 60, C, "ICD10CM:I10")])
    seq = to_sequence(build_timeline(record), NO_BINS)
    assert seq.tokens == ["[CLS]", "[VS]", "cond:ICD10CM:I10", "lab:LOINC:x", "[VE]", "[REG]"]
    assert seq.type_ids.tolist() == [1, 2, 6, 9, 3, 5]
    assert seq.visit_orders.tolist() == [0, 1, 1, 1, 1, 1]
    assert seq.visit_segments.tolist() == [0, 1, 1, 1, 1, 1]
    assert seq.times.tolist() == [T0, T0, T0 + 60, T0 + 600, T0 + HOUR, T0 + HOUR]
    assert seq.ages[1] == pytest.approx((T0 - BIRTH) / (365.25 * DAY), rel=1e-6)


def test_overlapping_encounters_merge_into_one_visit_with_events_in_time_order():
    # an emergency visit that ends as the admission starts, and a consult inside the stay
    record = patient(
        [enc("ed", T0, 4, "EMER"), enc("imp", T0 + 4 * HOUR, 72, "IMP"), enc("consult", T0 + 30 * HOUR, 1)],
        [ev("imp", T0 + 5 * HOUR, M, "RXNORM:1"), ev("ed", T0 + HOUR, L, "LOINC:x"),
         ev("consult", T0 + 30 * HOUR, P, "SNOMED:2"), ev("imp", T0 + 5 * HOUR, C, "ICD10CM:A41.9")],
    )  # fmt: skip
    timeline = build_timeline(record)
    assert len(timeline.visits) == 1 and timeline.visits[0].encounter_ids == ("ed", "imp", "consult")
    assert to_sequence(timeline, NO_BINS).tokens == [
        "[CLS]", "[VS]", "lab:LOINC:x", "cond:ICD10CM:A41.9", "med:RXNORM:1", "proc:SNOMED:2", "[VE]", "[REG]",
    ]  # fmt: skip


def test_same_day_visits_stay_apart_and_side_streams_follow_visits():
    record = patient(
        [enc("a", T0, 0.5), enc("b", T0 + 6 * HOUR, 0.5), enc("c", T0 + 40 * DAY, 1)],
        [ev("a", T0), ev("b", T0 + 6 * HOUR), ev("c", T0 + 40 * DAY)],
    )
    seq = to_sequence(build_timeline(record), NO_BINS)
    assert seq.tokens == ["[CLS]", "[VS]", "proc:SNOMED:1", "[VE]", "[REG]", "[W_0]", "[VS]", "proc:SNOMED:1",
                          "[VE]", "[REG]", "[M_1]", "[VS]", "proc:SNOMED:1", "[VE]", "[REG]"]  # fmt: skip
    assert seq.visit_orders.tolist() == [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]
    assert seq.visit_segments.tolist() == [0, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 1, 1, 1, 1]
    assert seq.type_ids.tolist() == [1, 2, 7, 3, 5, 4, 2, 7, 3, 5, 4, 2, 7, 3, 5]
    # the interval token is known only when the next visit starts
    assert seq.times[5] == seq.times[6] == T0 + 6 * HOUR
    assert np.all(np.diff(seq.times) >= 0)
    assert all(len(getattr(seq, s)) == len(seq.tokens) for s in ("type_ids", "ages", "times", "visit_orders",
                                                                   "visit_segments"))  # fmt: skip


def test_nothing_after_death_enters_the_sequence():
    death = T0 + 10 * HOUR
    record = patient(
        [enc("imp", T0, 48, "IMP"), enc("cert", death + 3 * DAY, 1)],
        [ev("imp", T0 + HOUR), ev("imp", T0 + 20 * HOUR, L, "LOINC:cause"), ev("cert", death + 3 * DAY, C, "SNOMED:d")],
        death=death,
    )
    timeline = build_timeline(record)
    assert timeline.dropped == Counter({"after_death": 2, "encounter_after_death": 1})
    seq = to_sequence(timeline, NO_BINS)
    assert seq.tokens == ["[CLS]", "[VS]", "proc:SNOMED:1", "[VE]", "[REG]"]
    assert seq.times.max() == death  # the stay is clipped at the death


def test_event_times_diagnoses_known_when_recorded_and_unlinked_events():
    record = patient(
        [enc("a", T0, 2), enc("b", T0 + 30 * DAY, 2)],
        [ev("a", T0 - 5 * 365 * DAY, C, "ICD10CM:E11"),  # historical onset: known at the visit, not 5 years ago
         ev("a", None, P, "SNOMED:9"),  # no time: the encounter's start
         ev(None, T0 + 30 * DAY + HOUR, L, "LOINC:y"),  # no encounter, inside visit b
         ev(None, T0 + 100 * DAY, L, "LOINC:z"), ev(None, None, L, "LOINC:w")],
    )  # fmt: skip
    from odyssey_batch.sequences.timeline import condition_known_time

    assert condition_known_time(T0 - 9e7, None, T0) == T0 and condition_known_time(T0 - 9e7, T0 + 5, T0) == T0 + 5
    record.events[0] = ev("a", condition_known_time(T0 - 5 * 365 * DAY, None, T0), C, "ICD10CM:E11")
    timeline = build_timeline(record)
    assert timeline.dropped == Counter({"outside_visit": 1, "no_time": 1})
    assert tokens_of(record) == ["[CLS]", "[VS]", "cond:ICD10CM:E11", "proc:SNOMED:9", "[VE]", "[REG]", "[M_0]",
                                 "[VS]", "lab:LOINC:y", "[VE]", "[REG]"]  # fmt: skip


def test_visits_come_from_encounter_periods_only():
    # a result dated two days after its visit ended moves nothing: it is outside every visit
    late = patient([enc("a", T0, 2), enc("b", T0 + 10 * DAY, 1)], [ev("a", T0), ev("a", T0 + 2 * DAY, L, "LOINC:x")])
    timeline = build_timeline(late)
    assert [(v.start, v.end) for v in timeline.visits] == [(T0, T0 + 2 * HOUR), (T0 + 10 * DAY, T0 + 10 * DAY + HOUR)]
    assert timeline.dropped == Counter({"outside_visit": 1})
    # an encounter without events is still a visit
    assert tokens_of(late)[5:] == ["[W_1]", "[VS]", "[VE]", "[REG]"]
    # an encounter without an end lasts until the next one starts, or until the end of the data
    open_ = patient([enc("a", T0, None), enc("b", T0 + 3 * DAY, 1), enc("c", T0 + 9 * DAY, None)],
                    [ev("a", T0 + DAY), ev("c", T0 + 20 * DAY)])  # fmt: skip
    visits = build_timeline(open_, data_end=T0 + 30 * DAY).visits
    assert [(v.start, v.end) for v in visits] == [
        (T0, T0 + 3 * DAY - 1), (T0 + 3 * DAY, T0 + 3 * DAY + HOUR), (T0 + 9 * DAY, T0 + 30 * DAY)
    ]  # fmt: skip
    assert [len(v.events) for v in visits] == [1, 0, 1]


# ------------------------------------------------------------------------------------------------ truncation
def _long_record(visits: int, events_per_visit: int) -> PatientRecord:
    encounters, events = [], []
    for v in range(visits):
        start = T0 + v * 10 * DAY
        encounters.append(enc(f"e{v}", start, 1))
        events += [ev(f"e{v}", start + i, P, f"SNOMED:{v}") for i in range(events_per_visit)]
    return patient(encounters, events)


def _streams(record: PatientRecord) -> dict[str, np.ndarray]:
    seq = to_sequence(build_timeline(record), NO_BINS)
    vocab = Vocabulary.build(Counter(t for t in seq.tokens if t not in SPECIAL_TOKENS), {}, [], min_count=1)
    return {"token_ids": vocab.encode(seq.tokens), "type_ids": seq.type_ids, "ages": seq.ages, "times": seq.times,
            "visit_orders": seq.visit_orders, "visit_segments": seq.visit_segments}  # fmt: skip


@pytest.mark.parametrize("max_length", [16, 2048, 8192])
def test_truncation_keeps_the_most_recent_visits_from_a_visit_boundary(max_length):
    streams = _streams(_long_record(visits=max_length // 4, events_per_visit=3))  # 7 tokens a visit
    n = len(streams["token_ids"])
    assert n > max_length
    out = window(streams, n, max_length)
    ids, types = out["token_ids"], out["type_ids"]
    assert len(ids) <= max_length and len(ids) > max_length - 8
    assert ids[0] == 3 and ids[1] == 4  # [CLS] [VS]
    assert np.array_equal(ids[1:], streams["token_ids"][n - len(ids) + 1 :])  # the most recent tokens, unchanged
    assert out["visit_orders"][1] == 1 and out["visit_orders"].max() == types.tolist().count(TokenType.VS)
    assert out["visit_segments"][1] == 1
    assert all(len(out[s]) == len(ids) for s in STREAMS)


def test_truncation_inside_one_long_visit_opens_it_with_a_synthetic_visit_start():
    streams = _streams(_long_record(visits=1, events_per_visit=50))
    out = window(streams, len(streams["token_ids"]), 10)
    assert len(out["token_ids"]) == 10 and out["token_ids"][:2].tolist() == [3, 4]
    assert out["type_ids"][:2].tolist() == [1, 2] and out["visit_orders"][1:].tolist() == [1] * 9


def test_a_short_sequence_is_only_cut():
    streams = _streams(_long_record(visits=3, events_per_visit=2))
    out = window(streams, 8, 2048)
    assert np.array_equal(out["token_ids"], streams["token_ids"][:8])


# ------------------------------------------------------------------------------------------------ labs, vocabulary
def test_lab_bins_are_quintiles_with_closed_edges():
    bins = LabBins.fit({"LOINC:a": np.arange(1, 101, dtype=float), "LOINC:flat": [5.0] * 50}, 5)
    assert bins.edges["LOINC:a"] == pytest.approx((20.8, 40.6, 60.4, 80.2))
    assert [bins.bin("LOINC:a", v) for v in (-1e9, 1, 20.8, 50, 100, 1e9)] == [0, 0, 1, 2, 4, 4]
    assert bins.edges["LOINC:flat"] == (5.0,) and bins.bins_of("LOINC:flat") == 2
    assert bins.bin("LOINC:never-seen", 3.0) == 0
    assert bins.describe("LOINC:a", 4) == "very high" and bins.describe("LOINC:flat", 1) == "bin 2 of 2"
    assert LabBins.from_dict(bins.as_dict()) == bins


def test_documented_unit_conversions_apply_before_binning():
    assert canonical_value("LOINC", "2160-0", "umol/L", 88.42) == (pytest.approx(1.0), "mg/dL")
    assert canonical_value("LOINC", "2160-0", "mg/dL", 1.2) == (1.2, "mg/dL")
    assert canonical_value("LOCAL", "2160-0", "umol/L", 88.42) == (88.42, "umol/L")


def test_vocabulary_is_deterministic_with_thresholds_and_task_tokens():
    counts = Counter({"proc:SNOMED:2": 5, "cond:ICD10CM:I10": 9, "lab:LOINC:a:q*": 6, "med:RXNORM:1": 4,
                      "lab:LOINC:b": 7})  # fmt: skip
    one = Vocabulary.build(counts, {"LOINC:a": 3}, ["mortality_30d"], min_count=5)
    two = Vocabulary.build(Counter(dict(reversed(list(counts.items())))), {"LOINC:a": 3}, ["mortality_30d"], 5)
    assert one == two
    assert one.tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and one.id("[PAD]") == 0 and one.id("[UNK]") == 1
    assert one.tokens[len(SPECIAL_TOKENS) :] == (
        "cond:ICD10CM:I10", "proc:SNOMED:2", "lab:LOINC:a:q0", "lab:LOINC:a:q1", "lab:LOINC:a:q2", "lab:LOINC:b",
        "[TASK:mortality_30d]",
    )  # fmt: skip
    assert one.encode(["med:RXNORM:1", "cond:ICD10CM:I10"]).tolist() == [1, 25]
    assert Vocabulary.from_dict(one.as_dict()) == one


def test_splits_are_stable_and_proportional():
    rule = SplitRule()
    # fixed expectations: a change of the hash rule would silently move patients across splits
    assert [rule.split(f"patient-{i}") for i in range(8)] == [SplitRule().split(f"patient-{i}") for i in range(8)]
    assert rule.position("abc") == pytest.approx(int.from_bytes(__import__("hashlib").sha256(b"odyssey-v1:abc")
                                                                .digest()[:8], "big") / 2**64)  # fmt: skip
    shares = Counter(rule.split(str(i)) for i in range(20000))
    assert abs(shares["train"] / 20000 - 0.8) < 0.01 and abs(shares["test"] / 20000 - 0.1) < 0.01
    assert Counter(SplitRule(salt="other").split(str(i)) == rule.split(str(i)) for i in range(2000))[False] > 300
    with pytest.raises(ValueError):
        SplitRule(train=0.9, validation=0.2)


# ------------------------------------------------------------------------------------------------ labels
REGISTRY = load_registry()
END = T0 + 3 * 365 * DAY


def labels(record: PatientRecord, data_end: float = END) -> dict[str, list[tuple[float, bool | None]]]:
    out: dict[str, list] = {}
    for p in task_points(build_timeline(record), REGISTRY, data_end):
        out.setdefault(p.task, []).append((p.prediction_time, p.label))
    return out


def stay(eid: str, start: float, days: float) -> tuple[Encounter, Event]:
    return enc(eid, start, days * 24, "IMP"), ev(eid, start + HOUR)


def test_discharge_tasks_death_windows_and_in_hospital_death():
    (a, ea), (b, eb) = stay("a", T0, 3), stay("b", T0 + 100 * DAY, 5)
    discharge_a, discharge_b = T0 + 3 * DAY, T0 + 105 * DAY
    death = discharge_b + 30 * DAY  # exactly 30 days after: inside the window
    got = labels(patient([a, b], [ea, eb], death=death))
    assert got["mortality_30d"] == [(discharge_a, False), (discharge_b, True)]
    assert got["los_7d"] == [(T0 + DAY, False), (T0 + 100 * DAY + DAY, False)]
    # died during stay b: no discharge point for it
    got = labels(patient([a, b], [ea, eb], death=discharge_b - HOUR))
    assert got["mortality_30d"] == [(discharge_a, False)] and len(got["readmission_30d"]) == 1


def test_readmission_windows_transfers_and_death_first():
    (a, ea), (b, eb), (c, ec) = stay("a", T0, 2), stay("b", T0 + 2 * DAY + 2 * HOUR, 2), stay("c", T0 + 33 * DAY, 1)
    got = labels(patient([a, b, c], [ea, eb, ec]))
    # a and b are one stay (a transfer 2 h after discharge); c starts 29 days after its discharge
    assert got["readmission_30d"] == [(T0 + 4 * DAY + 2 * HOUR, True), (T0 + 34 * DAY, False)]
    assert got["los_7d"] == [(T0 + DAY, False), (T0 + 34 * DAY, False)]  # 4 days; c lasts exactly 24 h
    # death 10 days after discharge, no readmission before it: not a readmission point
    got = labels(patient([a], [ea], death=T0 + 12 * DAY))
    assert "readmission_30d" not in got and got["mortality_30d"] == [(T0 + 2 * DAY, True)]


def test_length_of_stay_cut_and_exclusions():
    (a, ea), (b, eb) = stay("a", T0, 7.5), stay("b", T0 + 60 * DAY, 0.9)
    got = labels(patient([a, b], [ea, eb]))
    assert got["los_7d"] == [(T0 + DAY, True)]  # b lasts under 24 h: no point


def test_condition_tasks_first_diagnosis_prior_diagnosis_and_censoring():
    (a, ea), (b, eb) = stay("a", T0, 2), stay("b", T0 + 200 * DAY, 2)
    clinic = enc("o", T0 + 300 * DAY, 1)
    dx = ev("o", T0 + 300 * DAY, C, "ICD10CM:I10.9")  # hypertension, 298 days after a's discharge
    got = labels(patient([a, b, clinic], [ea, eb, dx]))
    assert got["hypertension_1y"] == [(T0 + 2 * DAY, True), (T0 + 202 * DAY, True)]
    assert got["lipid_disorder_1y"] == [(T0 + 2 * DAY, False), (T0 + 202 * DAY, False)]
    # diagnosed before b's discharge: b is no point; the data ends 100 days after b: censored for lipids
    dx_early = ev("o", T0 + 100 * DAY, C, "SNOMED:38341003")
    clinic_early = enc("o", T0 + 100 * DAY, 1)
    got = labels(patient([a, b, clinic_early], [ea, eb, dx_early]), data_end=T0 + 302 * DAY)
    assert got["hypertension_1y"] == [(T0 + 2 * DAY, True)]
    assert got["lipid_disorder_1y"] == [(T0 + 2 * DAY, None), (T0 + 202 * DAY, None)]  # both windows run past


def test_registry_is_data_and_rejects_bad_definitions(tmp_path):
    assert REGISTRY.names == ["mortality_30d", "los_7d", "readmission_30d", "hypertension_1y",
                              "fluid_electrolyte_1y", "lipid_disorder_1y"]  # fmt: skip
    cs = REGISTRY.code_sets["lipid_disorder"]
    assert cs.contains("ICD10CM:E78.5") and cs.contains("ICD9CM:272.0") and cs.contains("SNOMED:55822004")
    assert not cs.contains("ICD10CM:E79") and not cs.contains("SNOMED:5582200")
    custom = parse_registry(
        {"stays": {"inpatient_classes": ["IMP", "ACUTE"]},
         "tasks": [{"name": "death_7d", "trigger": "discharge", "outcome": "death", "days": 7}]}
    )  # fmt: skip
    assert custom.names == ["death_7d"] and custom.inpatient_classes == {"IMP", "ACUTE"}
    with pytest.raises(ValueError, match="trigger"):
        parse_registry({"tasks": [{"name": "x", "trigger": "noon", "outcome": "death", "days": 1}]})
    with pytest.raises(ValueError, match="code_set"):
        parse_registry({"tasks": [{"name": "x", "trigger": "discharge", "outcome": "diagnosis", "days": 1}]})
    with pytest.raises(ValueError, match="unknown field"):
        parse_registry({"tasks": [{"name": "x", "trigger": "discharge", "outcome": "death", "days": 1, "y": 2}]})
