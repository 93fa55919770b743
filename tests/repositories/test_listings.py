"""Run listings and session reads on the read path (``RunReads.page``, ``page_for_session``,
``SessionReads``), both backends: keyset order, every filter, cursors, and pages read
while other threads insert runs."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from app.db import unit_of_work
from app.errors import BadParameterError, SessionNotFoundError
from app.models import ChatSession, RunStatus
from app.repositories import RunRepository
from app.repositories.reads import RunReads, SessionReads
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def seed_runs(engine: Engine, specs: list[dict[str, Any]], session_id: str | None = None) -> str:
    """Runs created at T0 + i seconds (``i`` their position unless ``at`` says), in one
    session; returns the session's id."""

    def work(db: Any) -> str:
        session = SessionFactory() if session_id is None else db.get(ChatSession, session_id)
        for position, spec in enumerate(specs):
            spec = dict(spec)
            at = T0 + timedelta(seconds=spec.pop("at", position))
            SessionRunFactory(session=session, created_at=at, updated_at=at, **spec)
        return session.id

    return seed(engine, work)


def all_pages(read: Any, **filters: Any) -> list[list[str]]:
    pages, cursor = [], None
    for _ in range(100):
        page = read(cursor=cursor, **filters)
        pages.append([run.run_id for run in page.items])
        cursor = page.next_cursor
        if cursor is None:
            return pages
    raise AssertionError("more than 100 pages")


def ids_by_time(engine: Engine, status: str | None = None) -> list[str]:
    """Every run's id (or those in ``status``), newest first, read with plain SQL."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status FROM session_runs ORDER BY created_at DESC, id DESC")
        )
        return [row[0] for row in rows if status is None or row[1] == status]


def test_pages_newest_first_cover_every_run_once(engine: Engine) -> None:
    seed_runs(engine, [{} for _ in range(7)])
    # two runs at the very same time: the id breaks the tie
    seed_runs(engine, [{"at": 3}, {"at": 3}])
    reads = RunReads.of(engine)
    pages = all_pages(reads.page, limit=3)
    assert [len(page) for page in pages] == [3, 3, 3]
    assert [run for page in pages for run in page] == ids_by_time(engine)
    last = reads.page(limit=9)
    assert len(last.items) == 9 and last.next_cursor is None


def test_a_page_that_is_exactly_the_rest_has_no_next_cursor(engine: Engine) -> None:
    seed_runs(engine, [{} for _ in range(4)])
    reads = RunReads.of(engine)
    first = reads.page(limit=2)
    second = reads.page(limit=2, cursor=first.next_cursor)
    assert len(second.items) == 2 and second.next_cursor is None


def test_status_and_time_filters(engine: Engine) -> None:
    statuses = [RunStatus.QUEUED, RunStatus.COMPLETED, RunStatus.QUEUED, RunStatus.FAILED] * 2
    seed_runs(engine, [{"status": status} for status in statuses])
    reads = RunReads.of(engine)
    queued = [run for page in all_pages(reads.page, status="queued", limit=2) for run in page]
    assert queued == ids_by_time(engine, "queued") and len(queued) == 4
    # exclusive bounds: created at T0+2 .. T0+5 are after T0+1 and before T0+6
    window = reads.page(
        created_after=T0 + timedelta(seconds=1), created_before=T0 + timedelta(seconds=6)
    )
    assert [run.created_at for run in window.items] == [
        T0 + timedelta(seconds=s) for s in (5, 4, 3, 2)
    ]
    # a naive time is UTC; with a cursor inside the window, the cursor bounds
    naive = reads.page(created_before=datetime(2026, 1, 1, 0, 0, 6), limit=2)
    assert [run.created_at.second for run in naive.items] == [5, 4]
    rest = reads.page(created_before=T0 + timedelta(seconds=6), cursor=naive.next_cursor, limit=10)
    assert [run.created_at.second for run in rest.items] == [3, 2, 1, 0]
    # a created_before earlier than the cursor wins over it
    earlier = reads.page(created_before=T0 + timedelta(seconds=2), cursor=naive.next_cursor)
    assert [run.created_at.second for run in earlier.items] == [1, 0]
    both = reads.page(status="failed", created_after=T0 + timedelta(seconds=3))
    assert [run.created_at.second for run in both.items] == [7]


METADATA = [
    {"team": "a", "n": 1, "flag": True, "none": None, "dotted.key": "x", "nested": {"a": 1}},
    {"team": "a", "n": 1.0, "flag": False},
    {"team": "b", "n": "1", "flag": 1},
    {"team": "a", "n": 2, "with space": "yes"},
    {},
]


@pytest.mark.parametrize(
    ("wanted", "positions"),
    [
        ({"team": "a"}, [0, 1, 3]),
        ({"team": "a", "n": 1}, [0, 1]),  # 1 and 1.0 are the same number
        ({"n": 1.0}, [0, 1]),
        ({"n": "1"}, [2]),  # a string never matches a number
        ({"flag": True}, [0]),  # true is not 1
        ({"flag": 1}, [2]),
        ({"flag": False}, [1]),
        ({"none": None}, [0]),  # null matches a key set to null, not a missing key
        ({"dotted.key": "x"}, [0]),
        ({"with space": "yes"}, [3]),
        ({"team": "c"}, []),
        ({"team": "a", "missing": "x"}, []),
        ({"nested": 1}, []),
    ],
)
def test_metadata_filter(engine: Engine, wanted: dict[str, Any], positions: list[int]) -> None:
    seed_runs(engine, [{"run_metadata": metadata} for metadata in METADATA])
    reads = RunReads.of(engine)
    got = {run.created_at for run in reads.page(metadata=wanted).items}
    assert got == {T0 + timedelta(seconds=position) for position in positions}
    for run in reads.page(metadata=wanted).items:
        assert run.run_metadata == METADATA[int((run.created_at - T0).total_seconds())]


@pytest.mark.parametrize(
    "wanted",
    [
        {},
        {"a": {"b": 1}},
        {"a": [1]},
        {'quote"d': 1},
        {"back\\slash": 1},
        {"x" * 101: 1},
        {"a": float("nan")},
    ],
)
def test_a_bad_metadata_filter_is_refused(engine: Engine, wanted: dict[str, Any]) -> None:
    with pytest.raises(BadParameterError) as caught:
        RunReads.of(engine).page(metadata=wanted)
    assert (caught.value.code, caught.value.name) == ("bad_parameter", "metadata")


def test_filters_combine_with_the_session(engine: Engine) -> None:
    mine = seed_runs(
        engine,
        [
            {"status": RunStatus.QUEUED, "run_metadata": {"team": "a"}},
            {"status": RunStatus.COMPLETED, "run_metadata": {"team": "a"}},
            {"status": RunStatus.COMPLETED, "run_metadata": {"team": "b"}},
        ],
    )
    seed_runs(engine, [{"status": RunStatus.COMPLETED, "run_metadata": {"team": "a"}}])
    reads = RunReads.of(engine)
    assert len(reads.page_for_session(mine).items) == 3
    assert len(reads.page_for_session(mine, status="completed").items) == 2
    page = reads.page_for_session(mine, status="completed", metadata={"team": "a"})
    assert [run.created_at.second for run in page.items] == [1]
    assert len(reads.page(status="completed", metadata={"team": "a"}).items) == 2
    paged = all_pages(partial_session(reads, mine), limit=1)
    assert [len(page) for page in paged] == [1, 1, 1]


def partial_session(reads: RunReads, session_id: str) -> Any:
    return lambda **kwargs: reads.page_for_session(session_id, **kwargs)


def test_session_pages_and_errors(engine: Engine) -> None:
    empty = seed(engine, lambda db: SessionFactory().id)
    reads = RunReads.of(engine)
    page = reads.page_for_session(empty)
    assert page.items == [] and page.next_cursor is None
    with pytest.raises(SessionNotFoundError):
        reads.page_for_session("no-such-session")
    with pytest.raises(BadParameterError, match="status"):
        reads.page_for_session(empty, status="done")
    with pytest.raises(BadParameterError, match="limit"):
        reads.page(limit=0)


BAD_CURSORS = ["", "not base64 !", "e30", "W10", "WyJ4IiwxXQ", "x" * 401, "tampered"]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_a_bad_cursor_is_refused_by_name(engine: Engine, cursor: str) -> None:
    seed_runs(engine, [{}, {}])
    reads = RunReads.of(engine)
    if cursor == "tampered":  # a real cursor cut short
        real = reads.page(limit=1).next_cursor
        assert real is not None and reads.page(cursor=real).items
        cursor = real[:-4]
    with pytest.raises(BadParameterError) as caught:
        reads.page(cursor=cursor)
    assert caught.value.name == "cursor"
    assert not cursor or cursor not in str(caught.value)


def test_sessions_are_read_by_id(engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory(title="hello").id)
    session = SessionReads.of(engine).get(session_id)
    assert (session.session_id, session.title) == (session_id, "hello")
    assert session.created_at is not None and session.created_at.tzinfo is UTC
    with pytest.raises(SessionNotFoundError):
        SessionReads.of(engine).get("no-such-session")


@pytest.mark.slow
def test_paging_while_threads_insert_runs(engine: Engine) -> None:
    """Writers create runs through the repository (the database's clock) while a reader
    pages with small pages: the pages hold every run that existed at the start exactly
    once, in order, whatever else they hold."""
    session_ids = [seed(engine, lambda db: SessionFactory().id) for _ in range(3)]

    def create(session_id: str, metadata: dict[str, Any]) -> None:
        with unit_of_work(engine) as db:
            RunRepository(db).create({"session_id": session_id, "message": "m"})

    for index in range(45):
        create(session_ids[index % 3], {})
    before = ids_by_time(engine)
    stop = threading.Event()
    errors: list[BaseException] = []
    created = [0]

    def writer(session_id: str) -> None:
        try:
            while not stop.is_set() and created[0] < 300:
                create(session_id, {})
                created[0] += 1
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(sid,)) for sid in session_ids]
    for thread in threads:
        thread.start()
    try:
        reads = RunReads.of(engine)
        time.sleep(0.05)
        seen: list[str] = []
        cursor = None
        for _ in range(200):
            page = reads.page(cursor=cursor, limit=4)
            seen += [run.run_id for run in page.items]
            cursor = page.next_cursor
            time.sleep(0.005)
            if cursor is None:
                break
        per_session: dict[str, list[str]] = {}
        for sid in session_ids:
            cursor, ids = None, []
            for _ in range(200):
                page = reads.page_for_session(sid, cursor=cursor, limit=3)
                ids += [run.run_id for run in page.items]
                cursor = page.next_cursor
                if cursor is None:
                    break
            per_session[sid] = ids
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert created[0] > 0
    assert len(seen) == len(set(seen)), "a run came twice"
    assert [run for run in seen if run in set(before)] == before, "a gap or a reorder"
    for sid, ids in per_session.items():
        assert len(ids) == len(set(ids))
        mine = [run for run in before if run in set(ids_of_session(engine, sid))]
        assert [run for run in ids if run in set(before)] == mine


def ids_of_session(engine: Engine, session_id: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id FROM session_runs WHERE session_id = :s"), {"s": session_id}
        )
        return [row[0] for row in rows]
