"""Writing a synthetic Bulk Data export: sharded, parallel, deterministic, memory bounded.

Patients are simulated in fixed shards of ``SHARD_SIZE``; each shard has its own random stream derived from
(seed, shard), so the bytes depend on the seed and the patient count only, never on the number of worker
processes. Each shard's lines are gzip-compressed in the worker (level 6, mtime 0) and appended in shard order
as gzip members, so every ``<Type>.ndjson.gz`` is one valid gzip file. Beside the export: ``manifest.json``
(Bulk Data: ``transactionTime``, ``output[].count``) and ``truth.parquet``, which ingest never reads.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from odyssey_batch.parallel import ordered_map
from odyssey_batch.synth.patient import TYPES, Options, Output, PatientSimulator

SHARD_SIZE = 250
TRUTH_COLUMNS = ("task", "patient_id", "prediction_time", "probability", "label", "censored", "encounter_id")


@dataclass(frozen=True)
class ShardJob:
    seed: int
    shard: int
    first: int
    count: int
    start: float
    end: float
    messy: bool


@dataclass
class ShardResult:
    shard: int
    members: dict[str, bytes]  # resource type -> gzip member
    counts: dict[str, int]
    late_members: dict[str, bytes]
    late_counts: dict[str, int]
    truth: list[list]


def patient_id(seed: int, index: int) -> str:
    digest = hashlib.blake2b(f"odyssey-synth:{seed}:{index}".encode(), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4))


def _compress(lines: list[str]) -> bytes:
    if not lines:
        return b""
    return gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6, mtime=0)


def simulate_shard(job: ShardJob) -> ShardResult:
    rng = np.random.Generator(np.random.PCG64([job.seed, job.shard]))
    out = Output()
    opts = Options(start=job.start, end=job.end, messy=job.messy)
    for index in range(job.first, job.first + job.count):
        PatientSimulator(patient_id(job.seed, index), rng, opts, out).run()
    return ShardResult(
        shard=job.shard,
        members={t: _compress(out.lines[t]) for t in TYPES},
        counts={t: len(out.lines[t]) for t in TYPES},
        late_members={t: _compress(out.late[t]) for t in TYPES},
        late_counts={t: len(out.late[t]) for t in TYPES},
        truth=out.truth,
    )


@dataclass
class SynthResult:
    out: Path
    patients: int
    counts: dict[str, int]
    truth_points: dict[str, int]
    positives: dict[str, int]
    seconds: float
    late_counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "patients": self.patients,
            "resources": sum(self.counts.values()),
            "counts": self.counts,
            "late_counts": self.late_counts,
            "truth_points": self.truth_points,
            "prevalence": {t: round(self.positives[t] / n, 4) for t, n in self.truth_points.items() if n},
            "seconds": round(self.seconds, 2),
        }


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def _manifest(folder: Path, counts: dict[str, int], transaction_time: str, request: str) -> None:
    manifest = {
        "transactionTime": transaction_time,
        "request": request,
        "requiresAccessToken": False,
        "output": [{"type": t, "url": f"{t}.ndjson.gz", "count": counts[t]} for t in TYPES if counts[t]],
        "error": [],
    }
    (folder / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


def generate(
    out: Path, patients: int, seed: int = 0, *, start: str = "2015-01-01", end: str = "2026-01-01",
    messy: bool = False, workers: int = 0, progress: Callable[[int], None] | None = None,
) -> SynthResult:  # fmt: skip
    """Write a synthetic export of ``patients`` patients to ``out`` (created; must be empty if it exists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    t_start, t_end = _epoch(start), _epoch(end)
    if t_end <= t_start:
        raise ValueError(f"--end {end} must be after --start {start}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    jobs = [
        ShardJob(seed, shard, first, min(SHARD_SIZE, patients - first), t_start, t_end, messy)
        for shard, first in enumerate(range(0, patients, SHARD_SIZE))
    ]
    late_dir = out / "late"
    counts = dict.fromkeys(TYPES, 0)
    late_counts = dict.fromkeys(TYPES, 0)
    truth: list[list] = []
    handles = {t: (out / f"{t}.ndjson.gz").open("wb") for t in TYPES}
    late_handles = {}
    try:
        for result in ordered_map(simulate_shard, jobs, workers or os.cpu_count() or 1):
            for t in TYPES:
                handles[t].write(result.members[t])
                counts[t] += result.counts[t]
                if result.late_counts[t]:
                    if t not in late_handles:
                        late_dir.mkdir(exist_ok=True)
                        late_handles[t] = (late_dir / f"{t}.ndjson.gz").open("wb")
                    late_handles[t].write(result.late_members[t])
                    late_counts[t] += result.late_counts[t]
            truth.extend(result.truth)
            if progress is not None:
                progress(jobs[result.shard].count)
    finally:
        for fh in [*handles.values(), *late_handles.values()]:
            fh.close()

    transaction_time = datetime.fromtimestamp(t_end, UTC).isoformat().replace("+00:00", "Z")
    _manifest(out, counts, transaction_time, "synthetic://odyssey-batch/$export")
    if late_handles:
        late_time = datetime.fromtimestamp(t_end + 86400, UTC).isoformat().replace("+00:00", "Z")
        _manifest(late_dir, late_counts, late_time, "synthetic://odyssey-batch/$export?late")

    columns = list(zip(*truth, strict=True)) if truth else [[] for _ in TRUTH_COLUMNS]
    table = pa.table(
        {
            "task": pa.array(columns[0], pa.string()),
            "patient_id": pa.array(columns[1], pa.string()),
            "prediction_time": pa.array([int(x * 1_000_000) for x in columns[2]], pa.timestamp("us", tz="UTC")),
            "probability": pa.array(columns[3], pa.float64()),
            "label": pa.array(columns[4], pa.bool_()),
            "censored": pa.array(columns[5], pa.bool_()),
            "encounter_id": pa.array(columns[6], pa.string()),
        }
    )
    pq.write_table(table, out / "truth.parquet")
    points: dict[str, int] = {}
    positives: dict[str, int] = {}
    for row in truth:
        points[row[0]] = points.get(row[0], 0) + 1
        positives[row[0]] = positives.get(row[0], 0) + bool(row[4])
    return SynthResult(out, patients, counts, dict(sorted(points.items())), positives,
                       time.perf_counter() - started, late_counts)  # fmt: skip
