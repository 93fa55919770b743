"""``python -m migrations`` and concurrent upgrades, in real subprocesses, on both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text

from migrations import MIGRATIONS, status, upgrade
from tests.concurrency import run_scripts_together
from tests.migrations.test_migrations import make_v07_database

pytestmark = pytest.mark.slow  # every test starts Python processes

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrations", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def create_empty(engine: Engine) -> None:
    """An empty database that exists (``status`` and ``sql`` never create a SQLite file)."""
    with engine.connect():
        pass


def test_status_upgrade_status_sql(database_url: str, empty_engine: Engine) -> None:
    create_empty(empty_engine)
    pending = run_cli("status", "--url", database_url)
    assert pending.returncode == 1
    assert pending.stdout.count("pending  ") == len(MIGRATIONS)
    assert f"{len(MIGRATIONS)} pending or changed" in pending.stdout

    upgraded = run_cli("upgrade", "--url", database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    for migration in MIGRATIONS:
        assert f"applied {migration.label} in " in upgraded.stdout
    assert f"up to date: {len(MIGRATIONS)} applied now" in upgraded.stdout

    clean = run_cli("status", "--url", database_url)
    assert clean.returncode == 0
    assert clean.stdout.count("applied  ") == len(MIGRATIONS)
    assert clean.stdout.rstrip().endswith("up to date")

    again = run_cli("upgrade", "--url", database_url)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert "nothing to do" in run_cli("sql", "--url", database_url).stdout


def test_sql_prints_what_upgrade_would_run_without_running_it(
    database_url: str, empty_engine: Engine
) -> None:
    create_empty(empty_engine)
    printed = run_cli("sql", "--url", database_url)

    assert printed.returncode == 0, printed.stderr
    assert "CREATE TABLE IF NOT EXISTS schema_migrations" in printed.stdout
    assert "CREATE TABLE IF NOT EXISTS session_runs" in printed.stdout
    assert "-- only if " in printed.stdout
    for migration in MIGRATIONS:
        assert f"-- migration {migration.label} " in printed.stdout
    assert inspect(empty_engine).get_table_names() == []


def test_database_url_comes_from_the_environment(database_url: str, empty_engine: Engine) -> None:
    upgraded = run_cli("upgrade", env={"DATABASE_URL": database_url})
    assert upgraded.returncode == 0, upgraded.stderr
    assert all(state.state == "applied" for state in status(empty_engine))


def test_upgrade_prints_reports_of_legacy_data(database_url: str, empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO session_events (session_id, seq, type, source) "
                "VALUES ('s1', 1, 'duplicate', 'session')"
            )
        )

    upgraded = run_cli("upgrade", "--url", database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "  note: uq_session_events_session_seq was NOT created" in upgraded.stdout
    assert "still pending: 0008_unique_seq_per_session" in upgraded.stdout
    shown = run_cli("status", "--url", database_url)
    assert shown.returncode == 1  # pending until the duplicates are resolved
    assert "pending  0008_unique_seq_per_session (applied " in shown.stdout
    assert "  note: uq_session_events_session_seq was NOT created" in shown.stdout


def test_a_changed_migration_fails_status_and_upgrade_until_allowed(
    database_url: str, empty_engine: Engine
) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 2"))

    shown = run_cli("status", "--url", database_url)
    assert shown.returncode == 1
    assert "CHANGED  0002_v08_run_model" in shown.stdout
    refused = run_cli("upgrade", "--url", database_url)
    assert refused.returncode == 1
    assert "0002_v08_run_model (recorded edited" in refused.stderr
    assert "--allow-changed" in refused.stderr
    allowed = run_cli("upgrade", "--url", database_url, "--allow-changed")
    assert allowed.returncode == 0, allowed.stderr
    assert run_cli("status", "--url", database_url).returncode == 0


def test_failure_exit_code_names_the_migration_and_statement(
    database_url: str, empty_engine: Engine
) -> None:
    make_v07_database(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("CREATE TABLE session_runs (id VARCHAR PRIMARY KEY, status VARCHAR)"))
        conn.execute(text("INSERT INTO session_runs (id, status) VALUES ('r1', 'bogus')"))

    failed = run_cli("upgrade", "--url", database_url)

    assert failed.returncode == 1
    assert "upgrade failed: migration 0002_v08_run_model failed" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert [s.version for s in status(empty_engine) if s.state == "applied"] == [1]


# --------------------------------------------------------------------------
# Concurrent starts

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from app.db import create_db_engine
    from migrations import MIGRATIONS, Migration, upgrade
    from migrations.steps import step

    url = sys.argv[1]
    engine = create_db_engine(url)
    slow_sql = {
        "postgresql": "SELECT pg_sleep(0.5)",
        "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
        "WHERE i < 1500000) SELECT count(*) FROM n",
    }
    slow = Migration(100, "slow", "test only", lambda dialect: (step(slow_sql[dialect]),))
    print("ready", flush=True)
    sys.stdin.readline()  # released together with the other workers
    began = time.time()
    applied = upgrade(engine, migrations=[*MIGRATIONS, slow])
    print(json.dumps({"applied": [m.version for m in applied], "began": began,
                      "ended": time.time()}))
    """
)


def test_concurrent_processes_apply_each_migration_exactly_once(
    database_url: str, empty_engine: Engine
) -> None:
    outputs = run_scripts_together(WORKER, [database_url], count=4)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]

    applied = sorted(version for result in results for version in result["applied"])
    assert applied == sorted([m.version for m in MIGRATIONS] + [100])
    # They really overlapped: the others began while the slow migration was being applied.
    (applier,) = [r for r in results if 100 in r["applied"]]
    assert all(r["began"] < applier["ended"] for r in results)
    with empty_engine.connect() as conn:
        versions = conn.execute(text("SELECT version FROM schema_migrations")).scalars().all()
    assert sorted(versions) == sorted([m.version for m in MIGRATIONS] + [100])
