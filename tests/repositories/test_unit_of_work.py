"""The unit of work as the Run Service holds it: commits that never lose writes
quietly, conflicts that surface as domain errors, and the objects the
repositories return behaving like ORM-loaded ones (docs/unit-of-work.md)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine, select, text
from sqlmodel import Session as DbSession

from app.errors import (
    ActiveRunExistsError,
    ReadOnlyFieldError,
    RunNotFoundError,
    SessionNotFoundError,
    TransactionAbortedError,
)
from app.models import ChatSession, RunStatus, SessionEvent, SessionRun
from app.repositories import EventRepository, RunRepository
from tests.concurrency import in_own_transaction, seed
from tests.factories import SessionFactory, SessionRunFactory


def stored_session_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM sessions")).scalars())


def test_commit_after_the_database_aborted_the_transaction_raises(
    engine: Engine, backend: str
) -> None:
    """PostgreSQL aborts a transaction at its first failed statement, and SQLite rolls
    one back by itself after some errors; a plain COMMIT then "succeeds" on nothing.
    The caller must hear that its earlier writes are gone."""
    with DbSession(engine) as db:
        db.add(ChatSession(id="written-first", title="t"))
        db.flush()
        if backend == "postgresql":
            with pytest.raises(Exception, match="division by zero"):
                db.execute(text("SELECT 1 / 0"))
        else:  # what SQLite does on SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY...
            db.connection().exec_driver_sql("ROLLBACK")
        with pytest.raises(TransactionAbortedError, match="roll back and retry"):
            db.commit()
        db.rollback()
        db.add(ChatSession(id="after-rollback", title="t"))
        db.commit()
    assert stored_session_ids(engine) == {"after-rollback"}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_after_a_statement_error_sqlite_keeps_the_transaction(engine: Engine) -> None:
    """The other side of the rule: where the database kept the transaction usable
    (SQLite after a refused statement), commit stores what was written."""
    with DbSession(engine) as db:
        db.add(ChatSession(id="kept", title="t"))
        db.flush()
        with pytest.raises(Exception, match="constraint failed"):
            db.execute(
                text(
                    "INSERT INTO session_runs (id, session_id, status) VALUES "
                    "('r', 'kept', 'paused')"
                )
            )
        db.commit()
    assert stored_session_ids(engine) == {"kept"}


def test_a_lost_start_race_then_commit_raises_instead_of_dropping_other_writes(
    engine: Engine, backend: str
) -> None:
    """The second start of one session loses; its caller handles the 409 and commits.
    Its other write (a chat session) must not vanish without a word."""
    first_id, second_id = seed(
        engine,
        lambda db: [
            SessionRunFactory(session=chat).id for chat in [SessionFactory()] for _ in "ab"
        ],
    )
    outcome: list[BaseException] = []
    go = threading.Event()

    def second() -> None:
        go.wait(5)
        with DbSession(engine) as db:
            db.add(ChatSession(id="other-chat", title="t"))
            db.flush()
            try:
                RunRepository(db).start(second_id)
            except ActiveRunExistsError:
                try:
                    db.commit()
                except TransactionAbortedError as exc:
                    outcome.append(exc)
                    db.rollback()
                else:
                    outcome.append(AssertionError("committed"))

    with DbSession(engine) as db:
        RunRepository(db).start(first_id)
        thread = threading.Thread(target=second)
        thread.start()
        go.set()
        time.sleep(0.3)
        db.commit()
    thread.join(10)

    if backend == "postgresql":  # the index refused it: the transaction is aborted
        assert len(outcome) == 1 and isinstance(outcome[0], TransactionAbortedError)
        assert "other-chat" not in stored_session_ids(engine)
    else:  # SQLite: the guard refused it and the transaction stayed usable
        assert outcome == [AssertionError("committed")] or (
            len(outcome) == 1 and str(outcome[0]) == "committed"
        )
        assert "other-chat" in stored_session_ids(engine)


def _waiting_backends(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT COUNT(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ).scalar_one()


def test_create_and_start_in_one_transaction_against_a_concurrent_start(
    engine: Engine, backend: str
) -> None:
    """The "generate now" flow (create, then start, one transaction) racing a start of
    another run of the same session. On PostgreSQL the two used to deadlock and the
    loser got a raw DeadlockDetected; now one wins and the other gets
    ActiveRunExistsError. SQLite serializes the two transactions."""
    chat_id, queued_id = seed(
        engine, lambda db: (lambda run: (run.session_id, run.id))(SessionRunFactory())
    )
    results: dict[str, object] = {}
    created = threading.Event()

    def concurrent_start() -> None:
        created.wait(5)
        try:
            results["start"] = in_own_transaction(
                engine, lambda db: RunRepository(db).start(queued_id).status
            )
        except Exception as exc:  # the test inspects which error
            results["start"] = exc

    thread = threading.Thread(target=concurrent_start)
    thread.start()
    try:
        with DbSession(engine, expire_on_commit=False) as db:
            runs = RunRepository(db)
            fresh = runs.create({"session_id": chat_id, "message": "generate now"})
            created.set()
            if backend == "postgresql":  # the other start now waits for our counter lock
                deadline = time.monotonic() + 5
                while _waiting_backends(engine) == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
            try:
                runs.start(fresh.id)
                db.commit()
                results["generate"] = RunStatus.RUNNING
            except ActiveRunExistsError as exc:
                results["generate"] = exc
                db.rollback()
    finally:
        created.set()
        thread.join(15)

    outcomes = sorted(type(value).__name__ for value in results.values())
    assert outcomes == ["ActiveRunExistsError", "RunStatus"], results
    with engine.connect() as conn:
        running = conn.execute(
            text("SELECT COUNT(*) FROM session_runs WHERE status = 'running'")
        ).scalar_one()
    assert running == 1


def test_objects_from_a_rolled_back_transaction_keep_their_values(engine: Engine) -> None:
    chat_id = seed(engine, lambda db: SessionFactory().id)
    with DbSession(engine) as db:
        run = RunRepository(db).create({"session_id": chat_id, "message": "m"})
        event = EventRepository(db).append(chat_id, "note", {"k": 1}, run_id=run.id)
        run_id, event_seq = run.id, event.seq
        db.rollback()
        # As with objects the ORM inserted: transient again, values intact.
        assert (run.id, run.status, run.session_id) == (run_id, RunStatus.QUEUED, chat_id)
        assert (event.seq, event.payload, event.run_id) == (event_seq, {"k": 1}, run_id)
        assert run not in db and event not in db
        assert db.get(SessionRun, run_id) is None


def test_a_chat_deleted_by_another_request_is_session_not_found(engine: Engine) -> None:
    chat_id = seed(engine, lambda db: SessionFactory().id)
    with DbSession(engine, expire_on_commit=False) as db:
        held = db.get(ChatSession, chat_id)  # the caller still holds its copy
        assert held is not None
        db.commit()
        in_own_transaction(
            engine,
            lambda other: other.execute(
                text("DELETE FROM sessions WHERE id = :id"), {"id": chat_id}
            ),
        )
        with pytest.raises(SessionNotFoundError, match=chat_id):
            RunRepository(db).create({"session_id": chat_id, "message": "m"})
        with pytest.raises(SessionNotFoundError, match=chat_id):
            EventRepository(db).append(chat_id, "note", {})


def test_events_of_a_run_deleted_by_another_request_is_run_not_found(engine: Engine) -> None:
    run_id = seed(engine, lambda db: SessionRunFactory().id)
    with DbSession(engine, expire_on_commit=False) as db:
        assert RunRepository(db).get(run_id).id == run_id  # now in the identity map
        db.commit()
        in_own_transaction(engine, lambda other: RunRepository(other).delete(run_id))
        with pytest.raises(RunNotFoundError, match=run_id):
            EventRepository(db).list_for_run(run_id)


def test_an_event_returned_by_append_cannot_be_changed(engine: Engine) -> None:
    chat_id = seed(engine, lambda db: SessionFactory().id)
    with DbSession(engine) as db:
        event = EventRepository(db).append(chat_id, "note", {"k": 1})
        db.commit()
        with pytest.raises(ReadOnlyFieldError, match="events are immutable once written"):
            event.type = "rewritten"
        event.payload["k"] = 2  # in place: refused when it would be written
        with pytest.raises(ReadOnlyFieldError, match="payload cannot be changed"):
            db.commit()
        db.rollback()
    with DbSession(engine) as db:
        stored = db.execute(select(SessionEvent.type, SessionEvent.payload)).one()
    assert tuple(stored) == ("note", {"k": 1})
