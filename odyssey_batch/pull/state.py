"""A pull's row in ``ops.bulk_pull``: what lets a killed pull resume instead of starting another export.

The status URL is stored the moment the server accepts the kick-off, the manifest when the export completes, and
each file once it is stored in the landing location. One pull per server at a time: a session-level advisory
lock on the server URL, held by the pulling process's own connection (a killed process loses it with its
connection, so the next pull can take over and resume).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import psycopg2.extensions

UNFINISHED = ("kicking-off", "exporting", "downloading")
_COLUMNS = ("pull_id", "server", "scope", "filters", "request", "since", "status", "status_url", "progress",
            "manifest", "transaction_time", "destination", "files_done")  # fmt: skip


class PullBusy(RuntimeError):
    """Another process is pulling from the same server."""


def lock_key(server: str) -> int:
    return int.from_bytes(hashlib.sha256(b"odyssey-pull:" + server.encode()).digest()[:8], "big", signed=True)


def take_server_lock(conn: psycopg2.extensions.connection, server: str) -> None:
    """Hold the server's lock for as long as ``conn`` lives; ``PullBusy`` when another process holds it."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(server),))
        taken = cur.fetchone()[0]
    conn.commit()
    if not taken:
        raise PullBusy(f"another odyssey-batch pull from {server} is running (one export at a time per server)")


def _row(cur: psycopg2.extensions.cursor) -> dict[str, Any] | None:
    row = cur.fetchone()
    return dict(zip(_COLUMNS, row, strict=True)) if row else None


def unfinished(conn: psycopg2.extensions.connection, server: str, scope: str) -> dict[str, Any] | None:
    """The latest pull of this server and scope that neither completed nor failed (killed: to resume)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            f"""SELECT {", ".join(_COLUMNS)} FROM ops.bulk_pull
                WHERE server = %s AND scope = %s AND status = ANY(%s) ORDER BY pull_id DESC LIMIT 1""",
            (server, scope, list(UNFINISHED)),
        )
        return _row(cur)


def last_transaction_time(conn: psycopg2.extensions.connection, server: str, scope: str, filters: str) -> str | None:
    """``transactionTime`` of the latest complete pull of this server, scope and filters (``--since auto``)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT to_char(transaction_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
               FROM ops.bulk_pull
               WHERE server = %s AND scope = %s AND filters = %s AND status = 'complete'
                 AND transaction_time IS NOT NULL
               ORDER BY transaction_time DESC LIMIT 1""",
            (server, scope, filters),
        )
        row = cur.fetchone()
        return row[0] if row else None


def create(conn: psycopg2.extensions.connection, server: str, scope: str, filters: str, request: dict[str, Any],
           since: str | None) -> int:  # fmt: skip
    with conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO ops.bulk_pull (server, scope, filters, request, since)
               VALUES (%s, %s, %s, %s::jsonb, %s) RETURNING pull_id""",
            (server, scope, filters, orjson.dumps(request).decode(), since),
        )
        return cur.fetchone()[0]


def update(conn: psycopg2.extensions.connection, pull_id: int, **values: Any) -> None:
    """Set columns of the pull (jsonb values given as Python objects) and beat its heartbeat."""
    sets, params = [], []
    for name, value in values.items():
        if name in ("manifest", "request", "files_done"):
            sets.append(f"{name} = %s::jsonb")
            params.append(orjson.dumps(value).decode())
        else:
            sets.append(f"{name} = %s")
            params.append(value)
    if values.get("status") in ("complete", "failed", "cancelled"):
        sets.append("finished_at = now()")
    with conn, conn.cursor() as cur:
        cur.execute(
            f"UPDATE ops.bulk_pull SET {', '.join(sets)}, heartbeat_at = now() WHERE pull_id = %s",
            (*params, pull_id),
        )


def file_done(conn: psycopg2.extensions.connection, pull_id: int, url: str, stored: str) -> None:
    with conn, conn.cursor() as cur:
        cur.execute(
            """UPDATE ops.bulk_pull SET files_done = files_done || jsonb_build_object(%s::text, %s::text),
                      heartbeat_at = now() WHERE pull_id = %s""",
            (url, stored, pull_id),
        )


def latest(conn: psycopg2.extensions.connection, server: str, scope: str) -> dict[str, Any] | None:
    with conn, conn.cursor() as cur:
        cur.execute(
            f"""SELECT {", ".join(_COLUMNS)} FROM ops.bulk_pull WHERE server = %s AND scope = %s
                ORDER BY pull_id DESC LIMIT 1""",
            (server, scope),
        )
        return _row(cur)
