"""One synthetic patient: physiology, an event-driven timeline of encounters, and the truth of every outcome.

The timeline is driven by a small event queue (outpatient and emergency visits, unplanned admissions,
scheduled readmissions, condition onsets, deaths). Within an encounter, the values are drawn in vectorised
batches from the patient's physiology. Outcomes are drawn from ``risk`` at each prediction point, from the
history observed so far, and the probability used is recorded as the truth.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from odyssey_batch.synth import catalog as c
from odyssey_batch.synth import fhir, risk
from odyssey_batch.synth.risk import DAY, YEAR

HOUR = 3600.0
# Measurement noise per lab (standard deviation; relative for creatinine).
LAB_NOISE = {"creatinine": 0.06, "sodium": 1.4, "potassium": 0.25, "glucose": 9.0, "hemoglobin": 0.5, "wbc": 1.3,
             "lactate": 0.25}  # fmt: skip
# Physiological floors: a slow drift must not carry a lab below what a living patient can show.
LAB_FLOORS = {"creatinine": 0.2, "lactate": 0.2, "glucose": 40.0}
TYPES = ("Patient", "Encounter", "Condition", "Procedure", "MedicationRequest", "Observation")


@dataclass
class Options:
    start: float  # history window, seconds since the epoch
    end: float  # the export's transaction time: nothing happens after it
    messy: bool = False


@dataclass
class Output:
    lines: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TYPES})
    late: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TYPES})  # messy: a later export
    truth: list[list] = field(default_factory=list)  # [task, patient_id, prediction_time, p, label, censored, enc]


@dataclass
class Stay:
    encounter_id: str
    start: float
    end: float


class PatientSimulator:
    def __init__(self, pid: str, rng: np.random.Generator, opts: Options, out: Output):
        self.pid = pid
        self.rng = rng
        self.opts = opts
        self.out = out
        self.counter = 0
        r = rng
        self.gender = "female" if r.random() < 0.52 else "male"
        age0 = 18.0 + 72.0 * r.beta(2.2, 1.6)
        self.history_start = opts.start + r.random() * 2 * YEAR
        self.birth = self.history_start - age0 * YEAR - r.random() * YEAR
        self.frailty = float(r.normal())
        # physiology
        female = self.gender == "female"
        self.height = r.normal(1.63 if female else 1.77, 0.07)
        self.weight0 = max(45.0, r.normal(74 if female else 86, 15))
        self.weight_slope = r.normal(0.3, 1.2)
        self.sbp0 = 112 + 0.45 * (age0 - 40) + r.normal(0, 11)
        self.sbp_slope = r.normal(0.6, 1.6)
        self.glucose0 = 92 + r.normal(0, 9)
        self.glucose_slope = r.normal(0.8, 2.6)
        self.creat0 = math.exp(r.normal(math.log(0.75 if female else 0.95), 0.15) + 0.006 * (age0 - 40))
        self.sodium0 = 140 + r.normal(0, 1.3)
        self.potassium0 = 4.2 + r.normal(0, 0.22)
        self.hemoglobin0 = r.normal(13.2 if female else 14.8, 0.9)
        # diagnoses: name -> time
        self.diagnosed: dict[str, float] = {}
        self.group_diagnosed: dict[str, float] = {}
        self.medications: set[str] = set()
        # observations so far: key -> (times, values)
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.stays: list[Stay] = []
        self.death: float | None = None
        self.condition_draws: dict[str, list[tuple[float, float]]] = {g: [] for g in c.GROUP_CONDITIONS}
        self.mortality_draws: list[tuple[float, float]] = []
        self.pending_onset: dict[str, float] = {}
        self.queue: list[tuple[float, int, str, object]] = []
        self.sequence = 0
        self.epoch = 0  # background-death clock; a discharge starts a new epoch, cancelling the old clock
        self.unplanned_token = 0
        self.truth_from = len(out.truth)

    # ----------------------------------------------------------------------------------------- helpers
    def new_id(self) -> str:
        self.counter += 1
        return f"{self.pid[:24]}{self.counter:012x}"

    def age(self, t: float) -> float:
        return (t - self.birth) / YEAR

    def years(self, t: float) -> float:
        return (t - self.history_start) / YEAR

    def schedule(self, t: float, kind: str, payload: object = None) -> None:
        self.sequence += 1
        heapq.heappush(self.queue, (t, self.sequence, kind, payload))

    def emit(self, resource_type: str, line: str) -> None:
        self.out.lines[resource_type].append(line)

    def observe(self, key: str, t: float, value: float) -> None:
        self.series.setdefault(key, []).append((t, value))

    def last(self, key: str, default: float) -> float:
        values = self.series.get(key)
        return values[-1][1] if values else default

    def slope(self, key: str, now: float, span: float = 3 * YEAR) -> float:
        """Change per year over the readings of the last ``span`` (0 with fewer than two)."""
        values = [(t, v) for t, v in self.series.get(key, ()) if t > now - span]
        if len(values) < 2 or values[-1][0] - values[0][0] < 30 * DAY:
            return 0.0
        return (values[-1][1] - values[0][1]) / ((values[-1][0] - values[0][0]) / YEAR)

    def n_chronic(self, t: float) -> int:
        return sum(1 for k in c.CHRONIC if k in self.diagnosed and self.diagnosed[k] <= t)

    # ------------------------------------------------------------------------------------- physiology
    def baseline(self, key: str, t: float) -> float:
        y = self.years(t)
        if key == "creatinine":
            return self.creat0 * (1.0 + 0.01 * y) * (1.35 if "ckd" in self.diagnosed else 1.0)
        if key == "sodium":
            return self.sodium0
        if key == "potassium":
            return self.potassium0
        if key == "glucose":
            return self.glucose0 + self.glucose_slope * y + (35.0 if "diabetes" in self.diagnosed else 0.0)
        if key == "hemoglobin":
            return self.hemoglobin0 - (1.0 if "ckd" in self.diagnosed else 0.0)
        if key == "wbc":
            return 7.0
        if key == "lactate":
            return 1.0
        raise KeyError(key)

    def draw_labs(self, keys: tuple[str, ...], t: float, acute: dict[str, float] | None = None) -> dict[str, float]:
        noise = self.rng.normal(size=len(keys))
        values = {}
        for key, z in zip(keys, noise, strict=True):
            base = self.baseline(key, t)
            shift = (acute or {}).get(key, 0.0)
            if key == "creatinine":
                value = base * (1.0 + shift) * math.exp(LAB_NOISE[key] * z)
            else:
                value = base + shift + LAB_NOISE[key] * z
            values[key] = max(value, LAB_FLOORS.get(key, 0.5))
        return values

    def emit_labs(self, eid: str, t: float, values: dict[str, float]) -> None:
        messy = self.opts.messy
        for key, value in values.items():
            lab = c.LABS[key]
            value = round(value, lab.decimals)
            self.observe(key, t, value)
            alt = messy and lab.alt_unit is not None and self.rng.random() < 0.03
            oid = self.new_id()
            line = fhir.lab(oid, self.pid, eid, lab, value, t, alt_unit=alt)
            if messy and self.rng.random() < 0.01:
                # The same lab sent twice: an early version with a wrong value, then the correction.
                wrong = fhir.lab(oid, self.pid, eid, lab, value * 1.3, t, version=1, updated=t + 600)
                line = fhir.lab(oid, self.pid, eid, lab, value, t, alt_unit=alt, version=2, updated=t + 7200)
                self.emit("Observation", wrong)
            if messy and self.rng.random() < 0.02:
                self.out.late["Observation"].append(line)
            else:
                self.emit("Observation", line)

    def emit_vitals(self, eid: str, t: float) -> None:
        y = self.years(t)
        z = self.rng.normal(size=4)
        sbp = self.sbp0 + self.sbp_slope * y + 8.0 * z[0] + (6.0 if "obesity" in self.diagnosed else 0.0)
        if "hypertension" in self.diagnosed:
            sbp -= 10.0  # treated
        dbp = 0.55 * sbp + 8.0 + 5.0 * z[1]
        weight = max(40.0, self.weight0 + self.weight_slope * y + 1.2 * z[2])
        bmi = weight / self.height**2
        sbp, dbp, weight, bmi = round(sbp), round(dbp), round(weight, 1), round(bmi, 1)
        self.observe("systolic", t, sbp)
        self.observe("weight", t, weight)
        self.observe("bmi", t, bmi)
        self.emit("Observation", fhir.blood_pressure(self.new_id(), self.pid, eid, sbp, dbp, t))
        self.emit("Observation", fhir.vital(self.new_id(), self.pid, eid, c.WEIGHT[0], c.WEIGHT[1], weight, "kg", t))
        self.emit("Observation", fhir.vital(self.new_id(), self.pid, eid, c.BMI[0], c.BMI[1], bmi, "kg/m2", t))

    # ------------------------------------------------------------------------------------- resources
    def encounter(self, klass: str, kind: str, start: float, end: float) -> str:
        eid = self.new_id()
        shown_end: float | None = end
        if self.opts.messy and klass == "AMB" and self.rng.random() < 0.03:
            shown_end = None  # the feed never sent the end of this visit
        self.emit("Encounter", fhir.encounter(eid, self.pid, klass, kind, start, shown_end))
        return eid

    def diagnose(self, key: str, eid: str, t: float) -> None:
        cond = c.CONDITIONS[key]
        self.diagnosed.setdefault(key, t)
        if cond.group is not None:
            self.group_diagnosed.setdefault(cond.group, t)
        use_snomed = self.rng.random() < 0.3
        self.emit("Condition", fhir.condition(self.new_id(), self.pid, eid, cond, use_snomed, t))

    def prescribe(self, key: str, eid: str, t: float) -> None:
        self.emit("MedicationRequest", fhir.medication_request(self.new_id(), self.pid, eid, key, t))

    # ------------------------------------------------------------------------------------------ setup
    def initial_history(self) -> None:
        """Chronic conditions already present at the start of the history, recorded at a first visit."""
        t = self.history_start
        age = self.age(t)
        r = self.rng
        bmi = self.weight0 / self.height**2
        chances = {
            "diabetes": 0.08 + 0.004 * max(0.0, age - 40) + 0.01 * max(0.0, bmi - 27),
            "ckd": 0.02 + 0.004 * max(0.0, age - 50) + 0.05 * (self.creat0 > 1.1),
            "heart_failure": 0.01 + 0.003 * max(0.0, age - 55) + 0.03 * max(0.0, self.frailty),
            "copd": 0.03 + 0.002 * max(0.0, age - 45),
            "atrial_fibrillation": 0.01 + 0.003 * max(0.0, age - 60),
            "obesity": 0.9 * (bmi > 30),
            "hypertension": 0.05 + 0.006 * max(0.0, age - 35) + 0.01 * max(0.0, self.sbp0 - 130),
            "hyperlipidemia": 0.05 + 0.004 * max(0.0, age - 35),
            "hyponatremia": 0.01,
        }
        present = [k for k, p in chances.items() if r.random() < min(p, 0.95)]
        eid = self.encounter("AMB", "AMB", t, t + 30 * 60)
        self.emit_vitals(eid, t + 5 * 60)
        self.emit_labs(eid, t + 10 * 60, self.draw_labs(c.BMP, t))
        for key in present:
            self.diagnose(key, eid, t + 20 * 60)
            med = c.CHRONIC_MEDICATION.get(key)
            if med:
                self.medications.add(med)
        for med in sorted(self.medications):
            self.prescribe(med, eid, t + 25 * 60)

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> None:
        opts, r = self.opts, self.rng
        self.initial_history()
        t0 = self.history_start
        amb_rate = 1.6 + 0.8 * self.n_chronic(t0)
        for when in t0 + np.cumsum(r.exponential(YEAR / amb_rate, size=int(amb_rate * 14) + 5)):
            if when < opts.end:
                self.schedule(float(when), "amb")
        for when in t0 + np.cumsum(r.exponential(YEAR / 0.2, size=8)):
            if when < opts.end:
                self.schedule(float(when), "ed")
        self.schedule_unplanned_admission(t0)
        self.schedule_background(t0)

        busy_until = t0
        while self.queue:
            t, _, kind, payload = heapq.heappop(self.queue)
            if t >= opts.end or (self.death is not None and t >= self.death):
                break  # the queue is in time order: nothing after this can happen
            if kind == "admit":
                planned = payload == "readmission"
                if not planned and payload != self.unplanned_token:
                    continue  # superseded: the unplanned process restarted at a discharge
                if t < busy_until:
                    if not planned:
                        self.schedule_unplanned_admission(busy_until)
                    continue
                stay = self.inpatient_stay(t, planned=planned)
                if stay is not None:
                    busy_until = stay.end
            elif kind in ("amb", "ed"):
                if t >= busy_until:
                    (self.outpatient_visit if kind == "amb" else self.emergency_visit)(t)
            elif kind == "onset":
                self.record_onset(t, str(payload))
            elif kind == "background_death":
                if payload == self.epoch:
                    self.death = t
            elif kind == "resume_background" and payload == self.epoch:
                self.schedule_background_death(t)
        death = self.death if self.death is not None and self.death < opts.end else None
        self.emit("Patient", fhir.patient(self.pid, self.gender, self.birth, death))
        self.settle()

    # ------------------------------------------------------------------------------------- processes
    def schedule_background(self, t: float) -> None:
        age = self.age(t)
        for group in c.GROUP_CONDITIONS:
            if group in self.group_diagnosed:
                continue
            rate = risk.condition_background_rate(group, age)
            self.schedule(t + self.rng.exponential(YEAR / rate), "onset", group)
        self.schedule_background_death(t)

    def schedule_background_death(self, t: float) -> None:
        """Deaths outside post-discharge windows (inside them, ``risk.mortality`` includes them)."""
        rate = risk.background_death_rate(self.age(t))
        self.schedule(t + self.rng.exponential(YEAR / rate), "background_death", self.epoch)

    def admission_rate(self) -> float:
        return risk.admission_rate(self.age(self.history_start), self.frailty, self.n_chronic(self.history_start))

    def schedule_unplanned_admission(self, t: float) -> None:
        """(Re)start the unplanned admission process at ``t``; an earlier pending admission is cancelled."""
        self.unplanned_token += 1
        self.schedule(t + self.rng.exponential(YEAR / self.admission_rate()), "admit", self.unplanned_token)

    # -------------------------------------------------------------------------------------- encounters
    def outpatient_visit(self, t: float) -> None:
        r = self.rng
        eid = self.encounter("AMB", "AMB", t, t + r.uniform(15, 40) * 60)
        self.emit_vitals(eid, t + 5 * 60)
        if r.random() < 0.45:
            self.emit_labs(eid, t + 10 * 60, self.draw_labs(c.BMP, t))
        if r.random() < 0.2:
            self.emit_labs(eid, t + 10 * 60, self.draw_labs(c.CBC, t))
        # comorbidities that develop along the way
        if "diabetes" not in self.diagnosed and self.last("glucose", 0) > 126 and r.random() < 0.5:
            self.diagnose("diabetes", eid, t + 15 * 60)
            self.medications.add("metformin")
        if "obesity" not in self.diagnosed and self.last("bmi", 0) > 31 and r.random() < 0.3:
            self.diagnose("obesity", eid, t + 15 * 60)
        if "ckd" not in self.diagnosed and self.last("creatinine", 0) > 1.5 and r.random() < 0.4:
            self.diagnose("ckd", eid, t + 15 * 60)
        for med in sorted(self.medications):
            if r.random() < 0.3:
                self.prescribe(med, eid, t + 20 * 60)

    def emergency_visit(self, t: float) -> None:
        r = self.rng
        end = t + r.uniform(2, 7) * HOUR
        eid = self.encounter("EMER", "EMER", t, end)
        self.emit_vitals(eid, t + 15 * 60)
        self.emit_labs(eid, t + HOUR, self.draw_labs((*c.BMP, *c.CBC), t))
        reason = ("uti", "cellulitis", "syncope")[int(r.integers(3))]
        self.diagnose(reason, eid, t + 2 * HOUR)
        for med in c.ACUTE_MEDICATION[reason][:1]:
            self.prescribe("amoxicillin" if med == "ceftriaxone" else med, eid, t + 2 * HOUR)

    def record_onset(self, t: float, group: str) -> None:
        if group in self.group_diagnosed:
            return
        self.pending_onset.pop(group, None)
        options = c.GROUP_CONDITIONS[group]
        key = options[int(self.rng.integers(len(options)))]
        within = next((s for s in self.stays if s.start <= t <= s.end), None)
        if within is not None:
            self.diagnose(key, within.encounter_id, t)
            return
        eid = self.encounter("AMB", "DX", t, t + 25 * 60)
        self.emit_vitals(eid, t + 5 * 60)
        self.diagnose(key, eid, t + 15 * 60)
        med = c.CHRONIC_MEDICATION.get(key) or ("potassium_chloride" if key == "hypokalemia" else None)
        if med:
            self.medications.add(med)
            self.prescribe(med, eid, t + 20 * 60)

    def onsets_during(self, stay: Stay) -> None:
        """Record now the onsets due during a stay: the stay is generated at once, its discharge included."""
        due = [item for item in self.queue if item[2] == "onset" and item[0] <= stay.end]
        if not due:
            return
        self.queue = [item for item in self.queue if not (item[2] == "onset" and item[0] <= stay.end)]
        heapq.heapify(self.queue)
        for when, _, _, group in sorted(due):
            self.record_onset(when, str(group))

    def inpatient_stay(self, t: float, planned: bool) -> Stay | None:
        r, opts = self.rng, self.opts
        age = self.age(t)
        severity = r.gamma(2.0, 0.45) * math.exp(0.25 * self.frailty)
        # length of stay: some very short stays, else long with the hidden model's probability
        if r.random() < 0.07:
            los = r.uniform(4, 23) * HOUR
            p_long = None
        else:
            los = None
            p_long = 0.0
        has_hf, has_copd = "heart_failure" in self.diagnosed, "copd" in self.diagnosed
        weights = {"pneumonia": 0.22, "sepsis": 0.06 + 0.08 * min(severity, 2.0), "uti": 0.12,
                   "hf_exacerbation": 0.30 if has_hf else 0.02, "copd_exacerbation": 0.30 if has_copd else 0.0,
                   "aki": 0.10 + 0.1 * ("ckd" in self.diagnosed), "cellulitis": 0.08, "syncope": 0.08}  # fmt: skip
        names = list(weights)
        probs = np.array([weights[n] for n in names])
        reason = names[int(r.choice(len(names), p=probs / probs.sum()))]
        acute = {
            "creatinine": 0.15 * severity + (0.6 * severity if reason in ("aki", "sepsis") else 0.0),
            "lactate": 1.1 * severity * (1.5 if reason == "sepsis" else 1.0),
            "sodium": -2.5 * severity * (1.0 if r.random() < 0.7 else -0.6),
            "potassium": 0.35 * severity * (1.0 if r.random() < 0.5 else -1.0),
            "wbc": 4.0 * severity * (1.4 if reason in ("sepsis", "pneumonia", "cellulitis") else 0.5),
            "hemoglobin": -0.5 * severity,
        }
        admission = self.draw_labs(c.ADMISSION_PANEL, t, acute)
        labs = risk.AdmissionLabs(admission["creatinine"], admission["sodium"], admission["potassium"],
                                  admission["wbc"], admission["lactate"])  # fmt: skip
        if los is None:
            p_long = risk.long_stay(age, labs)
            if r.random() < p_long:
                los = (7.0 + r.exponential(4.0)) * DAY
                los = min(los, 35 * DAY)
            else:
                los = math.exp(r.uniform(math.log(1.05), math.log(6.95))) * DAY
        end = t + los
        ed_start = t - r.uniform(2, 6) * HOUR if (not planned and r.random() < 0.6) else None
        if end >= opts.end or (self.death is not None and end >= self.death):
            return None  # the stay would not be over by the export (or the patient dies first)

        self.epoch += 1  # no background death during the stay: in-hospital death is modelled below
        if ed_start is not None:
            ed = self.encounter("EMER", "EMER", ed_start, t)
            self.emit_vitals(ed, ed_start + 20 * 60)
        eid = self.encounter("IMP", "IMP", t, end)
        stay = Stay(eid, t, end)
        self.stays.append(stay)
        lab_time = t + r.uniform(0.5, 3.0) * HOUR
        self.emit_labs(eid, lab_time, {k: admission[k] for k in c.ADMISSION_PANEL})
        self.emit_vitals(eid, t + 20 * 60)
        self.emit("Procedure", fhir.procedure(self.new_id(), self.pid, eid, "med_reconciliation", t + HOUR))
        for key in c.ACUTE_PROCEDURES[reason]:
            self.emit("Procedure", fhir.procedure(self.new_id(), self.pid, eid, key, t + r.uniform(1, 6) * HOUR))
        self.diagnose(reason, eid, t + 2 * HOUR)

        # daily labs: the acute shift resolves, or (for some) the kidneys keep worsening
        worsening = r.random() < 0.15 + 0.1 * min(severity, 2.0)
        days = int(los // DAY)
        creat_first = admission["creatinine"]
        stay_sodium, stay_potassium = [admission["sodium"]], [admission["potassium"]]
        creat_last, lactate_last = admission["creatinine"], admission["lactate"]
        for day in range(1, days + 1):
            when = t + day * DAY + r.uniform(-2, 2) * HOUR
            if when >= end:
                break
            fade = math.exp(-0.35 * day)
            shift = {k: v * fade for k, v in acute.items()}
            if worsening:
                shift["creatinine"] = acute["creatinine"] + 0.12 * day
            keys = c.BMP + (("lactate", "wbc") if day % 2 == 0 else ())
            values = self.draw_labs(keys, when, shift)
            self.emit_labs(eid, when, values)
            stay_sodium.append(values["sodium"])
            stay_potassium.append(values["potassium"])
            creat_last = values["creatinine"]
            lactate_last = values.get("lactate", lactate_last)
        if creat_last > 1.5 * creat_first and reason != "aki":
            self.diagnose("aki", eid, end - 6 * HOUR)
        if creat_last > 4.0 and r.random() < 0.5:
            self.emit("Procedure", fhir.procedure(self.new_id(), self.pid, eid, "hemodialysis", end - 12 * HOUR))

        stay_meds = set(self.medications) | set(c.INPATIENT_ROUTINE) | set(c.ACUTE_MEDICATION[reason])
        if min(stay_potassium) < 3.5:
            stay_meds.add("potassium_chloride")
        if r.random() < 0.3:
            stay_meds.add("furosemide" if has_hf else "prednisone")
        for med in sorted(stay_meds):
            self.prescribe(med, eid, t + r.uniform(1, 8) * HOUR)

        self.onsets_during(stay)
        # the outcomes
        if los >= DAY:
            # the stay is over before the export, so its label is always known
            self.truth("los_7d", t + DAY, p_long, eid, window_end=t + min(los, 7 * DAY), label=los > 7 * DAY)
        # In-hospital death, except inside the 30-day window of an earlier discharge (there, deaths come from
        # that discharge's draw only, which keeps its truth exact).
        in_window = any(t <= when + 30 * DAY for when, _ in self.mortality_draws)
        if not in_window and r.random() < risk.in_hospital_death(age, labs):
            self.death = end - 10 * 60
            return stay
        past_year = sum(1 for s in self.stays[:-1] if s.end > t - YEAR)
        stay_diagnoses = {reason} | ({"aki"} if creat_last > 1.5 * creat_first else set())
        high_risk = len(stay_diagnoses & set(c.HIGH_READMISSION)) + ("heart_failure" in self.diagnosed)
        state = risk.DischargeState(
            age=self.age(end), n_chronic=self.n_chronic(end), los_days=los / DAY, first_creatinine=creat_first,
            last_creatinine=creat_last, last_lactate=lactate_last, high_risk_diagnoses=high_risk,
            n_medications=len(stay_meds), admissions_past_year=past_year,
        )  # fmt: skip
        self.discharge(end, eid, state, stay_sodium, stay_potassium, stay_meds)
        return stay

    def discharge(self, end: float, eid: str, state: risk.DischargeState, sodium: list[float],
                  potassium: list[float], stay_meds: set[str]) -> None:  # fmt: skip
        r = self.rng
        # Mortality within 30 days (background deaths folded in, so the background clock pauses). A drawn
        # death is pending until it happens; while one is pending no new draw is made, and the truth of a
        # later discharge inside its window follows from the earlier draws (risk.pending_onset_truth).
        p_death = risk.mortality(state)
        truth = risk.pending_onset_truth(self.mortality_draws, end, p_death, window=30 * DAY)
        self.mortality_draws.append((end, p_death))
        self.epoch += 1
        if self.death is None and r.random() < p_death:
            self.death = end + r.uniform(0.1, 30.0) * DAY
        if self.death is None:
            self.schedule(end + 30 * DAY, "resume_background", self.epoch)
        self.truth("mortality_30d", end, truth, eid, window_end=end + 30 * DAY)

        # Readmission: the model's planned readmission, and the unplanned process restarted at discharge.
        # Points where death comes first are dropped when labels are settled, as the labels stage does.
        if r.random() < risk.planned_readmission(state):
            self.schedule(end + r.uniform(1.0, 30.0) * DAY, "admit", "readmission")
        self.schedule_unplanned_admission(end)
        p_readmit = risk.readmission(state, self.admission_rate())
        self.truth("readmission_30d", end, p_readmit, eid, window_end=end + 30 * DAY)

        # condition onsets within a year, from their precursors
        x = risk.Precursors(
            age=state.age, last_systolic=self.last("systolic", 125.0), systolic_slope=self.slope("systolic", end),
            bmi=self.last("bmi", 27.0), last_glucose=self.last("glucose", 95.0),
            glucose_slope=self.slope("glucose", end),
            weight_gain=self.slope("weight", end) * 3.0,
            min_sodium=min(sodium), worst_potassium_deviation=max(abs(k - 4.2) for k in potassium),
            on_diuretic=bool(stay_meds & {"furosemide", "hydrochlorothiazide"}),
            last_creatinine=state.last_creatinine,
        )  # fmt: skip
        for group, task in risk.CONDITION_TASKS.items():
            if group in self.group_diagnosed:
                continue
            p = risk.condition_onset(group, x)
            draws = self.condition_draws[group]
            scheduled = risk.pending_onset_truth(draws, end, p)
            background = math.exp(-risk.condition_background_rate(group, self.age(self.history_start)))
            truth = 1.0 - (1.0 - scheduled) * background
            draws.append((end, p))
            if group not in self.pending_onset and r.random() < p:
                onset = end + r.uniform(0.0, 1.0) * YEAR
                self.pending_onset[group] = onset
                self.schedule(onset, "onset", group)
            self.truth(task, end, truth, eid, window_end=end + YEAR, group=group)

    def truth(self, task: str, when: float, p: float, eid: str, *, window_end: float, group: str | None = None,
              label: bool | None = None) -> None:  # fmt: skip
        """Record a prediction point; labels are read off the realized history by ``settle``.

        The time is whole seconds, as the export writes it, so that it equals the encounter's end (discharge)
        or start + 24 h (length of stay) in the warehouse.
        """
        point = float(math.floor(when))
        self.out.truth.append([task, self.pid, point, p, label, window_end > self.opts.end, eid, group, window_end])

    def settle(self) -> None:
        """Labels as the export shows them: what happened inside the window, before the export."""
        rows = self.out.truth[self.truth_from :]
        kept = []
        for row in rows:
            task, _, when, _, _, _, _, group, window_end = row
            horizon = min(window_end, self.opts.end)
            if group is not None:
                onset = self.group_diagnosed.get(group)
                row[4] = onset is not None and when < onset <= horizon
            elif task == "mortality_30d":
                row[4] = self.death is not None and when < self.death <= horizon
            elif task == "readmission_30d":
                back = min((s.start for s in self.stays if s.start > when), default=None)
                if self.death is not None and when < self.death <= horizon and (back is None or back > self.death):
                    continue  # died before any readmission: not a prediction point
                row[4] = back is not None and back <= horizon
            del row[7:]  # group and window end were for settling only
            kept.append(row)
        self.out.truth[self.truth_from :] = kept
