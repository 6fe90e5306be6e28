"""Synthetic export generation speed.

    python -m benchmarks.synth [--patients 10000] [--repeats 3] [--workers 0]

Generates the export into a temporary folder ``--repeats`` times with the same seed (checking that the bytes
are identical each time) and prints the median. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from odyssey_batch.synth import generate


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    seconds, digests, resources, size = [], set(), 0, 0
    for repeat in range(1, args.repeats + 1):
        out = Path(tempfile.mkdtemp(prefix="odyssey-synth-bench-")) / "export"
        try:
            started = time.perf_counter()
            result = generate(out, args.patients, args.seed, workers=args.workers)
            seconds.append(time.perf_counter() - started)
            resources = sum(result.counts.values())
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            digests.add(folder_digest(out))
        finally:
            shutil.rmtree(out.parent)
        print(f"repeat {repeat}: {seconds[-1]:.2f} s, {resources:,} resources", file=sys.stderr)
    if len(digests) != 1:
        sys.exit("the same seed gave different bytes")
    median = statistics.median(seconds)
    print(
        json.dumps(
            {
                "patients": args.patients,
                "resources": resources,
                "seconds": round(median, 3),
                "patients_per_s": round(args.patients / median, 1),
                "resources_per_s": round(resources / median, 1),
                "export_mb": round(size / 1e6, 1),
                "workers": args.workers or os.cpu_count(),
                "repeats": args.repeats,
                "deterministic": True,
            }
        )
    )


if __name__ == "__main__":
    main()
