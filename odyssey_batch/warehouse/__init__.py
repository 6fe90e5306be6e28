"""The Postgres warehouse: connection, embedded server, schema migrations."""

from odyssey_batch.warehouse.connection import (
    connect,
    database_url,
    libpq_url,
    redact,
    sqlalchemy_url,
    transaction,
)
from odyssey_batch.warehouse.migrations import applied_migrations, upgrade

__all__ = [
    "applied_migrations",
    "connect",
    "database_url",
    "libpq_url",
    "redact",
    "sqlalchemy_url",
    "transaction",
    "upgrade",
]
