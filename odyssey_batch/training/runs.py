"""``ops.training_run``: one row per training run, kept current as the run goes (rank 0 writes it)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict

from odyssey_batch.warehouse import transaction


def _execute(url: str, statement: str, params: tuple) -> tuple | None:
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchone() if cur.description else None


def start_run(url, kind, dataset_version, options, backend, device, world, model, parent=None) -> int:
    row = _execute(
        url,
        """INSERT INTO ops.training_run (kind, dataset_version_id, preset, backend, device, world_size, seed,
                                         options, parent_run_id)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s) RETURNING training_run_id""",
        (kind, dataset_version, options.preset, backend, str(device), world, options.seed,
         json.dumps({"options": asdict(options), "model": model.config.as_dict(),
                     "parameters": model.num_parameters()}), parent),
    )  # fmt: skip
    return row[0]  # type: ignore[index]


_PROGRESS = "steps = %s, tokens = %s, tokens_per_s = %s, train_loss = %s, artifact_uri = %s"


def update_run(url, run_id, step, tokens, rate, loss, artifact) -> None:
    _execute(url, f"UPDATE ops.training_run SET {_PROGRESS} WHERE training_run_id = %s",
             (step, tokens, rate, loss, artifact, run_id))  # fmt: skip


def finish_run(url, run_id, step, tokens, rate, loss, val_loss, artifact) -> None:
    _execute(
        url,
        f"UPDATE ops.training_run SET {_PROGRESS}, val_loss = %s, status = 'succeeded', finished_at = now() "
        "WHERE training_run_id = %s",
        (step, tokens, rate, loss, artifact, val_loss, run_id),
    )


def fail_run(url, run_id, exc: BaseException) -> None:
    with contextlib.suppress(Exception):  # the database may be the problem
        _execute(
            url,
            "UPDATE ops.training_run SET status = 'failed', finished_at = now(), error = %s WHERE training_run_id = %s",
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
