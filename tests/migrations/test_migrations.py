"""Migrations on real databases, both backends: fresh builds, adoption of v0.7, repairs, failures.

Legacy databases are built here with the v0.7 DDL written out as v0.7's
``create_all`` made it (on PostgreSQL: naive timestamps, ``json`` and the
native enum ``session_event_source``), independently of the baseline migration.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session as DbSession
from sqlmodel import select

from app.models import EventSource, RunStatus, SessionEvent, SessionRun, TriggerSource
from migrations import (
    MIGRATIONS,
    Migration,
    MigrationLockTimeoutError,
    StatementFailedError,
    status,
    upgrade,
)
from migrations import m0002_v08_run_model as m0002
from migrations import m0003_v08_event_run_columns as m0003
from migrations.steps import step
from tests.schema import describe_schema

PHASE_RUN_COLUMNS = {
    "id": False,
    "session_id": False,
    "parent_run_id": True,
    "trigger_source": False,
    "status": False,
    "input_message": True,
    "resume_payload": True,
    "checkpoint_thread": True,
    "checkpoint_ns": True,
    "latest_error": True,
    "metrics": True,
    "started_at": True,
    "finished_at": True,
    "created_at": False,
    "updated_at": False,
}

V07_DDL = {
    "sqlite": [
        """CREATE TABLE sessions (
            id VARCHAR NOT NULL, title VARCHAR NOT NULL, created_at DATETIME,
            updated_at DATETIME, current_version INTEGER, product_type VARCHAR,
            complexity VARCHAR, model_name VARCHAR, graph_state JSON, build_status VARCHAR,
            PRIMARY KEY (id))""",
        """CREATE TABLE session_events (
            id INTEGER NOT NULL, session_id VARCHAR NOT NULL, seq INTEGER NOT NULL,
            type VARCHAR(100) NOT NULL, payload JSON, source VARCHAR(7) NOT NULL,
            created_at DATETIME, PRIMARY KEY (id),
            FOREIGN KEY(session_id) REFERENCES sessions (id) ON DELETE CASCADE)""",
        "CREATE INDEX idx_session_event_seq ON session_events (session_id, seq)",
        """CREATE TABLE session_event_sequences (
            session_id VARCHAR NOT NULL, next_seq INTEGER DEFAULT 1 NOT NULL,
            updated_at DATETIME, PRIMARY KEY (session_id),
            FOREIGN KEY(session_id) REFERENCES sessions (id) ON DELETE CASCADE)""",
    ],
    "postgresql": [
        "CREATE TYPE session_event_source AS ENUM ('session', 'plan', 'task')",
        """CREATE TABLE sessions (
            id VARCHAR NOT NULL, title VARCHAR NOT NULL, created_at TIMESTAMP WITHOUT TIME ZONE,
            updated_at TIMESTAMP WITHOUT TIME ZONE, current_version INTEGER,
            product_type VARCHAR, complexity VARCHAR, model_name VARCHAR, graph_state JSON,
            build_status VARCHAR, PRIMARY KEY (id))""",
        """CREATE TABLE session_events (
            id SERIAL NOT NULL, session_id VARCHAR NOT NULL, seq INTEGER NOT NULL,
            type VARCHAR(100) NOT NULL, payload JSON, source session_event_source NOT NULL,
            created_at TIMESTAMP WITHOUT TIME ZONE, PRIMARY KEY (id),
            FOREIGN KEY(session_id) REFERENCES sessions (id) ON DELETE CASCADE)""",
        "CREATE INDEX idx_session_event_seq ON session_events (session_id, seq)",
        """CREATE TABLE session_event_sequences (
            session_id VARCHAR NOT NULL, next_seq INTEGER DEFAULT 1 NOT NULL,
            updated_at TIMESTAMP WITHOUT TIME ZONE, PRIMARY KEY (session_id),
            FOREIGN KEY(session_id) REFERENCES sessions (id) ON DELETE CASCADE)""",
    ],
}

# Naive UTC, as v0.7 wrote them; one with microseconds, one without.
T1 = datetime(2024, 3, 1, 12, 30, 45, 123456)
T2 = datetime(2024, 3, 2, 8, 0, 0)
V07_SESSIONS = [
    {
        "id": "s1",
        "title": "Pitch deck",
        "created_at": T1,
        "updated_at": T2,
        "current_version": 3,
        "product_type": "deck",
        "complexity": "high",
        "model_name": "m-large",
        "graph_state": json.dumps({"node": "plan", "step": 2}),
        "build_status": "done",
    },
    {
        "id": "s2",
        "title": "Report",
        "created_at": T2,
        "updated_at": None,
        "current_version": None,
        "product_type": None,
        "complexity": None,
        "model_name": None,
        "graph_state": None,
        "build_status": None,
    },
]
V07_EVENTS = [
    {
        "session_id": "s1",
        "seq": 1,
        "type": "message",
        "payload": {"text": "hi"},
        "source": "session",
        "created_at": T1,
    },
    {
        "session_id": "s1",
        "seq": 2,
        "type": "plan_ready",
        "payload": {"pages": ["a", "b"], "nested": {"k": [1, 2.5, None]}},
        "source": "plan",
        "created_at": T2,
    },
    {
        "session_id": "s2",
        "seq": 1,
        "type": "task_done",
        "payload": None,
        "source": "task",
        "created_at": None,
    },
]


def _insert_v07_rows(conn: Any, events: Sequence[dict[str, Any]] = V07_EVENTS) -> None:
    for row in V07_SESSIONS:
        conn.execute(
            text(
                "INSERT INTO sessions (id, title, created_at, updated_at, current_version, "
                "product_type, complexity, model_name, graph_state, build_status) VALUES "
                "(:id, :title, :created_at, :updated_at, :current_version, :product_type, "
                ":complexity, :model_name, :graph_state, :build_status)"
            ),
            _storable(conn, row),
        )
    for row in events:
        conn.execute(
            text(
                "INSERT INTO session_events (session_id, seq, type, payload, source, created_at) "
                "VALUES (:session_id, :seq, :type, :payload, :source, :created_at)"
            ),
            _storable(conn, {**row, "payload": _json(row["payload"])}),
        )
    conn.execute(
        text(
            "INSERT INTO session_event_sequences (session_id, next_seq, updated_at) "
            "VALUES (:session_id, :next_seq, :updated_at)"
        ),
        _storable(conn, {"session_id": "s1", "next_seq": 3, "updated_at": T2}),
    )


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _storable(conn: Any, row: dict[str, Any]) -> dict[str, Any]:
    """v0.7 on SQLite wrote naive UTC as text 'YYYY-MM-DD HH:MM:SS.ffffff'."""
    if conn.dialect.name != "sqlite":
        return row
    return {
        key: value.isoformat(sep=" ", timespec="microseconds")
        if isinstance(value, datetime)
        else value
        for key, value in row.items()
    }


def make_v07_database(engine: Engine, events: Sequence[dict[str, Any]] = V07_EVENTS) -> None:
    with engine.begin() as conn:
        for ddl in V07_DDL[engine.dialect.name]:
            conn.execute(text(ddl))
        _insert_v07_rows(conn, events)


def _rows(engine: Engine, query: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(text(query))]  # noqa: SLF001 Row._mapping is public API


def _same_instant(legacy: Any, stored: Any) -> bool:
    """A legacy value read before the upgrade and the value after denote one instant.

    SQLite: the same text. PostgreSQL: the naive UTC value is now the aware
    one (the column became ``timestamptz``).
    """
    if legacy is None or stored is None or isinstance(legacy, str):
        return stored == legacy
    return legacy.tzinfo is None and stored == legacy.replace(tzinfo=UTC)


def _notes(applied: Sequence[Any], version: int) -> tuple[str, ...]:
    return next(migration.notes for migration in applied if migration.version == version)


# --------------------------------------------------------------------------
# Fresh database


def test_fresh_database_gets_session_runs_with_the_phase_columns(empty_engine: Engine) -> None:
    applied = upgrade(empty_engine)

    assert [migration.version for migration in applied] == [m.version for m in MIGRATIONS]
    assert all(migration.notes == () for migration in applied)
    inspector = inspect(empty_engine)
    columns = {col["name"]: col["nullable"] for col in inspector.get_columns("session_runs")}
    assert columns == {
        **PHASE_RUN_COLUMNS,
        "waiting_reason": True,
        "options": True,
        "worker_id": True,
        "lease_expires_at": True,
        "attempt": False,
        "run_metadata": False,
    }
    assert {index["name"] for index in inspector.get_indexes("session_runs")} == {
        "idx_session_runs_session_created",
        "idx_session_runs_status",
        "idx_session_runs_parent",
        "uq_session_runs_one_running",
        "idx_session_runs_queue",
        "idx_session_runs_session_status",
        "idx_session_runs_finished",
        "idx_session_runs_created",
        *(["idx_session_runs_metadata"] if empty_engine.dialect.name == "postgresql" else []),
    }
    event_columns = {
        col["name"]: col["nullable"] for col in inspector.get_columns("session_events")
    }
    assert event_columns["run_id"] is True and event_columns["event_id"] is True
    assert "idx_session_event_run_seq" in {
        index["name"] for index in inspector.get_indexes("session_events")
    }


def test_version_rows_record_each_migration(empty_engine: Engine) -> None:
    before = datetime.now(UTC)
    upgrade(empty_engine)
    states = status(empty_engine)

    assert [(state.version, state.state) for state in states] == [
        (migration.version, "applied") for migration in MIGRATIONS
    ]
    dialect = empty_engine.dialect.name
    for state, migration in zip(states, MIGRATIONS, strict=True):
        assert state.recorded is not None
        assert state.recorded.name == migration.name
        assert state.recorded.checksum == migration.checksum(dialect)
        assert state.recorded.applied_at.tzinfo is not None
        assert before <= state.recorded.applied_at <= datetime.now(UTC)
        assert state.recorded.duration_ms >= 0


def test_checksums_differ_per_dialect_and_are_stable() -> None:
    for migration in MIGRATIONS:
        assert migration.checksum("sqlite") == migration.checksum("sqlite")
    assert m0002.MIGRATION.checksum("sqlite") != m0002.MIGRATION.checksum("postgresql")


# --------------------------------------------------------------------------
# Idempotence


def test_upgrade_twice_changes_nothing(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    schema = describe_schema(empty_engine)

    assert upgrade(empty_engine) == []
    assert describe_schema(empty_engine) == schema


@pytest.mark.parametrize("migration", MIGRATIONS, ids=lambda migration: migration.label)
def test_each_migration_function_twice_on_a_migrated_database(
    engine: Engine, migration: Migration
) -> None:
    """Calling a migration again, as a function, neither fails nor changes the schema."""
    schema = describe_schema(engine)
    with engine.begin() as conn:
        assert migration.apply(conn) == []
        assert migration.apply(conn) == []
    assert describe_schema(engine) == schema


def test_phase_functions_are_named_and_idempotent_on_their_own(empty_engine: Engine) -> None:
    with empty_engine.begin() as conn:
        MIGRATIONS[0].apply(conn)
        for _ in range(2):
            m0002.migrate_v08_run_model(conn)
            m0003.migrate_v08_event_run_columns(conn)
    columns = {col["name"] for col in inspect(empty_engine).get_columns("session_runs")}
    assert columns == set(PHASE_RUN_COLUMNS)


# --------------------------------------------------------------------------
# Adoption of a v0.7 database


def test_v07_database_is_adopted_with_every_row_unchanged(empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    sessions_before = _rows(empty_engine, "SELECT * FROM sessions ORDER BY id")
    events_before = _rows(empty_engine, "SELECT * FROM session_events ORDER BY id")
    sequences_before = _rows(empty_engine, "SELECT * FROM session_event_sequences")

    applied = upgrade(empty_engine)

    assert [migration.version for migration in applied] == [m.version for m in MIGRATIONS]
    assert all(migration.notes == () for migration in applied)
    sessions_after = _rows(empty_engine, "SELECT * FROM sessions ORDER BY id")
    for before, after in zip(sessions_before, sessions_after, strict=True):
        for column in ("created_at", "updated_at"):
            assert _same_instant(before.pop(column), after.pop(column)), column
        assert after == before  # includes the v0.7 metadata columns this layer does not use
    events_after = _rows(empty_engine, "SELECT * FROM session_events ORDER BY id")
    for before, after in zip(events_before, events_after, strict=True):
        assert _same_instant(before.pop("created_at"), after.pop("created_at"))
        assert _loaded(after.pop("payload")) == _loaded(before.pop("payload"))
        assert after.pop("run_id") is None and after.pop("event_id") is None
        assert after == before
    sequences_after = _rows(empty_engine, "SELECT * FROM session_event_sequences")
    assert _same_instant(
        sequences_before[0].pop("updated_at"), sequences_after[0].pop("updated_at")
    )
    assert sequences_after == sequences_before


def _loaded(payload: Any) -> Any:
    return json.loads(payload) if isinstance(payload, str) else payload


def test_adopted_events_stay_readable_and_writable(empty_engine: Engine) -> None:
    """Old rows read through the model as aware UTC; plain SQL and the ORM append (native enum)."""
    make_v07_database(empty_engine)
    upgrade(empty_engine)

    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO session_events (session_id, seq, type, payload, source, created_at) "
                "VALUES (:session_id, :seq, :type, :payload, :source, :created_at)"
            ),
            _storable(
                conn,
                {
                    "session_id": "s1",
                    "seq": 3,
                    "type": "raw",
                    "payload": "{}",
                    "source": "task",
                    "created_at": T2,
                },
            ),
        )
    with DbSession(empty_engine) as db:
        db.add(SessionEvent(session_id="s1", seq=4, type="orm", source=EventSource.PLAN))
        db.commit()
        events = db.exec(
            select(SessionEvent).where(SessionEvent.session_id == "s1").order_by(SessionEvent.seq)
        ).all()
    assert [(e.seq, e.source) for e in events] == [
        (1, EventSource.SESSION),
        (2, EventSource.PLAN),
        (3, EventSource.TASK),
        (4, EventSource.PLAN),
    ]
    assert events[0].created_at == T1.replace(tzinfo=UTC)
    assert events[2].created_at == T2.replace(tzinfo=UTC)
    assert events[1].payload == V07_EVENTS[1]["payload"]


def test_adoption_with_duplicate_seqs_keeps_every_row_and_reports(
    empty_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    duplicated = [*V07_EVENTS, {**V07_EVENTS[1], "type": "racing_writer"}]
    make_v07_database(empty_engine, events=duplicated)

    with caplog.at_level(logging.WARNING, logger="migrations"):
        applied = upgrade(empty_engine)

    (note,) = _notes(applied, 8)
    assert "uq_session_events_session_seq was NOT created" in note
    assert "('s1', 2, 2)" in note
    assert note in caplog.text
    assert len(_rows(empty_engine, "SELECT id FROM session_events")) == len(duplicated)
    indexes = {index["name"] for index in inspect(empty_engine).get_indexes("session_events")}
    assert "uq_session_events_session_seq" not in indexes
    assert {"idx_session_event_seq", "uq_session_events_session_event_id"} <= indexes
    recorded = {state.version: state.recorded for state in status(empty_engine)}
    assert recorded[8] is not None and recorded[8].notes == (note,)


# --------------------------------------------------------------------------
# A hand-made session_runs from an early v0.8 build

HAND_MADE_RUNS = {
    "sqlite": "CREATE TABLE session_runs (id VARCHAR PRIMARY KEY, session_id VARCHAR, "
    "status VARCHAR(20), input_message TEXT, created_at DATETIME)",
    "postgresql": "CREATE TABLE session_runs (id VARCHAR PRIMARY KEY, session_id VARCHAR, "
    "status VARCHAR(20), input_message TEXT, created_at TIMESTAMP WITHOUT TIME ZONE)",
}


def _insert_hand_made_runs(engine: Engine, statuses: Sequence[str]) -> None:
    with engine.begin() as conn:
        conn.execute(text(HAND_MADE_RUNS[engine.dialect.name]))
        for index, run_status in enumerate(statuses):
            conn.execute(
                text(
                    "INSERT INTO session_runs (id, session_id, status, input_message, created_at) "
                    "VALUES (:id, 's1', :status, :message, :created_at)"
                ),
                _storable(
                    conn,
                    {
                        "id": f"r{index}",
                        "status": run_status,
                        "message": f"message {index}",
                        "created_at": T1,
                    },
                ),
            )


def test_hand_made_session_runs_is_completed_keeping_its_rows(empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    _insert_hand_made_runs(empty_engine, ["completed", "queued"])

    upgrade(empty_engine)

    inspector = inspect(empty_engine)
    columns = {col["name"]: col["nullable"] for col in inspector.get_columns("session_runs")}
    assert columns == {
        **PHASE_RUN_COLUMNS,
        "waiting_reason": True,
        "options": True,
        "worker_id": True,
        "lease_expires_at": True,
        "attempt": False,
        "run_metadata": False,
    }
    checks = {ck["name"] for ck in inspector.get_check_constraints("session_runs")}
    assert {"ck_session_runs_status", "ck_session_runs_trigger_source"} <= checks
    with DbSession(empty_engine) as db:
        runs = db.exec(select(SessionRun).order_by(SessionRun.id)).all()
        assert [(r.id, r.status, r.input_message, r.trigger_source) for r in runs] == [
            ("r0", RunStatus.COMPLETED, "message 0", TriggerSource.CHAT),
            ("r1", RunStatus.QUEUED, "message 1", TriggerSource.CHAT),
        ]
        assert all(run.created_at == T1.replace(tzinfo=UTC) for run in runs)
        assert all(run.updated_at > T1.replace(tzinfo=UTC) for run in runs)
        # The constraints of the model hold on the adopted table.
        db.add(SessionRun(id="r2", session_id="s1", status=RunStatus.RUNNING))
        db.commit()
    with pytest.raises(IntegrityError, match=r"(?i)check"), empty_engine.begin() as conn:
        conn.execute(text("UPDATE session_runs SET status = 'bogus' WHERE id = 'r0'"))
    with empty_engine.begin() as conn:
        conn.execute(text("DELETE FROM sessions WHERE id = 's1'"))
    assert _rows(empty_engine, "SELECT id FROM session_runs") == []


def test_a_failing_statement_leaves_no_trace_and_a_rerun_succeeds(empty_engine: Engine) -> None:
    """A hand-made row that breaks a CHECK stops 0002 midway; everything of 0002 is rolled back."""
    make_v07_database(empty_engine)
    _insert_hand_made_runs(empty_engine, ["completed", "weird"])
    schema_before = describe_schema(empty_engine)

    with pytest.raises(StatementFailedError) as failure:
        upgrade(empty_engine)

    assert failure.value.migration == "0002_v08_run_model"
    assert "ck_session_runs_status" in str(failure.value) or "CHECK" in str(failure.value)
    assert failure.value.statement in str(failure.value)
    assert [s.version for s in status(empty_engine) if s.state == "applied"] == [1]
    schema_after = describe_schema(empty_engine)
    assert schema_after == schema_before  # no half-made table, column or constraint
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE session_runs SET status = 'failed' WHERE status = 'weird'"))
    upgrade(empty_engine)
    assert all(state.state == "applied" for state in status(empty_engine))


def test_a_failure_in_the_middle_of_a_migration_is_rolled_back(empty_engine: Engine) -> None:
    broken = Migration(
        version=99,
        name="broken",
        summary="creates a table, adds a column, then fails",
        declare=lambda dialect: (
            step("CREATE TABLE half_made (id INTEGER PRIMARY KEY)"),
            step("ALTER TABLE session_events ADD COLUMN half_column VARCHAR"),
            step("INSERT INTO no_such_table (id) VALUES (:id)", params=lambda: {"id": 1}),
        ),
    )
    with pytest.raises(StatementFailedError, match="migration 0099_broken failed") as failure:
        upgrade(empty_engine, migrations=[*MIGRATIONS, broken])

    assert failure.value.statement == "INSERT INTO no_such_table (id) VALUES (:id)"
    inspector = inspect(empty_engine)
    assert not inspector.has_table("half_made")
    assert "half_column" not in {c["name"] for c in inspector.get_columns("session_events")}
    recorded = _rows(empty_engine, "SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in recorded] == [m.version for m in MIGRATIONS]
    assert upgrade(empty_engine) == []


# --------------------------------------------------------------------------
# Extensions on legacy data


def test_several_running_runs_of_a_session_are_resolved_newest_first(empty_engine: Engine) -> None:
    upgrade(empty_engine, migrations=MIGRATIONS[:5])
    runs = [  # (id, session, created_at)
        ("a-old", "s1", datetime(2024, 1, 1, 9, 0)),
        ("b-new", "s1", datetime(2024, 1, 1, 10, 0)),
        ("a-tie", "s1", datetime(2024, 1, 1, 10, 0)),  # same time as b-new, lower id
        ("c-only", "s2", datetime(2024, 1, 1, 8, 0)),
    ]
    with empty_engine.begin() as conn:
        for session_id in ("s1", "s2"):
            conn.execute(
                text("INSERT INTO sessions (id, title) VALUES (:id, :title)"),
                {"id": session_id, "title": session_id},
            )
        for run_id, session_id, created in runs:
            conn.execute(
                text(
                    "INSERT INTO session_runs (id, session_id, trigger_source, status, "
                    "created_at, updated_at) VALUES (:id, :session_id, 'chat', 'running', "
                    ":created_at, :created_at)"
                ),
                _storable(
                    conn,
                    {
                        "id": run_id,
                        "session_id": session_id,
                        "created_at": created.replace(tzinfo=UTC),
                    },
                ),
            )

    applied = upgrade(empty_engine)

    (note,) = _notes(applied, 6)
    assert "2 runs were running alongside a newer running run" in note
    assert "('a-old', 's1')" in note and "('a-tie', 's1')" in note
    with DbSession(empty_engine) as db:
        result = {r.id: r for r in db.exec(select(SessionRun))}
    assert {run_id: run.status for run_id, run in result.items()} == {
        "a-old": RunStatus.FAILED,
        "a-tie": RunStatus.FAILED,
        "b-new": RunStatus.RUNNING,
        "c-only": RunStatus.RUNNING,
    }
    for run_id in ("a-old", "a-tie"):
        assert result[run_id].latest_error is not None
        assert result[run_id].latest_error["code"] == "superseded_running_run"
        assert result[run_id].finished_at is not None
    with pytest.raises(IntegrityError, match=r"(?i)unique"), empty_engine.begin() as conn:
        conn.execute(text("UPDATE session_runs SET status = 'running' WHERE id = 'a-old'"))


def test_duplicate_event_ids_skip_their_index_and_are_reported(empty_engine: Engine) -> None:
    upgrade(empty_engine, migrations=MIGRATIONS[:6])
    make_rows = [("s1", 1, "e-1"), ("s1", 2, "e-1"), ("s1", 3, None), ("s1", 4, None)]
    with empty_engine.begin() as conn:
        conn.execute(text("INSERT INTO sessions (id, title) VALUES ('s1', 't')"))
        for session_id, seq, event_id in make_rows:
            conn.execute(
                text(
                    "INSERT INTO session_events (session_id, seq, type, source, event_id) "
                    "VALUES (:session_id, :seq, 'x', 'session', :event_id)"
                ),
                {"session_id": session_id, "seq": seq, "event_id": event_id},
            )

    applied = upgrade(empty_engine)

    (note,) = _notes(applied, 7)
    assert "uq_session_events_session_event_id was NOT created" in note
    assert "('s1', 'e-1', 2)" in note
    assert _notes(applied, 8) == ()  # seqs are unique, so that index was made
    assert len(_rows(empty_engine, "SELECT id FROM session_events")) == 4


# --------------------------------------------------------------------------
# Changed migrations and the lock


def test_a_changed_migration_is_refused_unless_allowed(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE schema_migrations SET checksum = 'old' WHERE version = 3"))
    changed = [state.version for state in status(empty_engine) if state.state == "changed"]
    assert changed == [3]

    with pytest.raises(Exception, match=r"0003_v08_event_run_columns \(recorded old"):
        upgrade(empty_engine)
    assert upgrade(empty_engine, allow_changed=True) == []
    assert all(state.state == "applied" for state in status(empty_engine))


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_write_lock_held_elsewhere_times_out(empty_engine: Engine) -> None:
    with empty_engine.connect() as holder, holder.begin():
        holder.execute(text("CREATE TABLE holder (x INTEGER)"))
        with pytest.raises(MigrationLockTimeoutError, match="SQLite write lock"):
            upgrade(empty_engine, lock_timeout=0.5)
