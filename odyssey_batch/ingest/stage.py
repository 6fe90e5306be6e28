"""The per-chunk work of ingest: parse, validate and normalize resources, render staging rows.

This runs in worker processes. A job is either a chunk of NDJSON lines or one whole JSON document (a Bundle or
a single resource); the result is the text of a ``COPY staging.resource FROM STDIN`` plus the rows to
quarantine. Nothing here touches the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from odyssey_batch.ingest.normalize import Context
from odyssey_batch.ingest.reader import TooLarge
from odyssey_batch.ingest.validate import Rejected, check_depth, check_resource, json_error_reason
from odyssey_batch.profiles import GENERIC, SourceProfile

STAGING_COLUMNS = (
    "run_id", "file_no", "line_no", "source", "resource_type", "resource_id", "version_id", "last_updated",
    "patient_ref", "encounter_ref", "medication_ref", "ehr", "ehr_skipped", "components", "body",
)  # fmt: skip
QUARANTINE_COLUMNS = (
    "run_id", "source", "line_no", "resource_type", "resource_id", "kind", "reason", "error", "raw_text",
    "raw_bytes",
)  # fmt: skip


@dataclass(frozen=True)
class LinesJob:
    """Lines of one NDJSON file: ``(line_no, raw bytes)``, or ``TooLarge`` for a line over the resource limit."""

    run_id: int
    file_no: int
    source: str
    lines: list[tuple[int, bytes | TooLarge]]
    default_tz: str = "UTC"
    expected_type: str | None = None
    keep_text_codes: bool = True  # see codes.py: free-text-only concepts become TEXT codes
    export_errors: bool = False  # a Bulk Data error file: every line is an OperationOutcome to quarantine
    profile: SourceProfile = GENERIC

    def context(self) -> Context:
        return Context(self.profile.zone(self.default_tz), keep_text_codes=self.keep_text_codes, profile=self.profile)


@dataclass(frozen=True)
class DocumentJob:
    """One whole JSON file: a Bundle (one record per entry) or a single resource."""

    run_id: int
    file_no: int
    source: str
    data: bytes
    default_tz: str = "UTC"
    keep_text_codes: bool = True
    profile: SourceProfile = GENERIC

    def context(self, full_urls: dict[str, tuple[str, str]] | None = None) -> Context:
        return Context(self.profile.zone(self.default_tz), full_urls, self.keep_text_codes, self.profile)


@dataclass
class ChunkResult:
    file_no: int
    records: int = 0
    staged: int = 0
    copy_text: str = ""
    quarantine: list[tuple] = field(default_factory=list)
    document_format: str | None = None  # 'bundle' or 'resource' for DocumentJob


def copy_field(value: Any) -> str:
    """One value in COPY text format."""
    if value is None:
        return "\\N"
    text = value if isinstance(value, str) else str(value)
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def raw_fields(data: bytes) -> tuple[str, bytes | None]:
    """The original bytes as storable text, plus the bytes themselves when text cannot hold them exactly."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").replace("\x00", "\ufffd"), data
    if "\x00" in text:
        return text.replace("\x00", "\ufffd"), data
    return text, None


def _json_or_null(value: Any) -> str | None:
    return orjson.dumps(value).decode() if value else None


class _Stager:
    def __init__(self, result: ChunkResult, run_id: int, file_no: int, source: str):
        self.result = result
        self.run_id = run_id
        self.file_no = file_no
        self.source = source
        self.rows: list[str] = []

    def reject(self, line_no: int | None, reason: str, error: str, raw: bytes | str | None, *, kind: str = "line",
               resource_type: str | None = None, resource_id: str | None = None) -> None:  # fmt: skip
        if isinstance(raw, bytes):
            raw_text, raw_bytes = raw_fields(raw)
        else:
            raw_text, raw_bytes = raw, None
        self.result.quarantine.append(
            (self.run_id, self.source, line_no, resource_type, resource_id, kind, reason, error, raw_text, raw_bytes)
        )

    def resource(self, line_no: int, obj: Any, text: str | None, ctx: Context, expected_type: str | None) -> None:
        """Stage one parsed resource; ``text`` is its JSON, or None to serialize it (once its depth is checked)."""
        self.result.records += 1
        try:
            if text is None:
                check_depth(obj)  # orjson serializes at most 255 levels; a deeper resource is refused first
                text = orjson.dumps(obj).decode()
            norm = check_resource(obj, ctx, text, expected_type)
        except Rejected as exc:
            self.reject(line_no, exc.reason, exc.message, text, resource_type=exc.resource_type,
                        resource_id=exc.resource_id)  # fmt: skip
            return
        meta = obj.get("meta") or {}
        values = (
            self.run_id, self.file_no, line_no, self.source, obj["resourceType"], obj["id"], meta.get("versionId"),
            meta.get("lastUpdated"), norm.patient_ref, norm.encounter_ref, norm.medication_ref,
            _json_or_null(norm.ehr), norm.skipped, _json_or_null(norm.components), text,
        )  # fmt: skip
        self.rows.append("\t".join(copy_field(v) for v in values))
        self.result.staged += 1

    def finish(self) -> ChunkResult:
        self.result.copy_text = "\n".join(self.rows) + "\n" if self.rows else ""
        return self.result


def process_lines(job: LinesJob) -> ChunkResult:
    stager = _Stager(ChunkResult(job.file_no), job.run_id, job.file_no, job.source)
    ctx = job.context()
    for line_no, raw in job.lines:
        if isinstance(raw, TooLarge):
            stager.result.records += 1
            stager.reject(line_no, "too-large", f"line is {raw.size:,} bytes, more than the {raw.limit:,} a resource "
                          f"may have (ODYSSEY_MAX_RESOURCE_BYTES); its first {len(raw.prefix):,} bytes are kept",
                          raw.prefix)  # fmt: skip
            continue
        if job.export_errors:
            stager.result.records += 1
            stager.reject(line_no, "export-error", "the exporting server reported this error (Bulk Data error file)",
                          raw, resource_type="OperationOutcome")  # fmt: skip
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            stager.result.records += 1
            stager.reject(line_no, "invalid-utf8", f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})", raw)
            continue
        text = text.strip()
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            stager.result.records += 1
            reason = json_error_reason(exc)
            hint = "is the line truncated?" if reason == "invalid-json" else "nested deeper than the parser's limit"
            stager.reject(line_no, reason, f"invalid JSON: {exc} ({hint})", raw)
            continue
        stager.resource(line_no, obj, text, ctx, job.expected_type)
    return stager.finish()


def _bundle_index(entries: list) -> dict[str, tuple[str, str]]:
    full_urls: dict[str, tuple[str, str]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        resource, full_url = entry.get("resource"), entry.get("fullUrl")
        if not isinstance(resource, dict) or not isinstance(full_url, str):
            continue
        resource_type = resource.get("resourceType")
        resource_id = resource.get("id") or _id_from_full_url(full_url)
        if isinstance(resource_type, str) and isinstance(resource_id, str):
            full_urls[full_url] = (resource_type, resource_id)
    return full_urls


def _id_from_full_url(full_url: str | None) -> str | None:
    if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        return full_url[len("urn:uuid:") :]
    return None


def process_document(job: DocumentJob) -> ChunkResult:
    stager = _Stager(ChunkResult(job.file_no), job.run_id, job.file_no, job.source)
    try:
        text = job.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        stager.reject(1, "invalid-utf8", f"file is not valid UTF-8 ({exc.reason} at byte {exc.start})", job.data,
                      kind="file")  # fmt: skip
        return stager.finish()
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        stager.reject(1, json_error_reason(exc), f"file is not valid JSON: {exc}", job.data, kind="file")
        return stager.finish()

    if not (isinstance(obj, dict) and obj.get("resourceType") == "Bundle"):
        stager.result.document_format = "resource"
        stager.resource(1, obj, None, job.context(), None)
        return stager.finish()

    stager.result.document_format = "bundle"
    entries = obj.get("entry") or []
    if not isinstance(entries, list):
        stager.reject(1, "invalid-bundle", "Bundle.entry is not a list", text, kind="file",
                      resource_type="Bundle", resource_id=obj.get("id"))  # fmt: skip
        return stager.finish()
    ctx = job.context(_bundle_index(entries))
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            stager.result.records += 1
            stager.reject(index, "not-a-resource", f"Bundle.entry[{index - 1}] is not a JSON object",
                          orjson.dumps(entry).decode() if not isinstance(entry, list) else None)  # fmt: skip
            continue
        resource = entry.get("resource")
        if resource is None:
            continue  # e.g. a DELETE or a transaction-response entry: no resource to load
        if isinstance(resource, dict) and "id" not in resource:
            # Transaction Bundles may identify a new resource only by its urn:uuid fullUrl.
            full_url_id = _id_from_full_url(entry.get("fullUrl"))
            if full_url_id is not None:
                resource = {**resource, "id": full_url_id}
        stager.resource(index, resource, None, ctx, None)
    return stager.finish()


def process(job: LinesJob | DocumentJob) -> ChunkResult:
    if isinstance(job, LinesJob):
        return process_lines(job)
    return process_document(job)
