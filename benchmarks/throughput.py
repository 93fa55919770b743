"""Throughput: appends per second on PostgreSQL with 1, 4 and 16 writers.

Each writer is a thread with its own Session per append, committing each one
(as a worker that streams events would). The pool holds one connection per
writer. Writers append to distinct sessions, or all to one session: there
they queue on the session's counter row, which is what keeps ``seq`` without
gaps or duplicates, so one session's rate is bounded by one commit at a time.
Python threads share one interpreter lock: on a machine with few cores the
client, not the database, may be the limit (the report prints the core count).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlmodel import Session as DbSession

from app.db import create_db_engine
from app.models import SessionEvent
from app.repositories import EventRepository
from benchmarks.overhead import PROGRESS, add_sessions
from migrations import upgrade


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    writers: int
    target: str  # "distinct sessions" | "one session"
    appends: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.appends / self.seconds


def _append_for(
    engine: Engine, session_id: str, deadline: float, counts: list[int], slot: int
) -> Callable[[], None]:
    """A writer: appends until ``deadline``, then stores its count in ``counts[slot]``."""

    def work() -> None:
        done = 0
        while time.perf_counter() < deadline:
            with DbSession(engine, expire_on_commit=False) as db:
                EventRepository(db).append(session_id, "task_progress", PROGRESS)
                db.commit()
            done += 1
        counts[slot] = done

    return work


def measure_throughput(
    url: str, *, writer_counts: tuple[int, ...], seconds: float
) -> list[ThroughputResult]:
    results: list[ThroughputResult] = []
    setup = create_db_engine(url)
    upgrade(setup)
    setup.dispose()
    for writers in writer_counts:
        engine = create_db_engine(url, pool_size=writers, max_overflow=0)
        try:
            for target in ("distinct sessions", "one session"):
                sessions = add_sessions(engine, writers if target == "distinct sessions" else 1)
                counts = [0] * writers
                deadline = time.perf_counter() + seconds
                threads = [
                    threading.Thread(
                        target=_append_for(
                            engine, sessions[slot % len(sessions)], deadline, counts, slot
                        )
                    )
                    for slot in range(writers)
                ]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                elapsed = time.perf_counter() - started
                _check_gapless(engine, sessions, sum(counts))
                results.append(ThroughputResult(writers, target, sum(counts), elapsed))
        finally:
            engine.dispose()
    return results


def _check_gapless(engine: Engine, sessions: list[str], appended: int) -> None:
    """Every append is stored once, with seqs 1..n per session: the rate counts correct work."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                func.count(),
                func.count(func.distinct(SessionEvent.seq)),
                func.max(SessionEvent.seq),
            )
            .where(SessionEvent.session_id.in_(sessions))
            .group_by(SessionEvent.session_id)
        ).all()
    stored = sum(row[0] for row in rows)
    if stored != appended or any(
        count != distinct or count != top for count, distinct, top in rows
    ):
        raise RuntimeError(f"appends lost or duplicated: {appended} made, rows {rows}")
