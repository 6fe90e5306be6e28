"""``odyssey-batch score --as-of T``: the champion's calibrated risk for every eligible patient and task, written
to ``risk.*`` so that analysts see a whole run or none of it.

A run is ``start_run`` → ``score_partition`` for each hash partition of the patients (independent: Airflow maps
them as parallel tasks; a retried partition replaces its own rows) → ``commit_run``, which, in one transaction,
checks that every partition succeeded, stores the score distributions and drift flags, deletes the previous
run of the same as-of date and marks this one ``succeeded``. Views read succeeded runs only, so until that
commit analysts keep seeing the previous run, and a failed run is never seen at all.

Crashes and retries: every status change is guarded in SQL under the run's row lock. ``fail_run`` marks a
``running`` run failed and drops its rows, and is a no-op on a ``succeeded`` run (a failure handler that runs
after the commit never touches published scores); ``commit_run`` refuses a run that is not ``running`` (a
failed or abandoned run is never published); a partition writes its rows only while its run is ``running``.
While a process works on a run or partition it keeps their heartbeat fresh (``warehouse.liveness``); the next
``start_run`` sweeps runs whose process died to ``abandoned`` (and drops their rows). ``start_run`` with a
``run_key`` (Airflow's DAG run) reuses the run that an earlier try of the same start left ``running``.

The quality gate: patients with any resource from an ingest run no stage may use (rejected and not accepted, or
not validated yet: ``quality.gate.run_uses``) are held back from the run; ``held_back_runs`` and
``held_back_patients`` (a count, never ids) say what was held back. Patients the gate excluded whole
(``quality.exclusions``) are not scored either (``excluded_patients``, a count), and the records it excluded are
left out of every input.

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
from odyssey_batch.quality.exclusions import current as current_exclusions
from odyssey_batch.quality.gate import patients_of_runs, unusable_runs
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
from odyssey_batch.warehouse.liveness import abandon, heartbeat, sweep

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
    held_back_runs: list[int] = field(default_factory=list)  # unusable ingest runs whose patients were held back
    held_back_patients: int = 0  # patients of the cohort not scored because an unusable run touched them
    excluded_patients: int = 0  # patients of the cohort not scored because the quality gate excluded them

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


def start_run(url: str, settings: Settings, as_of: dt.datetime, options: ScoreOptions = ScoreOptions(), *,
              run_key: str | None = None) -> int:  # fmt: skip
    """A new ``running`` scoring run with the current champion; LookupError when there is no champion.

    First sweeps scoring runs and partitions whose process died (no heartbeat for ``stale_run_minutes``) to
    ``abandoned`` and drops their rows. With ``run_key`` (the orchestrator's id of this work, e.g. the DAG run),
    the run an earlier try left ``running`` under the same key and options is returned instead of a new one (a
    retried start never orphans a run); one with other options is abandoned."""
    if options.cohort not in COHORTS:
        raise ValueError(f"cohort must be one of {', '.join(COHORTS)}, not {options.cohort!r}")
    if options.partitions < 1:
        raise ValueError("partitions must be at least 1")
    _as_of_seconds(as_of)
    champion = versions.champion(url)
    if champion is None:
        raise LookupError("no champion model: evaluate a model and promote it (`odyssey-batch evaluate V --promote`"
                          " or `odyssey-batch models promote V`)")  # fmt: skip
    active_days = options.active_days if options.cohort == "active" else None
    with transaction(url) as conn, conn.cursor() as cur:
        swept = [run for (run,) in sweep(cur, "scoring", settings.stale_run_minutes)]
        sweep(cur, "scoring_partition", settings.stale_run_minutes)
        _drop_rows(cur, swept)
        if run_key is not None:
            cur.execute("""SELECT run_id, as_of, cohort, active_days, partitions FROM risk.scoring_run
                           WHERE run_key = %s AND status = 'running' FOR UPDATE""", (run_key,))  # fmt: skip
            row = cur.fetchone()
            if row is not None and row[1:] == (as_of, options.cohort, active_days, options.partitions):
                cur.execute("UPDATE risk.scoring_run SET heartbeat_at = now() WHERE run_id = %s", (row[0],))
                log.info("scoring run %s reused: an earlier try of the same work started it", row[0])
                return row[0]
            if row is not None:
                abandon(cur, "scoring", "run_id = %s", (row[0],),
                        "abandoned: superseded by a retried start of the same work with other options")  # fmt: skip
                _drop_rows(cur, [row[0]])
        cur.execute(
            """INSERT INTO risk.scoring_run (as_of, model_version, dataset_version, cohort, active_days, partitions,
                                             run_key)
               VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING run_id""",
            (as_of, champion.model_version, champion.dataset_version, options.cohort, active_days,
             options.partitions, run_key),
        )  # fmt: skip
        return cur.fetchone()[0]


def _drop_rows(cur, run_ids: list[int]) -> None:
    """Delete the scores and explanations of runs that ended ``failed`` or ``abandoned`` (the status is checked in
    the same statement: a succeeded run's rows are never deleted here). Call with the runs' rows locked."""
    if not run_ids:
        return
    for table in ("risk.explanation", "risk.score"):
        cur.execute(
            f"""DELETE FROM {table} t USING risk.scoring_run r
                WHERE t.run_id = r.run_id AND r.run_id = ANY(%s) AND r.status IN ('failed', 'abandoned')""",
            (list(run_ids),),
        )


_RUN_KEYS = ("as_of", "model_version", "dataset_version", "cohort", "active_days", "partitions", "status", "started_at",
             "error")  # fmt: skip


def _run_row(cur, run_id: int, lock: str = "") -> dict[str, Any]:
    """A run read with an open cursor; ``lock``: ``FOR SHARE`` or ``FOR UPDATE`` of its row."""
    cur.execute(f"SELECT {', '.join(_RUN_KEYS)} FROM risk.scoring_run WHERE run_id = %s {lock}", (run_id,))
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"scoring run {run_id} does not exist")
    return {"run_id": run_id, **dict(zip(_RUN_KEYS, row, strict=True))}


class RunNotRunning(ValueError):
    """The run is no longer ``running`` (committed, failed or abandoned): nothing more may be written to it."""


def _ensure_running(run: dict[str, Any], doing: str) -> None:
    if run["status"] != "running":
        why = f" ({run['error']})" if run["status"] != "succeeded" and run["error"] else ""
        raise RunNotRunning(f"scoring run {run['run_id']} is {run['status']}{why}, not running: {doing} is refused; "
                            "start a new run")  # fmt: skip


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
    held_back_runs: list[int] = field(default_factory=list)
    held_back_patients: int = 0
    excluded_patients: int = 0
    patients: int = 0
    event_tokens: int = 0
    unknown_tokens: int = 0


def score_partition(url: str, settings: Settings, run_id: int, partition: int, options: ScoreOptions = ScoreOptions(),
                    *, progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Score one partition of a run and replace its rows (idempotent: a retried partition starts over). Refused
    (``RunNotRunning``) when the run is no longer ``running``, at the start or when the rows are written."""
    report = progress or (lambda phase, done, total: None)
    started = time.perf_counter()
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            run = _run_row(cur, run_id, "FOR SHARE")  # a commit or a failure handler waits for this transaction
            _ensure_running(run, f"scoring partition {partition}")
            if not 0 <= partition < run["partitions"]:
                raise ValueError(f"partition must be in 0..{run['partitions'] - 1}")
            cur.execute(
                """INSERT INTO risk.scoring_partition (run_id, partition, status) VALUES (%s, %s, 'running')
                   ON CONFLICT (run_id, partition) DO UPDATE SET status = 'running', started_at = now(),
                       finished_at = NULL, error = NULL, heartbeat_at = now()""",
                (run_id, partition),
            )
        try:
            with heartbeat(url, settings, ("scoring", run_id), ("scoring_partition", (run_id, partition))):
                loaded = load_model(url, settings, run["model_version"])
                scored = _score(conn, settings, loaded, run, partition, options, report)
                _write_partition(conn, run_id, partition, scored)
        except BaseException as exc:
            _fail_partition(conn, run_id, partition, exc)
            raise
    finally:
        conn.close()
    seconds = time.perf_counter() - started
    log.info("scoring run %s partition %s: %s patients, %s scores, %s explained, %s held back in %.1f s", run_id,
             partition, scored.patients, len(scored.rows), len({r[2:4] for r in scored.explanations}),
             scored.held_back_patients, seconds)  # fmt: skip
    return {"run_id": run_id, "partition": partition, "patients": scored.patients, "scores": len(scored.rows),
            "explanations": len(scored.explanations), "held_back_runs": scored.held_back_runs,
            "held_back_patients": scored.held_back_patients, "seconds": round(seconds, 2)}  # fmt: skip


def _fail_partition(conn, run_id: int, partition: int, exc: BaseException) -> None:
    conn.rollback()
    with conn, conn.cursor() as cur:
        cur.execute("""UPDATE risk.scoring_partition SET status = 'failed', finished_at = now(), error = %s
                       WHERE run_id = %s AND partition = %s AND status = 'running'""",
                    (f"{type(exc).__name__}: {exc}"[:2000], run_id, partition))  # fmt: skip


def _write_partition(conn, run_id: int, partition: int, scored: _Scored) -> None:
    """One transaction: the partition's rows and its status, only while the run and the partition are
    ``running`` (the run's row is held ``FOR SHARE`` meanwhile: a commit or a failure handler waits for it)."""
    with conn, conn.cursor() as cur:
        _ensure_running(_run_row(cur, run_id, "FOR SHARE"), f"writing partition {partition}")
        cur.execute(
            """UPDATE risk.scoring_partition SET status = 'succeeded', finished_at = now(), n_patients = %s,
                      n_scores = %s, event_tokens = %s, unknown_tokens = %s, held_back_runs = %s,
                      held_back_patients = %s, excluded_patients = %s
               WHERE run_id = %s AND partition = %s AND status = 'running'""",
            (scored.patients, len(scored.rows), scored.event_tokens, scored.unknown_tokens, scored.held_back_runs,
             scored.held_back_patients, scored.excluded_patients, run_id, partition),
        )  # fmt: skip
        if cur.rowcount != 1:
            raise RunNotRunning(f"scoring run {run_id} partition {partition} is no longer running (swept or failed "
                                "meanwhile): its rows are not written")  # fmt: skip
        cur.execute("DELETE FROM risk.explanation WHERE run_id = %s AND partition = %s", (run_id, partition))
        cur.execute("DELETE FROM risk.score WHERE run_id = %s AND partition = %s", (run_id, partition))
        execute_values(cur, """INSERT INTO risk.score (run_id, partition, as_of, patient_id, task, prediction_time,
                               probability, risk_band, model_version) VALUES %s""", scored.rows,
                       template="(%s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s)", page_size=2000)  # fmt: skip
        execute_values(cur, """INSERT INTO risk.explanation (run_id, partition, patient_id, task, rank, token,
                               display, event_time, attribution) VALUES %s""", scored.explanations,
                       template="(%s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), %s)", page_size=2000)  # fmt: skip


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
        with conn.cursor() as cur:  # the quality gate: patients touched by an unusable ingest run are held back
            scored.held_back_runs = unusable_runs(cur)
            held = patients_of_runs(cur, scored.held_back_runs)
            excluded = current_exclusions(cur)  # and what the gate excluded is left out
        scored.held_back_patients = sum(1 for p in ids if p in held)
        ids = excluded.keep_patients([p for p in ids if p not in held])
        scored.excluded_patients = excluded.skipped["patients"]
        done = 0
        report("scoring", 0, len(ids))
        for start in range(0, len(ids), options.chunk_patients):
            chunk = ids[start : start + options.chunk_patients]
            requests: list[Request] = []
            owners: list[tuple[str, Any, np.ndarray, int]] = []  # patient, sequence, its token ids, cut
            for record in read_patients(conn, chunk, display=explain_from is not None, exclusions=excluded,
                                        units=loaded.bins.units):  # fmt: skip
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
    drift flags are stored; the previous run of the same as-of date is deleted; the run becomes ``succeeded``.
    Refused (``RunNotRunning``) unless the run is ``running``: a failed or abandoned run is never published, and a
    committed one is not committed again."""
    with transaction(url) as conn, conn.cursor() as cur:
        run = _run_row(cur, run_id, "FOR UPDATE")
        _ensure_running(run, "committing it")
        cur.execute("""SELECT partition, n_patients, n_scores, event_tokens, unknown_tokens, held_back_runs,
                              held_back_patients, excluded_patients
                       FROM risk.scoring_partition WHERE run_id = %s AND status = 'succeeded'""",
                    (run_id,))  # fmt: skip
        done = {row[0]: row[1:] for row in cur.fetchall()}
        missing = sorted(set(range(run["partitions"])) - set(done))
        if missing:
            raise RuntimeError(f"scoring run {run_id}: partition(s) {', '.join(map(str, missing))} have not succeeded")
        n_patients = sum(r[0] for r in done.values())
        n_scores = sum(r[1] for r in done.values())
        events = sum(r[2] for r in done.values())
        unknown_rate = sum(r[3] for r in done.values()) / events if events else 0.0
        held_back_runs = sorted({held for r in done.values() for held in r[4]})
        held_back_patients = sum(r[5] for r in done.values())
        excluded_patients = sum(r[6] for r in done.values())
        drift = _drift(cur, settings, run_id, run["as_of"], unknown_rate)
        cur.execute("""DELETE FROM risk.scoring_run WHERE as_of = %s AND run_id <> %s AND status <> 'running'""",
                    (run["as_of"], run_id))  # fmt: skip
        cur.execute("SELECT extract(epoch FROM now() - started_at) FROM risk.scoring_run WHERE run_id = %s", (run_id,))
        seconds = float(cur.fetchone()[0])
        rate = n_patients / seconds if seconds > 0 else 0.0
        cur.execute(
            """UPDATE risk.scoring_run SET status = 'succeeded', finished_at = now(), n_patients = %s, n_scores = %s,
                      patients_per_s = %s, unknown_rate = %s, drift_flagged = %s, drift = %s, held_back_runs = %s,
                      held_back_patients = %s, excluded_patients = %s, heartbeat_at = now()
               WHERE run_id = %s AND status = 'running'""",
            (n_patients, n_scores, rate, unknown_rate, drift["flagged"], Json(drift), held_back_runs,
             held_back_patients, excluded_patients, run_id),
        )  # fmt: skip
        cur.execute("SELECT task, risk_band, count(*) FROM risk.score WHERE run_id = %s GROUP BY 1, 2", (run_id,))
        by_task: dict[str, dict[str, int]] = defaultdict(dict)
        for task, risk, count in cur.fetchall():
            by_task[task][risk] = count
    if drift["flagged"]:
        log.warning("scoring run %s drift: %s", run_id, "; ".join(drift["reasons"]))
    if held_back_runs:
        log.warning("scoring run %s held back %s patient(s) touched by ingest run(s) %s that are rejected and not "
                    "accepted, or not validated yet", run_id, held_back_patients,
                    ", ".join(map(str, held_back_runs)))  # fmt: skip
    return ScoringRun(run_id, run["as_of"].isoformat(), run["model_version"], run["dataset_version"], "succeeded",
                      n_patients, n_scores, round(rate, 2), round(unknown_rate, 6), drift["flagged"], drift,
                      dict(sorted(by_task.items())), round(seconds, 2), held_back_runs, held_back_patients,
                      excluded_patients)  # fmt: skip


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


def fail_run(url: str, run_id: int, exc: BaseException) -> bool:
    """Mark a ``running`` run failed and drop its rows (never visible; the previous run of its as-of date stays).

    A no-op on a run that is ``succeeded`` (a failure handler that runs after the commit, e.g. a retried or timed-out
    commit task, never touches published scores), and only drops leftover rows of one already failed or abandoned.
    Guarded in SQL under the run's row lock (the update waits for a concurrent commit and re-checks the status).
    Returns whether this call marked the run failed."""
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute("""UPDATE risk.scoring_run SET status = 'failed', finished_at = now(), error = %s
                       WHERE run_id = %s AND status = 'running'""",
                    (f"{type(exc).__name__}: {exc}"[:2000], run_id))  # fmt: skip
        failed = cur.rowcount == 1
        cur.execute("SELECT status FROM risk.scoring_run WHERE run_id = %s FOR UPDATE", (run_id,))
        _drop_rows(cur, [run_id])
        cur.execute("""UPDATE risk.scoring_partition p SET status = 'failed', finished_at = now(),
                              error = coalesce(p.error, 'the run failed')
                       FROM risk.scoring_run r
                       WHERE p.run_id = r.run_id AND r.run_id = %s AND r.status = 'failed' AND p.status = 'running'""",
                    (run_id,))  # fmt: skip
    if not failed:
        log.info("scoring run %s was not running: the failure handler changed nothing published", run_id)
    return failed


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
