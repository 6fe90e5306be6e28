"""Validation of one FHIR resource with ``fhir.resources`` (R4B models for R4 data).

A resource passes when it is a JSON object nested at most ``MAX_DEPTH`` levels, with a known ``resourceType``,
an id, no character Postgres cannot store (NUL), no control character FHIR forbids in a string, a model-valid
body, and a resolvable patient reference. Anything else raises ``Rejected`` with a short reason code and a
readable message; the caller quarantines the original text with both.

Nesting is checked first and without recursion: the model validation and normalization recurse, and a
pathologically nested resource would otherwise end in a ``RecursionError`` (fhir.resources fails near 200 levels
of nested extensions; orjson refuses to parse beyond 1024 levels or to serialize beyond 255). Real resources
nest a few dozen levels at most (a QuestionnaireResponse's items, a Bundle inside a Bundle).

Control characters: FHIR strings should contain no character below U+0020 except tab, CR and LF (R4 datatypes,
``string``). A resource with any other one (escaped in JSON as ``\\u0001`` to ``\\u001f``, ``\\b`` or ``\\f``) is
quarantined as ``control-character`` naming the element, rather than loaded with characters that break
downstream text (codes, displays, CSV and terminal output) or silently altered; the quarantine keeps its original
text. Raw control bytes inside a JSON string are not JSON at all (``invalid-json``).
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
# A JSON escape of a control character FHIR forbids in strings: U+0001-U+001F but tab, LF and CR.
_CONTROL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\(?:u00(?:0[1-8bBcCeEfF]|1[0-9a-fA-F])|[bf])")
_CONTROL_CHARS = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f]")
MAX_DEPTH = 100  # nesting levels of JSON objects and arrays in one resource (the resource itself is level 1)


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


def _identity(obj: Any) -> tuple[str | None, str | None]:
    if not isinstance(obj, dict):
        return None, None
    resource_type, resource_id = obj.get("resourceType"), obj.get("id")
    return (resource_type if isinstance(resource_type, str) else None,
            resource_id if isinstance(resource_id, str) else None)  # fmt: skip


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ``Rejected('too-deeply-nested')`` if objects and arrays nest more than ``limit`` levels."""
    if not isinstance(obj, (dict, list)):
        return
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    raise Rejected(
                        "too-deeply-nested",
                        f"JSON objects and arrays nest more than {limit} levels deep",
                        *_identity(obj),
                    )
                stack.append((child, depth + 1))


def json_error_reason(error: Exception) -> str:
    """The reason code for a JSON parse error: ``too-deeply-nested`` for orjson's depth limit, else ``invalid-json``."""
    message = str(error).lower()
    return "too-deeply-nested" if "depth limit" in message or "recursion limit" in message else "invalid-json"


def _control_character(obj: Any) -> tuple[str, str] | None:
    """``(element path, character)`` of the first string (or key) holding a forbidden control character."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, ())]
    while stack:
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            for text, where in ((key, path), (child, (*path, key))):
                if isinstance(text, str) and (found := _CONTROL_CHARS.search(text)):
                    return _location(where) or "(top level)", found.group()
            if isinstance(child, (dict, list)):
                stack.append((child, (*path, key)))
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
    check_depth(obj)
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
    if ("\\u00" in text or "\\b" in text or "\\f" in text) and _CONTROL_ESCAPE.search(text):
        found = _control_character(obj)
        if found is not None:
            where, char = found
            raise Rejected(
                "control-character",
                f"{resource_type}.{where} contains the control character U+{ord(char):04X}; FHIR strings hold no "
                "character below U+0020 but tab, CR and LF",
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
