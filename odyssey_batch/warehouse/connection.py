"""Where the warehouse is and how to connect to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions

from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import embedded


def database_url(settings: Settings) -> str:
    """The libpq URL of the warehouse in use, starting the embedded server when none is configured."""
    if settings.database_url:
        return settings.database_url
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


def redact(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


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
