"""Online index builds (``OnlineIndex``, migration 0015) and ``history`` / ``current``.

PostgreSQL, real processes: an upgrade's ``CREATE INDEX CONCURRENTLY`` is held
in its last phase by a transaction that keeps an old snapshot (a build waits
for those), then cancelled with ``pg_cancel_backend``: it leaves an INVALID
index, the upgrade exits 1 recording nothing, and the next upgrade drops the
INVALID index, builds it again and records the migration. A second upgrade
started while the build waits holds off until it is done (the migration lock)
and does not deadlock with it. Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, text

from migrations import MIGRATIONS, status, upgrade
from migrations.__main__ import main
from migrations.runner import index_validity

ROOT = Path(__file__).resolve().parents[2]
INDEX = "idx_session_runs_finished"


def _wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _spawn(database_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migrations",
            "upgrade",
            "--url",
            database_url,
            "--lock-timeout",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _building_pid(watcher: Connection) -> int | None:
    """The backend whose CREATE INDEX CONCURRENTLY waits for an older transaction."""
    return watcher.execute(
        text(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%' "
            "AND wait_event_type = 'Lock' AND datname = current_database()"
        )
    ).scalar()


def _recorded(watcher: Connection) -> list[int]:
    return watcher.execute(text("SELECT version FROM schema_migrations")).scalars().all()


def _prepare(empty_engine: Engine) -> None:
    upgrade(empty_engine, migrations=[m for m in MIGRATIONS if m.version < 15])
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sessions (id, title, created_at, updated_at) "
                "VALUES ('s', 't', now(), now())"
            )
        )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_an_interrupted_concurrent_build_is_recovered_by_the_next_upgrade(
    empty_engine: Engine, database_url: str
) -> None:
    _prepare(empty_engine)
    with empty_engine.connect() as watcher, empty_engine.connect() as snapshot:
        watcher.execution_options(isolation_level="AUTOCOMMIT")
        snapshot.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        snapshot.execute(text("SELECT count(*) FROM sessions"))  # an old snapshot, kept
        first = _spawn(database_url)
        second = None
        try:
            _wait_until(lambda: _building_pid(watcher) is not None, 60, "the build to wait")
            # Created, not valid yet: the build waits for the old snapshot.
            assert index_validity(watcher, INDEX) is False
            second = _spawn(database_url)
            time.sleep(1.5)  # past deadlock_timeout: no deadlock, both wait
            assert first.poll() is None and second.poll() is None
            watcher.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": _building_pid(watcher)})
            out, err = first.communicate(timeout=60)
            assert first.returncode == 1, out + err
            assert "CREATE INDEX CONCURRENTLY" in err and "INVALID" in err
            assert "rerun upgrade" in err and "Traceback" not in err
            assert index_validity(watcher, INDEX) is False  # left behind by the cancel
            assert 15 not in _recorded(watcher)  # recorded only once valid
            snapshot.rollback()
            # The second upgrade was waiting for the lock: it drops and rebuilds.
            out, err = second.communicate(timeout=60)
            assert second.returncode == 0, out + err
            assert "applied 0015_index_finished_runs_online" in out
            assert "dropped the INVALID index" in out
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.communicate(timeout=10)
        assert index_validity(watcher, INDEX) is True
        assert sorted(_recorded(watcher)) == [m.version for m in MIGRATIONS]
    assert all(state.state == "applied" for state in status(empty_engine))
    assert upgrade(empty_engine) == []


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_an_upgrade_waiting_for_the_lock_does_not_deadlock_with_the_build(
    empty_engine: Engine, database_url: str
) -> None:
    """The build's last phase waits for every older transaction, the waiting upgrade's
    too; a waiter blocked in one statement would close a cycle (PostgreSQL then ends one
    of them as a deadlock). The waiter polls instead."""
    _prepare(empty_engine)
    with empty_engine.connect() as watcher, empty_engine.connect() as writer:
        watcher.execution_options(isolation_level="AUTOCOMMIT")
        writer.execute(text("UPDATE sessions SET title = 'w'"))  # the build waits for it first
        writer.execute(text("LOCK TABLE session_runs IN ROW EXCLUSIVE MODE"))
        first = _spawn(database_url)
        second = None
        try:
            _wait_until(lambda: _building_pid(watcher) is not None, 60, "the build to wait")
            second = _spawn(database_url)
            time.sleep(1.0)  # the second one waits for the migration lock meanwhile
            writer.commit()  # the build goes on to its phase that waits for older ones
            results = [p.communicate(timeout=60) for p in (first, second)]
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.communicate(timeout=10)
        for process, (out, err) in zip((first, second), results, strict=True):
            assert process.returncode == 0, out + err
        assert index_validity(watcher, INDEX) is True
        assert sorted(_recorded(watcher)) == [m.version for m in MIGRATIONS]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_dropped_online_index_makes_the_migration_pending_again(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text(f"DROP INDEX {INDEX}"))
    assert [s.version for s in status(empty_engine) if s.state == "pending"] == [15]
    assert [m.version for m in upgrade(empty_engine)] == [15]
    with empty_engine.connect() as conn:
        assert index_validity(conn, INDEX) is True


def test_history_and_current(
    empty_engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    upgrade(empty_engine, migrations=MIGRATIONS[:3])
    assert main(["current", "--url", database_url, "--json"]) == 0
    current = json.loads(capsys.readouterr().out)
    assert current["current"] == "0003_v08_event_run_columns"
    assert current["pending"][0] == "0004_run_waiting_reason_and_options"
    upgrade(empty_engine)
    assert main(["history", "--url", database_url, "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [row["version"] for row in history] == [m.version for m in MIGRATIONS]
    assert main(["history", "--url", database_url]) == 0
    assert f"{len(MIGRATIONS)} recorded" in capsys.readouterr().out
    assert main(["current", "--url", database_url]) == 0
    out = capsys.readouterr().out
    assert MIGRATIONS[-1].label in out and "pending" not in out
