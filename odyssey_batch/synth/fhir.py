"""FHIR R4 JSON lines for the generator's events: compact, valid, and fast to produce (no dict round trip).

Every string interpolated here is either generated (ids, numbers, times) or a constant of ``catalog``, so no
JSON escaping is needed. ``tests/test_synth.py`` checks that every line parses and validates.
"""

from __future__ import annotations

import time

from odyssey_batch.synth import catalog as c


def instant(ts: float) -> str:
    """Seconds since the epoch as a FHIR dateTime in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))


def date(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _meta(version: int | None, updated: float | None) -> str:
    if version is None:
        return ""
    return f',"meta":{{"versionId":"{version}","lastUpdated":"{instant(updated or 0.0)}"}}'


def patient(pid: str, gender: str, birth: float, death: float | None, version: int | None = None,
            updated: float | None = None) -> str:  # fmt: skip
    deceased = f',"deceasedDateTime":"{instant(death)}"' if death is not None else ""
    return (
        f'{{"resourceType":"Patient","id":"{pid}"{_meta(version, updated)},'
        f'"identifier":[{{"system":"urn:oid:2.16.840.1.113883.3.9999.1","value":"MRN-{pid[:8]}"}}],'
        f'"gender":"{gender}","birthDate":"{date(birth)}"{deceased}}}'
    )


def encounter(eid: str, pid: str, klass: str, kind: str, start: float, end: float | None,
              version: int | None = None, updated: float | None = None) -> str:  # fmt: skip
    code, display = c.ENCOUNTER_TYPES[kind]
    period = f'"start":"{instant(start)}"' + (f',"end":"{instant(end)}"' if end is not None else "")
    status = "finished" if end is not None else "in-progress"
    return (
        f'{{"resourceType":"Encounter","id":"{eid}"{_meta(version, updated)},"status":"{status}",'
        f'"class":{{"system":"{c.ACT_CODE}","code":"{klass}"}},'
        f'"type":[{{"coding":[{{"system":"{c.SNOMED}","code":"{code}","display":"{display}"}}],"text":"{display}"}}],'
        f'"subject":{{"reference":"Patient/{pid}"}},"period":{{{period}}}}}'
    )


def condition(cid: str, pid: str, eid: str, cond: c.Condition, use_snomed: bool, onset: float) -> str:
    system, code = (c.SNOMED, cond.snomed) if use_snomed else (c.ICD10CM, cond.icd10)
    when = instant(onset)
    return (
        f'{{"resourceType":"Condition","id":"{cid}",'
        f'"clinicalStatus":{{"coding":[{{"system":"{c.CLINICAL_STATUS}","code":"active"}}]}},'
        f'"code":{{"coding":[{{"system":"{system}","code":"{code}","display":"{cond.display}"}}],"text":"{cond.display}"}},'
        f'"subject":{{"reference":"Patient/{pid}"}},"encounter":{{"reference":"Encounter/{eid}"}},'
        f'"onsetDateTime":"{when}","recordedDate":"{when}"}}'
    )


def procedure(prid: str, pid: str, eid: str, key: str, performed: float) -> str:
    code, display = c.PROCEDURES[key]
    return (
        f'{{"resourceType":"Procedure","id":"{prid}","status":"completed",'
        f'"code":{{"coding":[{{"system":"{c.SNOMED}","code":"{code}","display":"{display}"}}],"text":"{display}"}},'
        f'"subject":{{"reference":"Patient/{pid}"}},"encounter":{{"reference":"Encounter/{eid}"}},'
        f'"performedDateTime":"{instant(performed)}"}}'
    )


def medication_request(mid: str, pid: str, eid: str, key: str, authored: float) -> str:
    med = c.MEDICATIONS[key]
    return (
        f'{{"resourceType":"MedicationRequest","id":"{mid}","status":"active","intent":"order",'
        f'"medicationCodeableConcept":{{"coding":[{{"system":"{c.RXNORM}","code":"{med.rxnorm}",'
        f'"display":"{med.display}"}}],"text":"{med.display}"}},'
        f'"subject":{{"reference":"Patient/{pid}"}},"encounter":{{"reference":"Encounter/{eid}"}},'
        f'"authoredOn":"{instant(authored)}"}}'
    )


def _observation(oid: str, pid: str, eid: str, category: str, code: str, display: str, when: float, value: str,
                 version: int | None = None, updated: float | None = None) -> str:  # fmt: skip
    return (
        f'{{"resourceType":"Observation","id":"{oid}"{_meta(version, updated)},"status":"final",'
        f'"category":[{{"coding":[{{"system":"{c.OBS_CATEGORY}","code":"{category}"}}]}}],'
        f'"code":{{"coding":[{{"system":"{c.LOINC}","code":"{code}","display":"{display}"}}],"text":"{display}"}},'
        f'"subject":{{"reference":"Patient/{pid}"}},"encounter":{{"reference":"Encounter/{eid}"}},'
        f'"effectiveDateTime":"{instant(when)}",{value}}}'
    )


def quantity(value: float, unit: str, decimals: int) -> str:
    return f'"valueQuantity":{{"value":{round(value, decimals)},"unit":"{unit}","system":"{c.UCUM}","code":"{unit}"}}'


def lab(oid: str, pid: str, eid: str, lab: c.Lab, value: float, when: float, *, alt_unit: bool = False,
        version: int | None = None, updated: float | None = None) -> str:  # fmt: skip
    if alt_unit and lab.alt_unit:
        shown = quantity(value * lab.alt_factor, lab.alt_unit, lab.decimals + 1)
    else:
        shown = quantity(value, lab.unit, lab.decimals)
    return _observation(oid, pid, eid, "laboratory", lab.loinc, lab.display, when, shown, version, updated)


def vital(oid: str, pid: str, eid: str, code: str, display: str, value: float, unit: str, when: float) -> str:
    return _observation(oid, pid, eid, "vital-signs", code, display, when, quantity(value, unit, 1))


def blood_pressure(oid: str, pid: str, eid: str, systolic: float, diastolic: float, when: float) -> str:
    def component(code_display: tuple[str, str], value: float) -> str:
        code, display = code_display
        return (
            f'{{"code":{{"coding":[{{"system":"{c.LOINC}","code":"{code}","display":"{display}"}}]}},'
            f"{quantity(value, 'mm[Hg]', 0)}}}"
        )

    components = f'"component":[{component(c.SYSTOLIC, systolic)},{component(c.DIASTOLIC, diastolic)}]'
    return _observation(oid, pid, eid, "vital-signs", c.BP_PANEL[0], c.BP_PANEL[1], when, components)
