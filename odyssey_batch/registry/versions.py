"""``ops.model_version`` and ``ops.model_evaluation``: registered models, their artifacts and their numbers.

A model is registered as a ``candidate``; ``promotion`` decides which version is the ``champion`` that scoring
uses. Registering inserts the row and publishes the artifacts in one transaction, so a failed upload leaves no
row behind (at worst an orphaned folder under ``models/v<N>/`` whose number is never used again). Adding files
later (``add_files``) switches the row's checksum to a new content-addressed manifest in one commit (see
``artifacts``).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psycopg2.extensions
from psycopg2.extras import Json

from odyssey_batch.registry import artifacts
from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import connect, transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    """One row of ``ops.model_version``."""

    model_version: int
    created_at: dt.datetime
    parent_version: int | None
    dataset_version: int
    training_run_id: int | None
    preset: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    status: str
    status_reason: str | None
    status_changed_at: dt.datetime
    artifact_uri: str
    checksum: str


COLUMNS = ", ".join(f.name for f in fields(ModelVersion))
EVALUATION_COLUMNS = (
    "model_version", "task", "split", "method", "metric", "value", "ci_low", "ci_high", "std", "seeds",
    "n_positive", "n_negative", "evaluated_at",
)  # fmt: skip
_EVALUATION_KEY = ("task", "split", "method", "metric")
_EVALUATION_VALUES = ("value", "ci_low", "ci_high", "std", "seeds", "n_positive", "n_negative")


def _query(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


def fetch_version(cur: psycopg2.extensions.cursor, version: int, *, lock: bool = False) -> ModelVersion:
    """A model version read with an open cursor (``lock``: ``FOR UPDATE``); LookupError when there is none."""
    cur.execute(
        f"SELECT {COLUMNS} FROM ops.model_version WHERE model_version = %s{' FOR UPDATE' if lock else ''}",
        (version,),
    )
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no model version {version} in the registry")
    return ModelVersion(*row)


def fetch_champion(cur: psycopg2.extensions.cursor, *, lock: bool = False) -> ModelVersion | None:
    """The champion read with an open cursor (``lock``: ``FOR UPDATE``), or None."""
    cur.execute(f"SELECT {COLUMNS} FROM ops.model_version WHERE status = 'champion'{' FOR UPDATE' if lock else ''}")
    row = cur.fetchone()
    return None if row is None else ModelVersion(*row)


def register(
    url: str,
    settings: Settings,
    *,
    dataset_version: int,
    training_run_id: int | None,
    preset: str,
    config: dict[str, Any],
    files: dict[str, Path],
    parent_version: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Register a candidate model: insert its row, publish ``files`` under ``models/v<N>/``, record the checksum.

    All in one transaction: if publishing fails, the row is rolled back and the error propagates.
    """
    if not files:
        raise ValueError("a model version needs at least one file")
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO ops.model_version (parent_version, dataset_version, training_run_id, preset, config,
                                              metrics, artifact_uri, checksum)
               VALUES (%s, %s, %s, %s, %s, %s, '', '') RETURNING model_version""",
            (parent_version, dataset_version, training_run_id, preset, Json(config), Json(metrics or {})),
        )
        version = cur.fetchone()[0]
        artifact_uri, checksum = artifacts.publish(settings, version, files)
        cur.execute(
            "UPDATE ops.model_version SET artifact_uri = %s, checksum = %s WHERE model_version = %s",
            (artifact_uri, checksum, version),
        )
        return fetch_version(cur, version)


def add_files(
    url: str,
    settings: Settings,
    version: int,
    files: dict[str, Path],
    *,
    metrics: Callable[[dict[str, str]], dict[str, Any]] | None = None,
) -> ModelVersion:
    """Add files to a registered model's artifacts (replacing same-named ones) and record the new checksum.

    The new files and manifest go under names the committed manifest does not use, and the row's checksum
    switches to the new manifest in one commit, so a failure or a kill at any step leaves the version loading
    exactly as before. ``metrics``, given where each added file is stored (name → path or URI), returns metrics
    to merge into the row in the same commit (an evaluation's numbers and its report's link). After the commit,
    what the new manifest no longer names is swept (``_sweep``).
    """
    with transaction(url) as conn, conn.cursor() as cur:
        current = fetch_version(cur, version, lock=True)  # one writer of the version's artifacts at a time
        checksum = artifacts.add(settings, version, files, expected_manifest_checksum=current.checksum)
        merged = {}
        if metrics is not None:
            merged = metrics(artifacts.where(settings, version, sorted(files), expected_manifest_checksum=checksum))
        cur.execute(
            "UPDATE ops.model_version SET checksum = %s, metrics = metrics || %s::jsonb WHERE model_version = %s",
            (checksum, Json(merged), version),
        )
        updated = fetch_version(cur, version)
    _sweep(url, settings, version)
    return updated


def _sweep(url: str, settings: Settings, version: int) -> None:
    """Remove the objects of ``models/v<N>/`` that the committed manifest does not name, under the row's lock
    (so no add is writing meanwhile). A failure here is logged, not raised: the add is committed, and the next
    add sweeps again."""
    try:
        with transaction(url) as conn, conn.cursor() as cur:
            committed = fetch_version(cur, version, lock=True)
            removed = artifacts.sweep(settings, version, committed.checksum)
        if removed:
            log.info("model v%s: removed %d stored object(s) its manifest no longer names", version, len(removed))
    except Exception as exc:  # the add itself is committed: leftovers are unreferenced and swept next time
        log.warning("model v%s: could not sweep unreferenced objects (%s: %s)", version, type(exc).__name__, exc)


def get(url: str, version: int) -> ModelVersion:
    """One model version; LookupError when it is not registered."""
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            return fetch_version(cur, version)
    finally:
        conn.close()


def registered_from(url: str, training_run_id: int) -> ModelVersion | None:
    """The version registered from a training run (the first one), or None."""
    rows = _query(url, f"SELECT {COLUMNS} FROM ops.model_version WHERE training_run_id = %s ORDER BY 1 LIMIT 1",
                  (training_run_id,))  # fmt: skip
    return ModelVersion(*rows[0]) if rows else None


def list_versions(url: str) -> list[ModelVersion]:
    """Every registered model version, newest first."""
    return [ModelVersion(*row) for row in _query(url, f"SELECT {COLUMNS} FROM ops.model_version ORDER BY 1 DESC")]


def champion(url: str) -> ModelVersion | None:
    """The model version scoring uses, or None before the first promotion."""
    rows = _query(url, f"SELECT {COLUMNS} FROM ops.model_version WHERE status = 'champion'")
    return ModelVersion(*rows[0]) if rows else None


def update_metrics(url: str, version: int, metrics: dict[str, Any]) -> ModelVersion:
    """Merge ``metrics`` into the version's metrics (top-level keys are replaced)."""
    with transaction(url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE ops.model_version SET metrics = metrics || %s::jsonb WHERE model_version = %s",
            (Json(metrics), version),
        )
        return fetch_version(cur, version)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def record_evaluation(url: str, version: int, rows: list[dict[str, Any]], *, replace: bool = False) -> int:
    """Upsert ``ops.model_evaluation`` rows of one version in one transaction; return how many were written.

    Each row has the keys ``task``, ``split``, ``method``, ``metric`` and optionally ``value``, ``ci_low``,
    ``ci_high``, ``std``, ``seeds``, ``n_positive``, ``n_negative`` (NaN is stored as NULL). With ``replace``,
    the version's existing rows of every (split, method) present in ``rows`` are deleted first, so tasks that
    are no longer evaluated do not linger.
    """
    allowed = set(_EVALUATION_KEY) | set(_EVALUATION_VALUES) | {"model_version"}
    for row in rows:
        unknown = set(row) - allowed
        if unknown:
            raise ValueError(f"unknown evaluation column(s) {', '.join(sorted(unknown))}; known: {sorted(allowed)}")
        missing = [key for key in _EVALUATION_KEY if row.get(key) is None]
        if missing:
            raise ValueError(f"evaluation row {row} lacks {', '.join(missing)}")
        if row.get("model_version", version) != version:
            raise ValueError(f"evaluation row {row} belongs to another model version than v{version}")
    columns = ("model_version", *_EVALUATION_KEY, *_EVALUATION_VALUES)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _EVALUATION_VALUES)
    statement = (
        f"INSERT INTO ops.model_evaluation ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT (model_version, {', '.join(_EVALUATION_KEY)}) DO UPDATE SET {updates}, evaluated_at = now()"
    )
    with transaction(url) as conn, conn.cursor() as cur:
        fetch_version(cur, version)  # a clear error for an unknown version
        if replace:
            for split, method in sorted({(row["split"], row["method"]) for row in rows}):
                cur.execute(
                    "DELETE FROM ops.model_evaluation WHERE model_version = %s AND split = %s AND method = %s",
                    (version, split, method),
                )
        for row in rows:
            cur.execute(
                statement,
                (
                    version,
                    *(row[key] for key in _EVALUATION_KEY),
                    _number(row.get("value")),
                    _number(row.get("ci_low")),
                    _number(row.get("ci_high")),
                    _number(row.get("std")),
                    int(row.get("seeds") or 1),
                    row.get("n_positive"),
                    row.get("n_negative"),
                ),
            )
    return len(rows)


def evaluations(url: str, version: int, split: str | None = "test") -> list[dict[str, Any]]:
    """The evaluation rows of a version (all splits when ``split`` is None), by task, method and metric."""
    rows = _query(
        url,
        f"SELECT {', '.join(EVALUATION_COLUMNS)} FROM ops.model_evaluation "
        "WHERE model_version = %s AND (%s::text IS NULL OR split = %s) ORDER BY task, split, method, metric",
        (version, split, split),
    )
    return [dict(zip(EVALUATION_COLUMNS, row, strict=True)) for row in rows]
