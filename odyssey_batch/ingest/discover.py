"""What an export folder holds: which files to load, in which format, and what its manifest promises.

Recognized:
- FHIR Bulk Data NDJSON: ``Patient.ndjson``, ``Patient.000.ndjson``, ``export_Patient.ndjson``, ``.jsonl``,
  each optionally ``.gz``. The resource type in the name (when it is a FHIR type) must match every line.
- JSON documents: ``*.json`` / ``*.json.gz`` holding a Bundle (collection, transaction, batch, searchset,
  document...) or a single resource.
- The Bulk Data ``manifest.json``: ``transactionTime``, ``output[].count`` (checked against what is read),
  ``error[]`` files (their OperationOutcomes are quarantined as export errors) and ``deleted[]`` files (Bundles of
  ``DELETE`` requests: the resources are deleted from the warehouse, see ``deletions.py``).
- A folder still being written by ``odyssey-batch pull`` (it holds ``.odyssey-incomplete``) is refused.
- A bulk client's ``log.ndjson`` and any other file are listed as ignored, never loaded; so is a subfolder with
  a ``manifest.json`` of its own (another export, such as late-arriving files: ingest it on its own).
- Entries the location refuses to read (links, special files, names that are not UTF-8, unsafe S3 keys) are
  kept in ``ExportPlan.refused``; each becomes a file problem of the run, and the rest of the export loads.

The manifest is checked before anything is loaded: a manifest that is not a JSON object, is larger than the
per-resource limit, is a refused entry (a link), or has a field of the wrong type (``output`` not a list, an
entry without a string ``url``, a ``count`` that is not a whole number, a ``type`` that is no FHIR resource type,
a ``transactionTime`` that is not an instant with a time zone, a ``url`` that is neither an http(s) URL nor a
relative path inside the export, one file listed twice) raises ``ManifestError`` with one line naming the field;
the run is then never started.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from odyssey_batch.ingest.validate import model_class
from odyssey_batch.pull.landing import INCOMPLETE_MARKER
from odyssey_batch.storage import Location
from odyssey_batch.storage.location import RefusedEntry

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
    deleted: list[ExportFile] = field(default_factory=list)  # the manifest's deleted[] files
    refused: list[RefusedEntry] = field(default_factory=list)  # entries the location will not read


def type_from_name(name: str) -> str | None:
    """The FHIR resource type a bulk file name declares (``Observation.000.ndjson.gz`` -> Observation)."""
    base = _NDJSON.sub("", posixpath.basename(name))
    stem = base.split(".")[0]
    candidate = stem.rsplit("_", 1)[-1]
    if candidate and candidate[0].isupper() and model_class(candidate) is not None:
        return candidate
    return None


def _shown(value: Any) -> str:
    """A manifest value for an error message: its JSON, cut short."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _url_name(url: str, where: str) -> str:
    """The file name an output URL points at; refuses URLs that could reach outside the export."""
    parsed = urlparse(url)
    if parsed.scheme.lower() not in ("", "http", "https"):
        raise ManifestError(f"{where} {_shown(url)} is neither an http(s) URL nor a relative path in the export")
    path = unquote(parsed.path)
    if not parsed.scheme and (parsed.netloc or path.startswith("/")):
        raise ManifestError(f"{where} {_shown(url)} is an absolute path: only files inside the export are read")
    if ".." in path.replace("\\", "/").split("/"):
        raise ManifestError(f"{where} {_shown(url)} contains '..': only files inside the export are read")
    name = posixpath.basename(path)
    if not name:
        raise ManifestError(f"{where} {_shown(url)} names no file")
    return name


def _manifest_entries(manifest: dict, key: str, source: str) -> list[tuple[str, str | None, int | None]]:
    """``(file name, type, count)`` of each entry of ``output`` or ``error``, every field checked."""
    entries = manifest.get(key)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ManifestError(f"{source}: '{key}' must be a list, not {_shown(entries)}")
    out: list[tuple[str, str | None, int | None]] = []
    for index, entry in enumerate(entries):
        where = f"{source}: {key}[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where} must be an object, not {_shown(entry)}")
        url = entry.get("url")
        if not isinstance(url, str) or not url:
            raise ManifestError(f"{where}.url is missing" if url is None else f"{where}.url {_shown(url)} is not a URL")
        resource_type = entry.get("type")
        if resource_type is not None and (not isinstance(resource_type, str) or model_class(resource_type) is None):
            raise ManifestError(f"{where}.type {_shown(resource_type)} is not a FHIR resource type")
        count = entry.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ManifestError(f"{where}.count {_shown(count)} is not a whole number")
        out.append((_url_name(url, f"{where}.url"), resource_type, count))
    return out


def check_transaction_time(value: Any, source: str = "manifest") -> str | None:
    """The manifest's ``transactionTime`` if it is a FHIR instant (date, time and zone); raises otherwise."""
    if value is None:
        return None
    problem = f"{source}: transactionTime {_shown(value)} is not an instant with a time zone (2024-08-02T01:00:00Z)"
    if not isinstance(value, str) or "T" not in value:
        raise ManifestError(problem)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(problem) from None
    if parsed.tzinfo is None:
        raise ManifestError(problem)
    return value


def _read_manifest(location: Location, name: str, max_bytes: int) -> dict:
    with location.open(name) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ManifestError(f"{name} is larger than {max_bytes:,} bytes (ODYSSEY_MAX_RESOURCE_BYTES)")
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{name} is not a JSON object")
    return manifest


def plan_export(location: Location, max_manifest_bytes: int = 64 << 20) -> ExportPlan:
    listing = location.listing()
    files = listing.files
    if any(f.name == INCOMPLETE_MARKER for f in files):
        raise ManifestError(f"{location.uri} is still being written by odyssey-batch pull ({INCOMPLETE_MARKER} "
                            "is there): it is loaded once the pull commits it")  # fmt: skip
    for entry in listing.refused:
        if entry.name.lower() in MANIFEST_NAMES:
            raise ManifestError(f"{entry.name} is refused ({entry.reason}): {entry.message}")
    manifests = [f for f in files if posixpath.basename(f.name).lower() in MANIFEST_NAMES]
    manifest_file = next((f for f in manifests if "/" not in f.name), None)
    # A subfolder with a manifest of its own is another export (e.g. late-arriving files): ingest it separately.
    nested = tuple(posixpath.dirname(f.name) + "/" for f in manifests if "/" in f.name)
    plan = ExportPlan(files=[], refused=[r for r in listing.refused if not r.name.startswith(nested)])
    plan.ignored.extend(f.name for f in files if f.name.startswith(nested))
    files = [f for f in files if not f.name.startswith(nested)]
    by_base = {posixpath.basename(f.name): f for f in files}

    declared: dict[str, tuple[str | None, int | None]] = {}
    error_files: set[str] = set()
    deleted_files: set[str] = set()
    if manifest_file is not None:
        manifest = _read_manifest(location, manifest_file.name, max_manifest_bytes)
        plan.manifest = manifest_file.name
        plan.transaction_time = check_transaction_time(manifest.get("transactionTime"), manifest_file.name)
        listed: set[str] = set()
        for key in ("output", "error", "deleted"):
            for base, resource_type, count in _manifest_entries(manifest, key, manifest_file.name):
                if base in listed:
                    raise ManifestError(f"{manifest_file.name}: {base} is listed twice")
                listed.add(base)
                if key == "output":
                    declared[base] = (resource_type, count)
                elif key == "deleted":
                    deleted_files.add(base)
                else:
                    error_files.add(base)
        plan.missing = sorted(b for b in [*declared, *error_files, *deleted_files] if b and b not in by_base)

    for f in files:
        base = posixpath.basename(f.name)
        lower = base.lower()
        if f is manifest_file or lower in LOG_NAMES:
            plan.ignored.append(f.name)
        elif base in deleted_files:
            plan.deleted.append(ExportFile(f.name, f.size, "deleted", "Bundle"))
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
