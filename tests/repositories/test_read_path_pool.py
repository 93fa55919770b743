"""The read path's connections, lent by the engine's pool without SQLAlchemy's proxy
(``app.repositories._pool_loan``), on both backends.

A loan must keep the pool's promises: never more connections than the pool allows,
each one back when the read ends (also when it fails), and the host's own pool
listeners seeing every read's connection (the read then takes the proxy). Real
databases and real threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session as DbSession

from app.db import create_db_engine, unit_of_work
from app.repositories import EventReads, RunReads, RunRepository
from tests.factories import SessionFactory

READERS, READS_EACH = 12, 60


def _runs(engine: Engine, count: int) -> tuple[str, list[str]]:
    with unit_of_work(engine) as db:
        chat = SessionFactory.build()
        db.add(chat)
        db.flush()
        runs = RunRepository(db)
        ids = [runs.create({"session_id": chat.id, "message": f"m{i}"}).id for i in range(count)]
        for run_id in ids:
            runs.cancel(run_id)
    return chat.id, ids


def test_many_threads_reading_on_a_small_pool_stay_within_it_and_give_every_connection_back(
    engine: Engine, database_url: str
) -> None:
    session_id, ids = _runs(engine, 5)
    small = create_db_engine(database_url, pool_size=2, max_overflow=1, pool_timeout=30)
    # Connections open at once (the pool closes an overflow connection it gets back when
    # it is full, and opens another later: over the test more than 3 may be opened).
    open_now, most_open = [0], [0]
    busiest = [0]
    lock = threading.Lock()

    @event.listens_for(small, "connect")
    def _opened(_dbapi_connection: Any, _record: Any) -> None:
        with lock:
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])

    @event.listens_for(small, "close")
    def _closed(_dbapi_connection: Any, _record: Any) -> None:
        with lock:
            open_now[0] -= 1

    runs, events = RunReads.of(small), EventReads.of(small)
    expected = {run_id: runs.get(run_id) for run_id in ids}
    expected_page = events.page_for_session(session_id, limit=50)

    def read(worker: int) -> int:
        done = 0
        for index in range(READS_EACH):
            run_id = ids[(worker + index) % len(ids)]
            assert runs.get(run_id) == expected[run_id]
            if index % 10 == 0:
                assert events.page_for_session(session_id, limit=50) == expected_page
            with lock:
                busiest[0] = max(busiest[0], small.pool.checkedout())  # type: ignore[attr-defined]
            done += 1
        return done

    try:
        with ThreadPoolExecutor(READERS) as pool:
            assert sum(pool.map(read, range(READERS))) == READERS * READS_EACH
        assert small.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert busiest[0] <= 3
        assert 1 <= most_open[0] <= 3, f"{most_open[0]} connections open at once"
    finally:
        small.dispose()


def test_a_hosts_pool_listeners_see_every_read_connection(engine: Engine) -> None:
    _session_id, ids = _runs(engine, 1)
    reads = RunReads.of(engine)
    reads.get(ids[0])  # the plan exists: the next reads go to the driver
    seen: list[str] = []

    def on_checkout(_dbapi: Any, _record: Any, proxy: Any) -> None:
        assert proxy is not None  # SQLAlchemy's proxy, as the host's listener expects
        seen.append("checkout")

    def on_checkin(_dbapi: Any, _record: Any) -> None:
        seen.append("checkin")

    event.listen(engine, "checkout", on_checkout)
    event.listen(engine, "checkin", on_checkin)
    try:
        for _ in range(3):
            reads.get(ids[0])
    finally:
        event.remove(engine, "checkout", on_checkout)
        event.remove(engine, "checkin", on_checkin)
    assert seen == ["checkout", "checkin"] * 3
    reads.get(ids[0])  # and without them, no listener of the host's is left behind
    assert len(seen) == 6


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_read_that_fails_gives_its_connection_back_and_the_next_read_works(
    engine: Engine, session: DbSession, backend: str
) -> None:
    """A driver error on a lent connection (its server process killed) is raised as the
    repositories raise it, and the pool ends with nothing checked out."""
    session.close()
    _session_id, ids = _runs(engine, 1)
    reads = RunReads.of(engine)
    expected = reads.get(ids[0])
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    killer = create_db_engine(engine.url, isolation_level="AUTOCOMMIT")
    try:
        with killer.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        killer.dispose()
    with pytest.raises(DBAPIError) as failed:
        reads.get(ids[0])
    assert failed.value.connection_invalidated
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert reads.get(ids[0]) == expected
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
