"""EventFeed on both backends: wake on commit, catch-up after a dropped listener, end of a run,
nothing missed or repeated under concurrent writers. Real databases, real threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, text

from app.db import create_db_engine, unit_of_work
from app.errors import RunNotFoundError
from app.feed import EventFeed
from app.models import SessionEvent
from app.repositories import EventRepository, RunRepository
from app.repositories.events import NewEvent
from tests.concurrency import seed
from tests.factories import SessionFactory

NO_TIMER = 60.0
"""The followers' safety re-read interval in these tests: far longer than any wait below,
so a delivery within seconds proves a wake-up on commit."""


@pytest.fixture
def feed(engine: Engine) -> Iterator[EventFeed]:
    feed = EventFeed(engine, recheck=NO_TIMER)
    feed.start()
    try:
        yield feed
    finally:
        feed.close()


def running_run(engine: Engine) -> tuple[str, str]:
    session_id = seed(engine, lambda db: SessionFactory().id)
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.create({"session_id": session_id, "message": "follow me"})
        runs.start(run.id)
    return session_id, run.id


def append(engine: Engine, session_id: str, type_: str, run_id: str | None = None) -> int:
    with unit_of_work(engine) as db:
        return EventRepository(db).append(session_id, type_, run_id=run_id).seq


def later(seconds: float, work: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), work()))
    thread.start()
    return thread


async def first_batch(feed: EventFeed, session_id: str, since_seq: int) -> list[SessionEvent]:
    async for batch in feed.follow(session_id, since_seq=since_seq):
        return batch
    raise AssertionError("the feed ended")


def test_a_follower_wakes_on_commit_not_on_a_timer(engine: Engine, feed: EventFeed) -> None:
    session_id, run_id = running_run(engine)
    started = {}

    def write() -> None:
        started["at"] = time.monotonic()
        append(engine, session_id, "tool_call", run_id)

    async def main() -> tuple[list[SessionEvent], float]:
        writer = later(0.5, write)
        batch = await asyncio.wait_for(first_batch(feed, session_id, since_seq=2), 20)
        writer.join()
        return batch, time.monotonic() - started["at"]

    batch, latency = asyncio.run(main())
    assert [(e.seq, e.type) for e in batch] == [(3, "tool_call")]
    assert latency < 5, latency  # far below NO_TIMER


def test_wait_blocks_until_a_commit_and_returns_empty_after_timeout(
    engine: Engine, feed: EventFeed
) -> None:
    session_id, run_id = running_run(engine)
    assert feed.wait(session_id, since_seq=2, timeout=0.3) == []
    writer = later(0.3, lambda: append(engine, session_id, "late", run_id))
    began = time.monotonic()
    events = feed.wait(session_id, since_seq=2, run_id=run_id, timeout=20)
    writer.join()
    assert [e.type for e in events] == ["late"] and time.monotonic() - began < 10
    # what is already there comes back at once, a run's events only
    append(engine, session_id, "session level")
    assert [e.seq for e in feed.wait(session_id, since_seq=0, timeout=0)] == [1, 2, 3, 4]
    assert [e.seq for e in feed.wait(session_id, since_seq=0, run_id=run_id)] == [1, 2, 3]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_catches_up_after_its_listening_connection_is_terminated(
    engine: Engine, feed: EventFeed, backend: str
) -> None:
    session_id, run_id = running_run(engine)
    pid = feed.listener_backend_pid
    assert pid is not None and feed.listener_connections == 1

    async def main() -> list[int]:
        seqs: list[int] = []

        async def follow() -> None:
            async for batch in feed.follow(session_id, since_seq=0, run_id=run_id):
                seqs.extend(e.seq for e in batch)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.5)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        # committed while nobody listens: the notice is lost, the catch-up finds the events
        await asyncio.to_thread(append, engine, session_id, "while down", run_id)
        with unit_of_work(engine) as db:
            EventRepository(db).append_many(session_id, [NewEvent("burst", run_id=run_id)] * 3)
        deadline = time.monotonic() + 20
        while feed.listener_connections < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(append, engine, session_id, "after", run_id)
        with unit_of_work(engine) as db:
            RunRepository(db).complete(run_id)
        await asyncio.wait_for(follower, 20)
        return seqs

    seqs = asyncio.run(main())
    assert feed.listener_connections == 2 and feed.listener_backend_pid != pid
    assert seqs == list(range(1, 9))  # created, started, down, 3 burst, after, completed


def test_following_a_run_ends_after_its_terminal_event(engine: Engine, feed: EventFeed) -> None:
    session_id, run_id = running_run(engine)

    async def follow(since_seq: int) -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        async for batch in feed.follow(session_id, since_seq=since_seq, run_id=run_id):
            seen.extend((e.seq, e.type) for e in batch)
        return seen

    async def main() -> list[tuple[int, str]]:
        follower = asyncio.create_task(follow(0))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(append, engine, session_id, "other run's business")
        await asyncio.to_thread(append, engine, session_id, "step", run_id)

        def cancel() -> None:
            with unit_of_work(engine) as db:
                RunRepository(db).cancel(run_id)

        await asyncio.to_thread(cancel)
        return await asyncio.wait_for(follower, 20)

    seen = asyncio.run(main())
    assert seen == [(1, "run_created"), (2, "run_started"), (4, "step"), (5, "run_cancelled")]
    # the run is over: a follower from its last event ends at once, one from earlier replays
    assert asyncio.run(asyncio.wait_for(follow(5), 10)) == []
    assert asyncio.run(asyncio.wait_for(follow(2), 10)) == [(4, "step"), (5, "run_cancelled")]
    with pytest.raises(RunNotFoundError):
        asyncio.run(follow_other_session(feed, run_id))


async def follow_other_session(feed: EventFeed, run_id: str) -> None:
    async for _ in feed.follow("another-session", since_seq=0, run_id=run_id):
        pass


def test_no_event_missed_or_repeated_under_concurrent_writers(
    engine: Engine, feed: EventFeed, database_url: str
) -> None:
    session_id, run_id = running_run(engine)
    writers, rounds = 4, 8

    def write(index: int) -> None:
        own = create_db_engine(database_url)
        try:
            for n in range(rounds):
                with unit_of_work(own) as db:
                    events = EventRepository(db)
                    if n % 2:
                        batch = [NewEvent(f"w{index}", run_id=run_id)] * 3
                        events.append_many(session_id, batch)
                    else:
                        events.append(session_id, f"w{index}", run_id=run_id)
        finally:
            own.dispose()

    total = 2 + writers * (rounds // 2) * 4 + 1

    async def main() -> list[list[int]]:
        received: list[list[int]] = [[] for _ in range(3)]

        async def follow(into: list[int], since: int) -> None:
            async for batch in feed.follow(session_id, since_seq=since, run_id=run_id):
                into.extend(e.seq for e in batch)

        followers = [asyncio.create_task(follow(received[i], 0)) for i in range(3)]
        await asyncio.sleep(0.3)
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(lambda: [thread.join() for thread in threads])

        def complete() -> None:
            with unit_of_work(engine) as db:
                RunRepository(db).complete(run_id)

        await asyncio.to_thread(complete)
        await asyncio.wait_for(asyncio.gather(*followers), 30)
        return received

    for seqs in asyncio.run(main()):
        assert seqs == list(range(1, total + 1))
