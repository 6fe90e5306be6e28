"""Resolving FHIR references to (resource type, id).

Accepted forms: relative ``Patient/123``, absolute ``https://server/fhir/Patient/123`` (with or without
``/_history/n``), ``urn:uuid:...``/``urn:oid:...`` resolved through the enclosing Bundle's ``fullUrl``s, and
contained ``#id``. Conditional references (``Practitioner?identifier=...``) name no id and do not resolve;
that is fine for resource types we keep only raw, and an error where we need the target (the patient).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_LITERAL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


@dataclass(frozen=True)
class Target:
    resource_type: str | None  # None for a contained reference whose type is not known yet
    resource_id: str
    contained: bool = False


def resolve(reference: str | None, full_urls: Mapping[str, tuple[str, str]] | None = None) -> Target | None:
    """The target of a reference string, or None when it cannot be resolved to an id."""
    if not reference:
        return None
    if reference.startswith("#"):
        return Target(None, reference[1:], contained=True)
    if full_urls and reference in full_urls:
        resource_type, resource_id = full_urls[reference]
        return Target(resource_type, resource_id)
    if reference.startswith("urn:") or "?" in reference:
        return None
    match = _LITERAL.search(reference)
    if match is None:
        return None
    return Target(match.group(1), match.group(2))


def reference_of(value: object) -> str | None:
    """The ``reference`` string of a FHIR Reference element, if any."""
    if isinstance(value, dict):
        ref = value.get("reference")
        return ref if isinstance(ref, str) else None
    return None
