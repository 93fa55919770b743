"""Every public repository method, racing the delete of its chat session and of its run.

The delete is made first and held uncommitted in its own transaction; the
method then runs in another thread and, on PostgreSQL, is given time to block on
the delete's row locks (we wait until ``pg_stat_activity`` shows it waiting on a
lock, or until it has finished). Then the delete commits and the method goes on
against rows that its statement's checks saw and that are now gone: the
interleaving that used to surface as a raw ``ForeignKeyViolation``. On SQLite
the method waits for the deleting writer on the busy timeout, then runs alone.

Whatever the method does, it returns or raises a ``DataLayerError``; no error it
raises, nothing in its exception chain and no log record carries the marker
that every text and JSON argument contains; and the stored data still meets
every invariant (seqs 1..n, lifecycles complete).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, text
from sqlmodel import Session as DbSession

from app.errors import ConflictError, DataLayerError
from app.models import ChatSession, RunStatus, SessionRun
from app.repositories import EventRepository, RunRepository
from tests.concurrency import in_own_transaction
from tests.reliability import invariants
from tests.reliability.figures import record

pytestmark = pytest.mark.slow  # each race waits for a blocked transaction

MARKER = f"secret marker {uuid.uuid4().hex}"
"""In every text and JSON argument (values and keys); it must never appear in an
error or a log record. Keys that are short identifiers are names and may be
quoted in error messages (``docs/input-limits.md``), so the marker is not one."""

BLOCK_TIMEOUT = 5.0
CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    session_id: str
    run_id: str


def _marked(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"note": MARKER, MARKER: [MARKER, {"deeper": MARKER}], **(extra or {})}


def _create_body(session_id: str) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "message": MARKER,
        "style_reference": _marked(),
        "target_pages": [MARKER],
    }


Call = Callable[[DbSession, Target], object]

METHODS: dict[str, tuple[RunStatus, Call]] = {
    "create": (
        RunStatus.QUEUED,
        lambda db, t: RunRepository(db).create(_create_body(t.session_id), checkpoint_ns=MARKER),
    ),
    "create(parent_run_id)": (
        RunStatus.FAILED,
        lambda db, t: RunRepository(db).create(_create_body(t.session_id), parent_run_id=t.run_id),
    ),
    "retry": (RunStatus.FAILED, lambda db, t: RunRepository(db).retry(t.run_id)),
    "get": (RunStatus.QUEUED, lambda db, t: RunRepository(db).get(t.run_id)),
    "get_or_none": (RunStatus.QUEUED, lambda db, t: RunRepository(db).get_or_none(t.run_id)),
    "list_for_session": (
        RunStatus.QUEUED,
        lambda db, t: RunRepository(db).list_for_session(t.session_id, before=t.run_id),
    ),
    "list_by_status": (
        RunStatus.QUEUED,
        lambda db, t: RunRepository(db).list_by_status(RunStatus.QUEUED, limit=5),
    ),
    "children": (RunStatus.FAILED, lambda db, t: RunRepository(db).children(t.run_id)),
    "latest_waiting": (
        RunStatus.WAITING_INPUT,
        lambda db, t: RunRepository(db).latest_waiting(t.session_id),
    ),
    "start": (RunStatus.QUEUED, lambda db, t: RunRepository(db).start(t.run_id)),
    "wait_for_input": (
        RunStatus.RUNNING,
        lambda db, t: RunRepository(db).wait_for_input(t.run_id, MARKER),
    ),
    "resume": (
        RunStatus.WAITING_INPUT,
        lambda db, t: RunRepository(db).resume(t.run_id, _marked()),
    ),
    "complete": (
        RunStatus.RUNNING,
        lambda db, t: RunRepository(db).complete(t.run_id, _marked({"tokens": 3})),
    ),
    "fail": (RunStatus.RUNNING, lambda db, t: RunRepository(db).fail(t.run_id, _marked())),
    "cancel": (RunStatus.WAITING_INPUT, lambda db, t: RunRepository(db).cancel(t.run_id)),
    "heartbeat": (RunStatus.RUNNING, lambda db, t: RunRepository(db).heartbeat(t.run_id)),
    "fail_stale": (
        RunStatus.RUNNING,
        lambda db, t: RunRepository(db).fail_stale(timedelta(microseconds=1)),
    ),
    "delete": (RunStatus.QUEUED, lambda db, t: RunRepository(db).delete(t.run_id)),
    "events.append": (
        RunStatus.QUEUED,
        lambda db, t: EventRepository(db).append(t.session_id, "note", _marked()),
    ),
    "events.append(run_id)": (
        RunStatus.RUNNING,
        lambda db, t: EventRepository(db).append(
            t.session_id, "verify_pass", _marked(), run_id=t.run_id, event_id=uuid.uuid4().hex
        ),
    ),
    "events.list_for_session": (
        RunStatus.QUEUED,
        lambda db, t: EventRepository(db).list_for_session(t.session_id, since_seq=0),
    ),
    "events.list_for_run": (
        RunStatus.QUEUED,
        lambda db, t: EventRepository(db).list_for_run(t.run_id),
    ),
}


def _seed(engine: Engine, status: RunStatus) -> Target:
    def write(db: DbSession) -> Target:
        session_id = db.merge(ChatSession(title="race")).id
        runs = RunRepository(db)
        run_id = runs.create({"session_id": session_id, "message": "m"}).id
        if status is RunStatus.FAILED:
            runs.start(run_id)
            runs.fail(run_id, {"code": "x"})
        elif status is not RunStatus.QUEUED:
            runs.start(run_id)
            if status is RunStatus.WAITING_INPUT:
                runs.wait_for_input(run_id, "which?")
        EventRepository(db).append(session_id, "note", {"n": 1})
        return Target(session_id, run_id)

    return in_own_transaction(engine, write)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def leaks(error: BaseException | None, records: list[logging.LogRecord]) -> list[str]:
    """Where the marker shows up: an error of the chain (str, repr, args) or a log record."""
    found = []
    for link in _chain(error) if error is not None else []:
        texts = [str(link), repr(link), *(repr(arg) for arg in link.args)]
        if any(MARKER in piece for piece in texts):
            found.append(f"{type(link).__name__}: {str(link)[:200]}")
    for log in records:
        if MARKER in log.getMessage() or MARKER in str(log.args):
            found.append(f"log {log.name}: {log.getMessage()[:200]}")
    return found


def _wait_until_blocked(engine: Engine, pid: int, done: threading.Event) -> bool:
    """Whether backend ``pid`` waits on a lock (PostgreSQL), polling until it does or is done."""
    deadline = time.monotonic() + BLOCK_TIMEOUT
    with engine.connect() as conn:
        while time.monotonic() < deadline and not done.is_set():
            waiting = conn.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            ).scalar()
            conn.rollback()
            if waiting == "Lock":
                return True
            time.sleep(0.02)
    return False


def race_with_delete(
    engine: Engine, call: Call, target: Target, deleted: str
) -> tuple[object, BaseException | None, bool]:
    """(result, error, whether the call blocked on the delete); the call's transaction
    is committed when it succeeds and rolled back when it raises."""
    deleter = DbSession(engine)
    if deleted == "session":
        deleter.execute(delete(ChatSession).where(ChatSession.id == target.session_id))  # type: ignore[arg-type]
    else:
        deleter.execute(delete(SessionRun).where(SessionRun.id == target.run_id))  # type: ignore[arg-type]
    deleter.flush()
    pids: queue.Queue[int] = queue.Queue()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def worker() -> None:
        with DbSession(engine, expire_on_commit=False) as db:
            if engine.dialect.name == "postgresql":
                pids.put(db.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            try:
                outcome["result"] = call(db, target)
                db.commit()
            except BaseException as exc:  # inspected by the test
                outcome["error"] = exc
                db.rollback()
            finally:
                done.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    blocked = False
    try:
        if engine.dialect.name == "postgresql":
            blocked = _wait_until_blocked(engine, pids.get(timeout=CALL_TIMEOUT), done)
        else:
            blocked = not done.wait(0.2)
    finally:
        deleter.commit()
        deleter.close()
        thread.join(CALL_TIMEOUT)
    assert not thread.is_alive(), "the call never finished"
    return outcome.get("result"), outcome.get("error"), blocked


@pytest.mark.parametrize("deleted", ["session", "run"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_racing_a_delete_gives_domain_errors_only(
    engine: Engine,
    backend: str,
    method: str,
    deleted: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, call = METHODS[method]
    target = _seed(engine, status)
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="app")
    _, error, blocked = race_with_delete(engine, call, target, deleted)
    record("delete races", 1, backend)
    record("delete races blocked", int(blocked), backend)
    record("raw errors", int(error is not None and not isinstance(error, DataLayerError)), backend)
    if error is not None:
        assert isinstance(error, DataLayerError), f"{method}: raw {type(error).__name__}"
    assert leaks(error, caplog.records) == []
    assert _violations(engine, deleted) == []


def _violations(engine: Engine, deleted: str) -> list[str]:
    """``invariants.violations``; a deleted run takes its events along (by design), which
    leaves holes in its session's seqs: then only duplicates count."""
    found = invariants.violations(engine)
    if deleted == "run":
        found = [
            problem
            for problem in found
            if "counter next_seq" not in problem and "duplicated []" not in problem
        ]
    return found


WRITERS = sorted(
    name
    for name in METHODS
    if name.split("(")[0]
    in {
        "create",
        "retry",
        "start",
        "wait_for_input",
        "resume",
        "complete",
        "fail",
        "cancel",
        "fail_stale",
        "events.append",
    }
)
"""The methods that append an event: they lock their run first, then the session's counter."""


def race_with_delete_mid_call(
    engine: Engine, call: Call, target: Target, deleted: str
) -> BaseException | None:
    """The delete arrives while the call holds its first locks and waits for the counter.

    A third transaction holds the session's counter row (PostgreSQL: ``FOR UPDATE``;
    SQLite: the write lock) while the call starts and blocks on it, and the delete
    starts and blocks behind the call. Then the counter is let go: on PostgreSQL the
    call and the delete may deadlock, and the database aborts one of them.
    """
    postgresql = engine.dialect.name == "postgresql"
    holder = DbSession(engine)
    if postgresql:
        holder.execute(
            text("SELECT next_seq FROM session_event_sequences WHERE session_id = :sid FOR UPDATE"),
            {"sid": target.session_id},
        )
    else:
        holder.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: the database's write lock
    outcome: dict[str, BaseException] = {}
    call_done, delete_done = threading.Event(), threading.Event()
    pids: queue.Queue[tuple[str, int]] = queue.Queue()

    def in_session(name: str, done: threading.Event, work: Callable[[DbSession], object]) -> None:
        with DbSession(engine, expire_on_commit=False) as db:
            if postgresql:
                pid = db.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                pids.put((name, pid))
            try:
                work(db)
                db.commit()
            except BaseException as exc:  # inspected by the test
                outcome[name] = exc
                db.rollback()
            finally:
                done.set()

    def delete_target(db: DbSession) -> None:
        model, key = (
            (ChatSession, target.session_id)
            if deleted == "session"
            else (SessionRun, target.run_id)
        )
        db.execute(delete(model).where(model.id == key))  # type: ignore[arg-type]

    threads = []
    try:
        for name, done, work in (
            ("call", call_done, lambda db: call(db, target)),
            ("delete", delete_done, delete_target),
        ):
            threads.append(
                threading.Thread(target=in_session, args=(name, done, work), daemon=True)
            )
            threads[-1].start()
            if postgresql:
                _, pid = pids.get(timeout=CALL_TIMEOUT)
                _wait_until_blocked(engine, pid, done)
            else:
                done.wait(0.2)
    finally:
        holder.rollback()
        holder.close()
        for thread in threads:
            thread.join(CALL_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a transaction never finished"
    return outcome.get("call")


@pytest.mark.parametrize("deleted", ["session", "run"])
@pytest.mark.parametrize("method", WRITERS)
def test_a_delete_arriving_mid_call_gives_domain_errors_only(
    engine: Engine,
    backend: str,
    method: str,
    deleted: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, call = METHODS[method]
    target = _seed(engine, status)
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="app")
    error = race_with_delete_mid_call(engine, call, target, deleted)
    record("delete races", 1, backend)
    record("delete races: aborted", int(isinstance(error, ConflictError)), backend)
    record("raw errors", int(error is not None and not isinstance(error, DataLayerError)), backend)
    if error is not None:
        assert isinstance(error, DataLayerError), f"{method}: raw {type(error).__name__}: {error}"
    assert leaks(error, caplog.records) == []
    assert _violations(engine, deleted) == []


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(sorted(METHODS)),
    deleted=st.sampled_from(["session", "run"]),
    mid_call=st.booleans(),
)
def test_random_entry_points_race_deletes(
    engine: Engine, backend: str, method: str, deleted: str, mid_call: bool
) -> None:
    """A few random draws of the two races above (method, what is deleted, when), as a
    property: a draw that fails is shrunk and kept in hypothesis' example database."""
    status, call = METHODS[method]
    if mid_call and method not in WRITERS:
        mid_call = False
    target = _seed(engine, status)
    if mid_call:
        error = race_with_delete_mid_call(engine, call, target, deleted)
    else:
        _, error, _ = race_with_delete(engine, call, target, deleted)
    record("delete races", 1, backend)
    assert error is None or isinstance(error, DataLayerError), f"{method}: {type(error).__name__}"
    assert leaks(error, []) == []
    assert _violations(engine, "run") == []  # the examples share a database: earlier runs deleted
