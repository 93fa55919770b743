"""Test harness: every database test runs on SQLite and on PostgreSQL.

Fixtures (all function-scoped unless said otherwise):

* ``backend``: ``"sqlite"`` or ``"postgresql"``; tests that use any fixture
  below are parametrized over both and marked with the backend's name.
* ``database_url``: a fresh, empty database for this test. SQLite: a file in
  the test's temporary folder. PostgreSQL: a schema of its own inside a
  database created for this test run (the URL pins ``search_path``), dropped
  at teardown; the database is dropped when the run ends. The URL is a plain
  string, so subprocesses can open it too.
* ``make_database_url``: a factory of such databases, for tests that need two.
* ``empty_engine``: an engine on that empty database (migration tests).
* ``engine``: an engine on a database with the schema built.
* ``session``: a ``sqlmodel.Session`` on ``engine``; the factories in
  ``tests/factories.py`` write through it.

PostgreSQL comes from ``TEST_DATABASE_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). When it cannot be
reached the PostgreSQL tests are skipped with the reason, except under
``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session as DbSession

from app.db import create_db_engine
from tests.schema import build_schema

BACKENDS = ("sqlite", "postgresql")
DEFAULT_TEST_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


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


# --------------------------------------------------------------------------
# PostgreSQL server and per-run database


@pytest.fixture(scope="session")
def postgres_run_url() -> Iterator[str]:
    """URL of a database created for this test run, dropped at its end."""
    admin_url = make_url(os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL))
    if admin_url.drivername in ("postgres", "postgresql"):
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    admin = create_db_engine(
        admin_url,
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
            f"PostgreSQL unreachable at {admin_url.render_as_string(hide_password=True)} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
            "set TEST_DATABASE_URL or start PostgreSQL"
        )
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)

    name = f"runlayer_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------------------
# Per-test databases


@pytest.fixture
def make_database_url(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases for this test (see module docstring).

    For tests that need more than one, e.g. to compare two ways of building a schema.
    """
    schemas: list[str] = []
    sqlite_files: list[Path] = []
    admin: Engine | None = None
    run_url = None
    if backend == "postgresql":
        run_url = make_url(request.getfixturevalue("postgres_run_url"))
        admin = create_db_engine(run_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def make() -> str:
        if admin is None or run_url is None:
            sqlite_files.append(tmp_path / f"runs{len(sqlite_files) or ''}.db")
            return f"sqlite:///{sqlite_files[-1]}"
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        return run_url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )

    try:
        yield make
    finally:
        if admin is not None:
            with admin.connect() as conn:
                for schema in schemas:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()


@pytest.fixture
def database_url(make_database_url: Callable[[], str]) -> str:
    """A fresh, empty database for this test (see module docstring)."""
    return make_database_url()


@pytest.fixture
def empty_engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    build_schema(empty_engine)
    return empty_engine


@pytest.fixture
def session(engine: Engine) -> Iterator[DbSession]:
    from tests.factories import bind_factories

    with DbSession(engine, expire_on_commit=False) as db_session:
        bind_factories(db_session)
        try:
            yield db_session
        finally:
            bind_factories(None)
            db_session.rollback()
