"""Scaling: page latency of the event log at 10k, 100k and 1M rows.

For each size one database is built (schema by the migrations, rows by
``benchmarks.bulk``, then ``ANALYZE``): a big session holding a tenth of all
events, shared by two alternating runs, and sessions of 100 events. Pages of
100 are read through the repositories (one Session per page, as a request
would), at the start, middle and end of the big session and of one of its
runs, and in a small session. The sizes take turns round by round, so that
the machine's drift does not favour one size. The target: the largest size's
median within 1.5 times the smallest's, for every page.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from app.db import create_db_engine
from app.repositories import EventRepository
from benchmarks.bulk import EventLog, event_log, load_in_bulk
from benchmarks.environment import ScratchDatabases
from benchmarks.stats import Samples
from migrations import upgrade

PAGE = 100
BIG_SHARE = 0.1
SMALL_SESSION = 100
MIN_SIZE = 10_000
"""Smallest log whose big session's run still fills a page from its middle on."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page to read: which query, where, with which ``since_seq``."""

    label: str
    read: Callable[[EventRepository], Sequence[object]]
    expected_rows: int = PAGE


def _pages(log: EventLog) -> list[Page]:
    assert log.big is not None
    big, small = log.big, log.sessions[0]
    run_events = big.events // 2  # the big session's first run has every other event
    run = big.run_ids[1]

    def session_page(session_id: str, since: int) -> Callable[[EventRepository], Sequence[object]]:
        return lambda events: events.list_for_session(session_id, since_seq=since, limit=PAGE)

    def run_page(run_id: str, since: int) -> Callable[[EventRepository], Sequence[object]]:
        return lambda events: events.list_for_run(run_id, since_seq=since, limit=PAGE)

    return [
        Page("list_for_session, big session, start", session_page(big.id, 0)),
        Page("list_for_session, big session, middle", session_page(big.id, big.events // 2)),
        Page("list_for_session, big session, end", session_page(big.id, big.events - PAGE)),
        Page("list_for_session, small session", session_page(small.id, 0)),
        Page("list_for_run, big run, start", run_page(run, 0)),
        Page("list_for_run, big run, middle", run_page(run, run_events)),
        Page("list_for_run, big run, end", run_page(run, big.events - 2 * PAGE)),
        # Every tenth event of a small session is a legacy one (run_id NULL).
        Page("list_for_run, small run", run_page(small.run_ids[0], 0), PAGE - PAGE // 10),
    ]


def build_event_database(backend: str, url: str, total: int) -> EventLog:
    """Schema through the migrations, ``total`` events loaded in bulk, statistics updated."""
    engine = create_db_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    log = event_log(total, session_size=SMALL_SESSION, big_share=BIG_SHARE)
    load_in_bulk(backend, url, log)
    return log


@dataclass
class ScalingResult:
    backend: str
    sizes: list[int]
    labels: list[str]
    samples: Samples  # side = str(size), operation = page label
    build_seconds: dict[int, float]


def measure_scaling(
    backend: str, databases: ScratchDatabases, sizes: Sequence[int], *, rounds: int, batch: int
) -> ScalingResult:
    if min(sizes) < MIN_SIZE:
        raise ValueError(f"scaling sizes must be at least {MIN_SIZE} (full pages everywhere)")
    engines: dict[int, Engine] = {}
    pages: dict[int, list[Page]] = {}
    build_seconds: dict[int, float] = {}
    urls: list[str] = []
    try:
        for size in sizes:
            url = databases.url(backend, f"scaling_{size}")
            urls.append(url)
            started = time.perf_counter()
            log = build_event_database(backend, url, size)
            build_seconds[size] = time.perf_counter() - started
            engines[size] = create_db_engine(url)
            pages[size] = _pages(log)
        samples = Samples()
        for round_ in range(rounds + 1):
            gc.collect()
            order = list(sizes) if round_ % 2 == 0 else list(reversed(sizes))
            for index in range(len(pages[sizes[0]])):
                for size in order:
                    page = pages[size][index]
                    for _ in range(batch):
                        call = _reader(engines[size], page)
                        if round_:
                            samples.time(str(size), page.label, call)
                        else:
                            call()
    finally:
        for engine in engines.values():
            engine.dispose()
        for url in urls:
            databases.drop(url)
    labels = [page.label for page in pages[sizes[0]]]
    return ScalingResult(backend, list(sizes), labels, samples, build_seconds)


def _reader(engine: Engine, page: Page) -> Callable[[], None]:
    def read() -> None:
        with DbSession(engine, expire_on_commit=False) as db:
            rows = page.read(EventRepository(db))
            if len(rows) != page.expected_rows:
                raise RuntimeError(f"{page.label}: {len(rows)} rows, expected {page.expected_rows}")
            db.commit()

    return read
