"""What each Airflow task does, as plain functions over the library (the DAG files in ``dags/`` stay thin).

Every step is idempotent for its inputs — ingest loads an export once (a re-run finds it unchanged), the gate
validates only runs not yet validated, scoring replaces its as-of date — and returns a small JSON-serialisable
dict for XCom. Steps never log patient identifiers or clinical values. Errors that a retry cannot fix (a
rejected run, no champion) are ``PermanentError``s; the DAGs turn them into failures without retries.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from odyssey_batch.settings import Settings, load_settings


class PermanentError(RuntimeError):
    """A failure no retry can fix: the DAG task fails at once, with this message."""


def context() -> tuple[str, Settings]:
    """The warehouse URL and settings: the Airflow connection ``odyssey_warehouse`` when one is defined
    (``AIRFLOW_CONN_ODYSSEY_WAREHOUSE``), else the ODYSSEY_* settings. The schema must be current (a
    ``PermanentError`` says to run ``odyssey-batch db upgrade`` as the owner): DAGs run as a login in
    ``odyssey_pipeline`` and never migrate, except on the embedded server this installation owns. Log records are
    redacted from here on (no password in task logs)."""
    from odyssey_batch import redaction
    from odyssey_batch.warehouse import SchemaNotCurrent, database_url, prepare

    redaction.install_log_redaction()
    settings = load_settings()
    redaction.remember_settings_secrets(settings)
    url = os.environ.get("AIRFLOW_CONN_ODYSSEY_WAREHOUSE", "").replace("postgres://", "postgresql://", 1)
    owner = False
    if url:
        redaction.remember_secrets(redaction.dsn_password(url))
    else:
        url, owner = database_url(settings), settings.embedded
    try:
        prepare(url, owner=owner)
    except SchemaNotCurrent as exc:
        raise PermanentError(str(exc)) from exc
    return url, settings


def _sources(url: str) -> set[str]:
    from odyssey_batch.warehouse import connect

    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT source FROM ops.ingest_run WHERE status IN ('succeeded', 'validated', 'rejected')")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def new_exports(landing: str) -> list[str]:
    """The exports in the landing location not ingested yet: each top-level folder (or prefix) is one export, a
    file directly in the landing location is one too. Sorted, so the oldest dated folder loads first. A folder
    that ``odyssey-batch pull`` is still writing (it holds ``.odyssey-incomplete``) is left for a later run."""
    from odyssey_batch.pull.landing import INCOMPLETE_MARKER
    from odyssey_batch.storage import open_location

    url, settings = context()
    names = [f.name for f in open_location(landing, settings).list_files()]
    incomplete = {n.split("/", 1)[0] for n in names if n.endswith("/" + INCOMPLETE_MARKER)}
    groups = sorted({n.split("/", 1)[0] for n in names} - incomplete)
    done = _sources(url)
    base = landing.rstrip("/")
    return [source for source in (f"{base}/{g}" for g in groups) if source not in done]


def ingest_export(source: str) -> dict[str, Any]:
    """Load one export; a run whose files are all refused raises (the task retries, then fails). A broken
    manifest is a ``PermanentError``: the same bytes fail the same way on every retry."""
    from odyssey_batch.ingest import ingest
    from odyssey_batch.ingest.discover import ManifestError

    url, settings = context()
    try:
        data = ingest(source, settings, url=url).as_dict()
    except ManifestError as exc:
        raise PermanentError(f"{source}: {exc}") from exc
    keys = ("source", "run_id", "status", "records", "loaded", "normalized", "excluded", "excluded_reasons",
            "unchanged", "quarantined")  # fmt: skip
    return {k: data.get(k) for k in keys}


def pull_export(connection: dict[str, Any], landing: str, since: str = "auto") -> dict[str, Any]:
    """Pull one export from the FHIR server of ``connection`` (an Airflow connection's fields: ``host`` the base
    URL, ``login`` the SMART client id, ``password`` the private key (PEM or JWK set) or the bearer token, ``extra``
    {"auth", "group", "level", "types", "type_filters", "kid", "scope", "token_url", "method"}) into ``landing``.
    A retry resumes the same export (``ops.bulk_pull``); a failed export, refused credentials or a server already
    exporting for another pull are ``PermanentError``s, the latter two because a retry within minutes cannot fix
    them."""
    from odyssey_batch import redaction
    from odyssey_batch.pull.auth import AuthError
    from odyssey_batch.pull.client import ExportFailed
    from odyssey_batch.pull.run import PullOptions, pull
    from odyssey_batch.pull.state import PullBusy

    url, settings = context()
    extra = connection.get("extra") or {}
    if isinstance(extra, str):
        import json

        extra = json.loads(extra) if extra.strip() else {}
    secret = connection.get("password") or ""
    redaction.remember_secrets(secret)
    kind = extra.get("auth") or ("smart" if connection.get("login") else "bearer" if secret else "none")
    settings = settings.with_overrides(
        pull_auth=kind, pull_client_id=connection.get("login") or "",
        pull_private_key=secret if kind == "smart" else "", pull_bearer_token=secret if kind == "bearer" else "",
        pull_key_id=extra.get("kid", ""), pull_scope=extra.get("scope") or settings.pull_scope,
        pull_token_url=extra.get("token_url", ""),
    )  # fmt: skip
    types = extra.get("types") or ()
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    group = extra.get("group", "")
    options = PullOptions(
        server=connection["host"], level=extra.get("level") or ("group" if group else "system"), group=group,
        types=tuple(types), type_filters=tuple(extra.get("type_filters") or ()), since=since, to=landing,
        method=extra.get("method", "auto"),
    )  # fmt: skip
    try:
        result = pull(options, settings, url=url)
    except (ExportFailed, AuthError, PullBusy) as exc:
        raise PermanentError(str(exc)) from exc
    keys = ("pull_id", "destination", "since", "transaction_time", "resumed", "files", "resources", "errors",
            "deleted", "seconds")  # fmt: skip
    return {k: result.as_dict()[k] for k in keys}


def quality_gate() -> dict[str, Any]:
    """Validate every finished ingest run not validated yet; a rejected run is a ``PermanentError`` carrying the
    gate's message (accept it with ``odyssey-batch accept-run``, or fix the export and load it again)."""
    from odyssey_batch.quality.gate import validate
    from odyssey_batch.warehouse import connect

    url, settings = context()
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id FROM ops.ingest_run WHERE status = 'succeeded' ORDER BY run_id")
            pending = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    verdicts = [validate(url, settings, run, data_docs=False) for run in pending]
    rejected = [v for v in verdicts if not v.success]
    if rejected:
        raise PermanentError("\n".join(v.message() for v in rejected))
    return {"validated": [v.run_id for v in verdicts]}


def build_dataset() -> dict[str, Any]:
    """Tokenize the warehouse into a new dataset version with task labels (refuses rejected runs)."""
    from odyssey_batch.quality.gate import RunRejected
    from odyssey_batch.sequences.dataset import tokenize

    url, settings = context()
    try:
        result = tokenize(url, settings)
    except RunRejected as exc:
        raise PermanentError(str(exc)) from exc
    return {"dataset_version": result.dataset_version_id, "patients": result.patients, "tokens": result.tokens}


def pretrain_model(preset: str, steps: int, epochs: float, max_length: int, seed: int,
                   run_key: str | None = None) -> int:  # fmt: skip
    """Pretrain on the latest dataset version; returns the training run. With ``run_key`` (the DAG run), a retry
    returns the run an earlier try of the same work finished instead of training again."""
    from odyssey_batch.training.pretrain import PretrainOptions, pretrain
    from odyssey_batch.training.runs import keyed_run

    url, settings = context()
    done = keyed_run(url, "pretrain", run_key) if run_key else None
    if done is not None:
        return done
    options = PretrainOptions(preset=preset, steps=steps, epochs=epochs, max_length=max_length, seed=seed)
    return pretrain(url, settings, None, options, run_key=run_key).training_run_id


def latest_pretraining_run() -> int:
    from odyssey_batch.training.runs import latest_run

    url, _ = context()
    run = latest_run(url, "pretrain")
    if run is None:
        raise PermanentError("no succeeded pretraining run to finetune: trigger retrain with mode=full")
    return run


def finetune_model(pretrained: int, epochs: int, max_length: int, seed: int, run_key: str | None = None) -> int:
    """Multitask finetuning from ``pretrained``; registers and returns the candidate model version. With
    ``run_key`` (the DAG run), a retry registers nothing new: the finetuning run an earlier try finished gives back
    its version (registered now if that try died in between), and a run that try left unfinished is abandoned."""
    from odyssey_batch.registry.bundle import register_run
    from odyssey_batch.training.finetune import FinetuneOptions, finetune
    from odyssey_batch.training.runs import keyed_run

    url, settings = context()
    done = keyed_run(url, "finetune", run_key) if run_key else None
    if done is None:
        options = FinetuneOptions(epochs=epochs, max_length=max_length, seed=seed)
        done = finetune(url, settings, pretrained, options, run_key=run_key).training_run_id
    return register_run(url, settings, done).model_version


def evaluate_and_promote(version: int, seeds: int) -> dict[str, Any]:
    """Evaluate the candidate beside the baselines and the champion, then apply the promotion rule."""
    from odyssey_batch.evaluation.evaluate import EvaluateOptions, evaluate_model
    from odyssey_batch.registry.promotion import promote

    url, settings = context()
    evaluation = evaluate_model(url, settings, version, EvaluateOptions(seeds=seeds))
    decision = promote(url, version, settings.promotion_rule(), actor="airflow:retrain")
    return {"model_version": version, "promoted": decision.promote, "reason": decision.reason,
            "report": evaluation.report.get("report/report.html")}  # fmt: skip


def start_scoring(as_of: str, partitions: int, cohort: str = "triggers", run_key: str | None = None) -> int:
    """A new scoring run as of ``as_of`` (ISO time); a ``PermanentError`` when no champion exists. With
    ``run_key`` (the DAG run), a retried start returns the run its earlier try started."""
    from odyssey_batch.scoring.run import ScoreOptions, start_run

    url, settings = context()
    try:
        return start_run(url, settings, dt.datetime.fromisoformat(as_of),
                         ScoreOptions(partitions=partitions, cohort=cohort), run_key=run_key)  # fmt: skip
    except LookupError as exc:
        raise PermanentError(str(exc)) from exc


def score_partition(run_id: int, partition: int) -> dict[str, Any]:
    from odyssey_batch.scoring.run import score_partition as score

    url, settings = context()
    return score(url, settings, run_id, partition)


def commit_scoring(run_id: int) -> dict[str, Any]:
    """Make the run visible (all partitions must have succeeded) and report drift and what the gate held back. A
    run that is no longer running (failed, abandoned) is a ``PermanentError``: no retry can publish it."""
    from odyssey_batch.scoring.run import RunNotRunning, commit_run

    url, settings = context()
    try:
        result = commit_run(url, settings, run_id)
    except RunNotRunning as exc:
        raise PermanentError(str(exc)) from exc
    return {"run_id": run_id, "n_patients": result.n_patients, "n_scores": result.n_scores,
            "drift_flagged": result.drift_flagged, "drift_reasons": result.drift["reasons"],
            "held_back_runs": result.held_back_runs, "held_back_patients": result.held_back_patients,
            "excluded_patients": result.excluded_patients}  # fmt: skip


def fail_scoring(run_id: int, reason: str) -> bool:
    """Mark the run failed unless it is no longer running (a committed run is never touched); whether it did."""
    from odyssey_batch.scoring.run import fail_run

    url, _ = context()
    return fail_run(url, run_id, RuntimeError(reason))


def call(step, *args: Any, **kwargs: Any) -> Any:
    """Run a step inside an Airflow task: a ``PermanentError`` fails the task at once, without retries."""
    try:
        return step(*args, **kwargs)
    except PermanentError as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(exc)) from exc
