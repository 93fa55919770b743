"""``python -m migrations sql | psql``: the printed script runs as it is and builds what
``python -m migrations upgrade`` builds.

PostgreSQL only (psql and the script are PostgreSQL's; on SQLite ``sql`` prints the
review listing). Each test creates fresh databases with unique names on the test
server and drops them after; the CLI and psql are real processes joined by a pipe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from app.db import create_db_engine
from migrations.psql import bind, literal
from tests.migrations.test_migrations import make_v07_database
from tests.schema import describe_schema

pytestmark = pytest.mark.slow  # a dozen processes and four databases per test

ROOT = Path(__file__).resolve().parents[2]
PSQL = shutil.which("psql")


@pytest.fixture
def fresh_database(postgresql_databases: object) -> Iterator[Callable[[], URL]]:
    """A factory of new, empty PostgreSQL databases with unique names, dropped after."""
    admin: Engine = postgresql_databases.admin  # type: ignore[attr-defined]
    server: URL = postgresql_databases.run_url  # type: ignore[attr-defined]
    made: list[str] = []

    def make() -> URL:
        name = f"runlayer_psql_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return server.set(database=name)

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrations", *args]


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _libpq(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _sql_into_psql(url: URL) -> subprocess.CompletedProcess[str]:
    """``python -m migrations sql --url URL | psql -X -q URL``, a real pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    printer = subprocess.Popen(
        _cli("sql", "--url", _url(url)), cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    assert PSQL is not None
    psql = subprocess.run(
        [PSQL, "-X", "-q", _libpq(url)],
        stdin=printer.stdout,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert printer.stdout is not None
    printer.stdout.close()
    assert printer.wait(timeout=60) == 0
    return psql


def _psql_file(url: URL, script: str) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    return subprocess.run(
        [PSQL, "-X", "-q", _libpq(url)],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _upgrade(url: URL) -> None:
    done = subprocess.run(
        _cli("upgrade", "--url", _url(url)),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _state(url: URL) -> tuple[dict[str, object], list[tuple[object, ...]], dict[str, int]]:
    """The schema, the version rows (version, name, checksum) and every table's row count."""
    engine = create_db_engine(url, poolclass=NullPool)
    try:
        schema = describe_schema(engine)
        with engine.connect() as conn:
            versions = [
                tuple(row)
                for row in conn.execute(
                    text("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
                )
            ]
            counts = {
                table: conn.execute(text(f'SELECT COUNT(*) FROM "{table}"')).scalar_one()  # noqa: S608 table names from the inspector
                for table in schema
                if not table.startswith("(")
            }
        return schema, versions, counts
    finally:
        engine.dispose()


def _status_exit(url: URL) -> int:
    return subprocess.run(
        _cli("status", "--url", _url(url)),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
        check=False,
    ).returncode


needs_psql = pytest.mark.skipif(PSQL is None, reason="psql (PostgreSQL's client) not found")


@needs_psql
@pytest.mark.postgresql  # psql and its script are PostgreSQL's
def test_sql_piped_into_psql_builds_what_upgrade_builds_and_runs_twice(
    fresh_database: Callable[[], URL],
) -> None:
    by_psql, by_upgrade = fresh_database(), fresh_database()
    script = subprocess.run(
        _cli("sql", "--url", _url(by_psql)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert all(line.startswith("--") for line in script.splitlines()[:3]), script[:300]
    assert "only if" not in script.replace("-- only if", "")  # guards are SQL, not words

    piped = _sql_into_psql(by_psql)
    assert piped.returncode == 0, piped.stderr
    _upgrade(by_upgrade)
    assert _state(by_psql) == _state(by_upgrade)
    assert _status_exit(by_psql) == 0  # "up to date": every migration recorded

    again = _psql_file(by_psql, script)  # the same script, a second time
    assert again.returncode == 0, again.stderr
    assert "already applied" in again.stderr
    assert _state(by_psql) == _state(by_upgrade)
    nothing = _sql_into_psql(by_psql)  # printed now: nothing pending
    assert nothing.returncode == 0, nothing.stderr
    assert _state(by_psql) == _state(by_upgrade)


@needs_psql
@pytest.mark.postgresql  # psql and its script are PostgreSQL's
def test_on_a_v07_database_the_script_decides_the_guards_as_upgrade_does(
    fresh_database: Callable[[], URL],
) -> None:
    """A v0.7 database (tables, naive timestamps, json, int ids, rows): the guards that a
    fresh database never takes (conversions, added columns and constraints) decided in
    SQL come to the schema and rows ``upgrade`` makes."""
    by_psql, by_upgrade = fresh_database(), fresh_database()
    for url in (by_psql, by_upgrade):
        engine = create_db_engine(url, poolclass=NullPool)
        try:
            make_v07_database(engine)
        finally:
            engine.dispose()
    piped = _sql_into_psql(by_psql)
    assert piped.returncode == 0, piped.stderr
    _upgrade(by_upgrade)
    assert _state(by_psql) == _state(by_upgrade)
    assert _status_exit(by_psql) == 0
    again = _sql_into_psql(by_psql)
    assert again.returncode == 0, again.stderr


@needs_psql
@pytest.mark.postgresql  # psql and its script are PostgreSQL's
def test_the_review_listing_says_it_is_not_runnable(fresh_database: Callable[[], URL]) -> None:
    url = fresh_database()
    listing = subprocess.run(
        _cli("sql", "--review", "--url", _url(url)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "NOT runnable" in listing.splitlines()[1]
    assert "-- only if" in listing and ":pattern" in listing


def test_values_are_bound_as_literals() -> None:
    assert literal("it's") == "'it''s'"
    assert literal(r"\u0000") == r"'\u0000'"  # standard-conforming strings: as written
    assert literal(None) == "NULL" and literal(True) == "TRUE" and literal(7) == "7"
    assert literal({"a": 1}) == """'{"a": 1}'"""
    statement = "SELECT CAST(:a AS TEXT), x::text ~ :pattern, 'a:b'"
    bound = bind(statement, {"a": "x", "pattern": "p"})
    assert bound == "SELECT CAST('x' AS TEXT), x::text ~ 'p', 'a:b'"  # as text() binds them
