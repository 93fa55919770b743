"""The read path outside the ORM Session (``app.repositories.reads``), on both backends.

Every response must equal what the repositories give validated into the same schema
(``RunResponse.model_validate(RunRepository(db).get(run_id))`` and the like), for
ordinary, legacy and odd rows; errors must be the repositories' own. SQLite reads
must not wait for a writer; PostgreSQL reads take one round trip and leave the
pooled connection as they found it; many readers beside writers see whole rows
and contiguous pages. Real databases, real threads.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError, field_validator
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session as DbSession
from sqlmodel import SQLModel

from app.capture import capture_statements
from app.db import create_db_engine, unit_of_work
from app.errors import BadParameterError, DataLayerError, RunNotFoundError
from app.models import EventSource, RunStatus, SessionEvent, TriggerSource
from app.repositories import EventReads, EventRepository, RunReads, RunRepository
from app.repositories import events as event_statements
from app.repositories._driver import _PLANS, _plans
from app.repositories._run_statements import run_statements
from app.repositories.reads import _fast_fields, page
from app.repositories.runs import RUN_COLUMNS
from app.schemas import EventPage, EventResponse, RunResponse
from tests.concurrency import seed
from tests.factories import SessionEventFactory, SessionFactory, SessionRunFactory
from tests.fast_paths import both_ways, fast_paths  # noqa: F401 (the fixture)

SQL_DIR = Path(__file__).resolve().parents[2] / "docs" / "sql"
NOW = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


# --------------------------------------------------------------------------
# Seeds: ordinary, legacy and odd rows


ODD_JSON: list[dict[str, Any] | None] = [
    None,
    {},
    {"tokens": 1843, "cost_usd": 0.0123, "ok": True, "none": None},
    {"nested": {"deep": {"deeper": [1, 2.5, "three", None, {"x": []}]}}},
    {"unicode": "déjà vu ✓ 中文", "quote": 'a "b" \\ c', "newline": "a\nb"},
    {"big": 2**63 - 1, "small": -(2**63), "float": 1e15, "neg": -0.5},
    {"code": "tool_error", "message": "renderer crashed", "retryable": False},
]


def _seed_runs(session: DbSession, count: int, rng: random.Random) -> tuple[str, list[str]]:
    """``count`` runs of one session, each status, odd JSON and timestamps."""
    chat = SessionFactory()
    ids = []
    for index in range(count):
        status = list(RunStatus)[index % len(RunStatus)]
        started = NOW + timedelta(seconds=index) if status != RunStatus.QUEUED else None
        finished = (
            NOW + timedelta(minutes=index)
            if status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
            else None
        )
        one_running = status != RunStatus.RUNNING or index < len(RunStatus)
        run = SessionRunFactory(
            session=chat if one_running else SessionFactory(),  # one running run a session
            status=status,
            trigger_source=rng.choice(list(TriggerSource)),
            started_at=started,
            finished_at=finished,
            latest_error=rng.choice(ODD_JSON),
            metrics=rng.choice(ODD_JSON),
            options=rng.choice([None, {"generate_now": True, "target_pages": ["a", "b"]}]),
            resume_payload=rng.choice(ODD_JSON),
            checkpoint_ns=rng.choice([None, "", "ns-1"]),
            checkpoint_thread=rng.choice([None, f"{chat.id}:{index}"]),
            waiting_reason="which palette?" if status == RunStatus.WAITING_INPUT else None,
            worker_id=rng.choice([None, "worker-1"]),
            lease_expires_at=rng.choice([None, NOW + timedelta(minutes=5)]),
            created_at=NOW + timedelta(microseconds=rng.randrange(10**9)),
        )
        ids.append(run.id)
    session.commit()
    return chat.id, ids


def _legacy_runs(engine: Engine, session_id: str) -> list[str]:
    """Runs as raw SQL leaves them: server defaults, NULLs, other timestamp spellings."""
    spellings = (
        ["2024-05-01 10:00:00", "2024-05-01 10:00:00.5", "2024-05-01T10:00:00.123456"]
        if engine.dialect.name == "sqlite"
        else ["2024-05-01 10:00:00", "2024-05-01 10:00:00.5+02:00", "2024-05-01T10:00:00.123456Z"]
    )
    ids = []
    with engine.begin() as conn:
        for index, spelling in enumerate(spellings):
            run_id = f"legacy-{session_id}-{index}"
            conn.execute(
                text(
                    "INSERT INTO session_runs (id, session_id, trigger_source, created_at, "
                    "updated_at, started_at) VALUES (:id, :sid, 'chat', :at, :at, :at)"
                ),
                {"id": run_id, "sid": session_id, "at": spelling},
            )
            ids.append(run_id)
    return ids


def _reference_run(engine: Engine, run_id: str) -> RunResponse:
    with unit_of_work(engine, readonly=True) as db:
        return RunResponse.model_validate(RunRepository(db).get(run_id))


def _same(mine: SQLModel, reference: SQLModel) -> None:
    """Equal as models, in their JSON, in the fields set, and in every attribute slot."""
    assert type(mine) is type(reference)
    assert mine == reference
    assert mine.model_dump_json() == reference.model_dump_json()
    assert mine.__pydantic_fields_set__ == reference.__pydantic_fields_set__
    assert mine.__pydantic_extra__ == reference.__pydantic_extra__
    assert mine.__pydantic_private__ == reference.__pydantic_private__
    assert {k: type(v) for k, v in vars(mine).items()} == {
        k: type(v) for k, v in vars(reference).items()
    }


def _same_list(mine: list[Any], reference: list[Any]) -> None:
    assert len(mine) == len(reference)
    for left, right in zip(mine, reference, strict=True):
        _same(left, right)


# --------------------------------------------------------------------------
# Equality with the repositories


@both_ways
def test_get_equals_the_repository_response_for_many_odd_and_legacy_runs(
    engine: Engine, session: DbSession
) -> None:
    session_id, ids = _seed_runs(session, 60, random.Random(14))
    ids += _legacy_runs(engine, session_id)
    reads = RunReads.of(engine)
    for _ in range(2):  # the first call of a statement takes SQLAlchemy's path, then the driver's
        for run_id in ids:
            _same(reads.get(run_id), _reference_run(engine, run_id))
    assert reads.get_or_none("no-such-run") is None


@both_ways
def test_run_lists_equal_the_repository_lists(engine: Engine, session: DbSession) -> None:
    session_id, ids = _seed_runs(session, 40, random.Random(21))
    _legacy_runs(engine, session_id)
    reads = RunReads.of(engine)
    with unit_of_work(engine, readonly=True) as db:
        runs = RunRepository(db)
        cases: list[tuple[Callable[..., list[Any]], Callable[..., list[Any]], dict[str, Any]]] = [
            (runs.list_for_session, reads.list_for_session, {"limit": 1000}),
            (runs.list_for_session, reads.list_for_session, {"limit": 7}),
            (runs.list_for_session, reads.list_for_session, {"limit": 5, "before": ids[10]}),
            (runs.list_for_session, reads.list_for_session, {"status": "running", "limit": 50}),
            (
                runs.list_for_session,
                reads.list_for_session,
                {"status": RunStatus.QUEUED, "limit": 3, "before": ids[12]},
            ),
        ]
        for repository_call, read_call, kwargs in cases:
            for _ in range(2):
                expected = [
                    RunResponse.model_validate(run) for run in repository_call(session_id, **kwargs)
                ]
                _same_list(read_call(session_id, **kwargs), expected)
        for status in RunStatus:
            expected = [
                RunResponse.model_validate(run) for run in runs.list_by_status(status, limit=1000)
            ]
            _same_list(reads.list_by_status(status, limit=1000), expected)


def _seed_events(session: DbSession, rng: random.Random) -> tuple[str, str, str]:
    """A session with two runs' events and legacy ones (no run, NULL payload), odd payloads."""
    chat = SessionFactory()
    first, second = SessionRunFactory(session=chat), SessionRunFactory(session=chat)
    for seq in range(1, 151):
        SessionEventFactory(
            session=chat,
            seq=seq,
            type=rng.choice(["message", "task_progress", "run_started", "verify_pass"]),
            payload=rng.choice(ODD_JSON),
            source=rng.choice(list(EventSource)),
            run_id=rng.choice([None, first.id, second.id]),
            event_id=rng.choice([None, f"evt-{seq}"]),
            created_at=NOW + timedelta(seconds=seq),
        )
    session.commit()
    return chat.id, first.id, second.id


@both_ways
def test_event_pages_equal_the_repository_pages(engine: Engine, session: DbSession) -> None:
    session_id, first, second = _seed_events(session, random.Random(7))
    reads = EventReads.of(engine)
    with unit_of_work(engine, readonly=True) as db:
        events = EventRepository(db)
        for since_seq, limit in ((0, 100), (0, 1000), (37, 10), (149, 100), (150, 5), (500, 1)):
            for _ in range(2):
                for run_id in (first, second):
                    stored = events.list_for_run(run_id, since_seq=since_seq, limit=limit)
                    expected = EventPage.of(stored, since_seq)
                    _same(reads.page_for_run(run_id, since_seq=since_seq, limit=limit), expected)
                    _same_list(
                        reads.list_for_run(run_id, since_seq=since_seq, limit=limit),
                        expected.items,
                    )
                stored = events.list_for_session(session_id, since_seq=since_seq, limit=limit)
                expected = EventPage.of(stored, since_seq)
                _same(
                    reads.page_for_session(session_id, since_seq=since_seq, limit=limit), expected
                )
                _same_list(
                    reads.list_for_session(session_id, since_seq=since_seq, limit=limit),
                    expected.items,
                )
    assert reads.list_for_session("no-such-session") == []


@both_ways
def test_an_event_with_no_timestamp_fails_as_validating_the_repository_event_does(
    engine: Engine, session: DbSession
) -> None:
    """A v0.7 row with ``created_at`` NULL cannot be an ``EventResponse``: both ways
    raise the same validation error (the read path validates a row it cannot take as is)."""
    chat = SessionFactory()
    run = SessionRunFactory(session=chat)
    session.commit()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO session_events (session_id, seq, type, payload, source, run_id) "
                "VALUES (:sid, 1, 'old', NULL, 'session', :rid)"
            ),
            {"sid": chat.id, "rid": run.id},
        )
    with unit_of_work(engine, readonly=True) as db:
        (event,) = EventRepository(db).list_for_run(run.id)
    with pytest.raises(ValidationError) as reference:
        EventResponse.model_validate(event)
    for _ in range(2):
        with pytest.raises(ValidationError) as mine:
            EventReads.of(engine).list_for_run(run.id)
        assert _problems(mine.value) == _problems(reference.value)


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    return [(problem["type"], problem["msg"]) for problem in error.errors()]


def test_stored_rows_skip_validation_and_odd_ones_are_validated(
    engine: Engine, session: DbSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows whose values have the schema's own types are taken as they are; a row with
    anything else (here a JSON array where an object belongs) is validated and refused,
    as the repository refuses to load it (a ``ValueError`` both: the repository's from
    the JSON tracking, the read path's from validation, a ``ValidationError``)."""
    session_id, ids = _seed_runs(session, 12, random.Random(3))
    reads = RunReads.of(engine)
    reads.get(ids[0])  # the statement's plan
    validated: list[Any] = []
    original = RunResponse.model_validate.__func__  # type: ignore[attr-defined]

    def counting(cls: type[RunResponse], obj: Any, **kwargs: Any) -> RunResponse:
        validated.append(obj)
        return original(cls, obj, **kwargs)

    monkeypatch.setattr(RunResponse, "model_validate", classmethod(counting))
    for run_id in ids:
        reads.get(run_id)
    reads.list_for_session(session_id, limit=100)
    assert validated == []

    with engine.begin() as conn:
        conn.execute(
            text("UPDATE session_runs SET metrics = :m WHERE id = :id"),
            {"m": "[1, 2]", "id": ids[1]},
        )
    with pytest.raises(ValueError, match="metrics"):
        _reference_run(engine, ids[1])
    with pytest.raises(ValidationError, match="metrics"):
        reads.get(ids[1])
    assert len(validated) == 1


# --------------------------------------------------------------------------
# Errors


def _error_of(call: Callable[[], object]) -> tuple[type[BaseException], str] | None:
    try:
        call()
    except DataLayerError as exc:
        return type(exc), str(exc)
    return None


@both_ways
def test_bad_arguments_and_unknown_rows_raise_what_the_repositories_raise(
    engine: Engine, session: DbSession
) -> None:
    session_id, ids = _seed_runs(session, 4, random.Random(5))
    _other_id, other_ids = _seed_runs(session, 1, random.Random(6))
    runs, events = RunReads.of(engine), EventReads.of(engine)
    cases: list[tuple[Callable[[Any, Any], object], str]] = [
        (lambda r, _e: r.get("missing"), "get, unknown"),
        (lambda r, _e: r.get(""), "get, empty"),
        (lambda r, _e: r.get(7), "get, not a str"),
        (lambda r, _e: r.get("a\x00b"), "get, NUL"),
        (lambda r, _e: r.list_for_session(session_id, limit=0), "limit 0"),
        (lambda r, _e: r.list_for_session(session_id, limit=1001), "limit 1001"),
        (lambda r, _e: r.list_for_session(session_id, status="bogus"), "status"),
        (lambda r, _e: r.list_for_session(session_id, before="missing"), "before unknown"),
        (lambda r, _e: r.list_for_session(session_id, before=other_ids[0]), "before elsewhere"),
        (lambda r, _e: r.list_by_status("bogus", limit=5), "by status"),
        (lambda _r, e: e.list_for_run("missing"), "events of an unknown run"),
        (lambda _r, e: e.list_for_run(ids[0], since_seq=-1), "since_seq -1"),
        (lambda _r, e: e.list_for_run(ids[0], since_seq=2**31), "since_seq 2**31"),
        (lambda _r, e: e.list_for_run(ids[0], since_seq=True), "since_seq bool"),
        (lambda _r, e: e.list_for_session(session_id, limit="5"), "limit str"),
        (lambda _r, e: e.list_for_session("", limit=5), "session empty"),
    ]
    for call, label in cases:
        with unit_of_work(engine, readonly=True) as db:
            expected = _error_of(lambda: call(RunRepository(db), EventRepository(db)))  # noqa: B023
        assert expected is not None, label
        assert _error_of(lambda: call(runs, events)) == expected, label  # noqa: B023
    with pytest.raises(RunNotFoundError):
        runs.get("missing")
    with pytest.raises(BadParameterError, match="before"):
        runs.list_for_session(session_id, before=other_ids[0])


def test_a_database_that_cannot_be_opened_raises_what_a_session_raises(
    backend: str, engine: Engine, database_url: str
) -> None:
    """Both paths: SQLAlchemy's (no plan yet), and the driver's (the plans of a working
    engine of the same dialect handed over, so the read goes straight to the pool)."""
    if backend == "sqlite":
        url = "sqlite:////nonexistent-folder/for/this/test/runs.db"
    else:
        url = make_url(database_url).set(port=1).render_as_string(hide_password=False)
    RunReads.of(engine).get_or_none("any")  # the working engine's plan of the statement
    for handed_over in (False, True):
        unreachable = create_db_engine(url)
        if handed_over:
            unreachable.dialect.__dict__[_PLANS] = engine.dialect.__dict__[_PLANS]
        try:
            with pytest.raises(OperationalError) as reference, unit_of_work(unreachable) as db:
                RunRepository(db).get("any")
            with pytest.raises(OperationalError) as mine:
                RunReads.of(unreachable).get("any")
            assert type(mine.value) is type(reference.value)
            assert type(mine.value.orig) is type(reference.value.orig)
            assert RunReads.of(unreachable)._by_id._plan is (  # noqa: SLF001 contract test of the read path
                _plans(engine.dialect)[id(run_statements(backend).by_id)] if handed_over else None
            )
        finally:
            unreachable.dispose()


def _kill_pooled_connections(engine: Engine, count: int) -> None:
    """Check ``count`` connections out and in, then terminate their server processes."""
    held = [engine.connect() for _ in range(count)]
    pids = [conn.execute(text("SELECT pg_backend_pid()")).scalar_one() for conn in held]
    for conn in held:
        conn.close()
    killer = create_db_engine(engine.url, isolation_level="AUTOCOMMIT")
    try:
        with killer.connect() as conn:
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        killer.dispose()


@both_ways
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_lost_connection_fails_as_in_the_repositories_then_the_pool_heals(
    engine: Engine, session: DbSession, backend: str
) -> None:
    _session_id, ids = _seed_runs(session, 2, random.Random(8))
    session.close()
    reads = RunReads.of(engine)
    expected = reads.get(ids[0])  # the plan exists: the next read goes to the driver

    _kill_pooled_connections(engine, 3)
    with pytest.raises(DBAPIError) as reference, unit_of_work(engine, readonly=True) as db:
        RunRepository(db).get(ids[0])
    assert reference.value.connection_invalidated

    _kill_pooled_connections(engine, 3)
    with pytest.raises(DBAPIError) as mine:
        reads.get(ids[0])
    assert mine.value.connection_invalidated
    assert type(mine.value) is type(reference.value)
    assert type(mine.value.orig) is type(reference.value.orig)
    for _ in range(4):  # every older pooled connection was discarded with it
        assert reads.get(ids[0]) == expected


@both_ways
@pytest.mark.parametrize("backend", ["postgresql"])
def test_connections_killed_while_idle_are_replaced_by_the_checkout_ping(
    engine: Engine,
    session: DbSession,
    database_url: str,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read path checks out through the pool's own events: a connection idle past
    DB_POOL_PING_AFTER_IDLE is pinged (psycopg's ping switches autocommit on and off as
    the read does) and replaced, and the read never sees the dead one."""
    _session_id, ids = _seed_runs(session, 1, random.Random(13))
    session.close()
    monkeypatch.setenv("DB_POOL_PING_AFTER_IDLE", "0.2")
    pinging = create_db_engine(database_url)
    try:
        reads = RunReads.of(pinging)
        expected = reads.get(ids[0])
        _kill_pooled_connections(pinging, 3)
        time.sleep(0.3)
        for _ in range(3):
            assert reads.get(ids[0]) == expected
    finally:
        pinging.dispose()


# --------------------------------------------------------------------------
# Transactions and connections


@both_ways
@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_reads_complete_while_another_connection_holds_the_write_lock(
    engine: Engine, session: DbSession, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    session_id, ids = _seed_runs(session, 3, random.Random(9))
    session.close()
    monkeypatch.setenv("SQLITE_BUSY_TIMEOUT_MS", "3000")
    fresh = create_db_engine(engine.url)  # no plans yet: its first reads take SQLAlchemy's path
    holder = sqlite3.connect(str(engine.url.database), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO sessions (id, title) VALUES ('uncommitted', 'held')")
        monkeypatch.setenv("SQLITE_BUSY_TIMEOUT_MS", "100")
        impatient = create_db_engine(engine.url)
        try:  # the lock is really held: a writer cannot get it
            with pytest.raises(OperationalError, match="locked"), unit_of_work(impatient) as db:
                RunRepository(db).cancel(ids[0])
        finally:
            impatient.dispose()
        for _ in range(3):  # SQLAlchemy's path (BEGIN DEFERRED), then the driver's
            started = time.monotonic()
            assert RunReads.of(fresh).get(ids[0]).run_id == ids[0]
            assert len(RunReads.of(fresh).list_for_session(session_id)) == 3
            assert EventReads.of(fresh).list_for_run(ids[0]) == []
            assert EventReads.of(fresh).list_for_session("uncommitted") == []
            assert time.monotonic() - started < 1.0  # the busy timeout is 3 s
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        fresh.dispose()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_reads_take_one_round_trip_and_leave_no_state(
    backend: str, database_url: str, engine: Engine, session: DbSession
) -> None:
    """With a pool of one connection: each read is one protocol round trip (no BEGIN,
    no ROLLBACK; libpq's trace counts ReadyForQuery), the connection goes back idle with
    autocommit off, and the next unit of work on it is a real transaction."""
    session_id, ids = _seed_runs(session, 3, random.Random(10))
    session.close()
    single = create_db_engine(database_url, pool_size=1, max_overflow=0)
    runs, events = RunReads.of(single), EventReads.of(single)
    calls: list[Callable[[], object]] = [
        lambda: runs.get(ids[0]),
        lambda: runs.list_for_session(session_id),
        lambda: events.page_for_run(ids[0]),  # empty page: a second statement (RUN_EXISTS)
        lambda: events.list_for_session(session_id),
    ]
    try:
        for call in calls:
            call()  # the plans
        with tempfile.TemporaryFile("w+") as trace:
            pooled = single.raw_connection()
            pgconn = pooled.driver_connection.pgconn  # type: ignore[union-attr]
            pgconn.trace(trace.fileno())
            pooled.close()
            try:
                for call in calls:
                    call()
            finally:
                pooled = single.raw_connection()
                pgconn.untrace()
                driver: Any = pooled.driver_connection
                assert driver.autocommit is False
                assert driver.info.transaction_status.name == "IDLE"
                pooled.close()
            trace.seek(0)
            lines = trace.read().splitlines()
        sent = [line for line in lines if "\tQuery\t" in line or "\tParse\t" in line]
        ready = [line for line in lines if "\tReadyForQuery\t" in line]
        assert not [line for line in sent if "BEGIN" in line or "ROLLBACK" in line], sent
        assert len(ready) == 5, lines  # 4 reads, one of them with its RUN_EXISTS
        assert all(line.endswith("I") for line in ready), ready  # never inside a transaction

        with pytest.raises(RuntimeError), unit_of_work(single) as db:
            db.execute(text("INSERT INTO sessions (id, title) VALUES ('rolled-back', 'x')"))
            raise RuntimeError("roll it back")
        with single.connect() as conn:
            assert (
                conn.execute(
                    text("SELECT count(*) FROM sessions WHERE id = 'rolled-back'")
                ).scalar()
                == 0
            )
    finally:
        single.dispose()


def test_reads_seen_by_statement_listeners_go_through_sqlalchemy_with_the_documented_sql(
    backend: str, engine: Engine, session: DbSession
) -> None:
    """With a cursor listener on the engine (instrumentation, the tests' capture), reads
    take SQLAlchemy's execution, so the listener sees them; the SQL is the text of
    docs/sql/ and the driver path sends the same text."""
    session_id, ids = _seed_runs(session, 2, random.Random(11))
    session.close()
    runs, events = RunReads.of(engine), EventReads.of(engine)
    direct = (
        runs.get(ids[0]),
        runs.list_for_session(session_id),
        events.list_for_session(session_id),
    )
    documented = _documented_sql(backend)
    with capture_statements(engine) as capture:
        observed = (
            runs.get(ids[0]),
            runs.list_for_session(session_id),
            events.list_for_session(session_id),
        )
    assert observed == direct
    captured = [
        _normalized(statement.sql)
        for statement in capture.statements
        if statement.sql != "BEGIN DEFERRED"  # SQLite: app.db.read_only's transactions
    ]
    assert len(captured) == 3
    assert all(sql in documented for sql in captured), captured
    plans = _plans(engine.dialect)
    for statement in (
        run_statements(backend).by_id,
        run_statements(backend).pages[False, False],
        event_statements._statements(backend).page_for_session,  # noqa: SLF001 contract test of the read path
    ):
        assert _normalized(plans[id(statement)].sql) in documented


def _normalized(sql: str) -> str:
    return "\n".join(line.rstrip() for line in sql.strip().splitlines())


def _documented_sql(dialect: str) -> set[str]:
    text_ = (SQL_DIR / f"{dialect}.sql").read_text()
    statements = set()
    for chunk in text_.split(";\n"):
        body = [line for line in chunk.strip().splitlines() if not line.startswith("--")]
        if body:
            statements.add("\n".join(body))
    return statements


# --------------------------------------------------------------------------
# Many readers beside writers


@both_ways
def test_many_readers_beside_writers_see_whole_rows_and_contiguous_pages(
    engine: Engine, backend: str
) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    with unit_of_work(engine) as db:
        run_id = RunRepository(db).create({"session_id": session_id, "message": "watched"}).id
        RunRepository(db).start(run_id)
    writers, per_writer, readers = 2, 40, 6
    deadline = time.monotonic() + 60
    done = threading.Event()
    problems: list[str] = []
    reads_done = [0] * readers

    def write(writer: int) -> None:
        try:
            for index in range(per_writer):
                with unit_of_work(engine) as db:
                    EventRepository(db).append(
                        session_id,
                        "task_progress",
                        {"writer": writer, "index": index, "check": f"{writer}:{index}"},
                        run_id=run_id,
                        event_id=f"{writer}:{index}",
                    )
                if writer == 0 and index % 10 == 9:
                    with unit_of_work(engine) as db:  # the run moves while readers read it
                        RunRepository(db).update_metrics(run_id, {"done": index + 1})
        except Exception as exc:  # reported by the main thread
            problems.append(f"writer {writer}: {exc!r}")

    def read(reader: int) -> None:
        runs, events = RunReads.of(engine), EventReads.of(engine)
        rng = random.Random(reader)
        try:
            while time.monotonic() < deadline:
                finished = done.is_set()
                page_ = events.list_for_session(session_id, limit=1000)
                seqs = [event.seq for event in page_]
                if seqs != list(range(1, len(seqs) + 1)):
                    problems.append(f"reader {reader}: seqs {seqs}")
                for event in page_:
                    if event.type == "task_progress" and (
                        event.payload["check"] != event.event_id
                        or event.run_id != run_id
                        or event.timestamp.tzinfo is not UTC
                    ):
                        problems.append(f"reader {reader}: torn event {event!r}")
                since = rng.randrange(len(seqs) + 1)
                tail = events.page_for_run(run_id, since_seq=since, limit=1000)
                # Every event is the run's: its page after ``since`` is contiguous too, and
                # holds at least what the session's page (read before it) held after ``since``.
                tail_seqs = [event.seq for event in tail.items]
                if (
                    tail_seqs != list(range(since + 1, since + 1 + len(tail_seqs)))
                    or len(tail_seqs) < len(seqs) - since
                ):
                    problems.append(f"reader {reader}: run page after {since}: {tail_seqs}")
                run = runs.get(run_id)
                if run.status is not RunStatus.RUNNING or run.started_at is None:
                    problems.append(f"reader {reader}: run {run!r}")
                if run.metrics is not None and run.metrics.get("done", 0) % 10:
                    problems.append(f"reader {reader}: metrics {run.metrics!r}")
                reads_done[reader] += 1
                if finished:
                    return
        except Exception as exc:  # reported by the main thread
            problems.append(f"reader {reader}: {exc!r}")

    threads = [threading.Thread(target=read, args=(n,)) for n in range(readers)]
    threads += [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads[readers:]:
        thread.join(timeout=max(deadline - time.monotonic(), 0.1))
    done.set()
    for thread in threads[:readers]:
        thread.join(timeout=max(deadline - time.monotonic(), 0.1))
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"
    assert problems == []
    assert min(reads_done) >= 2
    final = EventReads.of(engine).list_for_session(session_id, limit=1000)
    assert [event.seq for event in final] == list(range(1, len(final) + 1))
    assert len([e for e in final if e.type == "task_progress"]) == writers * per_writer


# --------------------------------------------------------------------------
# The schemas' fast path, and the API


def test_the_response_schemas_are_built_without_validation_and_other_schemas_are_not() -> None:
    assert _fast_fields(RunResponse) is not None
    assert _fast_fields(EventResponse) is not None

    class Stripped(RunResponse):
        model_config = {**RunResponse.model_config, "str_strip_whitespace": True}

    class Bounded(RunResponse):
        checkpoint_ns: str | None = Field(default=None, max_length=3)

    class Upper(RunResponse):
        @field_validator("session_id")
        @classmethod
        def _upper(cls, value: str) -> str:
            return value.upper()

    class Listed(RunResponse):
        tags: list[str] = Field(default_factory=list)

    for schema in (Stripped, Bounded, Upper, Listed):
        assert _fast_fields(schema) is None, schema.__name__


@both_ways
def test_page_equals_event_page_of_the_repository_events(
    engine: Engine, session: DbSession
) -> None:
    _session_id, first, _second = _seed_events(session, random.Random(12))
    with unit_of_work(engine, readonly=True) as db:
        stored: list[SessionEvent] = EventRepository(db).list_for_run(first, since_seq=3)
    items = [EventResponse.model_validate(event) for event in stored]
    _same(page(items, 3), EventPage.of(stored, 3))
    _same(page([], 42), EventPage.of([], 42))


def test_one_reads_object_per_engine(engine: Engine) -> None:
    assert RunReads.of(engine) is RunReads.of(engine)
    assert EventReads.of(engine) is EventReads.of(engine)
    assert RunReads.of(engine) is not RunReads(engine)
    assert tuple(RunResponse.model_fields) != RUN_COLUMNS  # the shape maps fields to columns
