"""Codes the generator uses: real code systems (ICD-10-CM, SNOMED CT, LOINC, RxNorm, UCUM), illustrative picks.

Each condition carries an ICD-10-CM and a SNOMED CT coding; a generated Condition uses one of them (the same
export mixes both systems, as hospital exports do). The three condition groups of the clinical tasks are
``hypertension``, ``fluid_electrolyte`` and ``lipid_disorder``.
"""

from __future__ import annotations

from dataclasses import dataclass

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"


@dataclass(frozen=True)
class Condition:
    key: str
    icd10: str
    snomed: str
    display: str
    group: str | None = None  # the task's condition group, if any


CONDITIONS = {
    c.key: c
    for c in (
        # the three task groups
        Condition("hypertension", "I10", "59621000", "Essential hypertension", "hypertension"),
        Condition("hyponatremia", "E87.1", "89627008", "Hyponatremia", "fluid_electrolyte"),
        Condition("hypokalemia", "E87.6", "43339004", "Hypokalemia", "fluid_electrolyte"),
        Condition("dehydration", "E86.0", "34095006", "Dehydration", "fluid_electrolyte"),
        Condition("hyperlipidemia", "E78.5", "55822004", "Hyperlipidemia", "lipid_disorder"),
        Condition("hypercholesterolemia", "E78.00", "13644009", "Hypercholesterolemia", "lipid_disorder"),
        # chronic comorbidities
        Condition("diabetes", "E11.9", "44054006", "Type 2 diabetes mellitus"),
        Condition("ckd", "N18.30", "433144002", "Chronic kidney disease stage 3"),
        Condition("heart_failure", "I50.9", "84114007", "Heart failure"),
        Condition("copd", "J44.9", "13645005", "Chronic obstructive pulmonary disease"),
        Condition("atrial_fibrillation", "I48.91", "49436004", "Atrial fibrillation"),
        Condition("obesity", "E66.9", "414916001", "Obesity"),
        # acute reasons for admission
        Condition("pneumonia", "J18.9", "233604007", "Pneumonia"),
        Condition("sepsis", "A41.9", "91302008", "Sepsis"),
        Condition("aki", "N17.9", "14669001", "Acute kidney injury"),
        Condition("uti", "N39.0", "68566005", "Urinary tract infection"),
        Condition("hf_exacerbation", "I50.23", "10633002", "Acute on chronic systolic heart failure"),
        Condition("copd_exacerbation", "J44.1", "195951007", "Acute exacerbation of COPD"),
        Condition("cellulitis", "L03.90", "128045006", "Cellulitis"),
        Condition("syncope", "R55", "271594007", "Syncope"),
    )
}
GROUP_CONDITIONS = {
    "hypertension": ("hypertension",),
    "fluid_electrolyte": ("hyponatremia", "hypokalemia", "dehydration"),
    "lipid_disorder": ("hyperlipidemia", "hypercholesterolemia"),
}
CHRONIC = ("diabetes", "ckd", "heart_failure", "copd", "atrial_fibrillation", "obesity")
# Discharge diagnoses that drive readmission in the hidden model.
HIGH_READMISSION = ("heart_failure", "hf_exacerbation", "copd_exacerbation", "sepsis", "aki")


@dataclass(frozen=True)
class Lab:
    key: str
    loinc: str
    display: str
    unit: str
    decimals: int
    alt_unit: str | None = None  # alternative unit seen in messy exports, and its factor
    alt_factor: float = 1.0


LABS = {
    lab.key: lab
    for lab in (
        Lab("creatinine", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 2, "umol/L", 88.42),
        Lab("sodium", "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 0),
        Lab("potassium", "2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 1),
        Lab("glucose", "2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 0, "mmol/L", 1 / 18.016),
        Lab("hemoglobin", "718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 1, "g/L", 10.0),
        Lab("wbc", "6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 1),
        Lab("lactate", "2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L", 1),
    )
}
BMP = ("sodium", "potassium", "creatinine", "glucose")
CBC = ("hemoglobin", "wbc")
ADMISSION_PANEL = (*BMP, *CBC, "lactate")

BP_PANEL = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")
WEIGHT = ("29463-7", "Body weight", "kg")
BMI = ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2")


@dataclass(frozen=True)
class Medication:
    key: str
    rxnorm: str
    display: str


MEDICATIONS = {
    m.key: m
    for m in (
        Medication("lisinopril", "314076", "lisinopril 10 MG Oral Tablet"),
        Medication("amlodipine", "197361", "amlodipine 5 MG Oral Tablet"),
        Medication("hydrochlorothiazide", "310798", "hydrochlorothiazide 25 MG Oral Tablet"),
        Medication("furosemide", "313988", "furosemide 40 MG Oral Tablet"),
        Medication("atorvastatin", "617310", "atorvastatin 20 MG Oral Tablet"),
        Medication("metformin", "860975", "metformin hydrochloride 500 MG Extended Release Oral Tablet"),
        Medication("insulin_glargine", "2563976", "insulin glargine 100 UNT/ML Pen Injector"),
        Medication("apixaban", "1364445", "apixaban 5 MG Oral Tablet"),
        Medication("tiotropium", "1552002", "tiotropium 2.5 MCG/ACTUAT Inhalation Spray"),
        Medication("ceftriaxone", "1665021", "ceftriaxone 1000 MG Injection"),
        Medication("piperacillin_tazobactam", "1659149", "piperacillin 4000 MG / tazobactam 500 MG Injection"),
        Medication("amoxicillin", "308182", "amoxicillin 250 MG Oral Capsule"),
        Medication("prednisone", "312617", "predniSONE 20 MG Oral Tablet"),
        Medication("potassium_chloride", "628958", "potassium chloride 20 MEQ Extended Release Oral Tablet"),
        Medication("enoxaparin", "854235", "enoxaparin sodium 40 MG/0.4 ML Prefilled Syringe"),
        Medication("acetaminophen", "313782", "acetaminophen 325 MG Oral Tablet"),
    )
}
# Chronic medication for each chronic condition (and task condition, once diagnosed).
CHRONIC_MEDICATION = {
    "hypertension": "lisinopril",
    "diabetes": "metformin",
    "heart_failure": "furosemide",
    "copd": "tiotropium",
    "atrial_fibrillation": "apixaban",
    "hyperlipidemia": "atorvastatin",
    "hypercholesterolemia": "atorvastatin",
    "ckd": "amlodipine",
}
ACUTE_MEDICATION = {
    "pneumonia": ("ceftriaxone",),
    "sepsis": ("piperacillin_tazobactam",),
    "uti": ("ceftriaxone",),
    "cellulitis": ("ceftriaxone",),
    "hf_exacerbation": ("furosemide",),
    "copd_exacerbation": ("prednisone",),
    "aki": (),
    "syncope": (),
}
INPATIENT_ROUTINE = ("enoxaparin", "acetaminophen")

PROCEDURES = {
    "chest_xray": ("399208008", "Plain chest X-ray"),
    "ecg": ("29303009", "Electrocardiographic procedure"),
    "blood_culture": ("30088009", "Blood culture"),
    "hemodialysis": ("302497006", "Hemodialysis"),
    "med_reconciliation": ("430193006", "Medication reconciliation"),
    "iv_fluids": ("430701006", "Resuscitation using intravenous fluid"),
}
ACUTE_PROCEDURES = {
    "pneumonia": ("chest_xray",),
    "sepsis": ("blood_culture", "iv_fluids"),
    "uti": (),
    "cellulitis": (),
    "hf_exacerbation": ("chest_xray", "ecg"),
    "copd_exacerbation": ("chest_xray",),
    "aki": ("iv_fluids",),
    "syncope": ("ecg",),
}

ENCOUNTER_TYPES = {
    "AMB": ("185349003", "Encounter for check up"),
    "EMER": ("50849002", "Emergency room admission"),
    "IMP": ("32485007", "Hospital admission"),
    "DX": ("185345009", "Encounter for symptom"),
}
