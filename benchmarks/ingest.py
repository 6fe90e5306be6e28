"""Ingest throughput on the benchmark export, against a bare COPY of the same lines.

    python -m benchmarks.ingest [--source ../shared/data/fhir-large/synthea-smart-r4-ndjson] [--repeats 3]

Each repeat loads the whole export into a fresh, migrated database with full validation (fhir.resources),
normalization and the merge transaction, then, in the same run, times a bare ``COPY`` of the same NDJSON lines
(decompressed in this process) into a one-column jsonb table. Figures are medians over the repeats. The
server is ``ODYSSEY_BENCH_DATABASE_URL`` or ``ODYSSEY_TEST_DATABASE_URL`` (a maintenance database where
databases can be created), else a temporary embedded server. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

from odyssey_batch.ingest import ingest
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import create_database, drop_database, embedded, upgrade, with_database

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".." / "shared" / "data" / "fhir-large" / "synthea-smart-r4-ndjson"


class FreshDatabase:
    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.name = f"odyssey_bench_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        create_database(self.admin_url, self.name)
        return with_database(self.admin_url, self.name)

    def __exit__(self, *exc: object) -> None:
        drop_database(self.admin_url, self.name)


def bare_copy_seconds(url: str, files: list[Path]) -> tuple[float, int]:
    """Time to stream every line of the export into ``CREATE TABLE bench_copy (doc jsonb)`` with COPY."""
    conn = psycopg2.connect(url)
    lines = 0
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE bench_copy (doc jsonb)")
        started = time.perf_counter()
        with conn, conn.cursor() as cur:
            for path in files:
                buffer = io.BytesIO()
                with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
                    for line in fh:
                        if line.strip():
                            # COPY text format: escape backslashes (JSON lines hold no raw tabs or newlines).
                            buffer.write(line.rstrip(b"\r\n").replace(b"\\", b"\\\\") + b"\n")
                            lines += 1
                buffer.seek(0)
                cur.copy_expert("COPY bench_copy (doc) FROM STDIN", buffer, size=1 << 20)
        return time.perf_counter() - started, lines
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="export folder (NDJSON)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="validation workers (0 = one per core)")
    args = parser.parse_args()

    source = args.source.resolve()
    files = sorted(p for p in source.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    if not files:
        sys.exit(f"no NDJSON files in {source}")
    admin_url = os.environ.get("ODYSSEY_BENCH_DATABASE_URL") or os.environ.get("ODYSSEY_TEST_DATABASE_URL")
    server_home = None
    if not admin_url:
        server_home = Path(tempfile.mkdtemp(prefix="odyssey-bench-"))
        admin_url = with_database(embedded.start(Settings(home=server_home)), "postgres")

    settings = Settings(home=Path(tempfile.mkdtemp(prefix="odyssey-bench-home-")), ingest_workers=args.workers)
    ingest_seconds: list[float] = []
    copy_seconds: list[float] = []
    resources = 0
    try:
        for repeat in range(1, args.repeats + 1):
            with FreshDatabase(admin_url) as url:
                upgrade(url)
                result = ingest(str(source), settings, url=url)
                resources = result.counts["records"]
                if result.counts["loaded"] + result.counts["unchanged"] + result.counts["quarantined"] != resources:
                    sys.exit("ingest did not reconcile")
                ingest_seconds.append(result.seconds)
            with FreshDatabase(admin_url) as url:
                seconds, lines = bare_copy_seconds(url, files)
                copy_seconds.append(seconds)
                if lines != resources:
                    sys.exit(f"bare COPY read {lines} lines but ingest read {resources} resources")
            rate = resources / ingest_seconds[-1]
            print(
                f"repeat {repeat}: ingest {ingest_seconds[-1]:.2f} s ({rate:,.0f} resources/s), "
                f"bare COPY {copy_seconds[-1]:.2f} s",
                file=sys.stderr,
            )
    finally:
        if server_home is not None:
            embedded.stop(Settings(home=server_home))

    seconds = statistics.median(ingest_seconds)
    copy = statistics.median(copy_seconds)
    print(
        json.dumps(
            {
                "resources": resources,
                "seconds": round(seconds, 3),
                "resources_per_s": round(resources / seconds, 1),
                "copy_seconds": round(copy, 3),
                "ratio": round(seconds / copy, 2),
                "repeats": args.repeats,
                "workers": args.workers or os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
