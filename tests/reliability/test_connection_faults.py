"""Faults below the repositories: a PostgreSQL connection killed mid-transaction,
and a SQLite write lock held by another process past the busy timeout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session as DbSession

from app.db import create_db_engine
from tests.reliability.figures import record


def _count_sessions(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM sessions")).scalar_one()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_connection_terminated_mid_transaction(engine: Engine, backend: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sessions (id, title) VALUES ('kept', 'committed')"))

    with DbSession(engine) as db:
        db.execute(text("INSERT INTO sessions (id, title) VALUES ('lost', 'uncommitted')"))
        victim_pid = db.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as killer:
            assert killer.execute(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": victim_pid}
            ).scalar_one()
        with pytest.raises(DBAPIError) as caught:
            db.execute(text("INSERT INTO sessions (id, title) VALUES ('late', 'x')"))
            db.commit()
        assert caught.value.connection_invalidated
        db.rollback()

    # Nothing of the killed transaction is visible, the committed row is.
    with engine.connect() as conn:
        ids = sorted(row[0] for row in conn.execute(text("SELECT id FROM sessions")))
    assert ids == ["kept"]
    # The pool hands out a working connection next time.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sessions (id, title) VALUES ('after', 'ok')"))
    assert _count_sessions(engine) == 2
    record("faults survived", 1, backend)


def _kill_pooled_connections(engine: Engine, count: int) -> None:
    """Check ``count`` connections out and in, then terminate their server processes."""
    held = [engine.connect() for _ in range(count)]
    pids = [conn.execute(text("SELECT pg_backend_pid()")).scalar_one() for conn in held]
    for conn in held:
        conn.close()
    killer_engine = create_db_engine(engine.url, isolation_level="AUTOCOMMIT")
    try:
        with killer_engine.connect() as killer:
            for pid in pids:
                killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        killer_engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_connections_killed_while_idle_are_replaced_silently(
    engine: Engine, database_url: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle past DB_POOL_PING_AFTER_IDLE: the checkout ping finds them dead and replaces them."""
    monkeypatch.setenv("DB_POOL_PING_AFTER_IDLE", "0.2")
    pinging = create_db_engine(database_url)
    try:
        _kill_pooled_connections(pinging, 3)
        time.sleep(0.3)
        for _ in range(3):
            with pinging.begin() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        pinging.dispose()
    record("faults survived", 1, backend)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_connection_killed_right_after_use_fails_once_then_the_pool_heals(
    engine: Engine, backend: str
) -> None:
    """Without a ping (used a moment ago) the first statement fails; the pool then
    discards every connection older than the failure, so the next transaction works."""
    _kill_pooled_connections(engine, 3)
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.execute(text("SELECT 1"))
    assert caught.value.connection_invalidated
    for _ in range(3):
        with engine.begin() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    record("faults survived", 1, backend)


_LOCK_HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO sessions (id, title) VALUES ('holder', 'uncommitted')")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("ROLLBACK")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_lock_held_past_the_busy_timeout(
    engine: Engine, database_url: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sessions (id, title) VALUES ('kept', 'committed')"))
    engine.dispose()
    path = engine.url.database
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, path, "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SQLITE_BUSY_TIMEOUT_MS", "300")
        impatient = create_db_engine(database_url)
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"), impatient.begin() as conn:
            conn.execute(text("INSERT INTO sessions (id, title) VALUES ('waiter', 'x')"))
        waited = time.monotonic() - started
        assert 0.25 <= waited < 2.0, f"waited {waited:.2f}s for a 0.3s busy timeout"
        # Readers are not blocked by the writer (WAL) and see only committed rows.
        with impatient.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            ids = [row[0] for row in conn.execute(text("SELECT id FROM sessions"))]
        assert ids == ["kept"]
        impatient.dispose()
    finally:
        holder.wait(timeout=10)
    assert holder.returncode == 0
    with engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
        conn.execute(text("INSERT INTO sessions (id, title) VALUES ('after', 'ok')"))
    assert _count_sessions(engine) == 2
    record("faults survived", 1, backend)
