"""``odyssey-batch tokenize``: the warehouse → a versioned token-sequence dataset and ``ehr.task_label``.

Two passes over patient chunks keep memory bounded by the chunk size, not the warehouse:

1. read each chunk (``extract``), build timelines and label points, assign splits, count the training split's
   concept tokens and collect its lab values; park the timelines in a local scratch file;
2. fit the lab bins and the vocabulary on the training split, then turn every parked timeline into token ids
   and side streams and write one Parquet shard per chunk.

The dataset (``datasets/v<id>/``: ``manifest.json``, ``sequences/part-NNNNN.parquet``, ``labels.parquet``) goes
to the object store; ``ops.dataset_version`` records it, and ``ehr.task_label`` is replaced by its labels in
the same transaction that marks the version ready. A failure marks the version failed and leaves the previous
labels in place.

What the data-quality gate excluded (``ops.dq_exclusion_current``) is left out: excluded patients get no sequence
and no label, excluded records no token; the counts are in the summary (``excluded``) and in
``ops.dataset_version.excluded_patients`` / ``excluded_records``. Each lab code's main unit is fitted on the
warehouse first (``labs.LabUnits``) and kept with the bins.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey_batch.ingest.stage import copy_field
from odyssey_batch.labels.points import LabelPoint, task_points
from odyssey_batch.labels.tasks import Registry, load_registry
from odyssey_batch.parallel import prefetch
from odyssey_batch.profiles import SourceProfile
from odyssey_batch.quality.exclusions import current as current_exclusions
from odyssey_batch.quality.gate import ensure_usable
from odyssey_batch.sequences import grammar
from odyssey_batch.sequences.extract import iter_records, lab_unit_counts, patient_ids, warehouse_profile
from odyssey_batch.sequences.labs import LabBins, LabUnits
from odyssey_batch.sequences.splits import SPLITS, SplitRule
from odyssey_batch.sequences.timeline import DAY, Timeline, build_timeline
from odyssey_batch.sequences.tokens import (
    STREAM_DTYPES,
    STREAMS,
    TokenSequence,
    bin_labs,
    to_sequence,
    vocabulary_key,
)
from odyssey_batch.sequences.vocab import Vocabulary
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location
from odyssey_batch.warehouse import connect
from odyssey_batch.warehouse.liveness import heartbeat, sweep

FORMAT = "odyssey-batch/sequences"
FORMAT_VERSION = 1
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TokenizeOptions:
    max_length: int = 2048
    min_count: int = 5
    lab_bins: int = 5
    chunk_patients: int = 500
    split: SplitRule = field(default_factory=SplitRule)
    tasks_file: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TokenizeOptions:
        values = {
            "max_length": settings.max_length,
            "min_count": settings.vocab_min_count,
            "lab_bins": settings.lab_bins,
            "chunk_patients": settings.tokenize_chunk_patients,
            "split": SplitRule(settings.split_salt, settings.split_train, settings.split_validation),
            "tasks_file": settings.tasks_file,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class TokenizeResult:
    dataset_version_id: int
    location: str
    source_runs: list[int]
    data_end: str
    patients: dict[str, int]
    tokens: int
    events: int
    visits: int
    vocab_size: int
    unknown_rate: dict[str, float]
    dropped: dict[str, int]
    labels: dict[str, dict[str, int]]
    seconds: float
    events_by_type: dict[str, int] = field(default_factory=dict)
    source_profile: str = "generic"
    excluded: dict[str, int] = field(default_factory=dict)  # left out by the gate: patients, records (per type)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tokenize(
    url: str,
    settings: Settings,
    options: TokenizeOptions | None = None,
    *,
    accept: set[int] | None = None,
    progress: Progress | None = None,
) -> TokenizeResult:
    """Build a dataset version from the warehouse; raises ``RunRejected`` when a run is not usable."""
    started = time.perf_counter()
    options = options or TokenizeOptions.from_settings(settings)
    registry = load_registry(options.tasks_file or None)
    runs = ensure_usable(url, accept=accept)
    if not runs:
        raise LookupError("the warehouse holds no ingest run: run `odyssey-batch ingest` first")
    conn = connect(url)
    try:
        profile = warehouse_profile(conn)
        data_end = _data_end(conn, runs, profile.shifted_dates)
        with conn, conn.cursor() as cur:
            sweep(cur, "dataset", settings.stale_run_minutes)  # versions whose process died: abandoned
            cur.execute(
                "INSERT INTO ops.dataset_version (source_runs, data_end, max_length, source_profile) "
                "VALUES (%s, to_timestamp(%s), %s, %s) RETURNING dataset_version_id",
                (runs, data_end, options.max_length, profile.ref),
            )
            version = cur.fetchone()[0]
        try:
            reader = connect(url)  # one snapshot for the whole read
            try:
                reader.set_session(isolation_level="REPEATABLE READ", readonly=True)
                with heartbeat(url, settings, ("dataset", version)):
                    result = _build(reader, conn, settings, options, registry, version, runs, data_end, progress,
                                    profile)  # fmt: skip
            finally:
                reader.close()
        except BaseException as exc:
            conn.rollback()
            with conn, conn.cursor() as cur:
                cur.execute(
                    "UPDATE ops.dataset_version SET status = 'failed', finished_at = now(), error = %s "
                    "WHERE dataset_version_id = %s AND status = 'building'",
                    (f"{type(exc).__name__}: {exc}"[:2000], version),
                )
            raise
    finally:
        conn.close()
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _data_end(conn, runs: list[int], shifted_dates: bool = False) -> float:
    """The end of the data: the exports' transactionTime, else the latest time in the warehouse. With shifted
    dates (a de-identified source) the transactionTime and the clock are another calendar: the latest time the
    data holds (recorded per run at ingest, else read from the warehouse)."""
    column = "data_end" if shifted_dates else "transaction_time"
    with conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT extract(epoch FROM max({column}))::float8 FROM ops.ingest_run WHERE run_id = ANY(%s)",
            (runs,),
        )
        end = cur.fetchone()[0]
        if end is None:
            cur.execute(
                """SELECT extract(epoch FROM max(t))::float8 FROM (
                       SELECT max(greatest(start_time, end_time)) t FROM ehr.encounter
                       UNION ALL SELECT max(effective_time) FROM ehr.observation
                       UNION ALL SELECT max(greatest(onset_time, recorded_time)) FROM ehr.condition
                       UNION ALL SELECT max(performed_time) FROM ehr.procedure
                       UNION ALL SELECT max(authored_time) FROM ehr.medication_request
                       UNION ALL SELECT max(death_time) FROM ehr.patient) x"""
            )
            end = cur.fetchone()[0]
    return float(end) if end is not None else time.time()


@dataclass
class _Pass1:
    counts: Counter[str] = field(default_factory=Counter)
    lab_values: dict[str, list[float]] = field(default_factory=dict)
    points: list[tuple[LabelPoint, str, int]] = field(default_factory=list)  # point, split, tokens known
    patients: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def add(self, timeline: Timeline, sequence: TokenSequence, split: str, registry: Registry, data_end: float) -> None:
        self.patients[split] += 1
        self.dropped.update(timeline.dropped)
        for point in task_points(timeline, registry, data_end):
            self.points.append((point, split, sequence.known_at(point.prediction_time)))
        if split != "train":
            return
        for visit in timeline.visits:
            for event in visit.events:
                self.counts[vocabulary_key(event)] += 1
                if event.kind == grammar.TokenType.LAB and event.value == event.value:
                    self.lab_values.setdefault(event.code, []).append(event.value)


def _build(
    reader,
    conn,
    settings: Settings,
    options: TokenizeOptions,
    registry: Registry,
    version: int,
    runs: list[int],
    data_end: float,
    progress: Progress | None,
    profile: SourceProfile,
) -> TokenizeResult:
    report = progress or (lambda phase, done, total: None)
    with reader.cursor() as cur:
        excluded = current_exclusions(cur)
    ids = patient_ids(reader, excluded)
    units = LabUnits.fit(lab_unit_counts(reader))
    stats = _Pass1()
    with tempfile.TemporaryDirectory(prefix="odyssey-tokenize-") as scratch_dir:
        scratch = Path(scratch_dir)
        chunks: list[Path | list] = []  # parked chunks: a scratch file each, or in memory when there is one
        single = len(ids) <= options.chunk_patients
        done = 0
        report("reading timelines", 0, len(ids))
        for records in prefetch(iter_records(reader, ids, options.chunk_patients, profile=profile,
                                             exclusions=excluded, units=units)):  # fmt: skip
            parked = []
            for record in records:
                timeline = build_timeline(record, data_end)
                split = options.split.split(timeline.patient_id)
                sequence = to_sequence(timeline, None)  # binned in pass 2, once the bins are fitted
                stats.add(timeline, sequence, split, registry, data_end)
                parked.append((timeline.patient_id, split, len(timeline.visits), sequence))
            if single:
                chunks.append(parked)
            else:
                path = scratch / f"sequences-{len(chunks):05d}.pickle"
                with path.open("wb") as fh:
                    pickle.dump(parked, fh, protocol=pickle.HIGHEST_PROTOCOL)
                chunks.append(path)
            done += len(records)
            report("reading timelines", done, len(ids))
        reader.rollback()

        bins = LabBins.fit(stats.lab_values, options.lab_bins, units)
        stats.lab_values.clear()
        vocab = Vocabulary.build(
            stats.counts, {c: bins.bins_of(c) for c in bins.edges}, registry.names, options.min_count
        )

        out = scratch / "dataset"
        (out / "sequences").mkdir(parents=True)
        tokens = events = visits = 0
        unknown: Counter[str] = Counter()
        event_tokens: Counter[str] = Counter()
        by_type: Counter[int] = Counter()
        done = 0
        report("writing sequences", 0, len(ids))
        for n, parked in enumerate(chunks):
            chunks[n] = []
            rows = []
            for patient_id, split, n_visits, sequence in _unpark(parked):
                sequence.tokens = bin_labs(sequence.tokens, sequence.values, bins)
                streams = encode(sequence, vocab)
                rows.append((patient_id, split, streams))
                is_event = streams["type_ids"] >= grammar.TokenType.CONDITION
                tokens += len(sequence)
                events += int(is_event.sum())
                visits += n_visits
                event_tokens[split] += int(is_event.sum())
                by_type.update(streams["type_ids"][is_event].tolist())
                unknown[split] += int((streams["token_ids"][is_event] == vocab.unk_id).sum())
            _write_shard(out / "sequences" / f"part-{n:05d}.parquet", rows)
            done += len(rows)
            report("writing sequences", done, len(ids))

        label_rows = stats.points
        _write_labels(out / "labels.parquet", label_rows)
        unknown_rate = {s: round(unknown[s] / event_tokens[s], 6) if event_tokens[s] else 0.0 for s in SPLITS}
        label_counts = _label_counts(stats.points, registry)
        summary = {
            "patients": {s: stats.patients[s] for s in SPLITS},
            "tokens": tokens,
            "events": events,
            "events_by_type": {grammar.TokenType(t).name.lower(): int(n) for t, n in sorted(by_type.items())},
            "visits": visits,
            "vocab_size": len(vocab),
            "unknown_rate": unknown_rate,
            "dropped": dict(sorted(stats.dropped.items())),
            "excluded": excluded.summary(),
            "labels": label_counts,
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset_version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source_runs": runs,
            "source_profile": profile.describe(),
            "data_end": _iso(data_end),
            "max_length": options.max_length,
            "time_unit": "days since 1970-01-01T00:00:00Z",
            "streams": {name: np.dtype(STREAM_DTYPES[name]).name for name in STREAMS},
            "token_types": {t.name.lower(): int(t) for t in grammar.TokenType},
            "split": options.split.describe(),
            "tasks": registry.describe(),
            "counts": summary,
            "files": {
                "sequences": sorted(f"sequences/{p.name}" for p in (out / "sequences").iterdir()),
                "labels": "labels.parquet",
            },
            "vocabulary": vocab.as_dict(),
            "lab_bins": bins.as_dict(),
        }
        (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))

        location = open_location(settings.object_store_location, settings)
        prefix = f"datasets/v{version}"
        report("publishing", 0, 1)
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            stored = location.put_file(f"{prefix}/{path.relative_to(out).as_posix()}", path)
            if path.name == "manifest.json":
                manifest_uri = stored
        report("publishing", 1, 1)

    _commit(conn, version, manifest_uri, summary, label_rows, len(vocab))
    return TokenizeResult(
        version,
        manifest_uri,
        runs,
        _iso(data_end),
        summary["patients"],
        tokens,
        events,
        visits,
        len(vocab),
        unknown_rate,
        summary["dropped"],
        label_counts,
        0.0,
        summary["events_by_type"],
        profile.ref,
        summary["excluded"],
    )


def _unpark(parked: Path | list) -> list:
    if isinstance(parked, list):
        return parked
    with parked.open("rb") as fh:
        timelines_and_splits = pickle.load(fh)
    parked.unlink()
    return timelines_and_splits


def encode(sequence: TokenSequence, vocab: Vocabulary) -> dict[str, np.ndarray]:
    """The stored streams of a sequence: token ids, and times in days since the epoch."""
    return {
        "token_ids": vocab.encode(sequence.tokens),
        "type_ids": sequence.type_ids,
        "ages": sequence.ages,
        "times": sequence.times / DAY,
        "visit_orders": sequence.visit_orders,
        "visit_segments": sequence.visit_segments,
    }


def _list_column(arrays: list[np.ndarray], dtype: Any) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(dtype) if arrays else np.array([], dtype=dtype)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _write_shard(path: Path, rows: list[tuple[str, str, dict[str, np.ndarray]]]) -> None:
    columns: dict[str, pa.Array] = {
        "patient_id": pa.array([r[0] for r in rows], pa.string()),
        "split": pa.array([r[1] for r in rows], pa.string()),
        "n_tokens": pa.array([len(r[2]["token_ids"]) for r in rows], pa.int32()),
    }
    for name in STREAMS:
        columns[name] = _list_column([r[2][name] for r in rows], STREAM_DTYPES[name])
    pq.write_table(pa.table(columns), path, compression="zstd")


def _write_labels(path: Path, rows: list[tuple[LabelPoint, str, int]]) -> None:
    def ts(values: list[float]) -> pa.Array:
        return pa.array(
            np.round(np.asarray(values, dtype=np.float64) * 1e6).astype(np.int64), pa.timestamp("us", "UTC")
        )

    table = pa.table(
        {
            "task": pa.array([p.task for p, _, _ in rows], pa.string()),
            "patient_id": pa.array([p.patient_id for p, _, _ in rows], pa.string()),
            "prediction_time": ts([p.prediction_time for p, _, _ in rows]),
            "label": pa.array([p.label for p, _, _ in rows], pa.bool_()),
            "censored": pa.array([p.censored for p, _, _ in rows], pa.bool_()),
            "split": pa.array([s for _, s, _ in rows], pa.string()),
            "index_encounter_id": pa.array([p.index_encounter_id for p, _, _ in rows], pa.string()),
            "window_end": ts([p.window_end for p, _, _ in rows]),
            "cut": pa.array([c for _, _, c in rows], pa.int32()),
        }
    )
    pq.write_table(table, path, compression="zstd")


def _label_counts(points: list[tuple[LabelPoint, str, int]], registry: Registry) -> dict[str, dict[str, int]]:
    counts = {t: Counter() for t in registry.names}
    for point, _, _ in points:
        c = counts[point.task]
        c["points"] += 1
        c["positive"] += point.label is True
        c["negative"] += point.label is False
        c["censored"] += point.censored
    return {t: {k: int(c[k]) for k in ("points", "positive", "negative", "censored")} for t, c in counts.items()}


def _commit(
    conn, version: int, location: str, summary: dict, rows: list[tuple[LabelPoint, str, int]], vocab_size: int
) -> None:
    """Replace ``ehr.task_label`` and mark the version ready, in one transaction."""
    import io

    buffer = io.StringIO()
    for p, split, _ in rows:
        fields = (p.task, p.patient_id, _iso(p.prediction_time), p.label, split, p.index_encounter_id, p.censored,
                  _iso(p.window_end), version)  # fmt: skip
        buffer.write("\t".join(copy_field(f) for f in fields) + "\n")
    buffer.seek(0)
    with conn, conn.cursor() as cur:
        cur.execute("LOCK TABLE ehr.task_label IN EXCLUSIVE MODE")
        cur.execute("DELETE FROM ehr.task_label")
        cur.copy_expert(
            "COPY ehr.task_label (task, patient_id, prediction_time, label, split, index_encounter_id, censored, "
            "window_end, dataset_version_id) FROM STDIN",
            buffer,
        )
        cur.execute(
            """UPDATE ops.dataset_version SET status = 'ready', finished_at = now(), location = %s, patients = %s,
                      tokens = %s, vocab_size = %s, summary = %s::jsonb, excluded_patients = %s, excluded_records = %s
               WHERE dataset_version_id = %s AND status = 'building'""",
            (location, sum(summary["patients"].values()), summary["tokens"], vocab_size, json.dumps(summary),
             summary["excluded"]["patients"], summary["excluded"]["records"], version),
        )  # fmt: skip
        if cur.rowcount != 1:  # swept meanwhile: the labels above roll back with this transaction
            raise RuntimeError(f"dataset version {version} is no longer building (abandoned): not marked ready")
    with conn, conn.cursor() as cur:
        cur.execute("ANALYZE ehr.task_label")


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()
