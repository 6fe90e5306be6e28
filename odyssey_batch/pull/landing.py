"""A pulled export in the landing location: a Bulk Data folder (``manifest.json`` + files) that ingest reads, and
that appears complete or not at all.

Local folders and S3 prefixes are written the same way, through ``storage.Location`` (each file atomic):

1. ``<export>/.odyssey-incomplete`` first (the marker): ``fhir_ingest`` skips a folder holding it and ``ingest``
   refuses one (``ManifestError``), so nobody loads half an export;
2. the downloaded files, each as it completes (a resumed pull skips the ones already stored);
3. ``manifest.json`` last, its URLs rewritten to the stored file names (ingest checks ``output[].count`` and
   reads ``error[]`` and ``deleted[]`` from it);
4. the marker is removed: from this moment the folder is a complete export.

The folder is named ``<transactionTime>-pull-<id>`` (``2026-12-05T020000Z-pull-7``), so folders sort in the order
the server produced them and ``fhir_ingest`` loads the oldest first.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

import orjson

INCOMPLETE_MARKER = ".odyssey-incomplete"


def folder_name(transaction_time: str | None, pull_id: int) -> str:
    when = dt.datetime.now(dt.UTC)
    if transaction_time:
        with contextlib.suppress(ValueError):
            when = dt.datetime.fromisoformat(transaction_time.replace("Z", "+00:00")).astimezone(dt.UTC)
    return f"{when:%Y-%m-%dT%H%M%SZ}-pull-{pull_id}"


def file_name(kind: str, resource_type: str | None, index: int, gzipped: bool) -> str:
    """The stored name of one manifest entry: ``Observation.000.ndjson.gz``, ``error.000.ndjson``,
    ``deleted.000.ndjson``."""
    stem = resource_type if kind == "output" and resource_type else kind
    return f"{stem}.{index:03d}.ndjson" + (".gz" if gzipped else "")


def entries(manifest: dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """``(kind, index among its kind and type, entry)`` for every file of the manifest, in manifest order."""
    out: list[tuple[str, int, dict[str, Any]]] = []
    seen: dict[tuple[str, str | None], int] = {}
    for kind in ("output", "error", "deleted"):
        for entry in manifest.get(kind) or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            key = (kind, entry.get("type") if kind == "output" else None)
            index = seen.get(key, 0)
            seen[key] = index + 1
            out.append((kind, index, entry))
    return out


def local_manifest(manifest: dict[str, Any], stored: dict[str, str], extra: dict[str, Any]) -> bytes:
    """The manifest of the landed folder: the server's, with each URL replaced by the stored file's name."""
    local: dict[str, Any] = {
        "transactionTime": manifest.get("transactionTime"),
        "request": manifest.get("request"),
        "requiresAccessToken": False,
    }
    for kind in ("output", "error", "deleted"):
        items = []
        for entry in manifest.get(kind) or []:
            if isinstance(entry, dict) and entry.get("url") in stored:
                items.append({**entry, "url": stored[entry["url"]]})
        local[kind] = items
    local["odyssey"] = extra
    return orjson.dumps(local, option=orjson.OPT_INDENT_2)
