"""The Postgres warehouse: connection, embedded server, schema migrations."""

from odyssey_batch.warehouse.connection import (
    connect,
    create_database,
    database_url,
    drop_database,
    libpq_url,
    redact,
    sqlalchemy_url,
    transaction,
    with_database,
)
from odyssey_batch.warehouse.migrations import (
    SchemaNotCurrent,
    applied_migrations,
    prepare,
    require_current,
    upgrade,
)

__all__ = [
    "SchemaNotCurrent",
    "applied_migrations",
    "connect",
    "create_database",
    "database_url",
    "drop_database",
    "libpq_url",
    "prepare",
    "redact",
    "require_current",
    "sqlalchemy_url",
    "transaction",
    "upgrade",
    "with_database",
]
