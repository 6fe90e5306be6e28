"""Which source profile an ingest run uses: the configured one (``ODYSSEY_SOURCE_PROFILE`` or ``ingest
--profile``), else the built-in profile whose ``detect`` prefixes match the ``meta.profile`` of the first
resource of the export's NDJSON files, else ``generic``."""

from __future__ import annotations

import gzip
import io

import orjson

from odyssey_batch.ingest.discover import ExportFile
from odyssey_batch.profiles import GENERIC, SourceProfile, detect_profile, load_profile
from odyssey_batch.storage import Location

PEEK_FILES = 5  # first lines read for detection
PEEK_BYTES = 1 << 20


def _first_meta_profiles(location: Location, export_file: ExportFile) -> list[str]:
    try:
        with location.open(export_file.name) as stream:
            raw = gzip.GzipFile(fileobj=stream) if export_file.gzipped else stream
            line = io.BufferedReader(raw).readline(PEEK_BYTES)  # type: ignore[arg-type]
        resource = orjson.loads(line)
    except Exception:  # detection is best effort; staging reports what is wrong with the file
        return []
    meta = resource.get("meta") if isinstance(resource, dict) else None
    declared = meta.get("profile") if isinstance(meta, dict) else None
    return [p for p in declared if isinstance(p, str)] if isinstance(declared, list) else []


def choose_profile(configured: str, location: Location, files: list[ExportFile]) -> SourceProfile:
    if configured:
        return load_profile(configured)
    seen: list[str] = []
    for export_file in [f for f in files if f.format == "ndjson"][:PEEK_FILES]:
        seen += _first_meta_profiles(location, export_file)
    return detect_profile(seen) if seen else GENERIC
