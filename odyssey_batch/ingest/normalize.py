"""From one validated FHIR resource to its row in the normalized ``ehr.*`` tables.

Pure functions over the resource's JSON (a dict). References are resolved to ids here; whether the referenced
patient and encounter exist is checked later, when the whole run is known (files may come in any order).

A resource of a type with an ``ehr`` table either gets its row or says why not (``Normalized.skipped``), one of
``EXCLUSION_REASONS``; the merge adds the reasons only it can know (see ``commit.py``). Every resource is thus
accounted for: normalized, or excluded with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from odyssey_batch.ingest import codes, fhirtime
from odyssey_batch.ingest.references import Target, reference_of, resolve
from odyssey_batch.profiles import GENERIC, SourceProfile

# Where a resource names the patient it belongs to, in order of preference.
PATIENT_FIELDS = ("subject", "patient", "beneficiary")

# Resource types with a normalized table, and that table.
EHR_TABLES: dict[str, str] = {
    "Patient": "patient",
    "Encounter": "encounter",
    "Condition": "condition",
    "Procedure": "procedure",
    "MedicationRequest": "medication_request",
    "Observation": "observation",
}


# Why a loaded resource gets no ehr row (it stays raw in fhir.resource): the reasons of ops.ingest_exclusion.
NOT_MODELLED = "not-modelled"
EXCLUSION_REASONS = {
    NOT_MODELLED: "its type has no ehr table",
    "no-patient": "its subject is not a Patient (a Group, a Device, a Location...)",
    "no-code": "its code (or medication) has neither a coding with a code nor a text",
    "text-only-code": "its code is free text only, and ODYSSEY_KEEP_TEXT_CODES is false",
    "unresolved-medication": "its medicationReference resolves to no Medication",
    "medication-without-code": "the Medication it references has no code, nor an ingredient with one",
}


class UnresolvablePatient(ValueError):
    """The resource points at a patient through a reference that names no resolvable id."""


@dataclass
class Normalized:
    patient_ref: str | None = None
    encounter_ref: str | None = None
    medication_ref: str | None = None  # Medication id still to be looked up (medicationReference)
    ehr: dict[str, Any] | None = None  # the row for EHR_TABLES[type]; for Medication, its chosen code
    components: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None  # why a resource with an ehr table got no row


@dataclass(frozen=True)
class Context:
    default_tz: str = "UTC"
    full_urls: Mapping[str, tuple[str, str]] | None = None  # Bundle fullUrl -> (type, id)
    keep_text_codes: bool = True  # a concept with only a text becomes a TEXT code (see codes.py)
    profile: SourceProfile = GENERIC  # admissions, code-system aliases (default_tz is already the profile's zone)

    @property
    def aliases(self) -> Mapping[str, str]:
        return self.profile.code_systems

    def resolve(self, element: object) -> Target | None:
        return resolve(reference_of(element), self.full_urls)


def patient_reference(resource: dict, ctx: Context) -> str | None:
    """The id of the Patient this resource belongs to, or None when it names no patient."""
    if resource.get("resourceType") == "Patient":
        return None
    for name in PATIENT_FIELDS:
        element = resource.get(name)
        ref = reference_of(element)
        if ref is None:
            continue
        target = ctx.resolve(element)
        if target is not None:
            return target.resource_id if target.resource_type == "Patient" else None
        declared = element.get("type") if isinstance(element, dict) else None
        if declared == "Patient" or ref.startswith("Patient") or "/Patient/" in ref or ref.startswith("urn:"):
            raise UnresolvablePatient(f"{name}.reference {ref!r} cannot be resolved to a Patient id")
        return None
    return None


def _ts(value: str | None, ctx: Context) -> str | None:
    return fhirtime.to_timestamp(value, ctx.default_tz)


def _coded(resource: dict, kind: str, ctx: Context, element: str = "code",
           out: Normalized | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The chosen coding as row fields; when there is none, None (and ``out`` records why)."""
    concept = resource.get(element)
    picked = codes.pick_code(concept, kind, ctx.keep_text_codes, ctx.aliases)
    if picked is None:
        if out is not None:
            out.skipped = "text-only-code" if codes.only_text(concept) else "no-code"
        return None
    system, code, display = picked
    return {"code_system": system, "code": code, "display": display}


def _patient(r: dict, ctx: Context, out: Normalized) -> dict | None:
    death = r.get("deceasedDateTime")
    return {
        "patient_id": r["id"],
        "birth_date": fhirtime.to_date(r.get("birthDate")),
        "gender": r.get("gender"),
        "deceased": bool(r.get("deceasedBoolean")) or death is not None,
        "death_time": _ts(death, ctx),
        # a date-only death is a calendar date in the source's zone: death_time is its first instant
        "death_date_only": fhirtime.is_partial(death) if death else None,
    }


def _encounter(r: dict, ctx: Context, out: Normalized) -> dict | None:
    klass = r.get("class")
    types = r.get("type") or []
    picked = codes.pick_code(types[0], "Encounter", ctx.keep_text_codes, ctx.aliases) if types else None
    period = r.get("period")
    part_of = ctx.resolve(r.get("partOf"))
    hospitalization = r.get("hospitalization")
    disposition = None
    if isinstance(hospitalization, dict):
        disposition = codes.first_code(hospitalization.get("dischargeDisposition"))
    return {
        "encounter_id": r["id"],
        "class_code": klass.get("code") if isinstance(klass, dict) else None,
        "type_system": picked[0] if picked else None,
        "type_code": picked[1] if picked else None,
        "type_display": picked[2] if picked else None,
        "status": r.get("status"),
        "start_time": _ts(fhirtime.period_start(period), ctx),
        "end_time": _ts(fhirtime.period_end(period), ctx),
        "admission": ctx.profile.is_admission(r),
        "part_of": part_of.resource_id if part_of is not None and part_of.resource_type == "Encounter" else None,
        "discharge_disposition": disposition,
        "died_in_stay": ctx.profile.died_in_stay(disposition),
    }


def _condition(r: dict, ctx: Context, out: Normalized) -> dict | None:
    coded = _coded(r, "Condition", ctx, out=out)
    if coded is None:
        return None
    onset = r.get("onsetDateTime") or fhirtime.period_start(r.get("onsetPeriod"))
    abatement = r.get("abatementDateTime") or fhirtime.period_start(r.get("abatementPeriod"))
    return {
        "condition_id": r["id"],
        **coded,
        "onset_time": _ts(onset, ctx),
        "recorded_time": _ts(r.get("recordedDate"), ctx),
        "abatement_time": _ts(abatement, ctx),
        "clinical_status": codes.first_code(r.get("clinicalStatus")),
    }


def _procedure(r: dict, ctx: Context, out: Normalized) -> dict | None:
    coded = _coded(r, "Procedure", ctx, out=out)
    if coded is None:
        return None
    performed = r.get("performedDateTime") or fhirtime.period_start(r.get("performedPeriod"))
    return {
        "procedure_id": r["id"],
        **coded,
        "performed_time": _ts(performed, ctx),
        "status": r.get("status"),
    }


def _contained(r: dict, target: Target) -> dict | None:
    for item in r.get("contained") or ():
        if isinstance(item, dict) and item.get("id") == target.resource_id:
            return item
    return None


def first_ingredient(medication: dict, ctx: Context) -> dict[str, Any] | str | None:
    """What a Medication without a code of its own stands for (a mix, e.g. a drug in saline): the code of its
    first ingredient that has one, as row fields; or the id of the first ingredient Medication to look up; or
    None. Ingredients given as a code (``itemCodeableConcept``) or a contained Medication are read here."""
    for ingredient in medication.get("ingredient") or ():
        if not isinstance(ingredient, dict):
            continue
        if "itemCodeableConcept" in ingredient:
            picked = codes.pick_code(ingredient["itemCodeableConcept"], "Medication", ctx.keep_text_codes, ctx.aliases)
            if picked is not None:
                return {"code_system": picked[0], "code": picked[1], "display": picked[2]}
            continue
        target = ctx.resolve(ingredient.get("itemReference"))
        if target is None:
            continue
        if target.contained:
            item = _contained(medication, target)
            picked = codes.pick_code(item.get("code"), "Medication", ctx.keep_text_codes, ctx.aliases) if item else None
            if picked is not None:
                return {"code_system": picked[0], "code": picked[1], "display": picked[2]}
            continue
        if target.resource_type == "Medication":
            return target.resource_id
    return None


def _medication_request(r: dict, ctx: Context, out: Normalized) -> dict | None:
    row: dict[str, Any] = {
        "medication_request_id": r["id"],
        "authored_time": _ts(r.get("authoredOn"), ctx),
        "status": r.get("status"),
        "intent": r.get("intent"),
        "medication_id": None,
    }
    if "medicationCodeableConcept" in r or "medicationReference" not in r:
        coded = _coded(r, "Medication", ctx, "medicationCodeableConcept", out)
        return {**row, **coded} if coded is not None else None
    target = ctx.resolve(r.get("medicationReference"))
    if target is not None and target.contained:
        medication = _contained(r, target)
        if medication is None:
            out.skipped = "unresolved-medication"
            return None
        coded = _coded(medication, "Medication", ctx, out=out)
        if coded is None and out.skipped == "no-code" and ctx.profile.medication_mix == "first_ingredient":
            ingredient = first_ingredient(medication, ctx)
            if isinstance(ingredient, dict):
                out.skipped = None
                return {**row, **ingredient}
            if isinstance(ingredient, str):  # a contained mix of Medications sent apart: looked up at commit
                out.skipped = None
                row["medication_id"] = ingredient
                out.medication_ref = ingredient
                return row
        if coded is None:
            out.skipped = "medication-without-code" if out.skipped == "no-code" else out.skipped
            return None
        return {**row, **coded}
    if target is None or target.resource_type != "Medication":
        out.skipped = "unresolved-medication"
        return None
    row["medication_id"] = target.resource_id
    out.medication_ref = target.resource_id
    return row  # code filled in when the run is committed and all Medications are known


def _value(element: dict, kind: str) -> tuple[float | None, str | None, str | None]:
    """``(value_num, unit, value_text)`` of an element carrying a FHIR ``value[x]``."""
    if "valueQuantity" in element:
        q = element["valueQuantity"] or {}
        value = q.get("value")
        unit = q.get("code") if q.get("system") == codes.UCUM and q.get("code") else q.get("unit") or q.get("code")
        text = f"{q['comparator']}{value}" if q.get("comparator") else None
        return (float(value) if value is not None else None), unit, text
    if "valueInteger" in element:
        return float(element["valueInteger"]), None, None
    if "valueString" in element:
        return None, None, element["valueString"]
    if "valueBoolean" in element:
        return None, None, "true" if element["valueBoolean"] else "false"
    if "valueCodeableConcept" in element:
        concept = element["valueCodeableConcept"]
        picked = codes.pick_coding(concept, kind)
        text = (picked[2] or picked[1]) if picked else concept.get("text")
        return None, None, text
    for name in ("valueDateTime", "valueTime"):
        if name in element:
            return None, None, element[name]
    return None, None, None


def _category(r: dict) -> str | None:
    found = [c for cat in r.get("category") or () if (c := codes.first_code(cat))]
    if "laboratory" in found:
        return "laboratory"
    return found[0] if found else None


def _observation(r: dict, ctx: Context, out: Normalized) -> dict | None:
    coded = _coded(r, "Observation", ctx, out=out)
    if coded is None:
        return None
    effective = (
        r.get("effectiveDateTime") or r.get("effectiveInstant") or fhirtime.period_start(r.get("effectivePeriod"))
    )
    value_num, unit, value_text = _value(r, "Observation")
    for seq, component in enumerate(r.get("component") or (), start=1):
        picked = codes.pick_coding(component.get("code"), "Observation", ctx.aliases)  # coded-only
        if picked is None:
            continue
        c_num, c_unit, c_text = _value(component, "Observation")
        out.components.append(
            {
                "seq": seq,
                "code_system": picked[0],
                "code": picked[1],
                "display": picked[2],
                "value_num": c_num,
                "unit": c_unit,
                "value_text": c_text,
            }
        )
    return {
        "observation_id": r["id"],
        "category": _category(r),
        **coded,
        "effective_time": _ts(effective, ctx),
        "value_num": value_num,
        "unit": unit,
        "value_text": value_text,
        "status": r.get("status"),
    }


_ROW_BUILDERS: dict[str, Callable[[dict, Context, Normalized], dict | None]] = {
    "Patient": _patient,
    "Encounter": _encounter,
    "Condition": _condition,
    "Procedure": _procedure,
    "MedicationRequest": _medication_request,
    "Observation": _observation,
}


def normalize(resource: dict, ctx: Context) -> Normalized:
    """References and the normalized row of one resource. Raises UnresolvablePatient."""
    kind = resource["resourceType"]
    out = Normalized(patient_ref=patient_reference(resource, ctx))
    target = ctx.resolve(resource.get("encounter"))
    if target is not None and target.resource_type == "Encounter":
        out.encounter_ref = target.resource_id

    if kind == "Medication":
        out.ehr = _coded(resource, "Medication", ctx)  # used to resolve medicationReference at commit
        return out
    builder = _ROW_BUILDERS.get(kind)
    if builder is None:
        return out
    if kind != "Patient" and out.patient_ref is None:
        out.skipped = "no-patient"
        return out
    row = builder(resource, ctx, out)
    if row is not None:
        if kind != "Patient":
            row["patient_id"] = out.patient_ref
        if kind not in ("Patient", "Encounter"):
            row["encounter_id"] = out.encounter_ref
        out.ehr = row
    else:
        out.components = []
    return out
