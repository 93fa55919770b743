"""Reliability round 3 (issue 22), the engine, the unit of work and the HTTP boundary:

* a refused commit never sends its connection back to the pool inside the aborted
  transaction (PostgreSQL);
* bodies over the limit are refused with 413 ``too_large`` before they are read whole
  (a real uvicorn on 127.0.0.1);
* JSON bodies nested too deep for the parser are the documented 400 / 422;
* a database that cannot be reached is a 503 ``database_unavailable``, a database
  that is missing or not migrated stops the server at start-up with one line, and
  the server never creates a SQLite file (a real uvicorn on 127.0.0.1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import Engine, text
from sqlmodel import Session as DbSession

from app.api.deps import get_db_engine
from app.api.main import create_app
from app.db import create_db_engine, unit_of_work
from app.errors import ActiveRunExistsError, TransactionAbortedError
from app.models import RunStatus
from app.repositories import RunRepository
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory
from tests.reliability.figures import record

# --------------------------------------------------------------------------
# 1. A refused commit and the pool (PostgreSQL)


def _two_queued_runs_of_one_session(engine: Engine) -> tuple[str, str]:
    def make(_db: DbSession) -> tuple[str, str]:
        chat = SessionFactory()
        return SessionRunFactory(session=chat).id, SessionRunFactory(session=chat).id

    return seed(engine, make)


def _lock_waiters(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT COUNT(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        ).scalar_one()


def _lose_a_start_race(engine: Engine, pool_of_one: Engine, *, close_by: str) -> list[str]:
    """Start two runs of one session at once; the start on ``pool_of_one`` loses (the
    one-running index refuses it after the winner commits), its caller commits anyway,
    gets ``TransactionAbortedError`` and closes the session without a rollback."""
    winner_id, loser_id = _two_queued_runs_of_one_session(engine)
    seen: list[str] = []

    def loser() -> None:
        if close_by == "with block":
            with DbSession(pool_of_one) as db:
                try:
                    RunRepository(db).start(loser_id)
                except ActiveRunExistsError:
                    seen.append("lost")
                try:
                    db.commit()
                except TransactionAbortedError:
                    seen.append("commit refused")
        else:  # commit, then close
            db = DbSession(pool_of_one)
            try:
                RunRepository(db).start(loser_id)
            except ActiveRunExistsError:
                seen.append("lost")
            try:
                db.commit()
            except TransactionAbortedError:
                seen.append("commit refused")
            db.close()

    with DbSession(engine) as db:
        RunRepository(db).start(winner_id)
        thread = threading.Thread(target=loser)
        thread.start()
        deadline = time.monotonic() + 10
        while _lock_waiters(engine) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        db.commit()
    thread.join(15)
    assert not thread.is_alive()
    return seen


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("close_by", ["with block", "commit then close"])
def test_a_refused_commit_leaves_no_aborted_transaction_in_the_pool(
    engine: Engine, database_url: str, backend: str, close_by: str
) -> None:
    """Pool of one connection: the next, unrelated unit of work surely gets the loser's
    connection, and must find it idle, not inside the aborted transaction
    (``InFailedSqlTransaction`` before the fix)."""
    pool_of_one = create_db_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        assert _lose_a_start_race(engine, pool_of_one, close_by=close_by) == [
            "lost",
            "commit refused",
        ]
        with unit_of_work(pool_of_one) as db:
            status = db.connection().connection.dbapi_connection.info.transaction_status.name
            chat = SessionFactory.build()
            db.add(chat)
        assert status == "IDLE"  # as handed out by the pool: not INERROR
        with unit_of_work(pool_of_one, readonly=True) as db:
            running = db.execute(
                text("SELECT COUNT(*) FROM session_runs WHERE status = 'running'")
            ).scalar_one()
            stored = db.execute(
                text("SELECT COUNT(*) FROM sessions WHERE id = :id"), {"id": chat.id}
            ).scalar_one()
        assert (running, stored) == (1, 1)
    finally:
        pool_of_one.dispose()
    record("faults survived", 1, backend)


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_failed_statement_then_commit_and_close_leaves_the_pooled_connection_idle(
    engine: Engine, database_url: str, backend: str
) -> None:
    """The same without a race: any failed statement aborts the transaction; the refused
    commit rolls the connection back, so the pool gets it back idle."""
    pool_of_one = create_db_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=5)
    try:
        db = DbSession(pool_of_one)
        db.add(SessionFactory.build(id="never-stored"))
        db.flush()
        with pytest.raises(Exception, match="division by zero"):
            db.execute(text("SELECT 1 / 0"))
        with pytest.raises(TransactionAbortedError):
            db.commit()
        db.close()
        with pool_of_one.connect() as conn:
            status = conn.connection.dbapi_connection.info.transaction_status.name
            assert status == "IDLE"
            assert conn.execute(text("SELECT COUNT(*) FROM sessions")).scalar_one() == 0
    finally:
        pool_of_one.dispose()
    record("faults survived", 1, backend)


# --------------------------------------------------------------------------
# 5. JSON bodies nested deeper than the parser goes


def _app_on(engine: Engine) -> FastAPI:
    api = create_app()
    api.dependency_overrides[get_db_engine] = lambda: engine
    return api


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(_app_on(engine), raise_server_exceptions=False) as test_client:
        yield test_client


def _nested(shape: str, depth: int) -> str:
    """JSON ``depth`` containers deep: arrays, or objects with the key ``a``."""
    if shape == "arrays":
        return "[" * depth + "]" * depth
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def _post_json(client: TestClient, path: str, body: str) -> Response:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


DEPTHS = [1_000, 5_000, 100_000]  # all past the parser's recursion limit; 100,000 is 200 kB


def _says_nested_once(message: str) -> bool:
    return message.count("nested") == 1 and "64 levels" in message


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", ["arrays", "objects"])
def test_a_resume_body_nested_past_the_parser_is_a_400_bad_parameter(
    client: TestClient,
    engine: Engine,
    backend: str,
    caplog: pytest.LogCaptureFixture,
    shape: str,
    depth: int,
) -> None:
    """``json.loads`` raised RecursionError: a 500 with a logged traceback."""
    run_id = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    caplog.set_level(logging.WARNING)
    for body in ('{"resume": {"x": ' + _nested(shape, depth) + "}}", _nested(shape, depth)):
        response = _post_json(client, f"/api/runs/{run_id}/resume", body)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "bad_parameter"
        assert error["message"].startswith("resume: ") and _says_nested_once(error["message"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "waiting_input"
    record("bad inputs tried", 2, backend)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shape", ["arrays", "objects"])
def test_a_create_body_nested_past_the_parser_is_a_422_validation_failed(
    client: TestClient,
    engine: Engine,
    backend: str,
    caplog: pytest.LogCaptureFixture,
    shape: str,
    depth: int,
) -> None:
    """FastAPI's parse of the body raised RecursionError: a 400 ``http_error``
    "There was an error parsing the body"."""
    session_id = seed(engine, lambda db: SessionFactory().id)
    caplog.set_level(logging.WARNING)
    nested = _nested(shape, depth)
    bodies = [
        f'{{"session_id": "{session_id}", "message": "m", "style_reference": {{"x": {nested}}}}}',
        nested,
    ]
    for body in bodies:
        response = _post_json(client, "/api/runs", body)
        assert response.status_code == 422, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "validation_failed"
        assert error["message"].startswith("invalid body: ") and _says_nested_once(error["message"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM session_runs")).scalar_one() == 0
    record("bad inputs tried", 2, backend)


@pytest.mark.parametrize("where", ["resume", "create"])
def test_a_body_nested_too_deep_for_the_limit_is_named_once_in_words(
    client: TestClient, engine: Engine, where: str
) -> None:
    """Within the parser's reach (65 levels) the limit's own message, without
    pydantic's "Value error," and without naming the field twice."""
    run_id = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    nested = _nested("objects", 65)
    if where == "resume":
        response = _post_json(client, f"/api/runs/{run_id}/resume", f'{{"resume": {nested}}}')
        assert response.status_code == 400
    else:
        body = f'{{"session_id": "s", "message": "m", "style_reference": {nested}}}'
        response = _post_json(client, "/api/runs", body)
        assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "Value error" not in message and _says_nested_once(message), message
    field = "resume" if where == "resume" else "style_reference"
    assert message.count(f"{field}.a") == 1 and message.count(f"{field}:") == (
        1 if where == "resume" else 0
    ), message
