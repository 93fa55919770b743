"""EventRepository.append_many on both backends: order, de-duplication, atomic refusal, races."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy import event as sa_event
from sqlmodel import Session as DbSession

from app.errors import BadParameterError, RunNotFoundError, SessionNotFoundError
from app.models import EventSource, SessionEvent, SessionEventSequence
from app.repositories import EventRepository
from app.repositories.events import MAX_BATCH, OVERLAP_MIN_EVENTS, NewEvent
from app.types import TrackedJSONDict
from tests.concurrency import in_own_transaction, race, seed
from tests.factories import SessionFactory, SessionRunFactory


def stored(db: DbSession, session_id: str) -> list[tuple[int, str, str | None]]:
    rows = db.execute(
        select(SessionEvent.seq, SessionEvent.type, SessionEvent.event_id)
        .where(SessionEvent.session_id == session_id)
        .order_by(SessionEvent.seq)
    )
    return [tuple(row) for row in rows]


def next_seq(db: DbSession, session_id: str) -> int | None:
    return db.scalar(
        select(SessionEventSequence.next_seq).where(SessionEventSequence.session_id == session_id)
    )


def test_a_batch_takes_consecutive_seqs_in_the_order_given(session: DbSession) -> None:
    run = SessionRunFactory()
    events = EventRepository(session)
    events.append(run.session_id, "before")
    batch = events.append_many(
        run.session_id,
        [
            NewEvent("tool_call", {"n": 1}, run_id=run.id),
            {"type": "verify_start", "source": "task", "run_id": run.id, "event_id": "v1"},
            NewEvent("page", None, source=EventSource.PLAN),
        ],
    )
    after = events.append(run.session_id, "after")
    session.commit()

    assert [event.seq for event in batch] == [2, 3, 4] and after.seq == 5
    assert [event.type for event in batch] == ["tool_call", "verify_start", "page"]
    assert batch[0].payload == {"n": 1} and batch[2].payload == {}
    assert batch[1].source is EventSource.TASK and batch[1].event_id == "v1"
    assert batch[0].run_id == run.id and batch[2].run_id is None
    assert all(event in session and event.id is not None for event in batch)
    assert next_seq(session, run.session_id) == 6

    session.expire_all()
    for event in batch:
        row = session.get(SessionEvent, event.id)
        assert row is not None
        for field in ("seq", "type", "payload", "source", "run_id", "event_id", "created_at"):
            assert getattr(row, field) == getattr(event, field), field


def test_known_event_ids_come_back_as_stored_and_take_no_seq(session: DbSession) -> None:
    chat = SessionFactory()
    events = EventRepository(session)
    old = events.append(chat.id, "old", {"v": 1}, event_id="a")
    batch = events.append_many(
        chat.id,
        [
            NewEvent("x", event_id="b"),
            NewEvent("again", {"v": 2}, event_id="a"),
            NewEvent("y"),
            NewEvent("x twice", event_id="b"),
        ],
    )
    session.commit()

    assert batch[1].id == old.id and batch[1].type == "old" and batch[1].payload == {"v": 1}
    assert batch[3] is batch[0]
    assert [event.seq for event in batch] == [2, 1, 3, 2]
    assert stored(session, chat.id) == [(1, "old", "a"), (2, "x", "b"), (3, "y", None)]
    assert next_seq(session, chat.id) == 4
    # the same batch again stores nothing
    again = events.append_many(chat.id, [NewEvent("x", event_id="b"), NewEvent("z", event_id="a")])
    assert [event.id for event in again] == [batch[0].id, old.id]
    assert next_seq(session, chat.id) == 4


def test_a_big_batch_behaves_as_a_small_one(session: DbSession) -> None:
    """From OVERLAP_MIN_EVENTS on, PostgreSQL builds the events while the database
    inserts them (app.repositories._driver.execute_overlapped): the same results."""
    run, other = SessionRunFactory(), SessionRunFactory()
    events = EventRepository(session)
    size = OVERLAP_MIN_EVENTS + 3
    old = events.append(run.session_id, "old", {"v": 1}, event_id="known")
    batch = events.append_many(
        run.session_id,
        [NewEvent("step", {"i": i}, run_id=run.id, event_id=f"e{i}") for i in range(size)]
        + [NewEvent("again", event_id="known"), NewEvent("step", event_id="e0")],
    )
    assert [event.seq for event in batch[:size]] == list(range(2, size + 2))
    assert [event.payload["i"] for event in batch[:size]] == list(range(size))
    assert batch[size].id == old.id and batch[size + 1] is batch[0]
    assert all(event in session for event in batch)
    with pytest.raises(RunNotFoundError):
        events.append_many(
            run.session_id, [NewEvent("a", run_id=run.id)] * size + [NewEvent("b", run_id=other.id)]
        )
    session.commit()
    assert len(stored(session, run.session_id)) == size + 1
    assert next_seq(session, run.session_id) == size + 2

    rolled_back = events.append_many(run.session_id, [NewEvent("gone", {"k": 1})] * size)
    seqs = [event.seq for event in rolled_back]
    session.rollback()
    # As with rows the ORM inserted: transient again, values intact.
    assert [event.seq for event in rolled_back] == seqs and rolled_back[0].payload == {"k": 1}
    assert not any(event in session for event in rolled_back)
    assert len(stored(session, run.session_id)) == size + 1


@pytest.mark.parametrize(
    ("bad", "name"),
    [
        ({"type": ""}, "events[1].type"),
        ({"type": "t" * 101}, "events[1].type"),
        ({"type": "t", "payload": [1]}, "events[1].payload"),
        ({"type": "t", "payload": {"x": float("nan")}}, "events[1].payload"),
        ({"type": "t", "source": "nope"}, "events[1].source"),
        ({"type": "t", "event_id": "e" * 256}, "events[1].event_id"),
        ({"type": "t", "run_id": ""}, "events[1].run_id"),
        ({"type": "t", "color": "red"}, "events[1]"),
        ({"payload": {}}, "events[1]"),
        ("message", "events[1]"),
    ],
)
def test_one_bad_item_refuses_the_batch_and_writes_nothing(
    session: DbSession, bad: Any, name: str
) -> None:
    chat = SessionFactory()
    events = EventRepository(session)
    with pytest.raises(BadParameterError) as raised:
        events.append_many(chat.id, [NewEvent("fine"), bad, NewEvent("fine too")])
    assert raised.value.name == name
    assert stored(session, chat.id) == [] and next_seq(session, chat.id) is None


def test_a_run_of_another_session_refuses_the_whole_batch(session: DbSession) -> None:
    run, other = SessionRunFactory(), SessionRunFactory()
    events = EventRepository(session)
    with pytest.raises(RunNotFoundError) as raised:
        events.append_many(
            run.session_id, [NewEvent("a", run_id=run.id), NewEvent("b", run_id=other.id)]
        )
    assert raised.value.run_id == other.id
    with pytest.raises(SessionNotFoundError):
        events.append_many("no-such-session", [NewEvent("a")])
    with pytest.raises(BadParameterError):
        events.append_many(run.session_id, [NewEvent("a")] * (MAX_BATCH + 1))
    assert events.append_many(run.session_id, []) == []
    session.commit()
    assert stored(session, run.session_id) == []
    # the transaction stayed usable
    assert events.append(run.session_id, "ok").seq == 1


def test_batches_and_single_appends_racing_leave_seqs_exactly_one_to_n(engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    writers = 6

    def work(round_: int, index: int) -> Callable[[DbSession], None]:
        def append(db: DbSession) -> None:
            events = EventRepository(db)
            if index % 2:
                batch = [NewEvent(f"r{round_}w{index}.{n}") for n in range(10)]
                events.append_many(session_id, batch)
            else:
                for n in range(3):
                    events.append(session_id, f"r{round_}w{index}.{n}")

        return append

    for round_ in range(3):
        results = race(engine, [work(round_, index) for index in range(writers)])
        assert [r for r in results if isinstance(r, Exception)] == []
    rows = in_own_transaction(engine, lambda db: stored(db, session_id))
    assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1))
    assert len(rows) == 3 * (3 * 10 + 3 * 3)
    batches: dict[str, list[int]] = {}
    for seq, type_, _ in rows:
        batches.setdefault(type_.split(".")[0], []).append(seq)
    for name, numbers in batches.items():
        if int(name.split("w")[1]) % 2:  # a batch: consecutive, in the order given
            assert numbers == list(range(numbers[0], numbers[0] + 10)), (name, numbers)
    counted = in_own_transaction(
        engine,
        lambda db: db.scalar(select(func.count()).where(SessionEvent.session_id == session_id)),
    )
    assert counted == len(rows)


def test_the_same_event_ids_racing_are_stored_once(engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)

    def batch(db: DbSession) -> list[int]:
        events = EventRepository(db)
        return [
            e.seq
            for e in events.append_many(
                session_id, [NewEvent("e", event_id=f"id{n}") for n in range(5)]
            )
        ]

    results = race(engine, [batch] * 4)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert all(r == [1, 2, 3, 4, 5] for r in results), results
    rows = in_own_transaction(engine, lambda db: stored(db, session_id))
    assert [seq for seq, _, _ in rows] == [1, 2, 3, 4, 5]


def test_load_listeners_see_batch_events_in_the_session(session: DbSession) -> None:
    """A load listener of the application's own sees each new event as the ORM's loader
    would show it: persistent, in the session (JSON tracking alone runs earlier)."""
    seen: list[tuple[bool, bool]] = []

    def on_load(target: SessionEvent, _context: Any) -> None:
        seen.append((inspect(target).persistent, isinstance(target.payload, TrackedJSONDict)))

    chat = SessionFactory()
    sa_event.listen(SessionEvent, "load", on_load)
    try:
        EventRepository(session).append_many(
            chat.id, [NewEvent("step", {"i": i}) for i in range(OVERLAP_MIN_EVENTS)]
        )
    finally:
        sa_event.remove(SessionEvent, "load", on_load)
    assert seen == [(True, True)] * OVERLAP_MIN_EVENTS
