"""Validation of one FHIR resource with ``fhir.resources`` (R4B models for R4 data).

A resource passes when it is a JSON object with a known ``resourceType``, an id, a model-valid body, no
character Postgres cannot store, and a resolvable patient reference. Anything else raises ``Rejected`` with a
short reason code and a readable message; the caller quarantines the original text with both.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from odyssey_batch.ingest.normalize import Context, Normalized, UnresolvablePatient, normalize

# A JSON \u0000 escape (an odd number of backslashes before u0000), wherever it is: even in a duplicate key
# that the parser overrode, Postgres jsonb would refuse the text.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class Rejected(Exception):
    def __init__(self, reason: str, message: str, resource_type: str | None = None, resource_id: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.resource_type = resource_type
        self.resource_id = resource_id


@lru_cache(maxsize=256)
def model_class(resource_type: str):
    """The R4B model class for a resource type, or None when the type does not exist."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError, AttributeError, ImportError):
        return None


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_validation_error(resource_type: str, error: ValidationError, limit: int = 3) -> str:
    parts = []
    for item in error.errors()[:limit]:
        where = _location(tuple(item.get("loc", ())))
        parts.append(f"{resource_type}.{where}: {item.get('msg')}" if where else f"{resource_type}: {item.get('msg')}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def check_resource(obj: Any, ctx: Context, text: str, expected_type: str | None = None) -> Normalized:
    """Validate one parsed resource (``text`` is its JSON) and normalize it. Raises Rejected."""
    if not isinstance(obj, dict):
        raise Rejected("not-a-resource", f"expected a JSON object, got {type(obj).__name__}")
    resource_type = obj.get("resourceType")
    resource_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    if not isinstance(resource_type, str) or not resource_type:
        raise Rejected("not-a-resource", "missing resourceType", None, resource_id)
    cls = model_class(resource_type)
    if cls is None:
        raise Rejected("unknown-resource-type", f"unknown resourceType {resource_type!r}", resource_type, resource_id)
    if expected_type and resource_type != expected_type:
        raise Rejected(
            "resource-type-mismatch",
            f"a {resource_type} in a file of {expected_type} resources",
            resource_type,
            resource_id,
        )
    if resource_id is None:
        raise Rejected("missing-id", f"{resource_type} has no id", resource_type, None)
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise Rejected(
            "unsupported-character",
            "contains a NUL character (\\u0000), which Postgres jsonb cannot store",
            resource_type,
            resource_id,
        )
    try:
        cls.model_validate(obj)
    except ValidationError as exc:
        raise Rejected(
            "fhir-validation", describe_validation_error(resource_type, exc), resource_type, resource_id
        ) from None
    except (ValueError, TypeError) as exc:  # validators that raise outside pydantic's error model
        raise Rejected("fhir-validation", f"{resource_type}: {exc}", resource_type, resource_id) from None
    try:
        return normalize(obj, ctx)
    except UnresolvablePatient as exc:
        raise Rejected("unresolvable-reference", str(exc), resource_type, resource_id) from None
