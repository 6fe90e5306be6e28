"""Code systems and choosing the coding of a CodeableConcept.

A CodeableConcept may carry several codings in any order. We pick by system, not by position: the preferred
systems for the resource type first (e.g. LOINC for observations), then any other coding with a code. Known
system URIs get short names, which later become token prefixes (``LOINC:2160-0``); codings with no system
are ``LOCAL``; other systems keep their URI so that nothing collides and data-quality checks can see them.

A concept with no coding but a ``text`` (``{"text": "Aspirin 81 mg tablet"}``, common in feeds that send free
text) is kept, unless the settings say otherwise (``ODYSSEY_KEEP_TEXT_CODES=false``): its code system is
``TEXT`` and its code the normalized text (lower-cased, whitespace collapsed, at most ``TEXT_CODE_LENGTH``
characters), so that the same free text always gives the same code; the display keeps the original text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SYSTEM_NAMES: dict[str, str] = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://www.cms.gov/Medicare/Coding/ICD10": "ICD10PCS",
    "http://hl7.org/fhir/sid/icd-10-pcs": "ICD10PCS",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://hl7.org/fhir/sid/cvx": "CVX",
}
LOCAL = "LOCAL"
TEXT = "TEXT"
TEXT_CODE_LENGTH = 120
_WHITESPACE = re.compile(r"\s+")
UCUM = "http://unitsofmeasure.org"

PREFERRED: dict[str, tuple[str, ...]] = {
    "Condition": ("ICD10CM", "ICD10", "SNOMED", "ICD9CM"),
    "Procedure": ("SNOMED", "ICD10PCS", "CPT", "ICD9CM"),
    "Medication": ("RXNORM", "NDC", "SNOMED"),
    "Observation": ("LOINC", "SNOMED"),
    "Encounter": ("SNOMED", "CPT"),
}


def system_name(uri: str | None, aliases: Mapping[str, str] | None = None) -> str:
    """The short name of a code system: the source profile's alias for it, else the known name, else the URI."""
    if not uri:
        return LOCAL
    if aliases and uri in aliases:
        return aliases[uri]
    return SYSTEM_NAMES.get(uri, uri)


def _codings_with_code(concept: object) -> list[dict]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or () if isinstance(c, dict) and c.get("code")]


def pick_coding(
    concept: object, kind: str, aliases: Mapping[str, str] | None = None
) -> tuple[str, str, str | None] | None:
    """``(code_system, code, display)`` of the best coding of a CodeableConcept, or None if none has a code."""
    codings = _codings_with_code(concept)
    if not codings:
        return None
    preference = PREFERRED.get(kind, ())

    def rank(item: tuple[int, dict]) -> tuple[int, int]:
        position, coding = item
        name = system_name(coding.get("system"), aliases)
        return (preference.index(name) if name in preference else len(preference), position)

    _, best = min(enumerate(codings), key=rank)
    display = best.get("display") or concept.get("text")
    return system_name(best.get("system"), aliases), str(best["code"]), display


def text_code(text: object) -> str | None:
    """The code of a free-text concept: lower-cased, whitespace collapsed, truncated; None for no text."""
    if not isinstance(text, str):
        return None
    code = _WHITESPACE.sub(" ", text).strip().lower()[:TEXT_CODE_LENGTH].rstrip()
    return code or None


def only_text(concept: object) -> bool:
    """True when a CodeableConcept has no coding with a code but a non-blank ``text``."""
    return isinstance(concept, dict) and not _codings_with_code(concept) and text_code(concept.get("text")) is not None


def pick_code(
    concept: object, kind: str, keep_text: bool = True, aliases: Mapping[str, str] | None = None
) -> tuple[str, str, str | None] | None:
    """Like ``pick_coding``, falling back to the concept's free text as a ``TEXT`` code when ``keep_text``."""
    picked = pick_coding(concept, kind, aliases)
    if picked is not None or not keep_text or not isinstance(concept, dict):
        return picked
    code = text_code(concept.get("text"))
    return (TEXT, code, concept["text"].strip()) if code is not None else None


def first_code(concept: object) -> str | None:
    """The first coded value of a CodeableConcept (for status-like fields)."""
    if isinstance(concept, dict):
        for coding in concept.get("coding") or ():
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"])
    return None
