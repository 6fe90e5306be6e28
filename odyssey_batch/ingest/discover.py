"""What an export folder holds: which files to load, in which format, and what its manifest promises.

Recognized:
- FHIR Bulk Data NDJSON: ``Patient.ndjson``, ``Patient.000.ndjson``, ``export_Patient.ndjson``, ``.jsonl``,
  each optionally ``.gz``. The resource type in the name (when it is a FHIR type) must match every line.
- JSON documents: ``*.json`` / ``*.json.gz`` holding a Bundle (collection, transaction, batch, searchset,
  document...) or a single resource.
- The Bulk Data ``manifest.json``: ``transactionTime``, ``output[].count`` (checked against what is read) and
  ``error[]`` files (their OperationOutcomes are quarantined as export errors).
- A bulk client's ``log.ndjson`` and any other file are listed as ignored, never loaded; so is a subfolder with
  a ``manifest.json`` of its own (another export, such as late-arriving files: ingest it on its own).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

import orjson

from odyssey_batch.ingest.validate import model_class
from odyssey_batch.storage import Location

_NDJSON = re.compile(r"\.(ndjson|jsonl)(\.gz)?$", re.IGNORECASE)
_JSON = re.compile(r"\.json(\.gz)?$", re.IGNORECASE)
MANIFEST_NAMES = ("manifest.json",)
LOG_NAMES = ("log.ndjson", "log.ndjson.gz")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class ExportFile:
    name: str
    size: int
    format: str  # 'ndjson' | 'document' | 'export-error'
    resource_type: str | None = None  # declared by the manifest or the file name
    manifest_count: int | None = None

    @property
    def gzipped(self) -> bool:
        return self.name.lower().endswith(".gz")


@dataclass
class ExportPlan:
    files: list[ExportFile]
    transaction_time: str | None = None
    manifest: str | None = None
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # listed in the manifest, not found


def type_from_name(name: str) -> str | None:
    """The FHIR resource type a bulk file name declares (``Observation.000.ndjson.gz`` -> Observation)."""
    base = _NDJSON.sub("", posixpath.basename(name))
    stem = base.split(".")[0]
    candidate = stem.rsplit("_", 1)[-1]
    if candidate and candidate[0].isupper() and model_class(candidate) is not None:
        return candidate
    return None


def _manifest_entries(manifest: dict, key: str) -> list[dict]:
    entries = manifest.get(key) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ManifestError(f"manifest '{key}' must be a list of objects")
    return entries


def _url_name(url: str) -> str:
    return posixpath.basename(urlparse(url).path)


def plan_export(location: Location) -> ExportPlan:
    files = location.list_files()
    manifests = [f for f in files if posixpath.basename(f.name).lower() in MANIFEST_NAMES]
    manifest_file = next((f for f in manifests if "/" not in f.name), None)
    # A subfolder with a manifest of its own is another export (e.g. late-arriving files): ingest it separately.
    nested = tuple(posixpath.dirname(f.name) + "/" for f in manifests if "/" in f.name)
    plan = ExportPlan(files=[])
    plan.ignored.extend(f.name for f in files if f.name.startswith(nested))
    files = [f for f in files if not f.name.startswith(nested)]
    by_base = {posixpath.basename(f.name): f for f in files}

    declared: dict[str, tuple[str | None, int | None]] = {}
    error_files: set[str] = set()
    if manifest_file is not None:
        with location.open(manifest_file.name) as fh:
            try:
                manifest = orjson.loads(fh.read())
            except orjson.JSONDecodeError as exc:
                raise ManifestError(f"{manifest_file.name} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise ManifestError(f"{manifest_file.name} is not a JSON object")
        plan.manifest = manifest_file.name
        plan.transaction_time = manifest.get("transactionTime")
        for entry in _manifest_entries(manifest, "output"):
            base = _url_name(str(entry.get("url", "")))
            count = entry.get("count")
            declared[base] = (entry.get("type"), int(count) if isinstance(count, int) else None)
        for entry in _manifest_entries(manifest, "error"):
            error_files.add(_url_name(str(entry.get("url", ""))))
        plan.missing = sorted(b for b in [*declared, *error_files] if b and b not in by_base)

    for f in files:
        base = posixpath.basename(f.name)
        lower = base.lower()
        if f is manifest_file or lower in LOG_NAMES:
            plan.ignored.append(f.name)
        elif base in error_files:
            plan.files.append(ExportFile(f.name, f.size, "export-error", "OperationOutcome"))
        elif _NDJSON.search(base):
            manifest_type, count = declared.get(base, (None, None))
            plan.files.append(ExportFile(f.name, f.size, "ndjson", manifest_type or type_from_name(base), count))
        elif _JSON.search(base):
            plan.files.append(ExportFile(f.name, f.size, "document"))
        else:
            plan.ignored.append(f.name)
    return plan
