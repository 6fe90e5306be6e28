"""Where the warehouse is and how to connect to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from odyssey_batch.redaction import redact  # also re-exported by odyssey_batch.warehouse
from odyssey_batch.settings import Settings


def database_url(settings: Settings) -> str:
    """The libpq URL of the warehouse in use, starting the embedded server when none is configured."""
    if settings.database_url:
        return settings.database_url
    from odyssey_batch.warehouse import embedded  # imports this module: keep the import here

    return embedded.start(settings)


def sqlalchemy_url(url: str) -> str:
    """The same URL with an explicit psycopg2 driver, as SQLAlchemy and Great Expectations want it."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {redact(url)}")


def libpq_url(url: str) -> str:
    """The URL without a SQLAlchemy driver suffix, as psycopg2 and psql want it."""
    if url.startswith("postgresql+"):
        return "postgresql://" + url.split("://", 1)[1]
    return url


def connect(url: str, *, application_name: str = "odyssey-batch") -> psycopg2.extensions.connection:
    return psycopg2.connect(libpq_url(url), application_name=application_name)


@contextmanager
def transaction(url: str) -> Iterator[psycopg2.extensions.connection]:
    """A connection whose work commits on success and rolls back on any error."""
    conn = connect(url)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def with_database(url: str, database: str) -> str:
    """The same server URL, naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _autocommit(url: str, statement: sql.Composable | str, params: tuple = ()) -> list[tuple]:
    conn = connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def create_database(admin_url: str, name: str, *, template: str | None = None, exist_ok: bool = False) -> None:
    """Create a database on the server of ``admin_url`` (optionally as a copy of ``template``)."""
    if exist_ok and _autocommit(admin_url, "SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        return
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    _autocommit(admin_url, statement)


def drop_database(admin_url: str, name: str) -> None:
    """Drop a database, disconnecting its sessions."""
    _autocommit(admin_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
