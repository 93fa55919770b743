"""The repositories' direct driver path (``app.repositories._driver``) on both backends.

It must send what SQLAlchemy would send, read back the same values, be taken
only where nothing observes SQLAlchemy's execution, and fail as SQLAlchemy
fails (wrapped errors, domain errors, lost connections invalidated). The failure
tests run with the fast paths on and off (``tests.fast_paths``); off, no statement
takes the driver path.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session as DbSession

from app.capture import capture_statements
from app.errors import DataLayerError
from app.models import ChatSession, RunStatus, SessionRun
from app.repositories import EventRepository, RunRepository, _driver, set_fast_paths
from app.repositories._driver import execute_core
from app.repositories.events import OVERLAP_MIN_EVENTS, NewEvent
from app.types import utc_now
from tests.factories import SessionFactory
from tests.fast_paths import both_ways, fast_paths  # noqa: F401 (the fixture)

RUNS = SessionRun.__table__


def _workout(db: DbSession) -> None:
    """Every kind of statement the repositories send: writes, reads, keyed and batched."""
    runs, events = RunRepository(db), EventRepository(db)
    chat = ChatSession(title="workout")
    db.add(chat)
    db.flush()
    first = runs.create({"session_id": chat.id, "message": "one"}, idempotency_key="k")
    runs.create({"session_id": chat.id, "message": "one"}, idempotency_key="k")  # replay
    runs.start(first.id)
    events.append(chat.id, "task_progress", {"step": 1, "note": "é"}, run_id=first.id)
    events.append(chat.id, "task_progress", {"step": 1}, run_id=first.id, event_id="e-1")
    events.append(chat.id, "task_progress", {"step": 1}, run_id=first.id, event_id="e-1")
    events.append_many(
        chat.id,
        [NewEvent("verify", {"page": 2}, run_id=first.id, event_id="e-2"), NewEvent("note")],
    )
    runs.wait_for_input(first.id, "which colour?")
    runs.resume(first.id, {"user_feedback": "blue"}, idempotency_key="r")
    runs.update_metrics(first.id, {"tokens": 12})
    runs.complete(first.id, {"cost": 0.5})
    second = runs.create({"session_id": chat.id, "message": "two"})
    assert runs.claim_next("worker-a", lease=timedelta(minutes=1)).id == second.id
    runs.heartbeat(second.id, worker_id="worker-a")
    runs.fail(second.id, {"code": "boom", "message": "broken"})
    third = runs.create({"session_id": chat.id, "message": "three"}, multitask_strategy="reject")
    fourth = runs.create({"session_id": chat.id, "message": "four"}, multitask_strategy="interrupt")
    runs.cancel(fourth.id)  # nothing queued is left for the next workout's claim
    runs.get(third.id)
    runs.list_for_session(chat.id, limit=10)
    runs.list_by_status(RunStatus.QUEUED, limit=10)
    events.list_for_session(chat.id, since_seq=1)
    events.list_for_run(first.id)
    runs.purge_idempotency_keys()


class _Compared:
    """Each execution of a planned statement is first run through SQLAlchemy in a
    savepoint (then undone) and compared with what the plan sends and reads."""

    def __init__(self) -> None:
        self.executed: set[int] = set()
        self.statements: set[int] = set()

    def execute(
        self, connection: Connection, statement: Any, params: dict[str, Any], work: Any = None
    ) -> Any:
        self.executed.add(id(statement))
        plan = _driver._plans(connection.dialect).get(id(statement))
        if plan is None:
            return _original_execute(connection, statement, params, work)
        sent: list[tuple[str, Any]] = []

        def record(_conn: Any, _cursor: Any, sql: str, parameters: Any, *_: Any) -> None:
            sent.append((sql, parameters))

        savepoint = connection.begin_nested()
        event.listen(connection, "before_cursor_execute", record)
        try:
            expected, _ = _original_execute(connection, statement, params, None)
        finally:
            event.remove(connection, "before_cursor_execute", record)
            savepoint.rollback()
        ((sql, arguments),) = sent
        assert (plan.sql, _plain(plan.arguments(params))) == (sql, _plain(arguments))
        actual, done = _original_execute(connection, statement, params, work)
        assert _comparable(plan, actual.rows) == _comparable(plan, expected.rows)
        _same_times(actual.rows, expected.rows)
        self.statements.add(id(statement))
        return actual, done


_original_execute = _driver._execute


def _execute_on(connection: Connection, statement: Any, values: dict[str, Any]) -> _driver.Rows:
    """One statement on ``connection``, all rows fetched, through its plan when it has one."""
    return _original_execute(connection, statement, values, None)[0]


def _plain(arguments: Any) -> Any:
    """Driver parameters as comparable values (psycopg's Jsonb wrappers by content)."""
    values = arguments.items() if isinstance(arguments, dict) else enumerate(arguments)
    return {key: getattr(value, "obj", value) for key, value in values}


_NEW_IDS = frozenset({"id", "event_row_id"})
"""Columns holding a new event's id: PostgreSQL does not give back sequence values
taken in a rolled-back savepoint, so both executions differ there."""


def _comparable(plan: _driver.Plan, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Values with their types (a StrEnum member equals its text); a timestamp by its type
    and time zone only (``_same_times`` compares the values)."""
    masked = [index for index, name in enumerate(plan.columns) if name in _NEW_IDS]
    return [
        tuple(
            None
            if index in masked and isinstance(value, int)
            else (datetime, value.tzinfo)
            if isinstance(value, datetime)
            else (type(value), value)
            for index, value in enumerate(row)
        )
        for row in rows
    ]


def _same_times(actual: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    """Timestamps the statement wrote come from the database's clock, read by each of the
    two executions: they agree to within the time between them (stored ones exactly)."""
    for row, other in zip(actual, expected, strict=True):
        for value, reference in zip(row, other, strict=True):
            if isinstance(value, datetime):
                assert abs(value - reference) < timedelta(seconds=5), (value, reference)


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Compared]:
    comparison = _Compared()
    monkeypatch.setattr(_driver, "_execute", comparison.execute)
    yield comparison


def test_the_driver_path_sends_and_reads_what_sqlalchemy_does(
    db: DbSession, compared: _Compared
) -> None:
    _workout(db)  # the first execution of each statement makes its plan
    compared.executed.clear()
    _workout(db)  # every later one is compared
    unplanned = compared.executed - compared.statements
    assert not unplanned, [str(s) for s in gc.get_objects() if id(s) in unplanned][:3]
    assert len(compared.statements) >= 18


def test_after_the_first_execution_sqlalchemy_executes_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DbSession(engine) as db:
        _workout(db)
        db.commit()

    def refuse(*_args: Any) -> Any:
        raise AssertionError("a planned statement went through SQLAlchemy's execution")

    monkeypatch.setattr(_driver, "_through_sqlalchemy", refuse)
    with DbSession(engine) as db:
        _workout(db)
        db.commit()


def test_listeners_and_echo_see_every_statement(engine: Engine) -> None:
    """A plan does not hide statements from instrumentation: with a cursor listener
    (here the statement capture) or echo on, SQLAlchemy executes them."""
    with DbSession(engine, expire_on_commit=False) as db:
        _workout(db)  # plans made
        chat = ChatSession(title="listened")
        db.add(chat)
        run = RunRepository(db).create({"session_id": chat.id, "message": "hi"})
        db.commit()
    expected = 1 if engine.dialect.name == "postgresql" else 3  # the run, its counter, its event
    with capture_statements(engine) as capture, DbSession(engine) as db:
        RunRepository(db).start(run.id)
        db.commit()
    assert len(capture.statements) == expected
    with DbSession(engine) as db:
        connection = db.connection()
        assert _driver._direct(connection)
        assert not _driver._direct(connection.execution_options(stream_results=True))
        engine.echo = True
        try:
            assert not _driver._direct(db.connection())
        finally:
            engine.echo = False


@both_ways
def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(db: DbSession) -> None:
    chat = SessionFactory()
    statement = insert(RUNS)
    values = {
        "id": "dup",
        "session_id": chat.id,
        "status": RunStatus.QUEUED,
        "trigger_source": "chat",
        "input_message": "m",
        "options": {},
        "checkpoint_thread": "t",
        "created_at": utc_now(),
        "updated_at": utc_now(),
    }
    connection = db.connection()
    savepoint = connection.begin_nested()
    _execute_on(connection, statement, values)  # through SQLAlchemy: makes the plan
    plan = _driver._plans(connection.dialect).get(id(statement))
    assert (plan is not None) is _driver.fast_paths()
    with pytest.raises(IntegrityError) as caught:
        _execute_on(connection, statement, values)  # the driver path, when on
    assert caught.value.orig is not None
    savepoint.rollback()

    missing = {**values, "id": "other", "session_id": "no-such-session"}
    savepoint = connection.begin_nested()
    with pytest.raises(DataLayerError, match="no-such-session"):  # SQLite cannot say which
        execute_core(db, statement, missing)
    savepoint.rollback()


@both_ways
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_lost_connection_is_invalidated_on_the_driver_path(engine: Engine) -> None:
    with DbSession(engine) as db:
        RunRepository(db).get_or_none("warm")  # makes the plan
        connection = db.connection()
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with engine.connect() as killer:
            killer.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(OperationalError) as caught:
            RunRepository(db).get_or_none("gone")
        assert caught.value.connection_invalidated
        assert connection.invalidated
        db.rollback()
    with DbSession(engine) as db:  # the pool hands out a working connection
        assert RunRepository(db).get_or_none("gone") is None


def test_plans_are_made_only_for_what_can_be_replayed(db: DbSession) -> None:
    connection = db.connection()
    expanding = select(RUNS.c.id).where(RUNS.c.id.in_(["a", "b"]))
    _execute_on(connection, expanding, {})
    assert _driver._plans(connection.dialect)[id(expanding)] is None
    assert _execute_on(connection, expanding, {}).rows == []


@both_ways
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_lost_connection_during_an_overlapped_batch_is_invalidated(engine: Engine) -> None:
    """``execute_overlapped`` (pipeline mode) fails as the plain driver path does."""
    batch = [NewEvent("step", {"i": i}) for i in range(OVERLAP_MIN_EVENTS)]
    with DbSession(engine, expire_on_commit=False) as db:
        chat = ChatSession(title="overlap")
        db.add(chat)
        db.commit()
        chat_id = chat.id
        EventRepository(db).append_many(chat_id, batch)  # makes the plan
        db.commit()
        connection = db.connection()
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with engine.connect() as killer:
            killer.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(OperationalError) as caught:
            EventRepository(db).append_many(chat_id, batch)
        assert caught.value.connection_invalidated and connection.invalidated
        db.rollback()
    with DbSession(engine) as db:
        assert len(EventRepository(db).append_many(chat_id, batch)) == OVERLAP_MIN_EVENTS
        db.commit()


def test_with_the_fast_paths_off_every_statement_goes_through_sqlalchemy(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    executed: list[int] = []
    through: list[int] = []
    execute, through_sqlalchemy = _driver._execute, _driver._through_sqlalchemy

    def counted(connection: Connection, statement: Any, *args: Any) -> Any:
        executed.append(id(statement))
        return execute(connection, statement, *args)

    def counted_through(connection: Connection, statement: Any, params: Any) -> Any:
        through.append(id(statement))
        return through_sqlalchemy(connection, statement, params)

    monkeypatch.setattr(_driver, "_execute", counted)
    monkeypatch.setattr(_driver, "_through_sqlalchemy", counted_through)
    previous = set_fast_paths(False)
    try:
        for _ in range(2):  # the second time is when plans would be taken
            with DbSession(engine) as db:
                _workout(db)
                db.commit()
    finally:
        set_fast_paths(previous)
    assert len(executed) >= 2 * 18
    assert through == executed
    assert _driver._plans(engine.dialect) == {}  # none made, none to go stale

    with DbSession(engine) as db:  # switched back on: plans are made again
        _workout(db)
        db.commit()
    assert sum(plan is not None for plan in _driver._plans(engine.dialect).values()) >= 18


@pytest.mark.slow  # Python processes
def test_the_switch_is_read_from_the_environment_once() -> None:
    def switch(value: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != _driver.FAST_PATHS}
        if value is not None:
            env[_driver.FAST_PATHS] = value
        code = "from app.repositories import fast_paths; print(fast_paths())"
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        return done.stdout.strip() or done.stderr.strip().splitlines()[-1]

    assert [switch(None), switch("1"), switch("0")] == ["True", "True", "False"]
    assert switch("off") == (
        "ValueError: RUN_LAYER_FAST_PATHS must be 0 (off) or 1 (on), got 'off'"
    )
