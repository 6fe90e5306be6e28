"""Data-quality gate speed on the benchmark export.

    python -m benchmarks.validate [--source ../shared/data/fhir-large/synthea-smart-r4-ndjson] [--repeats 3]

Loads the export once into a fresh database, then validates the whole warehouse ``--repeats`` times with Great
Expectations (plus once with the Data Docs site) and prints the median. The server is
``ODYSSEY_BENCH_DATABASE_URL`` or ``ODYSSEY_TEST_DATABASE_URL``, else a temporary embedded server. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from odyssey_batch.ingest import ingest
from odyssey_batch.quality.gate import validate
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import create_database, drop_database, embedded, upgrade, with_database

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".." / "shared" / "data" / "fhir-large" / "synthea-smart-r4-ndjson"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    admin_url = os.environ.get("ODYSSEY_BENCH_DATABASE_URL") or os.environ.get("ODYSSEY_TEST_DATABASE_URL")
    server_home = None
    if not admin_url:
        server_home = Path(tempfile.mkdtemp(prefix="odyssey-bench-"))
        admin_url = with_database(embedded.start(Settings(home=server_home)), "postgres")
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="odyssey-bench-home-")))
    name = f"odyssey_bench_{uuid.uuid4().hex[:8]}"
    create_database(admin_url, name)
    url = with_database(admin_url, name)
    try:
        upgrade(url)
        loaded = ingest(str(args.source.resolve()), settings, url=url)
        seconds, verdict = [], None
        for repeat in range(1, args.repeats + 1):
            started = time.perf_counter()
            verdict = validate(url, settings, data_docs=False)
            seconds.append(time.perf_counter() - started)
            print(f"repeat {repeat}: {seconds[-1]:.2f} s, {verdict.rows_checked:,} rows", file=sys.stderr)
        started = time.perf_counter()
        validate(url, settings, data_docs=True)
        with_docs = time.perf_counter() - started
    finally:
        drop_database(admin_url, name)
        if server_home is not None:
            embedded.stop(Settings(home=server_home))
    assert verdict is not None
    median = statistics.median(seconds)
    print(
        json.dumps(
            {
                "resources_loaded": loaded.counts["loaded"],
                "rows": verdict.rows_checked,
                "expectations": len(verdict.findings),
                "seconds": round(median, 3),
                "rows_per_s": round(verdict.rows_checked / median, 1),
                "seconds_with_data_docs": round(with_docs, 3),
                "critical_failures": [f"{f.suite}:{f.expectation}" for f in verdict.critical_failures],
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
