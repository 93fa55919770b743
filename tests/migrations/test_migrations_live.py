"""Upgrades on a live PostgreSQL: bounded waits behind other transactions, and the lock.

Real connections on 127.0.0.1 hold the locks; every wait and loop here is
bounded in time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, inspect, text

from migrations import (
    MIGRATIONS,
    Migration,
    MigrationError,
    MigrationLockTimeoutError,
    status,
    upgrade,
)
from migrations.runner import _advisory_key
from migrations.steps import step
from tests.migrations.test_migrations import make_v07_database

pytestmark = [
    pytest.mark.parametrize("backend", ["postgresql"]),
    pytest.mark.slow,  # lock waits of seconds on a live server
]
ROOT = Path(__file__).resolve().parents[2]

STATEMENT_LOCK = 0.5
TOTAL = 3.0
SLACK = 1.5  # scheduling on a loaded 2-core machine

HOLDERS = {
    # A reader left idle in its transaction: ACCESS SHARE on session_events.
    "idle_reader": "SELECT count(*) FROM session_events",
    # A writer that has not committed: ROW EXCLUSIVE on session_events.
    "open_writer": "UPDATE session_events SET type = type WHERE seq = 1",
}


def _backend_pid(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_upgrade_behind_an_open_transaction_gives_up_in_time_and_never_stalls_readers(
    empty_engine: Engine, holder: str
) -> None:
    make_v07_database(empty_engine)
    outcome: dict[str, object] = {}

    def run_upgrade() -> None:
        started = time.monotonic()
        try:
            upgrade(empty_engine, lock_timeout=TOTAL, statement_lock_timeout=STATEMENT_LOCK)
        except Exception as exc:  # the test inspects what the upgrade raised
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    with empty_engine.connect() as blocker, empty_engine.connect() as reader:
        blocker_pid = _backend_pid(blocker)
        blocker.commit()
        blocker.execute(text(HOLDERS[holder]))  # the transaction stays open
        worker = threading.Thread(target=run_upgrade, daemon=True)
        worker.start()
        slowest = 0.0
        deadline = time.monotonic() + TOTAL + STATEMENT_LOCK + 10
        while worker.is_alive() and time.monotonic() < deadline:
            began = time.monotonic()
            reader.execute(text("SELECT count(*) FROM session_events")).scalar_one()
            reader.commit()
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.05)
        worker.join(timeout=0.1)
        stuck = worker.is_alive()
        blocker.rollback()  # lets an unbounded upgrade (the old code) finish
        worker.join(timeout=30)

    assert not stuck, f"the upgrade still waited after {TOTAL + STATEMENT_LOCK + 10:g} s"
    error = outcome.get("error")
    assert isinstance(error, MigrationLockTimeoutError), error
    assert float(outcome["seconds"]) <= TOTAL + STATEMENT_LOCK + SLACK  # type: ignore[arg-type]
    assert slowest <= STATEMENT_LOCK + SLACK, f"a plain SELECT waited {slowest:.2f} s"
    message = str(error)
    assert f"pid {blocker_pid} (idle in transaction" in message
    assert "holds session_events" in message
    assert HOLDERS[holder][:30] in message, message
    assert "nothing of 0" in message and "was applied" in message
    states = [state.state for state in status(empty_engine)]
    applied = states.count("applied")
    assert applied < len(MIGRATIONS)
    assert states == ["applied"] * applied + ["pending"] * (len(MIGRATIONS) - applied)

    # Once the transaction is gone, the same upgrade goes through.
    upgrade(empty_engine, lock_timeout=TOTAL, statement_lock_timeout=STATEMENT_LOCK)
    assert all(state.state == "applied" for state in status(empty_engine))


def test_a_short_wait_is_retried_until_the_lock_is_free(empty_engine: Engine) -> None:
    """A transaction that ends within the total costs a retry, not a failure."""
    make_v07_database(empty_engine)
    with empty_engine.connect() as blocker:
        blocker.execute(text(HOLDERS["idle_reader"]))
        release = threading.Timer(1.5, blocker.rollback)
        release.start()
        try:
            applied = upgrade(empty_engine, lock_timeout=20, statement_lock_timeout=0.3)
        finally:
            release.join()
    assert [migration.version for migration in applied] == [m.version for m in MIGRATIONS]


# --------------------------------------------------------------------------
# The migration lock cannot vanish

WORKER = textwrap.dedent(
    """
    import json, sys
    from app.db import create_db_engine
    from migrations import MIGRATIONS, Migration, MigrationError, upgrade
    from migrations.steps import step

    slow = Migration(100, "slow", "test only", lambda dialect: (step("SELECT pg_sleep(4)"),))
    engine = create_db_engine(sys.argv[1])
    try:
        applied = upgrade(engine, migrations=[*MIGRATIONS, slow], lock_timeout=30,
                          statement_lock_timeout=0.5)
    except MigrationError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(1)
    print(json.dumps({"applied": [m.version for m in applied]}))
    """
)


def _spawn(database_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, database_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def watcher(empty_engine: Engine) -> Iterator[Connection]:
    with empty_engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


def _lock_holder(conn: Connection, key: int) -> int | None:
    return conn.execute(
        text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
        ),
        {"high": (key >> 32) & 0xFFFFFFFF, "low": key & 0xFFFFFFFF},
    ).scalar()


def _sleeping(conn: Connection, pid: int) -> bool:
    query = conn.execute(
        text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
    ).scalar()
    return "pg_sleep" in (query or "")


def test_killing_the_lock_holder_kills_its_migration_and_the_waiter_applies_it_once(
    database_url: str, empty_engine: Engine, watcher: Connection
) -> None:
    key = _advisory_key(watcher)
    first = _spawn(database_url)
    try:
        # The first runner reached the slow migration: it holds the lock inside it.
        _wait_until(
            lambda: (pid := _lock_holder(watcher, key)) is not None and _sleeping(watcher, pid),
            60,
            "the first runner to hold the lock in its slow migration",
        )
        holder = _lock_holder(watcher, key)
        assert holder is not None
        second = _spawn(database_url)
        time.sleep(1.0)  # the second one waits for the lock meanwhile
        assert first.poll() is None and second.poll() is None
        watcher.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder})
        first_out, _ = first.communicate(timeout=60)
        second_out, second_err = second.communicate(timeout=60)
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                process.kill()

    assert first.returncode == 1
    lost = json.loads(first_out.strip().splitlines()[-1])["error"]
    assert lost.startswith("lost the database connection while applying 0100_slow")
    assert "rerun upgrade" in lost
    assert second.returncode == 0, second_out + second_err
    assert 100 in json.loads(second_out.strip().splitlines()[-1])["applied"]
    versions = watcher.execute(text("SELECT version FROM schema_migrations")).scalars().all()
    assert sorted(versions) == sorted([m.version for m in MIGRATIONS] + [100])
    # A rerun has nothing left to do.
    rerun = _spawn(database_url)
    rerun_out, rerun_err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, rerun_err
    assert json.loads(rerun_out.strip().splitlines()[-1]) == {"applied": []}


def test_lock_held_by_another_session_times_out_naming_it(
    empty_engine: Engine, watcher: Connection
) -> None:
    key = _advisory_key(watcher)
    holder = _backend_pid(watcher)
    watcher.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
    try:
        with pytest.raises(MigrationLockTimeoutError) as failure:
            upgrade(empty_engine, lock_timeout=1, statement_lock_timeout=0.3)
    finally:
        watcher.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    message = str(failure.value)
    assert "waiting for the migration lock" in message
    assert f"pid {holder} (idle" in message and "holds the migration lock" in message
    assert status(empty_engine)[0].state == "pending"


def test_a_statement_past_the_statement_timeout_is_stopped_and_rolled_back(
    empty_engine: Engine,
) -> None:
    slow = Migration(
        100,
        "slow",
        "test only",
        lambda dialect: (
            step("CREATE TABLE half_made (id INTEGER)"),
            step("SELECT pg_sleep(5)"),
        ),
    )
    started = time.monotonic()
    with pytest.raises(MigrationError) as failure:
        upgrade(empty_engine, migrations=[*MIGRATIONS, slow], statement_timeout=0.5)
    assert time.monotonic() - started < 5
    assert str(failure.value).startswith(
        "0100_slow was stopped and rolled back, nothing of it kept: statement: "
        "SELECT pg_sleep(5) ran longer than the statement timeout (0.5 s)"
    )
    assert not inspect(empty_engine).has_table("half_made")
    assert all(state.state == "applied" for state in status(empty_engine))
