"""Test harness: every database test runs on SQLite and on PostgreSQL.

The schema is migrated once per test run and backend; a test gets a copy of
it (SQLite: the migrated file copied; PostgreSQL: the recorded migration
replayed into a new schema) or a rolled-back transaction on a shared one.
Design and timings: ``docs/testing.md``.

Fixtures (all function-scoped unless said otherwise):

* ``backend``: ``"sqlite"`` or ``"postgresql"``; tests that use any fixture
  below are parametrized over both and marked with the backend's name.
* ``db``: a ``sqlmodel.Session`` on one connection to a migrated database
  shared by the run, inside a transaction that is rolled back at teardown
  (``db.commit()`` releases a savepoint). The cheapest: use it when nothing
  outside that session needs to see the test's writes. Factories bound.
* ``engine``: an engine on a migrated database of this test's own; commits
  are visible to other connections, threads and processes.
* ``session``: a ``sqlmodel.Session`` on ``engine``, factories bound.
* ``database_url``: this test's database as a URL string that subprocesses can
  open: the database of ``engine`` (migrated) when the test uses ``engine``,
  else a fresh, empty one. SQLite: a file in the test's temporary folder.
  PostgreSQL: a schema in this run's database (the URL pins ``search_path``).
* ``make_database_url``: a factory of fresh, empty databases, for tests that need two.
* ``empty_engine``: an engine on ``database_url`` (migration tests).

PostgreSQL comes from ``TEST_DATABASE_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). When it cannot be
reached the PostgreSQL tests are skipped with the reason, except under
``CI=true``, where they fail. With ``TEST_DATABASE_DIRECT_URL`` set as well,
``TEST_DATABASE_URL`` is a transaction pooler in front of that server
(``scripts/ensure-pgbouncer``; ``.ci/run`` runs a part of the suite so): the
run's database and schemas are made directly, tests connect through the pooler
with ``DATABASE_POOLER=transaction``, and each test's ``DATABASE_DIRECT_URL``
is its database without the pooler. Each run creates its own database,
``runlayer_test_<pid>_<random>``, and drops it when the run ends, also after
failures; a test's schemas are dropped after it.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session as DbSession

from app.capture import capture_statements
from app.db import create_db_engine
from tests.factories import bind_factories
from tests.schema import build_schema

pytest_plugins = ("tests.reliability.report",)

BACKENDS = ("sqlite", "postgresql")
DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MIGRATED = pytest.StashKey[bool]()
"""Set on a test whose ``database_url`` is a migrated copy."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and not any(
        marker.name == "parametrize" and "backend" in marker.args[0]
        for marker in metafunc.definition.iter_markers("parametrize")
    ):
        metafunc.parametrize(
            "backend",
            [pytest.param(name, marks=getattr(pytest.mark, name), id=name) for name in BACKENDS],
        )


def migrate(url: str) -> None:
    engine = create_db_engine(url, poolclass=NullPool)
    try:
        build_schema(engine)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------
# Per-run databases of each backend


class SqliteDatabases:
    """This run's SQLite template: a file migrated once, copied per test."""

    def __init__(self, folder: Path) -> None:
        self.template = folder / "template.db"
        migrate(f"sqlite:///{self.template}")
        # The copies must not need a write-ahead log next to them.
        assert not Path(f"{self.template}-wal").exists()
        self.shared = create_db_engine(self.migrated(folder / "shared.db"))

    def migrated(self, path: Path) -> str:
        shutil.copyfile(self.template, path)
        return f"sqlite:///{path}"

    def close(self) -> None:
        self.shared.dispose()


class PostgresDatabases:
    """This run's PostgreSQL database and its schemas: one schema per test database.

    The database ``runlayer_test_<pid>_<random>`` is created for the run and
    dropped by ``close``. The migrations run once, into a template schema,
    recorded with ``app.capture``; a migrated schema is that recording replayed
    in one transaction: every statement except the SELECTs (catalog reads, the
    migration lock), with the same parameters. ``tests/migrations/test_schema_drift.py``
    checks that a replayed schema equals a migrated one. Schemas, unlike
    databases (``DROP DATABASE`` forces a checkpoint), come and go cheaply.

    One background thread builds migrated schemas ahead (two ready) and drops
    the schemas tests are done with, so a test waits for neither. A schema whose
    drop fails goes with the run's database.
    """

    def __init__(self, admin: Engine, server_url: URL, pooler_url: URL | None = None) -> None:
        self.admin = admin
        self.run = f"runlayer_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.run_url = server_url.set(database=self.run)
        self.pooler_url = None if pooler_url is None else pooler_url.set(database=self.run)
        """Where tests connect when they go through a pooler (module docstring)."""
        self._created = False
        self._builder: Engine | None = None
        self._migration: list[tuple[str, Any]] = []
        self.shared: Engine | None = None
        self._ready: queue.Queue[str | Exception] = queue.Queue()
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-schemas")

    def create_run_database(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.run}"'))
        self._created = True
        self._builder = create_db_engine(self.run_url, pooled=False)
        template = self.create_schema()
        recorder = create_db_engine(
            self.schema_url(template, direct=True), pooled=False, poolclass=NullPool
        )
        try:
            with capture_statements(recorder) as recording:
                build_schema(recorder)
        finally:
            recorder.dispose()
        # An online step (CREATE INDEX CONCURRENTLY) cannot run in the replay's one
        # transaction; on a new, empty schema the plain CREATE INDEX builds the same index.
        self._migration = [
            (statement.sql.replace("INDEX CONCURRENTLY", "INDEX"), statement.parameters)
            for statement in recording.statements
            if not statement.sql.lstrip().upper().startswith("SELECT")
        ]
        assert not any(template in f"{sql}{parameters}" for sql, parameters in self._migration)
        self.shared = create_db_engine(self.schema_url(self.create_schema(migrated=True)))
        for _ in range(2):
            self._background.submit(self._build_ahead)

    def schema_url(self, schema: str, *, direct: bool = False) -> str:
        """A URL on ``schema``: through the pooler if there is one, unless ``direct``."""
        base = self.run_url if direct or self.pooler_url is None else self.pooler_url
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def set_direct_url(self, request: pytest.FixtureRequest, url: str) -> None:
        """Through a pooler: ``DATABASE_DIRECT_URL`` is ``url``'s database, directly."""
        if self.pooler_url is not None:
            schema = make_url(url).query["options"].removeprefix("-csearch_path=")
            monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
            monkeypatch.setenv("DATABASE_DIRECT_URL", self.schema_url(str(schema), direct=True))

    def create_schema(self, *, migrated: bool = False) -> str:
        """A new schema, empty or with the migrated schema's tables and version rows."""
        assert self._builder is not None
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with self._builder.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            if migrated:
                conn.execute(text(f'SET LOCAL search_path TO "{schema}"'))
                for sql, parameters in self._migration:
                    conn.exec_driver_sql(sql, parameters)
        return schema

    def _build_ahead(self) -> None:
        try:
            self._ready.put(self.create_schema(migrated=True))
        except Exception as exc:  # handed to the test that takes this schema
            self._ready.put(exc)

    def take_migrated_schema(self) -> str:
        """A migrated schema built in the background; the next one starts now."""
        self._background.submit(self._build_ahead)
        built = self._ready.get(timeout=300)
        if isinstance(built, Exception):
            raise built
        return built

    def drop_later(self, schemas: list[str]) -> None:
        self._background.submit(self._drop_schemas, schemas)

    def _drop_schemas(self, schemas: list[str]) -> None:
        assert self._builder is not None
        with self._builder.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '30s'"))
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)
        for engine in (self.shared, self._builder):
            if engine is not None:
                engine.dispose()
        if self._created:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.run}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqliteDatabases]:
    databases = SqliteDatabases(tmp_path_factory.mktemp("sqlite-template"))
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture(scope="session")
def postgresql_databases() -> Iterator[PostgresDatabases]:
    """This run's PostgreSQL databases; skips (fails under CI=true) when unreachable."""
    server_url = make_url(os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL))
    if server_url.drivername in ("postgres", "postgresql"):
        server_url = server_url.set(drivername="postgresql+psycopg")
    pooler_url: URL | None = None
    if os.environ.get("TEST_DATABASE_DIRECT_URL"):  # TEST_DATABASE_URL is a pooler
        pooler_url = server_url
        server_url = make_url(os.environ["TEST_DATABASE_DIRECT_URL"])
        if server_url.drivername in ("postgres", "postgresql"):
            server_url = server_url.set(drivername="postgresql+psycopg")
    admin = create_db_engine(
        server_url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect means "unreachable"
        admin.dispose()
        reason = (
            f"PostgreSQL unreachable at {server_url.render_as_string(hide_password=True)} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
            "set TEST_DATABASE_URL or start PostgreSQL"
        )
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)

    databases = PostgresDatabases(admin, server_url, pooler_url)
    pooler_setting = os.environ.get("DATABASE_POOLER")
    if pooler_url is not None:  # for this process and the ones tests start
        os.environ["DATABASE_POOLER"] = "transaction"
    try:
        databases.create_run_database()
        yield databases
    finally:
        databases.close()
        admin.dispose()
        if pooler_url is not None:
            if pooler_setting is None:
                os.environ.pop("DATABASE_POOLER", None)
            else:
                os.environ["DATABASE_POOLER"] = pooler_setting


# --------------------------------------------------------------------------
# Per-test databases


@pytest.fixture
def make_database_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases for this test (see module docstring).

    For tests that need more than one, e.g. to compare two ways of building a schema.
    """
    if backend == "sqlite":
        files = (tmp_path / f"runs{n or ''}.db" for n in itertools.count())
        yield lambda: f"sqlite:///{next(files)}"
        return
    databases: PostgresDatabases = request.getfixturevalue("postgresql_databases")
    schemas: list[str] = []

    def make() -> str:
        schemas.append(databases.create_schema())
        url = databases.schema_url(schemas[-1])
        databases.set_direct_url(request, url)
        return url

    try:
        yield make
    finally:
        databases.drop_later(schemas)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """This test's database (see module docstring): migrated if the test uses ``engine``."""
    if "engine" not in request.fixturenames:
        yield request.getfixturevalue("make_database_url")()
        return
    request.node.stash[MIGRATED] = True
    if backend == "sqlite":
        yield request.getfixturevalue("sqlite_databases").migrated(tmp_path / "migrated.db")
    else:
        databases: PostgresDatabases = request.getfixturevalue("postgresql_databases")
        schema = databases.take_migrated_schema()
        databases.set_direct_url(request, databases.schema_url(schema))
        try:
            yield databases.schema_url(schema)
        finally:
            databases.drop_later([schema])


@pytest.fixture
def empty_engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def engine(empty_engine: Engine, request: pytest.FixtureRequest) -> Engine:
    """An engine on this test's own migrated database (``database_url`` made it so).

    Asked for with ``request.getfixturevalue`` after ``database_url`` made an
    empty database, it migrates that one, as it did before the template existed.
    """
    if not request.node.stash.get(MIGRATED, False):
        build_schema(empty_engine)
    return empty_engine


@pytest.fixture
def session(engine: Engine) -> Iterator[DbSession]:
    with DbSession(engine, expire_on_commit=False) as db_session:
        bind_factories(db_session)
        try:
            yield db_session
        finally:
            bind_factories(None)
            db_session.rollback()


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest) -> Iterator[DbSession]:
    """A session whose every write is rolled back at teardown (see module docstring)."""
    databases: SqliteDatabases | PostgresDatabases = request.getfixturevalue(f"{backend}_databases")
    with databases.shared.connect() as conn:
        outer = conn.begin()
        try:
            with DbSession(
                bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
            ) as db_session:
                bind_factories(db_session)
                try:
                    yield db_session
                finally:
                    bind_factories(None)
        finally:
            outer.rollback()
