"""Versioned plain-SQL schema migrations.

Migrations are the files ``sql/NNNN_name.sql`` (shipped inside the package as ``odyssey_batch/sql``), applied in
order, each in its own transaction, and recorded in ``ops.schema_migration`` with a checksum. Applying them
again is a no-op; an applied file whose content changed is an error (write a new migration instead).

Only the warehouse's owner applies migrations (``odyssey-batch db upgrade``; the embedded server and the demo own
their databases and upgrade on start). Every other command runs as whatever login it is given, typically a
member of ``odyssey_pipeline`` without CREATE, and only checks with ``require_current`` that the schema is the
one this code needs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources

import psycopg2.errors
import psycopg2.extensions

from odyssey_batch.warehouse.connection import connect

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works: it only serializes concurrent ``db upgrade`` calls on one database.
_LOCK_KEY = 0x0D7553


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    folder = resources.files("odyssey_batch") / "sql"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {folder}: {versions}")
    return found


_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS ops;
CREATE TABLE IF NOT EXISTS ops.schema_migration (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def _applied(cur: psycopg2.extensions.cursor) -> dict[int, tuple[str, str]]:
    cur.execute("SELECT to_regclass('ops.schema_migration') IS NOT NULL")
    if not cur.fetchone()[0]:
        return {}
    cur.execute("SELECT version, name, checksum FROM ops.schema_migration")
    return {v: (n, c) for v, n, c in cur.fetchall()}


def applied_migrations(url: str) -> dict[int, tuple[str, str]]:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            return _applied(cur)
    finally:
        conn.close()


class SchemaNotCurrent(RuntimeError):
    """The warehouse's schema is not the one this odyssey-batch needs (behind, ahead, or an edited migration)."""


def schema_problem(applied: dict[int, tuple[str, str]], available: list[Migration]) -> str | None:
    """Why a warehouse with ``applied`` migrations cannot be used by code shipping ``available`` (None: it can)."""
    have = max(applied, default=0)
    need = max((m.version for m in available), default=0)
    missing = [m for m in available if m.version not in applied]
    if missing:
        return (
            f"the warehouse schema is at version {have}, this odyssey-batch needs {need}: "
            "run `odyssey-batch db upgrade` as the owner"
        )
    unknown = sorted(set(applied) - {m.version for m in available})
    if unknown:
        return (
            f"the warehouse schema is at version {have}, newer than this odyssey-batch ({need}): "
            "install the odyssey-batch version that upgraded it"
        )
    for m in available:
        if applied[m.version][1] != m.checksum:
            return (
                f"migration {m.version:04d}_{m.name} differs from the one applied to this warehouse: "
                "install the odyssey-batch version that upgraded it"
            )
    return None


def require_current(url: str) -> int:
    """The schema version, after checking that it is exactly what this code needs (reads only: any login in
    ``odyssey_pipeline`` may call it). Raises ``SchemaNotCurrent`` with what to do otherwise."""
    try:
        applied = applied_migrations(url)
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise SchemaNotCurrent(
            "this login may not read the warehouse's schema version (ops.schema_migration): "
            "make it a member of odyssey_pipeline"
        ) from exc
    problem = schema_problem(applied, available_migrations())
    if problem:
        raise SchemaNotCurrent(problem)
    return max(applied)


def prepare(url: str, *, owner: bool) -> None:
    """Make the warehouse usable by this code: apply the missing migrations where we own the database (the
    embedded server), else only check that the schema is current."""
    if owner:
        upgrade(url)
    else:
        require_current(url)


def upgrade(url: str) -> list[Migration]:
    """Apply every migration not yet applied; return the ones applied now. A current warehouse is only read
    (so that any login may run it then); otherwise the login needs to own the warehouse."""
    if schema_problem(applied_migrations(url), available_migrations()) is None:
        return []
    done: list[Migration] = []
    conn = connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
            try:
                cur.execute(_BOOKKEEPING)
                applied = _applied(cur)
                for migration in available_migrations():
                    previous = applied.get(migration.version)
                    if previous is not None:
                        if previous[1] != migration.checksum:
                            raise RuntimeError(
                                f"migration {migration.version:04d}_{migration.name} was changed after it was "
                                "applied to this database; add a new migration instead of editing an old one"
                            )
                        continue
                    cur.execute("BEGIN")
                    try:
                        cur.execute(migration.sql)
                        cur.execute(
                            "INSERT INTO ops.schema_migration (version, name, checksum) VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                        cur.execute("COMMIT")
                    except Exception:
                        cur.execute("ROLLBACK")
                        raise
                    done.append(migration)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    finally:
        conn.close()
    return done
