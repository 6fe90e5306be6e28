"""Tokenization throughput on the benchmark export, against Postgres just streaming the same rows out.

    python -m benchmarks.tokenize [--source ../shared/data/fhir-large/synthea-smart-r4-ndjson] [--repeats 3]

Loads the export once into a fresh, migrated database and runs the data-quality gate once (the benchmark export is
rejected by the gate: one patient has events before birth, so the run is accepted for tokenization). Each repeat
then builds a whole dataset version with ``tokenize`` and, in the same run, times reading the same rows: the
patient ids, then for each chunk of ``tokenize_chunk_patients`` patients every query of ``extract`` executed and
fetched, without building records. Figures are medians over the repeats. ``--profile`` adds one tokenization under
cProfile and prints its top functions by cumulative time. The server is ``ODYSSEY_BENCH_DATABASE_URL`` or
``ODYSSEY_TEST_DATABASE_URL`` (a maintenance database where databases can be created), else a temporary embedded
server. The last line printed is one JSON object.
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# ``python benchmarks/tokenize.py`` puts this folder first on sys.path, where this file would shadow the standard
# library's ``tokenize`` (which linecache, inspect and dataclasses import): take the folder off before importing more.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse
import cProfile
import io
import json
import pstats
import resource
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

from odyssey_batch.ingest import ingest
from odyssey_batch.quality.gate import validate
from odyssey_batch.sequences.dataset import tokenize
from odyssey_batch.sequences.extract import _queries, patient_ids
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import create_database, drop_database, embedded, upgrade, with_database

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".." / "shared" / "data" / "fhir-large" / "synthea-smart-r4-ndjson"


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_seconds(url: str, chunk: int) -> tuple[float, dict[str, int]]:
    """Time for Postgres to hand over every row ``tokenize`` reads, chunk by chunk, with nothing built from them."""
    queries = _queries(display=False)
    where = "{p}patient_id BETWEEN %(lo)s AND %(hi)s"
    rows = dict.fromkeys(queries, 0)
    started = time.perf_counter()
    conn = psycopg2.connect(url)
    try:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)  # as tokenize's reader
        ids = patient_ids(conn)
        with conn.cursor() as cur:
            for i in range(0, len(ids), chunk):
                params = {"lo": ids[i], "hi": ids[min(i + chunk, len(ids)) - 1]}
                for name, sql in queries.items():
                    cur.execute(sql.format(where=where.format(p="o." if name == "observation" else "")), params)
                    rows[name] += len(cur.fetchall())
        conn.rollback()
    finally:
        conn.close()
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="export folder (NDJSON)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="ingest validation workers (0 = one per core)")
    parser.add_argument("--profile", action="store_true", help="also profile one tokenization with cProfile")
    parser.add_argument("--top", type=int, default=10, help="functions listed by --profile")
    args = parser.parse_args()

    admin_url = os.environ.get("ODYSSEY_BENCH_DATABASE_URL") or os.environ.get("ODYSSEY_TEST_DATABASE_URL")
    server_home = None
    if not admin_url:
        server_home = Path(tempfile.mkdtemp(prefix="odyssey-bench-"))
        admin_url = with_database(embedded.start(Settings(home=server_home)), "postgres")
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="odyssey-bench-home-")), ingest_workers=args.workers)
    chunk = settings.tokenize_chunk_patients
    name = f"odyssey_bench_{uuid.uuid4().hex[:8]}"
    create_database(admin_url, name)
    url = with_database(admin_url, name)
    tokenize_seconds: list[float] = []
    read_seconds: list[float] = []
    rows: dict[str, int] = {}
    try:
        upgrade(url)
        loaded = ingest(str(args.source.resolve()), settings, url=url)
        verdict = validate(url, settings, loaded.run_id, data_docs=False)
        failures = [f"{f.suite}:{f.expectation}" for f in verdict.critical_failures]
        gate = "passed" if verdict.success else f"rejected ({', '.join(failures)}), accepted for the benchmark"
        print(
            f"ingest {loaded.seconds:.2f} s ({loaded.counts['loaded']:,} resources loaded), "
            f"gate {verdict.seconds:.2f} s: {gate}",
            file=sys.stderr,
        )
        rss_before = peak_rss_mb()
        accept = {loaded.run_id}
        result = None
        for repeat in range(1, args.repeats + 1):
            result = tokenize(url, settings, accept=accept)
            tokenize_seconds.append(result.seconds)
            seconds, rows = stream_seconds(url, chunk)
            read_seconds.append(seconds)
            patients = sum(result.patients.values())
            print(
                f"repeat {repeat}: tokenize {result.seconds:.2f} s ({patients:,} patients, {result.events:,} events, "
                f"{result.tokens:,} tokens), stream {seconds:.2f} s ({sum(rows.values()):,} rows)",
                file=sys.stderr,
            )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            tokenize(url, settings, accept=accept)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
            print(text.getvalue(), file=sys.stderr)
    finally:
        drop_database(admin_url, name)
        if server_home is not None:
            embedded.stop(Settings(home=server_home))
    assert result is not None
    patients = sum(result.patients.values())
    seconds = statistics.median(tokenize_seconds)
    read = statistics.median(read_seconds)
    print(
        json.dumps(
            {
                "patients": patients,
                "splits": result.patients,
                "events": result.events,
                "tokens": result.tokens,
                "visits": result.visits,
                "vocab_size": result.vocab_size,
                "seconds": round(seconds, 3),
                "events_per_s": round(result.events / seconds, 1),
                "patients_per_s": round(patients / seconds, 1),
                "read_seconds": round(read, 3),
                "rows_read": sum(rows.values()),
                "rows_by_query": rows,
                "ratio": round(seconds / read, 2),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "rss_before_tokenize_mb": round(rss_before, 1),
                "chunk_patients": chunk,
                "gate_passed": verdict.success,
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
