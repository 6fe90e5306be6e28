"""Pull + ingest through a real FHIR server's Bulk Data $export, against ingesting the same files from a folder.

    python -m benchmarks.pull [--source ../shared/data/fhir-large/synthea-smart-r4-ndjson] [--patients 615]

Starts sekmet-fhir (the dev extra's test FHIR server, through ``tests/fhir_server.py``) on loopback in a
temporary folder, open (no auth), loads the first ``--patients`` patients of the source with every resource that
points at them (transaction Bundles of PUTs, ids kept; the time is reported, not counted), then in fresh, migrated
databases:

- ``pull``: ``odyssey-batch pull`` (kick-off, polling, 4 parallel downloads into a landing folder) and ``ingest``
  of the landed folder: resources/s end to end, and each part;
- ``folder``: ``ingest`` of the same resources written as a Bulk Data folder: resources/s;
- ``incremental``: one Observation changed on the server, then a pull with ``--since auto``: the time from the
  kick-off to the first downloaded byte, and the whole pull.

The server is ``ODYSSEY_BENCH_DATABASE_URL`` or ``ODYSSEY_TEST_DATABASE_URL``, else a temporary embedded one. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.ingest import DEFAULT_SOURCE, FreshDatabase
from odyssey_batch.ingest import ingest
from odyssey_batch.pull.run import PullOptions, pull
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import embedded, upgrade, with_database
from tests.fhir_server import patient_resources, sekmet_process, transaction_bundle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--patients", type=int, default=615)
    args = parser.parse_args(argv)
    resources, _ = patient_resources(args.source.resolve(), args.patients)
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    admin = os.environ.get("ODYSSEY_BENCH_DATABASE_URL") or os.environ.get("ODYSSEY_TEST_DATABASE_URL")
    pg_settings = Settings(home=work / "pg")
    if not admin:
        admin = with_database(embedded.start(pg_settings), "postgres")
    settings = Settings(home=work / "home", ingest_workers=0)
    server_settings = {"data_dir": str(work / "server" / "data"), "log_inbound": False,
                       "simulator": {"enabled": False, "delay_seconds": 0.5}, "validation": {"inbound": "off"},
                       "server_auth": {"types": ["none"]}}  # fmt: skip
    try:
        with sekmet_process(work / "server", server_settings) as base:
            started = time.perf_counter()
            for at in range(0, len(resources), 2000):
                response = httpx.post(base, json=transaction_bundle(resources[at : at + 2000]), timeout=600)
                response.raise_for_status()
            load_s = time.perf_counter() - started
            folder = work / "folder"
            folder.mkdir()
            by_type: dict[str, list[str]] = {}
            for r in resources:
                by_type.setdefault(r["resourceType"], []).append(json.dumps(r))
            for resource_type, lines in by_type.items():
                (folder / f"{resource_type}.ndjson").write_text("\n".join(lines) + "\n")
            with FreshDatabase(admin) as url:
                upgrade(url)
                started = time.perf_counter()
                result = pull(PullOptions(server=base, to=str(work / "landing")), settings, url=url)
                pull_s = time.perf_counter() - started
                loaded = ingest(result.destination, settings, url=url)
                total_s = time.perf_counter() - started
                changed = next(r for r in resources if r["resourceType"] == "Observation" and "valueQuantity" in r)
                changed = {**changed, "valueQuantity": {**changed["valueQuantity"], "value": 12345.0}}
                httpx.put(f"{base}/Observation/{changed['id']}", json=changed, timeout=60).raise_for_status()
                incremental = pull(PullOptions(server=base, to=str(work / "landing")), settings, url=url)
            with FreshDatabase(admin) as url:
                upgrade(url)
                direct = ingest(str(folder), settings, url=url)
    finally:
        if not os.environ.get("ODYSSEY_BENCH_DATABASE_URL") and not os.environ.get("ODYSSEY_TEST_DATABASE_URL"):
            embedded.stop(pg_settings)
    n = len(resources)
    figures = {
        "benchmark": "pull",
        "patients": args.patients,
        "resources": n,
        "server_load_s": round(load_s, 2),
        "pull_s": round(pull_s, 2),
        "pull_first_byte_s": round(result.first_byte_s or 0, 3),
        "pull_ingest_s": round(loaded.seconds, 2),
        "pull_plus_ingest_s": round(total_s, 2),
        "pull_plus_ingest_resources_per_s": round(n / total_s, 1),
        "folder_ingest_s": round(direct.seconds, 2),
        "folder_ingest_resources_per_s": round(n / direct.seconds, 1),
        "ratio_pull_path_to_folder": round(total_s / direct.seconds, 2),
        "same_counts": loaded.counts["records"] == direct.counts["records"] == n,
        "incremental_resources": incremental.resources,
        "incremental_first_byte_s": round(incremental.first_byte_s or 0, 3),
        "incremental_pull_s": round(incremental.seconds, 3),
        "bytes_downloaded": result.bytes,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
