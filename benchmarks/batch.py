"""``append_many`` per event, at N = 1, 10 and 100, versus the raw driver running the same SQL.

    python -m benchmarks.batch [--rounds 10] [--batches 20] [--backends sqlite,postgresql]

Sides, as in ``benchmarks.overhead``: *repository* is a ``sqlmodel`` Session,
one ``EventRepository.append_many`` call of N events of one run, ``commit``;
*raw* replays the statements that call sent (captured once per N) on one
``sqlite3`` / ``psycopg`` connection in the same transaction. For comparison,
*append loop* is N ``append`` calls in one transaction. Both sides write to
the same run, taking turns batch by batch; the first round is a warm-up.
Figures: median (p95) microseconds **per event**; targets at N = 100:
repository at most 1.5x raw on PostgreSQL, 3x on SQLite.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.pool import NullPool
from sqlmodel import Session as DbSession

from app.capture import capture_statements
from app.db import create_db_engine
from app.repositories import EventRepository, RunRepository
from app.repositories.events import NewEvent
from benchmarks.capture import Ids, make_script
from benchmarks.environment import (
    machine_facts,
    postgresql_reachable,
    postgresql_server_url,
    scratch_databases,
)
from benchmarks.overhead import PROGRESS, RawSide, add_sessions
from benchmarks.report import RATIO_TARGETS, table
from benchmarks.stats import Samples, Summary, format_us
from migrations import upgrade

SIZES = (1, 10, 100)
REPOSITORY, RAW, LOOP = "repository", "raw", "append loop"


@dataclass
class BatchResult:
    backend: str
    samples: Samples
    sql: str


def measure_batches(backend: str, url: str, *, rounds: int, batches: int) -> BatchResult:
    engine = create_db_engine(url)
    upgrade(engine)
    session_id = add_sessions(engine, 1)[0]
    with DbSession(engine, expire_on_commit=False) as db:
        run_id = RunRepository(db).create({"session_id": session_id, "message": "bench"}).id
        db.commit()
    ids = Ids(run=run_id, session=session_id)

    # The caller's events, made once as the raw side's batch document is decoded
    # once: each side then checks, encodes and sends them per call.
    events = {
        size: [NewEvent("task_progress", PROGRESS, run_id=run_id) for _ in range(size)]
        for size in SIZES
    }

    def repository(size: int, on: Engine = engine) -> None:
        with DbSession(on, expire_on_commit=False) as db:
            EventRepository(db).append_many(session_id, events[size])
            db.commit()

    def loop(size: int) -> None:
        with DbSession(engine, expire_on_commit=False) as db:
            repo = EventRepository(db)
            for _ in range(size):
                repo.append(session_id, "task_progress", PROGRESS, run_id=run_id)
            db.commit()

    # Recorded on an engine of its own (see benchmarks.overhead: an engine that
    # ever had a cursor-event listener keeps paying for event dispatch).
    recorder = create_db_engine(url)
    scripts = {}
    try:
        for size in SIZES:
            with capture_statements(recorder) as capture:
                repository(size, recorder)
            scripts[str(size)] = make_script(capture.statements, ids)
    finally:
        recorder.dispose()
    raw_engine = create_db_engine(url, poolclass=NullPool)
    pooled = raw_engine.raw_connection()
    raw = RawSide(pooled.driver_connection, scripts)
    samples = Samples()
    sides = {
        REPOSITORY: repository,
        RAW: lambda size: raw.run(str(size), _Chain(ids)),
        LOOP: loop,
    }
    try:
        for round_ in range(rounds + 1):
            gc.collect()
            order = list(sides.items()) if round_ % 2 == 0 else list(sides.items())[::-1]
            for size in SIZES:
                for _ in range(batches):
                    for name, side in order:
                        if round_ == 0:
                            side(size)
                        else:
                            samples.time(name, str(size), lambda s=side, n=size: s(n))
    finally:
        pooled.close()
        raw_engine.dispose()
        engine.dispose()
    return BatchResult(backend, samples, scripts["100"].describe())


@dataclass
class _Chain:
    """What ``RawSide.run`` needs: the ids (the run exists; nothing is created)."""

    ids: Ids


def _per_event(summary: Summary, size: int) -> str:
    return f"{format_us(summary.median_us / size)} ({format_us(summary.p95_us / size)})"


def batch_section(results: Sequence[BatchResult]) -> str:
    parts = [
        "## append_many: per event, repository versus raw driver",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
    ]
    for result in results:
        rows = []
        for size in SIZES:
            per = {
                side: result.samples.summary(side, str(size)) for side in (REPOSITORY, RAW, LOOP)
            }
            ratio = per[REPOSITORY].median_us / per[RAW].median_us
            target = RATIO_TARGETS[result.backend] if size == 100 else None
            rows.append(
                [
                    str(size),
                    *(_per_event(per[side], size) for side in (REPOSITORY, RAW, LOOP)),
                    f"{ratio:.2f}x" + ("" if target is None or ratio <= target else " **over**"),
                    f"{per[LOOP].median_us / per[REPOSITORY].median_us:.1f}x",
                ]
            )
        parts += [
            f"### {result.backend}",
            "",
            table(
                [
                    "N",
                    "repository µs/event",
                    "raw µs/event",
                    "append loop µs/event",
                    "repository / raw",
                    "loop / batch",
                ],
                rows,
            ),
            "",
            "<details><summary>SQL replayed at N = 100</summary>",
            "",
            "```sql",
            result.sql,
            "```",
            "</details>",
            "",
        ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=20, help="batches per size, side and round")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    server = postgresql_server_url()
    backends = args.backends.split(",")
    if "postgresql" in backends and (reason := postgresql_reachable(server)):
        print(f"postgresql skipped: {reason}", file=sys.stderr)
        backends.remove("postgresql")
    facts = machine_facts(server if "postgresql" in backends else None)
    print("\n".join(f"- {key}: {value}" for key, value in facts.items()) + "\n")
    with scratch_databases(server) as databases:
        results = [
            measure_batches(
                backend, databases.url(backend, "batch"), rounds=args.rounds, batches=args.batches
            )
            for backend in backends
        ]
    print(batch_section(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
