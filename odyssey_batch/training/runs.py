"""``ops.training_run``: one row per training run, kept current as the run goes (rank 0 writes it)."""

from __future__ import annotations

import json
from dataclasses import asdict

from odyssey_batch.warehouse import connect


def start_run(url, kind, dataset_version, options, backend, device, world, model, parent=None) -> int:
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                """INSERT INTO ops.training_run (kind, dataset_version_id, preset, backend, device, world_size, seed,
                                                 options, parent_run_id)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s) RETURNING training_run_id""",
                (kind, dataset_version, options.preset, backend, str(device), world, options.seed,
                 json.dumps({"options": asdict(options), "model": model.config.as_dict(),
                             "parameters": model.num_parameters()}), parent),
            )  # fmt: skip
            return cur.fetchone()[0]
    finally:
        conn.close()


def update_run(url, run_id, step, tokens, rate, loss, artifact) -> None:
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                """UPDATE ops.training_run SET steps = %s, tokens = %s, tokens_per_s = %s, train_loss = %s,
                          artifact_uri = %s WHERE training_run_id = %s""",
                (step, tokens, rate, loss, artifact, run_id),
            )
    finally:
        conn.close()


def finish_run(url, run_id, step, tokens, rate, loss, val_loss, artifact) -> None:
    update_run(url, run_id, step, tokens, rate, loss, artifact)
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE ops.training_run SET status = 'succeeded', finished_at = now(), val_loss = %s "
                "WHERE training_run_id = %s",
                (val_loss, run_id),
            )
    finally:
        conn.close()


def fail_run(url, run_id, exc: BaseException) -> None:
    try:
        conn = connect(url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "UPDATE ops.training_run SET status = 'failed', finished_at = now(), error = %s "
                    "WHERE training_run_id = %s",
                    (f"{type(exc).__name__}: {exc}"[:2000], run_id),
                )
        finally:
            conn.close()
    except Exception:  # the database may be the problem
        pass
