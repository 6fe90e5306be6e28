"""Heartbeats of working runs, and the sweep that marks the runs whose process died ``abandoned``.

Every kind of run — ingest (``ops.ingest_run``), dataset (``ops.dataset_version``), training
(``ops.training_run``), scoring (``risk.scoring_run`` and its ``risk.scoring_partition`` rows) — has a
``heartbeat_at`` column. While a process works on a run, ``heartbeat(...)`` keeps it fresh from a small
background thread with its own connection (so a long training epoch, a long merge transaction or a slow model
load cannot starve it, and the work's own transactions are untouched). A run that is still unfinished
(``running``, or ``building`` for a dataset) with a heartbeat older than ``ODYSSEY_STALE_RUN_MINUTES`` has lost
its process (killed, out of memory, machine gone): ``sweep`` marks it ``abandoned`` with the reason in ``error``.
Each kind's next command or DAG run sweeps its own kind before it starts (``begin_run`` of ingest, ``tokenize``,
training's ``start_run``, scoring's ``start_run``); ``abandon`` is the one other way a run becomes abandoned (an
ingest superseded by a new run of the same export, a scoring run superseded by a retried start).

The heartbeat only ever touches a run in its working status, so it can never revive a finished or swept run;
the work's own final write checks the status under a row lock, so a swept run is never published.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg2.extensions

from odyssey_batch.settings import Settings
from odyssey_batch.warehouse.connection import connect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunKind:
    """Where runs of a kind live: the table, the columns of its key, and the status of unfinished work."""

    table: str
    key: tuple[str, ...]
    working: str = "running"

    def match(self) -> str:
        return " AND ".join(f"{column} = %s" for column in self.key)


KINDS: dict[str, RunKind] = {
    "ingest": RunKind("ops.ingest_run", ("run_id",)),
    "dataset": RunKind("ops.dataset_version", ("dataset_version_id",), "building"),
    "training": RunKind("ops.training_run", ("training_run_id",)),
    "scoring": RunKind("risk.scoring_run", ("run_id",)),
    "scoring_partition": RunKind("risk.scoring_partition", ("run_id", "partition")),
}

Key = tuple[Any, ...]


def _key(value: Any) -> Key:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def beat(cur: psycopg2.extensions.cursor, kind: str, key: Any) -> bool:
    """Refresh one run's heartbeat; False when the run is no longer working (finished, failed or swept)."""
    spec = KINDS[kind]
    cur.execute(
        f"UPDATE {spec.table} SET heartbeat_at = now() WHERE {spec.match()} AND status = %s",
        (*_key(key), spec.working),
    )
    return cur.rowcount == 1


def interval_seconds(settings: Settings) -> float:
    """How often a working run beats: the setting, but at least three beats within the stale timeout."""
    return max(0.05, min(settings.heartbeat_seconds, settings.stale_run_minutes * 60.0 / 3.0))


class Heartbeat:
    """A context manager that keeps the heartbeat of ``targets`` ((kind, key) pairs) fresh from a thread."""

    def __init__(self, url: str, targets: Sequence[tuple[str, Any]], interval: float) -> None:
        self.url = url
        self.targets = [(kind, _key(key)) for kind, key in targets]
        self.interval = interval
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odyssey-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        conn = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    if conn is None or conn.closed:
                        conn = connect(self.url, application_name="odyssey-batch heartbeat")
                        conn.autocommit = True
                    with conn.cursor() as cur:
                        for kind, key in self.targets:
                            beat(cur, kind, key)
                    self.beats += 1
                except Exception as exc:  # the database may be briefly away: try again at the next beat
                    log.warning("heartbeat failed (%s); retrying in %.0f s", type(exc).__name__, self.interval)
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()


def heartbeat(url: str, settings: Settings, *targets: tuple[str, Any]) -> Heartbeat:
    """``with heartbeat(url, settings, ("scoring", run_id)): ...`` keeps those runs alive while the block works."""
    return Heartbeat(url, targets, interval_seconds(settings))


def _locked(spec: RunKind, condition: str) -> str:
    """The unfinished runs matching ``condition``, locked; a run whose row another transaction holds (a commit in
    progress: its process is alive) is skipped rather than waited for."""
    key = ", ".join(spec.key)
    return (f"({key}) IN (SELECT {key} FROM {spec.table} WHERE status = %s AND ({condition}) "
            "FOR UPDATE SKIP LOCKED)")  # fmt: skip


def abandon(
    cur: psycopg2.extensions.cursor, kind: str, condition: str, params: Sequence[Any], reason: str
) -> list[Key]:
    """Mark the unfinished runs of ``kind`` matching ``condition`` (SQL over the table's columns) abandoned with
    ``reason``; returns their keys."""
    spec = KINDS[kind]
    cur.execute(
        f"""UPDATE {spec.table} SET status = 'abandoned', finished_at = now(), error = %s
            WHERE {_locked(spec, condition)} RETURNING {", ".join(spec.key)}""",
        (reason, spec.working, *params),
    )
    return sorted(tuple(row) for row in cur.fetchall())


def sweep(cur: psycopg2.extensions.cursor, kind: str, stale_minutes: float) -> list[Key]:
    """Mark the unfinished runs of ``kind`` whose heartbeat is older than ``stale_minutes`` abandoned, each with
    the time of its last heartbeat in the reason; returns their keys. Run inside the caller's transaction."""
    spec = KINDS[kind]
    cur.execute(
        f"""UPDATE {spec.table} SET status = 'abandoned', finished_at = now(),
                   error = format('abandoned: no heartbeat since %%s (more than %%s minutes): the process working '
                                  'on it died or was killed', to_char(heartbeat_at AT TIME ZONE 'UTC',
                                  'YYYY-MM-DD"T"HH24:MI:SS"Z"'), %s::text)
            WHERE {_locked(spec, "heartbeat_at < now() - make_interval(secs => %s)")}
            RETURNING {", ".join(spec.key)}""",
        (f"{stale_minutes:g}", spec.working, stale_minutes * 60.0),
    )
    swept = sorted(tuple(row) for row in cur.fetchall())
    if swept:
        log.warning("swept %s %s run(s) with no heartbeat for %g minutes to abandoned", len(swept), kind,
                    stale_minutes)  # fmt: skip
    return swept
