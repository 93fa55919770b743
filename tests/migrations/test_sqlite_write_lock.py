"""The migration runner's wait for SQLite's write lock.

The engine's ``BEGIN IMMEDIATE`` retries by itself for as long as the connection's
recorded busy timeout (``app._dialects.begin_immediate``): the runner's longer wait
must reach it, not only the ``PRAGMA``.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy import make_url

from app.db import create_db_engine
from migrations import MIGRATIONS, upgrade

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])  # SQLite's one write lock


def test_upgrade_waits_for_the_write_lock_past_the_engines_busy_timeout(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade behind another process's write of a second goes through (the runner's
    ``lock_timeout``), instead of failing at the engine's 0.1 s busy timeout for requests."""
    monkeypatch.setenv("SQLITE_BUSY_TIMEOUT_MS", "100")
    engine = create_db_engine(database_url)
    with engine.connect():
        pass  # the file exists, in WAL mode, before the lock is taken
    holder = sqlite3.connect(
        make_url(database_url).database or "", isolation_level=None, check_same_thread=False
    )
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's write, holding the lock
        release = threading.Timer(1.0, holder.rollback)
        release.start()
        began = time.monotonic()
        try:
            applied = upgrade(engine, lock_timeout=20)
        finally:
            release.join()
        assert time.monotonic() - began >= 0.9  # it waited for the holder
        assert [migration.version for migration in applied] == [m.version for m in MIGRATIONS]
        # and the engine's connections are back on the engine's own busy timeout
        with engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            assert driver.execute("PRAGMA busy_timeout").fetchone()[0] == 100
    finally:
        holder.close()
        engine.dispose()
