"""A private PgBouncer in transaction mode for the tests of this area (session scope).

``pgbouncer``: started with ``scripts/ensure-pgbouncer`` in this run's temporary
folder, on a free port, in front of the run's PostgreSQL server, and stopped at
the end. PgBouncer not installed: the tests are skipped, except under ``CI=true``
(``.ci/run`` installs it first), where they fail.

``pooled_database``: a migrated database of its own for this area (not a schema
of the run's database: its URL needs no ``options``, so the engines here are
exactly what a deployment has), reached through PgBouncer. Dropped at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.db import create_db_engine
from conftest import PostgresDatabases, in_ci
from tests.schema import build_schema

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-pgbouncer"
POSTGRESQL_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgresql, id="postgresql")]
)
"""PgBouncer is a PostgreSQL pooler: these tests have no SQLite case."""


@dataclass(frozen=True)
class PgBouncer:
    url: URL
    """``postgresql+psycopg://postgres@127.0.0.1:<port>/`` (no database)."""
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pgbouncer(postgresql_databases: PostgresDatabases) -> Iterator[PgBouncer]:
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        _unavailable("PgBouncer is not installed (scripts/ensure-pgbouncer --install)")
    server = postgresql_databases.run_url
    # Not under pytest's temporary folder: run as root, PgBouncer runs as postgres,
    # which must reach its folder (pytest's are private to their owner).
    folder = Path(tempfile.mkdtemp(prefix="runlayer-pgbouncer-"))
    command = [str(SCRIPT), "--dir", str(folder), "--port", str(_free_port())]
    command += ["--server", f"{server.host or '127.0.0.1'}:{server.port or 5432}"]
    started = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if started.returncode != 0:
        _unavailable(f"PgBouncer did not start: {started.stderr.strip()[-500:]}")
    url = make_url(started.stdout.strip().splitlines()[-1]).set(drivername="postgresql+psycopg")
    try:
        yield PgBouncer(url.set(username=server.username), folder / "pgbouncer.log")
    finally:
        subprocess.run([str(SCRIPT), "--dir", str(folder), "--stop"], timeout=30, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class PooledDatabase:
    pooled: URL
    """The database through PgBouncer."""
    direct: URL
    """The same database, straight to PostgreSQL."""


@pytest.fixture(scope="session")
def pooled_database(
    pgbouncer: PgBouncer, postgresql_databases: PostgresDatabases
) -> Iterator[PooledDatabase]:
    name = f"runlayer_pgbouncer_{uuid.uuid4().hex[:8]}"
    admin = postgresql_databases.admin
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    direct = postgresql_databases.run_url.set(database=name)
    try:
        engine = create_db_engine(direct, pooled=False, poolclass=NullPool)
        try:
            build_schema(engine)
        finally:
            engine.dispose()
        yield PooledDatabase(pgbouncer.url.set(database=name), direct)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pooled_engine(pooled_database: PooledDatabase) -> Iterator[Engine]:
    """An engine through PgBouncer as ``DATABASE_POOLER=transaction`` makes one."""
    engine = create_db_engine(
        pooled_database.pooled, pooled=True, direct_url=pooled_database.direct
    )
    try:
        yield engine
    finally:
        engine.dispose()
