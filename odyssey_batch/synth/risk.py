"""The hidden risk model of the synthetic generator: what really drives each outcome.

Every probability here is a function of the patient's *observable* history at the prediction time (what the
export contains up to that moment), so the truth probability is the best any model could do on these data:
its AUROC is the oracle. Each outcome is then drawn from it, so perfect prediction is impossible.

Prediction points follow the task definitions of the labels stage:

- ``mortality_30d``: at the discharge of an inpatient stay the patient survived, death within 30 days;
- ``los_7d``: 24 h after inpatient admission (stays of 24 h or more), the stay lasts more than 7 days;
- ``readmission_30d``: at discharge, a new inpatient admission within 30 days (deaths first: no point);
- ``hypertension_1y``, ``fluid_electrolyte_1y``, ``lipid_disorder_1y``: at each inpatient discharge of a
  patient not yet diagnosed with the group, a first diagnosis within one year.

The linear predictors (logits) and background hazards are below; ``README.md`` (Synthetic data) restates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DAY = 86400.0
YEAR = 365.25 * DAY

TASKS = (
    "mortality_30d",
    "los_7d",
    "readmission_30d",
    "hypertension_1y",
    "fluid_electrolyte_1y",
    "lipid_disorder_1y",
)
CONDITION_TASKS = {
    "hypertension": "hypertension_1y",
    "fluid_electrolyte": "fluid_electrolyte_1y",
    "lipid_disorder": "lipid_disorder_1y",
}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def combine(*probabilities: float) -> float:
    """Probability that at least one of several independent events happens."""
    none = 1.0
    for p in probabilities:
        none *= 1.0 - p
    return 1.0 - none


# ---------------------------------------------------------------------------------------------- background
def background_death_rate(age: float) -> float:
    """Deaths per year outside the hospital model: 0.5% at 60, doubling every 8 years."""
    return 0.005 * 2.0 ** ((age - 60.0) / 8.0)


def admission_rate(age: float, frailty: float, n_chronic: int) -> float:
    """Unplanned inpatient admissions per year (a Poisson process restarted at each discharge)."""
    return 0.16 * math.exp(0.55 * frailty + 0.025 * (age - 60.0) + 0.30 * n_chronic)


def condition_background_rate(group: str, age: float) -> float:
    """First diagnoses per year of a condition group outside the inpatient model."""
    base = {"hypertension": 0.020, "fluid_electrolyte": 0.010, "lipid_disorder": 0.015}[group]
    return base * math.exp(0.02 * (age - 55.0))


# -------------------------------------------------------------------------------------------- inpatient stay
@dataclass(frozen=True)
class AdmissionLabs:
    """The first labs of a stay (drawn in its first hours, so known 24 h after admission)."""

    creatinine: float
    sodium: float
    potassium: float
    wbc: float
    lactate: float


def long_stay(age: float, labs: AdmissionLabs) -> float:
    """``los_7d``: probability that a stay of at least 24 h lasts more than 7 days."""
    logit = (
        -2.1
        + 0.020 * (age - 65.0)
        + 0.55 * (labs.lactate - 1.5)
        + 0.10 * (labs.wbc - 9.0)
        + 0.14 * abs(labs.sodium - 140.0)
        + 0.80 * math.log(labs.creatinine)
        + 0.60 * (abs(labs.potassium - 4.2) > 0.8)
    )
    return sigmoid(logit)


def in_hospital_death(age: float, labs: AdmissionLabs) -> float:
    """Death before discharge (such stays are no prediction point for the discharge tasks)."""
    return sigmoid(-5.2 + 0.04 * (age - 65.0) + 0.6 * (labs.lactate - 1.5) + 0.5 * math.log(labs.creatinine))


@dataclass(frozen=True)
class DischargeState:
    """What is known about the patient at discharge."""

    age: float
    n_chronic: int  # chronic comorbidities diagnosed so far
    los_days: float
    first_creatinine: float  # of this stay
    last_creatinine: float
    last_lactate: float
    high_risk_diagnoses: int  # discharge diagnoses among catalog.HIGH_READMISSION
    n_medications: int  # distinct medications requested during the stay
    admissions_past_year: int  # earlier inpatient stays within 365 days


def mortality(s: DischargeState) -> float:
    """``mortality_30d``: death within 30 days of discharge (hospital model plus background deaths).

    Most of the signal is in the course of the stay (creatinine rising from admission to discharge, lactate at
    discharge) and the patient's burden (comorbidities, recent admissions), not in age alone.
    """
    logit = (
        -3.9
        + 0.035 * (s.age - 65.0)
        + 0.40 * s.n_chronic
        + 0.60 * math.log(s.last_creatinine)
        + 0.90 * (s.last_lactate - 1.5)
        + 2.50 * max(0.0, s.last_creatinine / s.first_creatinine - 1.0)
        + 0.45 * min(s.admissions_past_year, 3)
        + 0.04 * min(s.los_days, 21.0)
    )
    background = 1.0 - math.exp(-background_death_rate(s.age) * 30.0 / 365.25)
    return combine(sigmoid(logit), background)


def planned_readmission(s: DischargeState) -> float:
    """The readmission model proper; the generator draws the scheduled readmission from it."""
    logit = (
        -3.0
        + 0.85 * min(s.high_risk_diagnoses, 2)
        + 0.20 * (s.n_medications - 4)
        + 0.012 * (s.age - 65.0)
        + 0.45 * min(s.admissions_past_year, 3)
    )
    return sigmoid(logit)


def readmission(s: DischargeState, admission_rate_per_year: float) -> float:
    """``readmission_30d``: a new admission within 30 days (the model plus unplanned background admissions)."""
    background = 1.0 - math.exp(-admission_rate_per_year * 30.0 / 365.25)
    return combine(planned_readmission(s), background)


# ------------------------------------------------------------------------------------- condition onsets
@dataclass(frozen=True)
class Precursors:
    """Observed precursors of the three condition groups at a discharge."""

    age: float
    last_systolic: float  # mmHg, most recent reading
    systolic_slope: float  # mmHg per year over the readings of the last 3 years
    bmi: float
    last_glucose: float  # mg/dL
    glucose_slope: float  # mg/dL per year over the last 3 years
    weight_gain: float  # kg over the last 3 years
    min_sodium: float  # lowest sodium of the stay
    worst_potassium_deviation: float  # largest |K - 4.2| of the stay
    on_diuretic: bool
    last_creatinine: float


def condition_onset(group: str, x: Precursors) -> float:
    """Probability that this discharge triggers a first diagnosis of ``group`` within the next year."""
    if group == "hypertension":
        logit = -3.1 + 0.050 * (x.last_systolic - 130.0) + 0.10 * x.systolic_slope + 0.06 * (x.bmi - 28.0)
        logit += 0.015 * (x.age - 55.0)
    elif group == "lipid_disorder":
        logit = -3.2 + 0.030 * (x.last_glucose - 100.0) + 0.12 * x.glucose_slope + 0.12 * x.weight_gain
        logit += 0.01 * (x.age - 55.0)
    elif group == "fluid_electrolyte":
        logit = -3.5 + 0.35 * max(0.0, 138.0 - x.min_sodium) + 2.2 * max(0.0, x.worst_potassium_deviation - 0.4)
        logit += 1.0 * x.on_diuretic + 0.9 * math.log(x.last_creatinine)
    else:
        raise ValueError(f"unknown condition group {group!r}")
    return sigmoid(logit)


def pending_onset_truth(draws: list[tuple[float, float]], now: float, p_now: float, window: float = YEAR) -> float:
    """Exact probability of a first diagnosis within ``window`` after ``now`` from the discharge draws.

    The generator draws an onset at a discharge only when none is pending; a drawn onset happens uniformly
    within the following year. ``draws`` holds the earlier ``(time, probability)`` of this patient and group;
    given that no onset was observed yet, a pending onset certainly falls inside the new window.
    """
    nothing_pending = 1.0
    pending = 0.0
    for time, p in draws:
        pending += nothing_pending * p * max(0.0, 1.0 - (now - time) / window)
        nothing_pending *= 1.0 - p
    return (pending + nothing_pending * p_now) / (pending + nothing_pending)
