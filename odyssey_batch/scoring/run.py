"""``odyssey-batch score --as-of T``: the champion's calibrated risk for every eligible patient and task, written
to ``risk.*`` so that analysts see a whole run or none of it.

A run is ``start_run`` → ``score_partition`` for each hash partition of the patients (independent: Airflow maps
them as parallel tasks; a retried partition replaces its own rows) → ``commit_run``, which, in one transaction,
checks that every partition succeeded, stores the score distributions and drift flags, deletes the previous
run of the same as-of date and marks this one ``succeeded``. Views read succeeded runs only, so until that
commit analysts keep seeing the previous run, and a failed run is never seen at all.

Inputs are rebuilt from the warehouse as of the scoring time with the model's own vocabulary and lab bins
(``cohorts.record_as_of``, the same timeline and token rules as training). Logs carry counts, never patient
identifiers or clinical values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from psycopg2.extras import Json, execute_values
from scipy.special import expit

from odyssey_batch.labels.tasks import load_registry
from odyssey_batch.model import default_device
from odyssey_batch.registry import versions
from odyssey_batch.registry.bundle import LoadedModel, load_model
from odyssey_batch.scoring.cohorts import COHORTS, eligible, record_as_of
from odyssey_batch.scoring.scorer import Request, one_pass
from odyssey_batch.sequences.dataset import encode
from odyssey_batch.sequences.extract import read_patients
from odyssey_batch.sequences.grammar import TokenType, task_token
from odyssey_batch.sequences.timeline import DAY, build_timeline
from odyssey_batch.sequences.tokens import to_sequence, window, window_start
from odyssey_batch.settings import Settings
from odyssey_batch.training.finetune import calibrate, with_task_token
from odyssey_batch.warehouse import connect, transaction

log = logging.getLogger(__name__)
BANDS = ("low", "medium", "high")
HIST_BINS = 10
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ScoreOptions:
    cohort: str = "triggers"  # or "active": everyone with an encounter in the last `active_days` days
    active_days: float = 30.0
    partitions: int = 1
    batch_size: int = 64
    chunk_patients: int = 500
    explain_top_k: int = 5
    explain_steps: int = 32


@dataclass
class ScoringRun:
    run_id: int
    as_of: str
    model_version: int
    dataset_version: int
    status: str
    n_patients: int
    n_scores: int
    patients_per_s: float
    unknown_rate: float
    drift_flagged: bool
    drift: dict[str, Any]
    scores_by_task: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def partition_of(patient_id: str, partitions: int) -> int:
    """A patient's partition: a stable hash, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") % partitions


def band(probability: float, threshold: float, medium_fraction: float) -> str:
    if probability >= threshold:
        return "high"
    return "medium" if probability >= medium_fraction * threshold else "low"


def _as_of_seconds(as_of: dt.datetime) -> float:
    if as_of.tzinfo is None:
        raise ValueError("as_of needs a time zone")
    return as_of.timestamp()


def start_run(url: str, settings: Settings, as_of: dt.datetime, options: ScoreOptions = ScoreOptions()) -> int:
    """A new ``running`` scoring run with the current champion; LookupError when there is no champion."""
    if options.cohort not in COHORTS:
        raise ValueError(f"cohort must be one of {', '.join(COHORTS)}, not {options.cohort!r}")
    if options.partitions < 1:
        raise ValueError("partitions must be at least 1")
    _as_of_seconds(as_of)
    champion = versions.champion(url)
    if champion is None:
        raise LookupError("no champion model: evaluate a model and promote it (`odyssey-batch evaluate V --promote`"
                          " or `odyssey-batch models promote V`)")  # fmt: skip
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO risk.scoring_run (as_of, model_version, dataset_version, cohort, active_days, partitions)
               VALUES (%s, %s, %s, %s, %s, %s) RETURNING run_id""",
            (
                as_of,
                champion.model_version,
                champion.dataset_version,
                options.cohort,
                options.active_days if options.cohort == "active" else None,
                options.partitions,
            ),
        )
        return cur.fetchone()[0]


def _run_row(cur, run_id: int) -> dict[str, Any]:
    cur.execute("""SELECT as_of, model_version, dataset_version, cohort, active_days, partitions, status, started_at
                   FROM risk.scoring_run WHERE run_id = %s""", (run_id,))  # fmt: skip
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"scoring run {run_id} does not exist")
    keys = ("as_of", "model_version", "dataset_version", "cohort", "active_days", "partitions", "status",
            "started_at")  # fmt: skip
    return {"run_id": run_id, **dict(zip(keys, row, strict=True))}


def _candidates(conn, as_of: dt.datetime, hours: float) -> list[str]:
    """Patients with an encounter that may make them eligible (a cheap index-backed prefilter)."""
    with conn.cursor() as cur:
        cur.execute(
            """SELECT DISTINCT patient_id FROM ehr.encounter
               WHERE start_time <= %(as_of)s
                 AND (end_time IS NULL OR end_time > %(as_of)s - make_interval(secs => %(seconds)s))
               ORDER BY patient_id""",
            {"as_of": as_of, "seconds": hours * 3600.0},
        )
        return [r[0] for r in cur.fetchall()]


@dataclass
class _Scored:
    rows: list[tuple] = field(default_factory=list)
    explanations: list[tuple] = field(default_factory=list)
    patients: int = 0
    event_tokens: int = 0
    unknown_tokens: int = 0


def score_partition(url: str, settings: Settings, run_id: int, partition: int, options: ScoreOptions = ScoreOptions(),
                    *, progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Score one partition of a run and replace its rows (idempotent: a retried partition starts over)."""
    report = progress or (lambda phase, done, total: None)
    started = time.perf_counter()
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            run = _run_row(cur, run_id)
            if run["status"] != "running":
                raise ValueError(f"scoring run {run_id} is {run['status']}, not running")
            if not 0 <= partition < run["partitions"]:
                raise ValueError(f"partition must be in 0..{run['partitions'] - 1}")
            cur.execute(
                """INSERT INTO risk.scoring_partition (run_id, partition, status) VALUES (%s, %s, 'running')
                   ON CONFLICT (run_id, partition) DO UPDATE SET status = 'running', started_at = now(),
                       finished_at = NULL, error = NULL""",
                (run_id, partition),
            )
        try:
            loaded = load_model(url, settings, run["model_version"])
            scored = _score(conn, settings, loaded, run, partition, options, report)
        except BaseException as exc:
            conn.rollback()
            with conn, conn.cursor() as cur:
                cur.execute("""UPDATE risk.scoring_partition SET status = 'failed', finished_at = now(), error = %s
                               WHERE run_id = %s AND partition = %s""",
                            (f"{type(exc).__name__}: {exc}"[:2000], run_id, partition))  # fmt: skip
            raise
        with conn, conn.cursor() as cur:  # one transaction: the partition's rows and its status
            cur.execute("DELETE FROM risk.explanation WHERE run_id = %s AND partition = %s", (run_id, partition))
            cur.execute("DELETE FROM risk.score WHERE run_id = %s AND partition = %s", (run_id, partition))
            execute_values(cur, """INSERT INTO risk.score (run_id, partition, as_of, patient_id, task, prediction_time,
                                   probability, risk_band, model_version) VALUES %s""", scored.rows,
                           template="(%s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s)", page_size=2000)  # fmt: skip
            execute_values(cur, """INSERT INTO risk.explanation (run_id, partition, patient_id, task, rank, token,
                                   display, event_time, attribution) VALUES %s""", scored.explanations,
                           template="(%s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), %s)", page_size=2000)  # fmt: skip
            cur.execute(
                """UPDATE risk.scoring_partition SET status = 'succeeded', finished_at = now(), n_patients = %s,
                          n_scores = %s, event_tokens = %s, unknown_tokens = %s
                   WHERE run_id = %s AND partition = %s""",
                (scored.patients, len(scored.rows), scored.event_tokens, scored.unknown_tokens, run_id, partition),
            )
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    log.info("scoring run %s partition %s: %s patients, %s scores, %s explained in %.1f s", run_id, partition,
             scored.patients, len(scored.rows), len({r[2:4] for r in scored.explanations}), seconds)  # fmt: skip
    return {"run_id": run_id, "partition": partition, "patients": scored.patients, "scores": len(scored.rows),
            "explanations": len(scored.explanations), "seconds": round(seconds, 2)}  # fmt: skip


def _score(conn, settings: Settings, loaded: LoadedModel, run: dict, partition: int, options: ScoreOptions,
           report: Progress) -> _Scored:  # fmt: skip
    registry = load_registry(settings.tasks_file or None)
    missing = sorted(set(loaded.tasks) - set(registry.names))
    if missing:
        raise ValueError(f"the task registry lacks the model's task(s) {', '.join(missing)}")
    if loaded.placement != "append":
        raise ValueError(f"model version {loaded.version.model_version} puts its task token at the start "
                         f"(placement {loaded.placement}): nightly scoring needs placement 'append'")  # fmt: skip
    as_of = run["as_of"]
    as_of_s = _as_of_seconds(as_of)
    chosen = [t for t in registry.tasks if t.name in loaded.tasks]
    if run["cohort"] == "active":
        hours = run["active_days"] * 24
    else:
        hours = max(t.score_lookback_hours + t.offset_hours for t in chosen) + registry.transfer_gap_hours
    explain_from = BANDS.index(settings.explain_band) if settings.explain_band in BANDS else None
    token_ids = {t: loaded.vocabulary.id(task_token(t)) for t in loaded.tasks}
    device = default_device()
    loaded.model.to(device)
    scored = _Scored()
    conn.set_session(readonly=True)
    try:
        ids = [p for p in _candidates(conn, as_of, hours) if partition_of(p, run["partitions"]) == partition]
        done = 0
        report("scoring", 0, len(ids))
        for start in range(0, len(ids), options.chunk_patients):
            chunk = ids[start : start + options.chunk_patients]
            requests: list[Request] = []
            owners: list[tuple[str, Any, np.ndarray, int]] = []  # patient, sequence, its token ids, cut
            for record in read_patients(conn, chunk, display=explain_from is not None):
                timeline = build_timeline(record_as_of(record, as_of_s), as_of_s)
                points = eligible(timeline, registry, loaded.tasks, as_of_s, cohort=run["cohort"],
                                  active_days=run["active_days"] or 0.0)  # fmt: skip
                if not points:
                    continue
                sequence = to_sequence(timeline, loaded.bins, with_events=explain_from is not None)
                streams = encode(sequence, loaded.vocabulary)
                events = streams["type_ids"] >= TokenType.CONDITION
                scored.patients += 1
                scored.event_tokens += int(events.sum())
                scored.unknown_tokens += int((streams["token_ids"][events] == loaded.vocabulary.unk_id).sum())
                by_time: dict[float, list[str]] = defaultdict(list)
                for point in points:
                    by_time[point.prediction_time].append(point.task)
                for when, tasks in sorted(by_time.items()):
                    cut = sequence.known_at(when)
                    requests.append(Request(window(streams, cut, loaded.max_length - 1), when / DAY, tasks))
                    owners.append((record.patient_id, sequence, streams["token_ids"], cut))
            logits = one_pass(loaded.model, requests, token_ids, batch_size=options.batch_size, device=device)
            for request, (patient_id, sequence, history_ids, cut), values in zip(requests, owners, logits,
                                                                                   strict=True):  # fmt: skip
                probabilities = calibrate(loaded.calibration, request.tasks, expit(values))
                for task, p in zip(request.tasks, probabilities, strict=True):
                    risk = band(float(p), loaded.threshold(task), settings.risk_medium_fraction)
                    scored.rows.append((run["run_id"], partition, as_of, patient_id, task, request.when_days * DAY,
                                        float(p), risk, loaded.version.model_version))  # fmt: skip
                    if explain_from is not None and BANDS.index(risk) >= explain_from:
                        scored.explanations += _explain(loaded, run, partition, patient_id, task, request,
                                                        sequence, history_ids, cut, token_ids[task],
                                                        options)  # fmt: skip
            done += len(chunk)
            report("scoring", done, len(ids))
    finally:
        conn.rollback()
        conn.set_session(readonly=False)
    return scored


def _explain(loaded: LoadedModel, run: dict, partition: int, patient_id: str, task: str, request: Request,
             sequence, token_ids: np.ndarray, cut: int, token_id: int,
             options: ScoreOptions) -> list[tuple]:  # fmt: skip
    """The top contributing events of one score, by integrated gradients over the input embeddings."""
    from odyssey_batch.scoring.explain import integrated_gradients, top_events

    prompt = with_task_token(request.history, token_id, request.when_days)
    _, attributions = integrated_gradients(loaded.model, prompt, steps=options.explain_steps)
    start, synthetic = window_start(token_ids, cut, loaded.max_length - 1)  # where the history window began
    prefix = 0 if start == 0 else (2 if synthetic else 1)  # the [CLS] (and [VS]) it was given
    rows = []
    for rank, (position, attribution) in enumerate(top_events(prompt, attributions, options.explain_top_k), 1):
        index = position - prefix + start
        event = sequence.events[index] if sequence.events is not None else None
        token = sequence.tokens[index]
        display = event.display if event is not None else None
        if display and token.startswith("lab:") and ":q" in token:  # say which bin: "Sodium … (very low)"
            code, bin_index = token[len("lab:") :].rsplit(":q", 1)
            display = f"{display} ({loaded.bins.describe(code, int(bin_index))})"
        rows.append((run["run_id"], partition, patient_id, task, rank, token, display,
                     event.time if event is not None else None, float(attribution)))  # fmt: skip
    return rows


def commit_run(url: str, settings: Settings, run_id: int) -> ScoringRun:
    """Make a run visible, in one transaction: every partition must have succeeded; the score distributions and
    drift flags are stored; the previous run of the same as-of date is deleted; the run becomes ``succeeded``."""
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM risk.scoring_run WHERE run_id = %s FOR UPDATE", (run_id,))
        run = _run_row(cur, run_id)
        if run["status"] != "running":
            raise ValueError(f"scoring run {run_id} is {run['status']}, not running")
        cur.execute("""SELECT partition, n_patients, n_scores, event_tokens, unknown_tokens FROM risk.scoring_partition
                       WHERE run_id = %s AND status = 'succeeded'""", (run_id,))  # fmt: skip
        done = {row[0]: row[1:] for row in cur.fetchall()}
        missing = sorted(set(range(run["partitions"])) - set(done))
        if missing:
            raise RuntimeError(f"scoring run {run_id}: partition(s) {', '.join(map(str, missing))} have not succeeded")
        n_patients = sum(r[0] for r in done.values())
        n_scores = sum(r[1] for r in done.values())
        events = sum(r[2] for r in done.values())
        unknown_rate = sum(r[3] for r in done.values()) / events if events else 0.0
        drift = _drift(cur, settings, run_id, run["as_of"], unknown_rate)
        cur.execute("""DELETE FROM risk.scoring_run WHERE as_of = %s AND run_id <> %s AND status <> 'running'""",
                    (run["as_of"], run_id))  # fmt: skip
        cur.execute("SELECT extract(epoch FROM now() - started_at) FROM risk.scoring_run WHERE run_id = %s", (run_id,))
        seconds = float(cur.fetchone()[0])
        rate = n_patients / seconds if seconds > 0 else 0.0
        cur.execute(
            """UPDATE risk.scoring_run SET status = 'succeeded', finished_at = now(), n_patients = %s, n_scores = %s,
                      patients_per_s = %s, unknown_rate = %s, drift_flagged = %s, drift = %s WHERE run_id = %s""",
            (n_patients, n_scores, rate, unknown_rate, drift["flagged"], Json(drift), run_id),
        )
        cur.execute("SELECT task, risk_band, count(*) FROM risk.score WHERE run_id = %s GROUP BY 1, 2", (run_id,))
        by_task: dict[str, dict[str, int]] = defaultdict(dict)
        for task, risk, count in cur.fetchall():
            by_task[task][risk] = count
    if drift["flagged"]:
        log.warning("scoring run %s drift: %s", run_id, "; ".join(drift["reasons"]))
    return ScoringRun(run_id, run["as_of"].isoformat(), run["model_version"], run["dataset_version"], "succeeded",
                      n_patients, n_scores, round(rate, 2), round(unknown_rate, 6), drift["flagged"], drift,
                      dict(sorted(by_task.items())), round(seconds, 2))  # fmt: skip


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two histograms of shares."""
    e = np.clip(np.asarray(expected, dtype=float), eps, None)
    a = np.clip(np.asarray(actual, dtype=float), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _drift(cur, settings: Settings, run_id: int, as_of: dt.datetime, unknown_rate: float) -> dict[str, Any]:
    """Per task: the histogram of scores (10 bins) and band shares, stored in risk.score_distribution, and the
    PSI against the pooled histograms of the previous ``drift_history_runs`` succeeded runs (earlier as-of)."""
    cur.execute(
        """SELECT task, count(*), avg(probability),
                  array_agg(least(width_bucket(probability, 0, 1, %s), %s)),
                  count(*) FILTER (WHERE risk_band = 'low'), count(*) FILTER (WHERE risk_band = 'medium'),
                  count(*) FILTER (WHERE risk_band = 'high')
           FROM risk.score WHERE run_id = %s GROUP BY task ORDER BY task""",
        (HIST_BINS, HIST_BINS, run_id),
    )
    rows = cur.fetchall()
    cur.execute(
        """SELECT d.task, d.histogram FROM risk.score_distribution d
           WHERE d.run_id IN (SELECT run_id FROM risk.scoring_run WHERE status = 'succeeded' AND as_of < %s
                              ORDER BY as_of DESC LIMIT %s)""",
        (as_of, settings.drift_history_runs),
    )
    history: dict[str, list[np.ndarray]] = defaultdict(list)
    for task, histogram in cur.fetchall():
        history[task].append(np.asarray(histogram, dtype=float))
    reasons, per_task = [], {}
    for task, n, mean, buckets, low, medium, high in rows:
        histogram = np.bincount(np.asarray(buckets) - 1, minlength=HIST_BINS)[:HIST_BINS] / n
        value = psi(np.mean(history[task], axis=0), histogram) if history[task] else None
        flagged = value is not None and value > settings.drift_psi_threshold
        if flagged:
            reasons.append(f"{task}: PSI {value:.3f} > {settings.drift_psi_threshold} against "
                           f"{len(history[task])} previous run(s)")  # fmt: skip
        shares = {"low": low / n, "medium": medium / n, "high": high / n}
        cur.execute(
            """INSERT INTO risk.score_distribution (run_id, task, n, mean, histogram, band_shares, psi, flagged)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
            (run_id, task, n, mean, histogram.tolist(), Json(shares), value, flagged),
        )
        per_task[task] = {"psi": value, "flagged": flagged, "band_shares": shares}
    if unknown_rate > settings.drift_max_unknown_rate:
        reasons.append(f"unknown-token rate {unknown_rate:.3f} > {settings.drift_max_unknown_rate}")
    return {"flagged": bool(reasons), "reasons": reasons, "tasks": per_task, "unknown_rate": unknown_rate}


def fail_run(url: str, run_id: int, exc: BaseException) -> None:
    """Mark a run failed and drop its rows (never visible; the previous run of its as-of date stays)."""
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM risk.explanation WHERE run_id = %s", (run_id,))
        cur.execute("DELETE FROM risk.score WHERE run_id = %s", (run_id,))
        cur.execute("""UPDATE risk.scoring_run SET status = 'failed', finished_at = now(), error = %s
                       WHERE run_id = %s AND status = 'running'""",
                    (f"{type(exc).__name__}: {exc}"[:2000], run_id))  # fmt: skip


def score(url: str, settings: Settings, as_of: dt.datetime, options: ScoreOptions = ScoreOptions(), *,
          progress: Progress | None = None) -> ScoringRun:  # fmt: skip
    """A whole run in this process: start, every partition, commit (or fail, leaving the previous run)."""
    run_id = start_run(url, settings, as_of, options)
    try:
        for partition in range(options.partitions):
            score_partition(url, settings, run_id, partition, options, progress=progress)
        return commit_run(url, settings, run_id)
    except BaseException as exc:
        fail_run(url, run_id, exc)
        raise
