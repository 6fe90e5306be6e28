"""``ops.training_run``: one row per training run, kept current as the run goes (rank 0 writes it).

While it trains, rank 0 keeps the run's heartbeat fresh (``warehouse.liveness``); starting a run first sweeps
training runs whose process died to ``abandoned``. A run may carry a ``run_key`` (the orchestrator's id of the
work, e.g. the DAG run): ``keyed_run`` finds the run an earlier try of the same work finished, so a retried task
reuses it instead of training (and registering) again.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict

from odyssey_batch.warehouse import transaction
from odyssey_batch.warehouse.liveness import abandon, sweep


def _execute(url: str, statement: str, params: tuple) -> tuple | None:
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchone() if cur.description else None


def start_run(url, kind, dataset_version, options, backend, device, world, model, parent=None, *,
              run_key: str | None = None, stale_run_minutes: float = 30.0) -> int:  # fmt: skip
    """Register a new ``running`` run, after sweeping the runs whose process died."""
    with transaction(url) as conn, conn.cursor() as cur:
        sweep(cur, "training", stale_run_minutes)
        cur.execute(
            """INSERT INTO ops.training_run (kind, dataset_version_id, preset, backend, device, world_size, seed,
                                             options, parent_run_id, run_key)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s) RETURNING training_run_id""",
            (kind, dataset_version, options.preset, backend, str(device), world, options.seed,
             json.dumps({"options": asdict(options), "model": model.config.as_dict(),
                         "parameters": model.num_parameters()}), parent, run_key),
        )  # fmt: skip
        return cur.fetchone()[0]


def resume_run(url, run_id) -> None:
    """A run continues from its checkpoint (after a crash, or a sweep): ``running`` again, with a fresh heartbeat."""
    _execute(url, """UPDATE ops.training_run SET status = 'running', finished_at = NULL, error = NULL,
                            heartbeat_at = now() WHERE training_run_id = %s""", (run_id,))  # fmt: skip


def keyed_run(url: str, kind: str, run_key: str) -> int | None:
    """The succeeded run of ``kind`` an earlier try of the work ``run_key`` finished, or None; a run of that work
    still ``running`` belongs to a try that is gone (Airflow retries a task once its try failed or died), so it
    is abandoned."""
    with transaction(url) as conn, conn.cursor() as cur:
        abandon(cur, "training", "kind = %s AND run_key = %s", (kind, run_key),
                "abandoned: its try of the work ended without finishing; a retry took over")  # fmt: skip
        cur.execute("""SELECT max(training_run_id) FROM ops.training_run
                       WHERE kind = %s AND run_key = %s AND status = 'succeeded'""", (kind, run_key))  # fmt: skip
        return cur.fetchone()[0]


_PROGRESS = "steps = %s, tokens = %s, tokens_per_s = %s, train_loss = %s, artifact_uri = %s"


def update_run(url, run_id, step, tokens, rate, loss, artifact) -> None:
    _execute(url, f"UPDATE ops.training_run SET {_PROGRESS} WHERE training_run_id = %s",
             (step, tokens, rate, loss, artifact, run_id))  # fmt: skip


def finish_run(url, run_id, step, tokens, rate, loss, val_loss, artifact) -> None:
    """Mark a ``running`` run succeeded; a run swept meanwhile is refused (resume it to finish it)."""
    row = _execute(
        url,
        f"UPDATE ops.training_run SET {_PROGRESS}, val_loss = %s, status = 'succeeded', finished_at = now() "
        "WHERE training_run_id = %s AND status = 'running' RETURNING training_run_id",
        (step, tokens, rate, loss, artifact, val_loss, run_id),
    )
    if row is None:
        raise RuntimeError(f"training run {run_id} is no longer running (abandoned by a sweep?): not marked "
                           "succeeded; its checkpoints stay, resume it to finish")  # fmt: skip


def fail_run(url, run_id, exc: BaseException) -> None:
    with contextlib.suppress(Exception):  # the database may be the problem
        _execute(
            url,
            "UPDATE ops.training_run SET status = 'failed', finished_at = now(), error = %s "
            "WHERE training_run_id = %s AND status = 'running'",
            (f"{type(exc).__name__}: {exc}"[:2000], run_id),
        )


def run_state(url: str, run_id: int) -> tuple[str, str]:
    """A run's (kind, status); LookupError when there is no such run."""
    row = _execute(url, "SELECT kind, status FROM ops.training_run WHERE training_run_id = %s", (run_id,))
    if row is None:
        raise LookupError(f"training run {run_id} does not exist")
    return row[0], row[1]


def latest_run(url: str, kind: str) -> int | None:
    """The latest succeeded run of a kind (``pretrain`` or ``finetune``), or None."""
    row = _execute(url, "SELECT max(training_run_id) FROM ops.training_run WHERE kind = %s AND status = 'succeeded'",
                   (kind,))  # fmt: skip
    return row[0] if row else None
