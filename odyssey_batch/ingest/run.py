"""An ingest run: find the files of an export, stage them in parallel, merge them in one transaction.

``ingest()`` does the whole run. Its three steps are public for orchestrators that spread the staging over
several workers (Airflow maps ``stage_files`` over file groups, then calls ``commit_run`` once):

- ``begin_run``: registers the run; earlier runs of the same source that never finished (killed, crashed), and
  runs of any source whose heartbeat stopped (``warehouse.liveness``), are marked abandoned and their staged
  rows purged, so the new run redoes their work from scratch;
- ``stage_files``: validates and normalizes each file's resources in worker processes and ``COPY``s them into
  ``staging``, committing file by file (staged rows are invisible to analysts);
- ``commit_run``: the single merge transaction (see ``commit.py``).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import psycopg2.extensions
from psycopg2.extras import execute_values

from odyssey_batch.ingest.commit import commit_run, purge_staging, refresh_statistics
from odyssey_batch.ingest.deletions import read_deletions
from odyssey_batch.ingest.discover import ExportFile, ExportPlan, plan_export
from odyssey_batch.ingest.profile_choice import choose_profile
from odyssey_batch.ingest.reader import ReadProblem, iter_line_chunks, read_document
from odyssey_batch.ingest.stage import (
    QUARANTINE_COLUMNS,
    STAGING_COLUMNS,
    ChunkResult,
    DocumentJob,
    LinesJob,
    process,
)
from odyssey_batch.parallel import Marker, ordered_map
from odyssey_batch.profiles import SourceProfile, load_profile
from odyssey_batch.settings import Settings
from odyssey_batch.storage import Location, open_location
from odyssey_batch.storage.location import UnsafeName
from odyssey_batch.warehouse import connect, database_url
from odyssey_batch.warehouse.liveness import abandon, heartbeat, sweep


class Progress(Protocol):
    """What a progress display needs to know. All methods are optional to act on."""

    def start(self, total_bytes: int, total_files: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def file_done(self, name: str, records: int) -> None: ...

    def phase(self, description: str) -> None: ...


class _NoProgress:
    def start(self, total_bytes: int, total_files: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, name: str, records: int) -> None:
        pass

    def phase(self, description: str) -> None:
        pass


@dataclass
class IngestResult:
    run_id: int
    source: str
    status: str
    seconds: float
    counts: dict[str, Any]
    files: int
    ignored: list[str] = field(default_factory=list)
    manifest_mismatches: list[dict[str, Any]] = field(default_factory=list)
    source_profile: str = "generic"

    @property
    def resources_per_s(self) -> float:
        return self.counts.get("records", 0) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "source": self.source,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "resources_per_s": round(self.resources_per_s, 1),
            "files": self.files,
            "source_profile": self.source_profile,
            "ignored_files": self.ignored,
            "manifest_mismatches": self.manifest_mismatches,
            **self.counts,
        }


@dataclass(frozen=True)
class _FileStart(Marker):
    file_no: int
    file: ExportFile


@dataclass(frozen=True)
class _FileEnd(Marker):
    file_no: int
    file: ExportFile
    problem: ReadProblem | None


def begin_run(
    conn: psycopg2.extensions.connection, source: str, plan: ExportPlan, stale_run_minutes: float = 30.0,
    profile: SourceProfile | None = None,
) -> int:  # fmt: skip
    """Register a new run (with the source profile it uses, generic by default); abandon unfinished earlier runs
    of the same source, and unfinished runs of any source with no heartbeat for ``stale_run_minutes``, and purge
    their staged rows."""
    profile = profile or load_profile("")
    with conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO ops.ingest_run (source, transaction_time, host, pid, counts, source_profile, shifted_dates)
               VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s) RETURNING run_id""",
            (
                source,
                plan.transaction_time,  # checked by plan_export
                socket.gethostname(),
                os.getpid(),
                orjson.dumps({"manifest": plan.manifest, "missing_files": plan.missing}).decode(),
                profile.ref,
                profile.shifted_dates,
            ),
        )
        run_id = cur.fetchone()[0]
        abandon(cur, "ingest", "source = %s AND run_id <> %s", (source, run_id),
                f"did not finish (killed or crashed); superseded by run {run_id}")  # fmt: skip
        sweep(cur, "ingest", stale_run_minutes)
        cur.execute(
            """SELECT DISTINCT s.run_id FROM staging.resource s JOIN ops.ingest_run r USING (run_id)
               WHERE r.status <> 'running'
               UNION
               SELECT DISTINCT q.run_id FROM staging.quarantine q JOIN ops.ingest_run r USING (run_id)
               WHERE r.status <> 'running'"""
        )
        for (stale_run,) in cur.fetchall():
            purge_staging(cur, stale_run)
        for missing in plan.missing:
            cur.execute(
                """INSERT INTO staging.quarantine (run_id, source, kind, reason, error)
                   VALUES (%s, %s, 'file', 'missing-file', 'listed in the Bulk Data manifest but not found')""",
                (run_id, missing),
            )
        for entry in plan.refused:
            cur.execute(
                """INSERT INTO staging.quarantine (run_id, source, kind, reason, error)
                   VALUES (%s, %s, 'file', %s, %s)""",
                (run_id, entry.name, entry.reason, entry.message),
            )
    return run_id


def fail_run(conn: psycopg2.extensions.connection, run_id: int, error: BaseException) -> None:
    """Mark a run failed and drop its staged rows (the warehouse itself was never touched)."""
    conn.rollback()
    with conn, conn.cursor() as cur:
        purge_staging(cur, run_id)
        cur.execute(
            """UPDATE ops.ingest_run SET status = 'failed', finished_at = now(), error = %s
               WHERE run_id = %s AND status = 'running'""",
            (f"{type(error).__name__}: {error}", run_id),
        )


def run_profile(conn: psycopg2.extensions.connection, run_id: int) -> SourceProfile:
    """The source profile a registered run uses."""
    with conn.cursor() as cur:
        cur.execute("SELECT source_profile FROM ops.ingest_run WHERE run_id = %s", (run_id,))
        row = cur.fetchone()
    conn.commit()
    return load_profile(row[0] if row else "")


def _jobs(
    location: Location, files: list[ExportFile], run_id: int, settings: Settings, progress: Progress,
    first_file_no: int, profile: SourceProfile,
) -> Iterator[Any]:  # fmt: skip
    """The job stream: for each file a start marker, its jobs, and an end marker with any read problem."""
    for offset, export_file in enumerate(files):
        file_no = first_file_no + offset
        yield _FileStart(file_no, export_file)
        problem: ReadProblem | None = None
        source = export_file.name
        with contextlib.ExitStack() as stack:
            try:
                stream = stack.enter_context(location.open(export_file.name))
            except UnsafeName as exc:  # swapped for a link (or the like) since it was listed: never read
                yield _FileEnd(file_no, export_file, ReadProblem(0, exc.entry.reason, exc.entry.message))
                continue
            if export_file.format == "document":
                limit = min(settings.max_resource_bytes, settings.max_file_bytes)
                data = read_document(stream, export_file.gzipped, progress.advance, limit)
                if isinstance(data, ReadProblem):
                    problem = data
                else:
                    yield DocumentJob(
                        run_id, file_no, source, data, settings.default_timezone,
                        keep_text_codes=settings.keep_text_codes, profile=profile,
                    )  # fmt: skip
            else:
                for chunk in iter_line_chunks(
                    stream, export_file.gzipped, settings.ingest_chunk_lines, progress.advance,
                    max_line_bytes=settings.max_resource_bytes, max_file_bytes=settings.max_file_bytes,
                ):  # fmt: skip
                    if isinstance(chunk, ReadProblem):
                        problem = chunk
                        break
                    yield LinesJob(
                        run_id, file_no, source, chunk, settings.default_timezone,
                        expected_type=export_file.resource_type,
                        export_errors=export_file.format == "export-error", keep_text_codes=settings.keep_text_codes,
                        profile=profile,
                    )  # fmt: skip
        yield _FileEnd(file_no, export_file, problem)


_COPY_STAGING = f"COPY staging.resource ({', '.join(STAGING_COLUMNS)}) FROM STDIN"
_INSERT_QUARANTINE = f"INSERT INTO staging.quarantine ({', '.join(QUARANTINE_COLUMNS)}) VALUES %s"


def stage_files(
    conn: psycopg2.extensions.connection, run_id: int, location: Location, files: list[ExportFile],
    settings: Settings, progress: Progress | None = None, first_file_no: int = 0,
    profile: SourceProfile | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Validate and stage the given files of a run; one committed transaction per file. ``profile``: the run's
    source profile (default: the one ``begin_run`` recorded)."""
    progress = progress or _NoProgress()
    profile = profile or run_profile(conn, run_id)
    workers = settings.ingest_workers or os.cpu_count() or 1
    stats: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    cur = conn.cursor()
    try:
        jobs = _jobs(location, files, run_id, settings, progress, first_file_no, profile)
        for item in ordered_map(process, jobs, workers):
            if isinstance(item, _FileStart):
                current = {"file": item.file.name, "records": 0, "staged": 0, "quarantined": 0, "format": None}
            elif isinstance(item, ChunkResult):
                if item.copy_text:
                    cur.copy_expert(_COPY_STAGING, io.BytesIO(item.copy_text.encode()), size=1 << 20)
                if item.quarantine:
                    execute_values(cur, _INSERT_QUARANTINE, item.quarantine, page_size=500)
                current["records"] += item.records
                current["staged"] += item.staged
                current["quarantined"] += len(item.quarantine)
                current["format"] = item.document_format or current["format"]
            elif isinstance(item, _FileEnd):
                export_file = item.file
                if item.problem is not None:
                    execute_values(cur, _INSERT_QUARANTINE, [(
                        run_id, export_file.name, item.problem.line_no, export_file.resource_type, None, "file",
                        item.problem.reason, item.problem.message, None, None,
                    )])  # fmt: skip
                    current["quarantined"] += 1
                # A JSON document is recorded as what it turned out to hold: a Bundle or a single resource.
                file_format = export_file.format
                if file_format == "document":
                    file_format = current["format"] or "resource"
                cur.execute(
                    """INSERT INTO ops.ingest_file
                           (run_id, file, format, resource_type, records, staged, quarantined, manifest_count)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
                    (
                        run_id, export_file.name, file_format, export_file.resource_type, current["records"],
                        current["staged"], current["quarantined"], export_file.manifest_count,
                    ),
                )  # fmt: skip
                conn.commit()
                progress.file_done(export_file.name, current["records"])
                stats.append({**current, "manifest_count": export_file.manifest_count})
    except BaseException:
        conn.rollback()
        raise
    finally:
        cur.close()
    return stats


def _manifest_mismatches(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"file": s["file"], "manifest_count": s["manifest_count"], "records": s["records"]}
        for s in stats
        if s["manifest_count"] is not None and s["manifest_count"] != s["records"]
    ]


def _deletions(conn: psycopg2.extensions.connection, run_id: int, location: Location, plan: ExportPlan,
               settings: Settings) -> list[tuple[str, str]]:  # fmt: skip
    """The resources the export's deleted[] files name; their unreadable parts become file problems."""
    if not plan.deleted:
        return []
    found, problems = read_deletions(location, [f.name for f in plan.deleted], settings.max_resource_bytes)
    if problems:
        with conn, conn.cursor() as cur:
            execute_values(cur, _INSERT_QUARANTINE, [
                (run_id, name, line_no or None, "Bundle", None, "file", "invalid-deletion", problem, None, None)
                for name, line_no, problem in problems
            ])  # fmt: skip
    return found


def ingest(
    source: str, settings: Settings, *, url: str | None = None, progress: Progress | None = None
) -> IngestResult:
    """Load one export (a folder or ``s3://bucket/prefix``) into the warehouse. See the module docstring."""
    progress = progress or _NoProgress()
    started = time.perf_counter()
    location = open_location(source, settings)
    plan = plan_export(location, settings.max_resource_bytes)
    if not plan.files and not plan.missing and not plan.deleted and plan.manifest is None:
        refused = ""
        if plan.refused:
            first = plan.refused[0]
            refused = f"; {len(plan.refused)} entries refused, e.g. {first.name}: {first.message}"
        raise FileNotFoundError(f"no FHIR files (*.ndjson[.gz], *.json[.gz]) found in {location.uri}{refused}")
    profile = choose_profile(settings.source_profile, location, plan.files)
    url = url or database_url(settings)
    conn = connect(url)
    try:
        run_id = begin_run(conn, location.uri, plan, settings.stale_run_minutes, profile)
        try:
            with heartbeat(url, settings, ("ingest", run_id)):  # the merge holds the run's row lock: alive
                progress.start(sum(f.size for f in plan.files), len(plan.files))
                stats = stage_files(conn, run_id, location, plan.files, settings, progress, profile=profile)
                mismatches = _manifest_mismatches(stats)
                if mismatches:
                    with conn, conn.cursor() as cur:
                        cur.execute(
                            "UPDATE ops.ingest_run SET counts = counts || %s::jsonb WHERE run_id = %s",
                            (orjson.dumps({"manifest_mismatches": mismatches}).decode(), run_id),
                        )
                deletions = _deletions(conn, run_id, location, plan, settings)
                progress.phase("merging into the warehouse")
                counts = commit_run(conn, run_id, keep_text_codes=settings.keep_text_codes, deletions=deletions)
                refresh_statistics(conn)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the database may be the problem; the next run cleans up
                fail_run(conn, run_id, exc)
            raise
    finally:
        conn.close()
    return IngestResult(
        run_id=run_id,
        source=location.uri,
        status="succeeded",
        seconds=time.perf_counter() - started,
        counts=counts,
        files=len(plan.files),
        ignored=plan.ignored,
        manifest_mismatches=mismatches,
        source_profile=profile.ref,
    )
