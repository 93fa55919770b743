"""Issue 22, the repositories' part: interrupt above 1,000 active runs (item 6), one
rule for ``append`` and ``append_many`` (item 7), errors that describe their input
instead of quoting it (item 8) and lifecycle types kept to ``RunRepository`` (item 12).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select
from sqlmodel import Session as DbSession

from app.errors import BadParameterError, DataLayerError
from app.models import ChatSession, RunStatus, SessionEvent, SessionRun, TriggerSource, new_id
from app.repositories import EventRepository, RunRepository
from app.repositories.events import MAX_BATCH, NewEvent
from app.state_machine import RunEventType
from app.types import utc_now
from tests.concurrency import in_own_transaction
from tests.factories import SessionFactory, SessionRunFactory
from tests.reliability import invariants
from tests.reliability.figures import record
from tests.reliability.test_delete_races import MARKER, leaks

M = MARKER


def events_of(db: DbSession, session_id: str) -> list[tuple[int, str, str | None]]:
    rows = db.execute(
        select(SessionEvent.seq, SessionEvent.type, SessionEvent.run_id)
        .where(SessionEvent.session_id == session_id)
        .order_by(SessionEvent.seq)
    )
    return [tuple(row) for row in rows]


# ------------------------------------------------- item 6: interrupt, > MAX_BATCH runs


def _bulk_queued(db: DbSession, session_id: str, count: int) -> list[str]:
    """``count`` queued runs of the session in one multi-row INSERT (no events: fast)."""
    now = utc_now()
    rows = []
    for n in range(count):
        run_id = new_id()
        rows.append(
            {
                "id": run_id,
                "session_id": session_id,
                "status": RunStatus.QUEUED,
                "trigger_source": TriggerSource.CHAT,
                "input_message": f"turn {n}",
                "checkpoint_thread": f"{session_id}:{run_id}",
                "created_at": now - timedelta(seconds=count - n),
                "updated_at": now,
            }
        )
    db.execute(insert(SessionRun), rows)
    return [row["id"] for row in rows]


def test_interrupt_cancels_more_active_runs_than_one_batch_holds(db: DbSession) -> None:
    chat = SessionFactory()
    running = SessionRunFactory(session=chat, status=RunStatus.RUNNING)
    queued = _bulk_queued(db, chat.id, MAX_BATCH)  # with the running one: MAX_BATCH + 1
    db.commit()

    run = RunRepository(db).create(
        {"session_id": chat.id, "message": "now this"}, multitask_strategy="interrupt"
    )
    db.commit()

    statuses = dict(db.execute(select(SessionRun.id, SessionRun.status)).all())
    assert statuses.pop(run.id) is RunStatus.QUEUED
    assert set(statuses) == {running.id, *queued}
    assert set(statuses.values()) == {RunStatus.CANCELLED}
    stored = events_of(db, chat.id)
    assert [seq for seq, _, _ in stored] == list(range(1, MAX_BATCH + 3))
    cancelled = [run_id for _, kind, run_id in stored if kind == RunEventType.RUN_CANCELLED]
    assert sorted(cancelled) == sorted(statuses) and stored[-1][1:] == ("run_created", run.id)
    payloads = db.scalars(
        select(SessionEvent.payload).where(SessionEvent.type == RunEventType.RUN_CANCELLED)
    ).all()
    assert {(p["multitask_strategy"], p["interrupted_by"]) for p in payloads} == {
        ("interrupt", run.id)
    }


# ------------------------------------------------- item 7: run-scoped types need a run


@pytest.mark.parametrize("event_type", ["verify_pass", "tool_policy_blocked", "run_completed"])
def test_append_many_refuses_run_scoped_types_without_a_run_as_append_does(
    db: DbSession, event_type: str
) -> None:
    chat = SessionFactory()
    db.commit()
    events = EventRepository(db)
    with pytest.raises(BadParameterError) as single:
        events.append(chat.id, event_type, {"page": 1})
    with pytest.raises(BadParameterError) as batch:
        events.append_many(chat.id, [NewEvent("note"), NewEvent(event_type, {"page": 1})])
    with pytest.raises(BadParameterError) as mapping:
        events.append_many(chat.id, [{"type": event_type}])
    assert single.value.name == "run_id"
    assert batch.value.name == "events[1].run_id" and mapping.value.name == "events[0].run_id"
    reasons = {error.value.problem for error in (single, batch, mapping)}
    assert reasons == {f"required for the run-scoped event type {event_type}"}
    assert events_of(db, chat.id) == []


# ------------------------------------------------- item 12: lifecycle types are RunRepository's


LIFECYCLE_TYPES = sorted(RunEventType)


@pytest.mark.parametrize("event_type", LIFECYCLE_TYPES)
def test_append_and_append_many_refuse_lifecycle_types_even_with_a_run(
    engine: Engine, backend: str, event_type: str
) -> None:
    def seed(db: DbSession) -> tuple[str, str]:
        chat = db.merge(ChatSession(title="lifecycle"))
        runs = RunRepository(db)
        run = runs.start(runs.create({"session_id": chat.id, "message": "m"}).id)
        return chat.id, run.id

    session_id, run_id = in_own_transaction(engine, seed)
    before = invariants.fingerprint(engine)
    calls: list[Callable[[EventRepository], object]] = [
        lambda events: events.append(session_id, event_type, {"error": {}}, run_id=run_id),
        lambda events: events.append_many(
            session_id, [NewEvent("note"), NewEvent(event_type, {}, run_id=run_id)]
        ),
        lambda events: events.append_many(session_id, [{"type": event_type, "run_id": run_id}]),
    ]
    names = []
    for call in calls:
        with DbSession(engine) as db:
            with pytest.raises(BadParameterError) as refused:
                call(EventRepository(db))
            db.commit()  # a careless caller: still nothing written
        names.append(refused.value.name)
        assert "RunRepository" in refused.value.message, refused.value.message
    assert names == ["type", "events[1].type", "events[0].type"]
    assert invariants.fingerprint(engine) == before

    def lifecycle_still_works(db: DbSession) -> RunStatus:
        return RunRepository(db).fail(run_id, {"code": "x"}).status

    assert in_own_transaction(engine, lifecycle_still_works) is RunStatus.FAILED
    with DbSession(engine) as db:
        assert [kind for _, kind, _ in events_of(db, session_id)] == [
            "run_created",
            "run_started",
            "run_failed",
        ]


# ------------------------------------------------- item 8: errors describe, never quote


def _leaky_values() -> Any:
    return {"k": ("tool_call", {"password": M})}.values()


BAD_CALLS: dict[str, Callable[[DbSession, str], object]] = {
    "append_many: a tuple item": lambda db, sid: EventRepository(db).append_many(
        sid, [("tool_call", {"password": M})]
    ),
    "append_many: dict_values of items": lambda db, sid: EventRepository(db).append_many(
        sid, _leaky_values()
    ),
    "append_many: a mapping for the list": lambda db, sid: EventRepository(db).append_many(
        sid, {"type": "tool_call", "payload": {"password": M}}
    ),
    "append_many: a str for the list": lambda db, sid: EventRepository(db).append_many(sid, M),
    "append_many: an item of marked fields": lambda db, sid: EventRepository(db).append_many(
        sid, [{M: M, "type": "x"}]
    ),
    "append_many: a str item": lambda db, sid: EventRepository(db).append_many(sid, [M]),
    "fail_stale: a str": lambda db, sid: RunRepository(db).fail_stale(M),
    "fail_stale: a marked number of seconds": lambda db, sid: RunRepository(db).fail_stale({M: 5}),
    "fail_stale: reaches before year 1": lambda db, sid: RunRepository(db).fail_stale(
        timedelta.max
    ),
    "idempotency_window: a str": lambda db, sid: RunRepository(db, idempotency_window=M),
    "idempotency_window: a list": lambda db, sid: RunRepository(db, idempotency_window=[M]),
    "claim_next: marked lease": lambda db, sid: RunRepository(db).claim_next("w", lease=M),
    "heartbeat: marked lease": lambda db, sid: RunRepository(db).heartbeat(
        "r", worker_id="w", lease=[M]
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_repository_refusals_describe_arguments_without_quoting_them(
    engine: Engine, backend: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    session_id = in_own_transaction(engine, lambda db: db.merge(ChatSession(title="h")).id)
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="app")
    with DbSession(engine) as db, pytest.raises(DataLayerError) as refused:
        BAD_CALLS[case](db, session_id)
    record("errors searched for content", 1, backend)
    assert isinstance(refused.value, BadParameterError), refused.value
    assert leaks(refused.value, caplog.records) == []
    with DbSession(engine) as db:
        assert db.scalar(select(func.count()).select_from(SessionEvent)) == 0


@pytest.mark.parametrize(
    ("call", "name", "described"),
    [
        (lambda db: EventRepository(db).append_many("s", _leaky_values()), "events", "dict_values"),
        (lambda db: EventRepository(db).append_many("s", {"a": 1}), "events", "a dict"),
        (lambda db: EventRepository(db).append_many("s", [("t", {})]), "events[0]", "a tuple"),
        (lambda db: RunRepository(db).fail_stale("abc"), "older_than", "a str of 3 characters"),
        (lambda db: RunRepository(db, idempotency_window="abc"), "idempotency_window", "a str"),
    ],
)
def test_a_bad_argument_is_described_by_its_type_and_size(
    db: DbSession, call: Callable[[DbSession], object], name: str, described: str
) -> None:
    with pytest.raises(BadParameterError) as refused:
        call(db)
    assert refused.value.name == name and described in refused.value.message, refused.value
