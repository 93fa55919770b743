"""Database setup: URL resolution, SQLite transactions, the request session."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

import app.db as db
from app.db import create_db_engine, resolve_database_url
from tests.concurrency import run_scripts_together


def test_url_order_argument_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert resolve_database_url().render_as_string() == "sqlite:///./runs.db"
    monkeypatch.setenv("DATABASE_URL", "sqlite:///env.db")
    assert resolve_database_url().database == "env.db"
    assert resolve_database_url("sqlite:///arg.db").database == "arg.db"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_managed_host_urls_use_psycopg(scheme: str) -> None:
    url = resolve_database_url(f"{scheme}://u:p@db.example:5432/app")
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.database, url.password) == ("db.example", "app", "p")


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        resolve_database_url("mysql://u@h/db")


def test_pool_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "7")
    engine = create_db_engine("postgresql://u@127.0.0.1:1/none")
    try:
        assert engine.pool.size() == 3
        assert engine.pool._max_overflow == 7
    finally:
        engine.dispose()
    monkeypatch.setenv("DB_POOL_SIZE", "many")
    with pytest.raises(ValueError, match="DB_POOL_SIZE must be an integer"):
        create_db_engine("postgresql://u@127.0.0.1:1/none")
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    monkeypatch.setenv("DB_POOL_PING_AFTER_IDLE", "soon")
    with pytest.raises(ValueError, match="DB_POOL_PING_AFTER_IDLE must be a number"):
        create_db_engine("postgresql://u@127.0.0.1:1/none")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_pragmas(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_ddl_is_transactional(empty_engine: Engine) -> None:
    with pytest.raises(RuntimeError), empty_engine.begin() as conn:
        conn.execute(text("CREATE TABLE t_ddl (x INTEGER)"))
        raise RuntimeError("roll back")
    with empty_engine.connect() as conn:
        names = {name for name in empty_engine.dialect.get_table_names(conn)}
    assert "t_ddl" not in names


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_transactions_take_the_write_lock_at_begin(engine: Engine) -> None:
    """A second writer waits for the first instead of failing on lock upgrade."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sessions (id, title) VALUES ('s', 't')"))
    first_has_lock = threading.Event()
    order: list[str] = []

    def first() -> None:
        with engine.begin() as conn:
            conn.execute(text("SELECT title FROM sessions")).all()
            first_has_lock.set()
            time.sleep(0.3)
            conn.execute(text("UPDATE sessions SET title = 'first'"))
            order.append("first")

    thread = threading.Thread(target=first)
    thread.start()
    first_has_lock.wait(5)
    with engine.begin() as conn:
        order.append("second-begun")
        conn.execute(text("UPDATE sessions SET title = title || '+second'"))
    thread.join()
    assert order == ["first", "second-begun"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT title FROM sessions")).scalar() == "first+second"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_lock_wait_is_bounded_by_the_busy_timeout(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SQLITE_BUSY_TIMEOUT_MS", "200")
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as holder:
            holder.begin()
            started = time.monotonic()
            with pytest.raises(OperationalError, match="database is locked"), engine.begin():
                pass
            assert 0.19 < time.monotonic() - started < 2  # it waited, and not for ever
            holder.rollback()
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_sqlite_writer_takes_the_lock_when_it_frees_and_keeps_its_busy_timeout(
    engine: Engine,
) -> None:
    """BEGIN IMMEDIATE is retried by the layer (app._dialects.begin_immediate), not by
    SQLite's busy handler: the waiting writer begins once the holder commits, and the
    statements of its transaction keep the connection's busy timeout."""
    engine = create_db_engine(engine.url, pool_size=2)
    try:
        holder = engine.connect()
        holder.begin()
        holder.execute(text("INSERT INTO sessions (id, title) VALUES ('held', 't')"))
        timer = threading.Timer(0.3, holder.commit)
        timer.start()
        with engine.begin() as writer:
            assert writer.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            writer.execute(text("UPDATE sessions SET title = 'second' WHERE id = 'held'"))
        timer.join()
        holder.close()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.execute(text("SELECT title FROM sessions")).scalar() == "second"
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_begin_mode_is_validated(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        conn = engine.connect().execution_options(sqlite_begin="LATER")
        with pytest.raises(ValueError, match="sqlite_begin must be one of"):
            conn.execute(text("SELECT 1"))
        conn.close()
    finally:
        engine.dispose()


def test_unit_of_work_commits_on_success_and_rolls_back_on_error(engine: Engine) -> None:
    with db.unit_of_work(engine) as session:
        session.execute(text("INSERT INTO sessions (id, title) VALUES ('ok', 't')"))
    with pytest.raises(RuntimeError), db.unit_of_work(engine) as session:
        session.execute(text("INSERT INTO sessions (id, title) VALUES ('bad', 't')"))
        raise RuntimeError("handler failed")

    with engine.connect() as conn:
        ids = {row[0] for row in conn.execute(text("SELECT id FROM sessions"))}
    assert ids == {"ok"}


_OPENER = textwrap.dedent(
    """
    import sys
    from sqlalchemy import text
    from app.db import create_db_engine
    engine = create_db_engine(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    print(conn.engine.dialect.name, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"])
def test_processes_opening_a_new_sqlite_file_together_all_get_wal(database_url: str) -> None:
    """App instances starting together on a new embedded database: each first
    connection switches (or finds) WAL mode; none fails with "database is locked".

    A race: before the fix about 4 % of such starts failed, so 48 starts catch it
    with high probability."""
    for _round in range(6):
        for suffix in ("", "-wal", "-shm"):
            Path(make_url_path(database_url) + suffix).unlink(missing_ok=True)
        run_scripts_together(_OPENER, [database_url], count=8, timeout=60)
        engine = create_db_engine(database_url)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.execute(text("SELECT COUNT(*) FROM t")).scalar() == 8
        finally:
            engine.dispose()


def make_url_path(database_url: str) -> str:
    return database_url.removeprefix("sqlite:///")
