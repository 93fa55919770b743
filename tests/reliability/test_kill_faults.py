"""SIGKILL in the middle of a migration, of a transition, and of a burst of appends.

A killed process gets no chance to clean up: whatever it had not committed
must vanish, whatever it had committed must stay, and the next process must
carry on. The victims are real child processes:

* a migration: ``python -m migrations upgrade`` on a v0.7 database with
  enough rows that its slow migrations (index builds, PostgreSQL column
  rewrites) take a measurable time; killed a random moment into one of them.
  Afterwards the recorded migrations are a prefix of the list and the schema
  is exactly what that prefix builds (no trace of the killed one), no legacy
  row changed, and a rerun of the CLI completes with ``status`` up to date;
* ``workers transitions`` / ``workers appends``: run lifecycles and append
  bursts that journal every commit (``workers.Journal``). Afterwards every
  journaled commit is in the database, the invariants hold (no run change
  without its event, no seq gap), and a restarted worker carries on.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session as DbSession

from app.db import create_db_engine
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from app.state_machine import EVENT_TARGET, RunEventType
from migrations import MIGRATIONS, status, upgrade
from tests.concurrency import in_own_transaction, seed
from tests.reliability import invariants
from tests.reliability.figures import record
from tests.reliability.workers import read_journal
from tests.schema import describe_schema

pytestmark = pytest.mark.slow  # every test starts and kills Python processes

ROOT = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

LEGACY_SESSIONS = 40
LEGACY_EVENTS = {"sqlite": 100_000, "postgresql": 50_000}
SLOW_MIGRATIONS = {"sqlite": (7, 8), "postgresql": (5, 8)}
"""Versions that take a few hundred ms on ``LEGACY_EVENTS`` rows: where the kills land."""

_LEGACY_ROWS = (
    "SELECT id, session_id, seq, type, payload, source, created_at FROM session_events ORDER BY id"
)
_LEGACY_SESSIONS = "SELECT id, title, created_at FROM sessions ORDER BY id"
_INSERT_LEGACY_SESSIONS = (
    "WITH RECURSIVE numbers(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM numbers WHERE n < :last) "
    "INSERT INTO sessions (id, title, created_at) "
    "SELECT 'legacy-' || CAST(n AS VARCHAR), 'v0.7 session', CURRENT_TIMESTAMP FROM numbers"
)
_INSERT_LEGACY_EVENTS = (
    "WITH RECURSIVE numbers(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM numbers WHERE n < :last) "
    "INSERT INTO session_events (session_id, seq, type, payload, source, created_at) "
    "SELECT 'legacy-' || CAST(n % :sessions AS VARCHAR), n / :sessions + 1, 'message', "
    '\'{"text": "from v0.7", "n": 1}\', \'plan\', CURRENT_TIMESTAMP FROM numbers'
)


def _make_v07_database(engine: Engine, events: int) -> None:
    """The v0.7 tables (the baseline, without a version table, as v0.7 left them) and rows."""
    upgrade(engine, migrations=MIGRATIONS[:1])
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE schema_migrations"))
        conn.execute(text(_INSERT_LEGACY_SESSIONS), {"last": LEGACY_SESSIONS - 1})
        conn.execute(text(_INSERT_LEGACY_EVENTS), {"last": events - 1, "sessions": LEGACY_SESSIONS})


def _legacy_state(engine: Engine) -> tuple[tuple[int, str], tuple[int, str]]:
    """Digests of the legacy rows' v0.7 columns: the values adoption must keep exactly."""
    return invariants.digest(engine, _LEGACY_SESSIONS), invariants.digest(engine, _LEGACY_ROWS)


def _legacy_counts(engine: Engine) -> int:
    return invariants.count(engine, "sessions") + invariants.count(engine, "session_events")


def _wait_for_orphaned_backends(engine: Engine) -> None:
    """PostgreSQL finishes a statement whose client died before it notices; wait for that.

    Otherwise a COMMIT sent just before the kill could land between two of our checks.
    """
    if engine.dialect.name != "postgresql":
        return
    deadline = time.monotonic() + 60
    query = text(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() == 0:
                return
        time.sleep(0.05)
    pytest.fail("a killed client's PostgreSQL backend still runs after 60 s")


def _reference_schemas(make_database_url: Callable[[], str]) -> dict[int, object]:
    """What each prefix of the migrations builds on a v0.7 database without rows."""
    url = make_database_url()
    engine = create_db_engine(url)
    try:
        _make_v07_database(engine, events=1)
        references = {}
        for applied in range(1, len(MIGRATIONS) + 1):
            upgrade(engine, migrations=MIGRATIONS[:applied])
            references[applied] = describe_schema(engine)
        return references
    finally:
        engine.dispose()


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_LOGGED_UPGRADE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
    "from migrations.__main__ import main\n"
    "sys.exit(main(['upgrade', '--url', sys.argv[1]]))\n"
)
"""The CLI's upgrade, with the runner's log on stdout: one line as each migration commits."""


def _kill_upgrade_inside(database_url: str, version: int, rng: random.Random) -> str:
    """Start the upgrade, SIGKILL it a random moment after ``version - 1`` committed."""
    child = _spawn("-c", _LOGGED_UPGRADE, database_url)
    assert child.stdout is not None
    seen = []
    for line in child.stdout:
        seen.append(line.strip())
        if line.startswith(f"applied migration {version - 1:04d}_"):
            break
    else:
        pytest.fail(f"upgrade ended before migration {version}: {seen} {child.stderr.read()}")
    delay = rng.uniform(0.01, 0.06)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL, "the upgrade finished before the kill"
    return f"killed {delay * 1000:.0f} ms into migration {version} (log: {seen})"


def _check_after_killed_upgrade(
    engine: Engine, legacy_rows: int, references: dict[int, object], when: str
) -> tuple[int, int]:
    """What the killed upgrade left: a clean prefix and every legacy row (their values are
    compared once at the end: digesting them takes longer than the migrations).

    Returns (migrations applied, legacy rows lost)."""
    _wait_for_orphaned_backends(engine)
    states = [state.state for state in status(engine)]
    applied = states.count("applied")
    assert states == ["applied"] * applied + ["pending"] * (len(MIGRATIONS) - applied), when
    assert describe_schema(engine) == references[applied], f"a trace of a killed migration; {when}"
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
    return applied, legacy_rows - _legacy_counts(engine)


def test_upgrade_killed_mid_migration_reruns_to_completion(
    empty_engine: Engine,
    database_url: str,
    make_database_url: Callable[[], str],
    backend: str,
) -> None:
    rng = random.Random()
    references = _reference_schemas(make_database_url)
    _make_v07_database(empty_engine, LEGACY_EVENTS[backend])
    legacy = _legacy_state(empty_engine)
    legacy_rows = _legacy_counts(empty_engine)
    lost = 0
    for version in SLOW_MIGRATIONS[backend]:
        when = _kill_upgrade_inside(database_url, version, rng)
        applied, rows_lost = _check_after_killed_upgrade(
            empty_engine, legacy_rows, references, when
        )
        assert applied == version - 1, f"the kill missed migration {version}: {when}"
        lost += rows_lost
        record("faults survived", 1, backend)

    rerun = _spawn("-m", "migrations", "upgrade", "--url", database_url)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, out + err
    assert "up to date" in out
    check = _spawn("-m", "migrations", "status", "--url", database_url)
    out, err = check.communicate(timeout=60)
    assert check.returncode == 0, out + err
    assert "pending" not in out and out.strip().endswith("up to date")
    assert describe_schema(empty_engine) == references[len(MIGRATIONS)]
    assert _legacy_state(empty_engine) == legacy
    record("rows lost", lost, backend)
    assert lost == 0

    # The adopted sessions take new events after their legacy ones.
    stored = in_own_transaction(
        empty_engine, lambda db: EventRepository(db).append("legacy-0", "after_upgrade").seq
    )
    assert stored == LEGACY_EVENTS[backend] // LEGACY_SESSIONS + 1


# --------------------------------------------------------------------------
# Workers killed mid-transaction

KILLS_PER_WORKER = 2
COMMITS_BEFORE_KILL = 25


def _kill_worker(mode: str, database_url: str, session_ids: list[str], journal: Path) -> None:
    """Run ``workers <mode>`` until it journaled enough commits, then SIGKILL it at once."""
    child = _spawn(
        "-m",
        "tests.reliability.workers",
        mode,
        database_url,
        ",".join(session_ids),
        str(journal),
        str(random.randrange(10**6)),
    )
    deadline = time.monotonic() + 60
    baseline = len(read_journal(str(journal))) if journal.exists() else 0
    while not journal.exists() or len(read_journal(str(journal))) < baseline + COMMITS_BEFORE_KILL:
        if child.poll() is not None:
            pytest.fail(f"worker {mode} died on its own: {child.stderr.read()}")
        assert time.monotonic() < deadline, f"worker {mode} made no progress"
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.02))
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def _lost_transitions(engine: Engine, journal: list[dict]) -> list[dict]:
    """Journaled transitions whose lifecycle event, into the journaled status, is not stored."""
    with engine.connect() as conn:
        stored = {
            (row.run_id, row.seq): EVENT_TARGET[RunEventType(row.type)]
            for row in conn.execute(
                text("SELECT run_id, seq, type FROM session_events WHERE run_id IS NOT NULL")
            )
        }
    return [e for e in journal if stored.get((e["run_id"], e["seq"])) != e["status"]]


def _lost_appends(engine: Engine, journal: list[dict]) -> list[dict]:
    with engine.connect() as conn:
        stored = set(conn.execute(text("SELECT session_id, seq, event_id FROM session_events")))
    return [e for e in journal if (e["session_id"], e["seq"], e["event_id"]) not in stored]


def _restart_after_transitions(engine: Engine, _session_ids: list[str]) -> None:
    """What a restarted service does: fail the runs the dead worker left running, go on."""

    def recover(db: DbSession) -> None:
        runs = RunRepository(db)
        for run_id in runs.fail_stale(timedelta(microseconds=1)):
            assert runs.get(run_id).latest_error["code"] == "stale_run"

    in_own_transaction(engine, recover)


def _restart_after_appends(engine: Engine, session_ids: list[str]) -> None:
    """A new writer continues each session right after its last committed seq."""

    def continue_session(db: DbSession, session_id: str) -> None:
        events = EventRepository(db)
        last = len(events.list_for_session(session_id, limit=1000))
        assert events.append(session_id, "after_restart").seq == last + 1

    for session_id in session_ids:
        in_own_transaction(engine, partial(continue_session, session_id=session_id))


@pytest.mark.parametrize(
    ("mode", "lost", "restart"),
    [
        pytest.param("transitions", _lost_transitions, _restart_after_transitions, id="transition"),
        pytest.param("appends", _lost_appends, _restart_after_appends, id="appends"),
    ],
)
def test_worker_killed_mid_transaction_loses_nothing_committed(
    engine: Engine,
    database_url: str,
    backend: str,
    tmp_path: Path,
    mode: str,
    lost: Callable[[Engine, list[dict]], list[dict]],
    restart: Callable[[Engine, list[str]], None],
) -> None:
    session_ids = seed(
        engine, lambda db: [db.merge(ChatSession(title=f"victim {n}")).id for n in range(2)]
    )
    journal = tmp_path / f"{mode}.journal"
    for _ in range(KILLS_PER_WORKER):
        _kill_worker(mode, database_url, session_ids, journal)
        _wait_for_orphaned_backends(engine)
        committed = read_journal(str(journal))
        missing = lost(engine, committed)
        record("rows lost", len(missing), backend)
        assert missing == [], f"{len(missing)} of {len(committed)} committed changes lost"
        assert invariants.violations(engine) == []
        restart(engine, session_ids)
        assert invariants.violations(engine) == []
        record("faults survived", 1, backend)
