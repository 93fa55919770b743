"""EventRepository on both backends: seq allocation under races and old writers, replay."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session as DbSession

from app.errors import BadParameterError, RunNotFoundError, SessionNotFoundError
from app.models import EventSource, SessionEvent, SessionEventSequence
from app.repositories import EventRepository, RunRepository
from tests.concurrency import in_own_transaction, race, seed
from tests.factories import SessionEventFactory, SessionFactory, SessionRunFactory


@pytest.fixture
def events(db: DbSession) -> EventRepository:
    return EventRepository(db)


def seqs(db: DbSession, session_id: str) -> list[int]:
    rows = db.execute(
        select(SessionEvent.seq)
        .where(SessionEvent.session_id == session_id)
        .order_by(SessionEvent.seq)
    )
    return list(rows.scalars())


def counter(db: DbSession, session_id: str) -> int | None:
    return db.scalar(
        select(SessionEventSequence.next_seq).where(SessionEventSequence.session_id == session_id)
    )


def new_session(engine: Engine) -> str:
    return seed(engine, lambda db: SessionFactory().id)


# ------------------------------------------------------------------ append


def test_append_numbers_events_per_session_and_keeps_the_counter_true(
    db: DbSession, events: EventRepository
) -> None:
    chat, other = SessionFactory(), SessionFactory()
    first = events.append(chat.id, "message", {"text": "hi"})
    events.append(other.id, "message")
    second = events.append(chat.id, "plan_ready", None, source="plan")
    db.commit()

    assert (first.seq, second.seq) == (1, 2)
    assert second.payload == {} and second.source is EventSource.PLAN
    assert first.created_at.tzinfo is not None and first.id is not None
    assert first in db and not db.dirty
    assert seqs(db, chat.id) == [1, 2] and seqs(db, other.id) == [1]
    assert counter(db, chat.id) == 3


def test_the_returned_event_matches_what_is_stored(db: DbSession, events: EventRepository) -> None:
    run = SessionRunFactory()
    appended = events.append(
        run.session_id,
        "verify_pass",
        {"n": 1},
        source=EventSource.TASK,
        run_id=run.id,
        event_id="e",
    )
    db.commit()
    db.expire_all()
    stored = db.get(SessionEvent, appended.id)
    fields = ("session_id", "seq", "type", "payload", "source", "created_at", "run_id", "event_id")
    assert {f: getattr(stored, f) for f in fields} == {f: getattr(appended, f) for f in fields}


def test_source_is_the_native_enum_on_postgresql(
    backend: str, db: DbSession, events: EventRepository
) -> None:
    chat = SessionFactory()
    events.append(chat.id, "task_done", source="task")
    if backend == "postgresql":
        assert db.scalar(text("SELECT pg_typeof(source)::text FROM session_events")) == (
            "session_event_source"
        )
    assert db.scalar(text("SELECT source FROM session_events")) == "task"


def test_a_rollback_gives_the_number_back(db: DbSession, events: EventRepository) -> None:
    chat = SessionFactory()
    db.commit()
    events.append(chat.id, "lost")
    db.rollback()
    assert events.append(chat.id, "kept").seq == 1


def test_a_legacy_session_continues_after_its_highest_seq(
    db: DbSession, events: EventRepository
) -> None:
    chat = SessionFactory()
    for seq in (1, 2, 7):
        SessionEventFactory(session=chat, seq=seq)
    db.add(SessionEventSequence(session_id=chat.id, next_seq=3))  # behind, as v0.7 left it
    other = SessionFactory()
    SessionEventFactory(session=other, seq=4)  # no counter row at all
    assert events.append(chat.id, "new").seq == 8
    assert events.append(other.id, "new").seq == 5
    assert (counter(db, chat.id), counter(db, other.id)) == (9, 6)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"payload": "text"}, "payload"),
        ({"payload": [1]}, "payload"),
        ({"payload": {"x": float("inf")}}, "payload"),
        ({"payload": {"x": "\x00"}}, "payload"),
        ({"type": ""}, "type"),
        ({"type": "t" * 101}, "type"),
        ({"source": "chat"}, "source"),
        ({"event_id": 5}, "event_id"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    db: DbSession, events: EventRepository, arguments: dict[str, Any], name: str
) -> None:
    chat = SessionFactory()
    call = {"type": "message", **arguments}
    with pytest.raises(BadParameterError) as caught:
        events.append(chat.id, **call)
    assert caught.value.name == name and caught.value.status_code == 400
    assert seqs(db, chat.id) == [] and counter(db, chat.id) is None


def test_unknown_session_or_foreign_run_raise_and_keep_the_transaction(
    db: DbSession, events: EventRepository
) -> None:
    chat = SessionFactory()
    foreign = SessionRunFactory()
    with pytest.raises(SessionNotFoundError):
        events.append("missing", "message")
    with pytest.raises(RunNotFoundError, match=foreign.id):
        events.append(chat.id, "message", run_id=foreign.id)
    assert events.append(chat.id, "message").seq == 1
    db.commit()
    assert counter(db, "missing") is None


# ----------------------------------------------------------- de-duplication


def test_a_known_event_id_returns_the_stored_event_and_writes_nothing(
    db: DbSession, events: EventRepository
) -> None:
    chat = SessionFactory()
    original = events.append(chat.id, "message", {"v": 1}, event_id="evt-1")
    again = events.append(chat.id, "other", {"v": 2}, event_id="evt-1")
    assert (again.id, again.seq, again.payload) == (original.id, 1, {"v": 1})
    elsewhere = events.append(SessionFactory().id, "message", event_id="evt-1")
    assert elsewhere.id != original.id  # event ids are unique per session
    assert events.append(chat.id, "next").seq == 2  # no number was used up
    assert counter(db, chat.id) == 3


def test_concurrent_appends_with_one_event_id_store_it_once(engine: Engine) -> None:
    session_id = new_session(engine)
    for round_number in range(5):
        event_id = f"evt-{round_number}"
        results = race(
            engine,
            [
                lambda db, n=n, e=event_id: EventRepository(db).append(
                    session_id, "message", {"writer": n}, event_id=e
                )
                for n in range(6)
            ],
        )
        assert not [r for r in results if isinstance(r, Exception)], results
        assert len({(r.id, r.seq) for r in results}) == 1
    with DbSession(engine) as db:
        assert seqs(db, session_id) == [1, 2, 3, 4, 5]
        assert counter(db, session_id) == 6


# ---------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_eight_writers_of_250_events_get_seqs_exactly_1_to_2000(engine: Engine) -> None:
    session_id = new_session(engine)

    def writer(_db: DbSession) -> None:
        for n in range(250):
            in_own_transaction(
                engine,
                lambda db, n=n: EventRepository(db).append(session_id, "tick", {"n": n}),
            )

    results = race(engine, [writer] * 8)
    assert results == [None] * 8
    with DbSession(engine) as db:
        assert seqs(db, session_id) == list(range(1, 2001))
        assert counter(db, session_id) == 2001


def test_events_of_a_session_commit_in_seq_order(engine: Engine) -> None:
    """A second writer waits for the first one's commit, so seq order is commit order."""
    session_id = new_session(engine)
    finished = threading.Event()
    with DbSession(engine) as first:
        assert EventRepository(first).append(session_id, "first").seq == 1

        def second() -> None:
            in_own_transaction(engine, lambda db: EventRepository(db).append(session_id, "2nd"))
            finished.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not finished.wait(0.5)  # blocked behind the uncommitted first event
        first.commit()
        thread.join(10)
    assert finished.is_set()
    with DbSession(engine) as db:
        assert seqs(db, session_id) == [1, 2]


# ------------------------------------------------------------ v0.7 writers


class OldWriter:
    """The v0.7 way to append: read ``next_seq``, insert with it, write ``next_seq + 1`` back.

    No lock is taken; each step is its own statement on the given connection.
    """

    def __init__(self, engine: Engine, session_id: str) -> None:
        self.conn = engine.connect()
        self.session_id = session_id
        self.seq = 0

    def read_counter(self) -> None:
        self.seq = self.conn.execute(
            text("SELECT next_seq FROM session_event_sequences WHERE session_id = :s"),
            {"s": self.session_id},
        ).scalar_one()

    def insert_event(self) -> None:
        self.conn.execute(
            text(
                "INSERT INTO session_events (session_id, seq, type, payload, source, created_at) "
                "VALUES (:s, :seq, 'old', '{}', 'session', CURRENT_TIMESTAMP)"
            ),
            {"s": self.session_id, "seq": self.seq},
        )

    def write_counter_back(self) -> None:
        self.conn.execute(
            text("UPDATE session_event_sequences SET next_seq = :n WHERE session_id = :s"),
            {"s": self.session_id, "n": self.seq + 1},
        )

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


def append_new(engine: Engine, session_id: str) -> int:
    return in_own_transaction(engine, lambda db: EventRepository(db).append(session_id, "new")).seq


def seqs_by_writer(engine: Engine, session_id: str) -> tuple[list[int], list[int]]:
    """(seqs written by the new code, seqs written by the old writer), ascending."""
    with DbSession(engine) as db:
        rows = db.execute(
            select(SessionEvent.type, SessionEvent.seq)
            .where(SessionEvent.session_id == session_id)
            .order_by(SessionEvent.seq)
        ).all()
    return [s for t, s in rows if t == "new"], [s for t, s in rows if t == "old"]


@pytest.mark.parametrize("unique_index", [True, False], ids=["index", "legacy-no-index"])
def test_an_old_writer_interleaved_with_append_never_gets_a_new_seq_duplicated(
    engine: Engine, unique_index: bool
) -> None:
    if not unique_index:  # a v0.7 database whose duplicates kept the index from being built
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX uq_session_events_session_seq"))
    session_id = new_session(engine)
    assert append_new(engine, session_id) == 1
    old = OldWriter(engine, session_id)
    try:
        old.read_counter()  # reads 2
        old.commit()
        assert append_new(engine, session_id) == 2  # the new code takes 2 meanwhile
        old.write_counter_back()  # the old writer sets the counter back to 3 ...
        if unique_index:
            with pytest.raises(IntegrityError):  # ... and the index refuses its duplicate 2
                old.insert_event()
            old.conn.rollback()
            old.write_counter_back()
        else:
            old.insert_event()  # the old code's own duplicate: nothing can stop it
        old.commit()
        assert append_new(engine, session_id) == 3

        # The counter left behind the real maximum: the guard skips the taken number.
        old.read_counter()  # reads 4
        old.insert_event()
        old.commit()  # inserted 4, counter still says 4
        assert append_new(engine, session_id) == 5
    finally:
        old.close()
    # Every number the new code took was free when it took it; only the old
    # code's own write can duplicate one, and only where the index is missing.
    assert seqs_by_writer(engine, session_id) == ([1, 2, 3, 5], [4] if unique_index else [2, 4])
    with DbSession(engine) as db:
        assert counter(db, session_id) == 6


def test_append_waits_for_an_uncommitted_old_writer_and_takes_the_next_number(
    engine: Engine,
) -> None:
    session_id = new_session(engine)
    assert append_new(engine, session_id) == 1
    old = OldWriter(engine, session_id)
    got: list[int] = []
    try:
        old.read_counter()  # 2
        old.insert_event()  # uncommitted seq 2 (SQLite: holds the write lock)
        thread = threading.Thread(target=lambda: got.append(append_new(engine, session_id)))
        thread.start()
        time.sleep(0.3)
        old.commit()
        thread.join(10)
    finally:
        old.close()
    assert got == [3]
    assert seqs_by_writer(engine, session_id) == ([1, 3], [2])
    with DbSession(engine) as db:
        assert counter(db, session_id) == 4


def test_a_transition_whose_event_collides_with_an_old_writer_appends_it_after(
    engine: Engine,
) -> None:
    """On PostgreSQL a transition writes its event in the same statement; when that
    insert collides with an old writer's uncommitted number, the run still moves and
    the event takes the next free number (as ``append`` would)."""
    session_id = new_session(engine)
    with DbSession(engine) as db:
        run_id = RunRepository(db).create({"session_id": session_id, "message": "m"}).id
        db.commit()
    old = OldWriter(engine, session_id)
    started: list[str] = []

    def start() -> None:
        with DbSession(engine) as db:
            started.append(RunRepository(db).start(run_id).status)
            db.commit()

    try:
        old.read_counter()  # 2
        old.insert_event()  # uncommitted seq 2 (SQLite: holds the write lock)
        thread = threading.Thread(target=start)
        thread.start()
        time.sleep(0.3)
        old.commit()
        thread.join(10)
    finally:
        old.close()
    assert started == ["running"]
    with DbSession(engine) as db:
        rows = db.execute(
            select(SessionEvent.seq, SessionEvent.type)
            .where(SessionEvent.session_id == session_id)
            .order_by(SessionEvent.seq)
        ).all()
        assert [tuple(row) for row in rows] == [(1, "run_created"), (2, "old"), (3, "run_started")]
        assert counter(db, session_id) == 4


# ------------------------------------------------------------------- replay


def test_session_and_run_views(db: DbSession, events: EventRepository) -> None:
    run = SessionRunFactory()
    chat_id = run.session_id
    SessionEventFactory(session=run.session, seq=1, type="legacy")  # v0.7 event, run_id NULL
    for n in range(2, 8):
        events.append(chat_id, "step", {"n": n}, run_id=run.id if n % 2 == 0 else None)
    other_run = SessionRunFactory(session=run.session)
    events.append(chat_id, "other", run_id=other_run.id)

    assert [e.seq for e in events.list_for_session(chat_id)] == list(range(1, 9))
    assert [e.seq for e in events.list_for_session(chat_id, since_seq=3, limit=2)] == [4, 5]
    assert [e.seq for e in events.list_for_run(run.id)] == [2, 4, 6]
    assert [e.seq for e in events.list_for_run(run.id, since_seq=2, limit=1)] == [4]
    assert events.list_for_run(run.id, since_seq=6) == []
    assert all(e.run_id == run.id for e in events.list_for_run(run.id))
    assert [e.seq for e in events.list_for_run(other_run.id)] == [8]
    assert len(events.list_for_session(chat_id, limit=1000)) == 8


@pytest.mark.parametrize(
    "arguments",
    [{"limit": 0}, {"limit": 1001}, {"limit": True}, {"since_seq": -1}, {"since_seq": 2**40}],
)
def test_page_bounds_are_checked(events: EventRepository, arguments: dict[str, Any]) -> None:
    run = SessionRunFactory()
    for read in (
        lambda: events.list_for_session(run.session_id, **arguments),
        lambda: events.list_for_run(run.id, **arguments),
    ):
        with pytest.raises(BadParameterError) as caught:
            read()
        assert caught.value.status_code == 400


def test_the_run_view_of_an_unknown_run_raises(events: EventRepository) -> None:
    with pytest.raises(RunNotFoundError):
        events.list_for_run("missing")
