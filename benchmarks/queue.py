"""The run queue: claims per second with worker processes, and ``claim_next`` versus raw SQL.

Two measurements of ``RunRepository.claim_next``:

* **Claims per second on PostgreSQL** (``measure_claim_rates``) with 1, 4 and
  16 worker *processes* (``multiprocessing``, spawn), each with its own engine
  and a pool of one connection. Each worker loops: claim the next run in one
  unit of work (``app.db.unit_of_work``), complete it in another, until its
  time is up, its count is reached or the queue is empty. Each worker count
  gets a new database whose queue is seeded over many sessions (runs in
  round-robin order, so the oldest runs belong to different sessions), loaded
  in bulk as ``RunRepository.create`` leaves them (queued run, ``run_created``
  event, the session's event counter), then ``ANALYZE``. The clock starts when
  every worker is connected and ready. Meanwhile ``ServerSampler`` records
  where the workers' backends are (``pg_stat_activity``), and each worker
  measures its own CPU time and its backend's (``/proc``). Afterwards
  ``check_claims`` compares the workers' reports with the database: no run
  claimed twice (one ``run_started`` per run, reported by exactly one worker,
  the one whose ``worker_id`` the run holds), every claimed run completed
  exactly once, the others still queued, and in every session the log
  alternates ``run_started`` / ``run_completed`` of the same run, so a session
  never had two running runs; also whether each session's runs were started
  in their queue order (FIFO per session).
* **The cost of ``claim_next`` over the raw driver** (``measure_claim_cost``),
  on SQLite and PostgreSQL, in the style of ``benchmarks.overhead``: the
  repository side is one unit of work with ``claim_next``; the raw side
  replays the statements one such call sent (captured with ``app.capture``:
  SQLite's ``BEGIN IMMEDIATE``, the claim UPDATE, the ``run_started`` append,
  then the driver's commit) on a ``sqlite3`` / ``psycopg`` connection. Like
  hand-written driver code, the raw side takes the claimed run's id and
  session from the UPDATE's returned row for the append, and sets the lease
  to now plus the captured lease. Both sides claim from one queue (so the
  database state is the same for both), alternate batch by batch and swap
  who goes first every round; after the claims each side completes its runs
  the same way (also timed, as ``complete``), and the queue is refilled to
  its depth, so every round starts from the same state. Every claim must take
  a run; afterwards a check confirms that both sides claimed and completed
  the same number of runs, each with one ``run_started`` and one
  ``run_completed`` event. SQLite is measured twice: as the migrations leave
  a database (no planner statistics: nothing in the app runs ``ANALYZE``) and
  after ``ANALYZE``, because its plan for the claim differs between the two.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sqlite3
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import psycopg
from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.pool import NullPool

from app.capture import CapturedStatement, capture_statements
from app.db import create_db_engine, unit_of_work
from app.errors import ConflictError
from app.models import (
    EventSource,
    RunOptions,
    RunStatus,
    SessionEvent,
    SessionEventSequence,
    SessionRun,
    TriggerSource,
    new_id,
)
from app.repositories import RunRepository
from app.schemas.run import RunCreate
from app.state_machine import RunEventType
from app.types import utc_now
from benchmarks.capture import SQLITE_TIMESTAMP_FORMAT, Ids, Script, make_script
from benchmarks.environment import ScratchDatabases, raw_postgresql
from benchmarks.overhead import MESSAGE, RAW, REPOSITORY, add_sessions
from benchmarks.stats import Samples, Summary, summarize
from migrations import upgrade

RUNS = SessionRun.__table__
EVENTS = SessionEvent.__table__
METRICS = {"tokens": 4096, "cost_usd": 0.12}
CLAIM, COMPLETE = "claim_next", "complete"
REPOSITORY_WORKER, RAW_WORKER = "bench-repository", "bench-raw-driver"
OPTIONS = RunCreate(session_id="-", message=MESSAGE).model_dump(
    include=set(RunOptions.model_fields)
)
"""The options ``RunRepository.create`` stores for a run created with defaults."""
EMPTY_RETRIES = 3
"""A worker whose ``claim_next`` finds nothing this many times in a row (5 ms apart) stops."""
START_TIMEOUT_S = 120.0
"""How long the worker processes may take to import, connect and report ready."""


# --------------------------------------------------------------------------
# The queue, seeded in bulk


@dataclass
class Queue:
    """Queued runs over a fixed set of sessions, added round-robin, oldest first."""

    engine: Engine
    sessions: list[str]
    runs: list[str] = field(default_factory=list)  # every run added, oldest first
    start: datetime = field(default_factory=lambda: utc_now() - timedelta(hours=1))

    def add(self, count: int) -> None:
        """``count`` more queued runs, each as ``RunRepository.create`` leaves it: the
        queued row, its ``run_created`` event and the session's event counter."""
        sequences = SessionEventSequence.__table__
        with self.engine.begin() as conn:
            next_seq: dict[str, int] = dict(
                conn.execute(
                    select(sequences.c.session_id, sequences.c.next_seq).where(
                        sequences.c.session_id.in_(self.sessions)
                    )
                ).all()
            )
            run_rows: list[dict[str, Any]] = []
            event_rows: list[dict[str, Any]] = []
            for index in range(len(self.runs), len(self.runs) + count):
                session_id = self.sessions[index % len(self.sessions)]
                run_id = new_id()
                created = self.start + timedelta(milliseconds=index)
                seq = next_seq.get(session_id, 1)
                next_seq[session_id] = seq + 1
                self.runs.append(run_id)
                run_rows.append(
                    {
                        "id": run_id,
                        "session_id": session_id,
                        "status": RunStatus.QUEUED,
                        "trigger_source": TriggerSource.CHAT,
                        "input_message": MESSAGE,
                        "options": OPTIONS,
                        "checkpoint_thread": f"{session_id}:{run_id}",
                        "created_at": created,
                        "updated_at": created,
                    }
                )
                event_rows.append(
                    {
                        "session_id": session_id,
                        "seq": seq,
                        "type": RunEventType.RUN_CREATED.value,
                        "payload": {"trigger_source": "chat", "parent_run_id": None},
                        "source": EventSource.SESSION,
                        "created_at": created,
                        "run_id": run_id,
                    }
                )
            for chunk in range(0, count, 5000):
                conn.execute(insert(RUNS), run_rows[chunk : chunk + 5000])
                conn.execute(insert(EVENTS), event_rows[chunk : chunk + 5000])
            conn.execute(delete(sequences).where(sequences.c.session_id.in_(self.sessions)))
            now = utc_now()
            conn.execute(
                insert(sequences),
                [
                    {"session_id": session_id, "next_seq": seq, "updated_at": now}
                    for session_id, seq in next_seq.items()
                ],
            )


def seed_queue(engine: Engine, *, sessions: int, runs: int, analyze: bool = True) -> Queue:
    """``runs`` queued runs over ``sessions`` new sessions; then ``ANALYZE`` if asked
    (on PostgreSQL autovacuum would soon do it; on SQLite nothing in the app does)."""
    queue = Queue(engine, add_sessions(engine, sessions))
    queue.add(runs)
    if analyze:
        with engine.begin() as conn:
            for table in ("session_runs", "session_events", "sessions"):
                conn.exec_driver_sql(f"ANALYZE {table}")
    return queue


# --------------------------------------------------------------------------
# Claims per second: worker processes


@dataclass
class WorkerReport:
    worker_id: str
    claimed: list[str] = field(default_factory=list)
    claim_ns: list[int] = field(default_factory=list)
    complete_ns: list[int] = field(default_factory=list)
    conflicts: int = 0
    drained: bool = False
    started: float = 0.0
    finished: float = 0.0
    cpu_seconds: float = 0.0  # this process, from start to finish
    server_cpu_seconds: float | None = None  # its PostgreSQL backend (None: not readable)


def _process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a local process, from ``/proc`` (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def claim_worker(
    url: str,
    worker_id: str,
    seconds: float,
    limit: int,
    go: Any,
    reports: Any,
) -> None:
    """One worker process: claim, then complete, each in its own unit of work.

    Stops after ``seconds`` (counted from ``go``), after ``limit`` claims, or
    when the queue stays empty; puts its ``WorkerReport`` (or an error) on ``reports``.
    """
    try:
        engine = create_db_engine(url, pool_size=1, max_overflow=0)
        with engine.connect() as conn:  # connected before the clock starts
            conn.exec_driver_sql("SELECT 1")
            backend = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
        report = WorkerReport(worker_id)
        reports.put(("ready", worker_id))
        if not go.wait(START_TIMEOUT_S):
            raise RuntimeError("never told to start")
        report.started = time.monotonic()
        cpu_started = time.process_time()
        server_cpu_started = _process_cpu_seconds(backend)
        deadline = report.started + seconds
        empty = 0
        while len(report.claimed) < limit and time.monotonic() < deadline:
            began = time.perf_counter_ns()
            try:
                with unit_of_work(engine) as db:
                    run = RunRepository(db).claim_next(worker_id)
            except ConflictError:
                report.conflicts += 1
                continue
            claimed = time.perf_counter_ns()
            if run is None:
                empty += 1
                if empty >= EMPTY_RETRIES:
                    report.drained = True
                    break
                time.sleep(0.005)
                continue
            empty = 0
            report.claimed.append(run.id)
            report.claim_ns.append(claimed - began)
            with unit_of_work(engine) as db:
                RunRepository(db).complete(run.id, METRICS)
            report.complete_ns.append(time.perf_counter_ns() - claimed)
        report.finished = time.monotonic()
        report.cpu_seconds = time.process_time() - cpu_started
        server_cpu_finished = _process_cpu_seconds(backend)
        if server_cpu_started is not None and server_cpu_finished is not None:
            report.server_cpu_seconds = server_cpu_finished - server_cpu_started
        engine.dispose()
        reports.put(("done", report))
    except BaseException:
        reports.put(("error", f"{worker_id}: {traceback.format_exc()}"))


@dataclass(frozen=True, slots=True)
class ClaimRate:
    workers: int
    claims: int
    seconds: float
    seeded: int
    sessions: int
    conflicts: int
    drained: bool
    claim: Summary
    complete: Summary
    problems: tuple[str, ...]  # empty: every check passed
    fifo: bool
    spawn_seconds: float
    client_cpu_ms: float  # per claim (claim and complete), all worker processes
    server_cpu_ms: float | None  # per claim, their PostgreSQL backends
    backend_states: tuple[tuple[str, float], ...]  # share of samples, largest first

    @property
    def per_second(self) -> float:
        return self.claims / self.seconds


def measure_claim_rates(
    databases: ScratchDatabases,
    *,
    worker_counts: Sequence[int],
    seconds: float,
    runs: int,
    sessions: int,
) -> list[ClaimRate]:
    """For each worker count, on a new PostgreSQL database: a queue of ``runs`` runs over
    ``sessions`` sessions, worked for at most ``seconds``, then checked."""
    results: list[ClaimRate] = []
    for workers in worker_counts:
        url = databases.url("postgresql", f"queue_{workers}")
        setup = create_db_engine(url, pool_size=2, max_overflow=0)
        try:
            upgrade(setup)
            queue = seed_queue(setup, sessions=sessions, runs=runs)
            launched = time.monotonic()
            reports, states = _run_workers(url, workers, seconds=seconds, limit=runs)
            total = time.monotonic() - launched
            elapsed = max(r.finished for r in reports) - min(r.started for r in reports)
            problems, fifo = check_claims(setup, queue, reports)
        finally:
            setup.dispose()
        databases.drop(url)
        claims = sum(len(report.claimed) for report in reports)
        results.append(
            ClaimRate(
                workers=workers,
                claims=claims,
                seconds=elapsed,
                seeded=runs,
                sessions=sessions,
                conflicts=sum(report.conflicts for report in reports),
                drained=any(report.drained for report in reports),
                claim=summarize(ns for report in reports for ns in report.claim_ns),
                complete=summarize(ns for report in reports for ns in report.complete_ns),
                problems=tuple(problems),
                fifo=fifo,
                spawn_seconds=total - elapsed,
                client_cpu_ms=1000 * sum(r.cpu_seconds for r in reports) / max(1, claims),
                server_cpu_ms=None
                if any(r.server_cpu_seconds is None for r in reports)
                else 1000 * sum(r.server_cpu_seconds or 0.0 for r in reports) / max(1, claims),
                backend_states=tuple(
                    (state, count / max(1, states.total())) for state, count in states.most_common()
                ),
            )
        )
    return results


def _run_workers(
    url: str, workers: int, *, seconds: float, limit: int
) -> tuple[list[WorkerReport], Counter[str]]:
    """The workers' reports, and what their backends were doing (``ServerSampler``)."""
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    inbox = context.Queue()
    processes = [
        context.Process(
            target=claim_worker,
            args=(url, f"worker-{slot}", seconds, limit, go, inbox),
            name=f"bench-queue-worker-{slot}",
        )
        for slot in range(workers)
    ]
    for process in processes:
        process.start()
    sampler = ServerSampler(url)
    try:
        reports: list[WorkerReport] = []
        ready = 0
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(reports) < workers:
            try:
                kind, payload = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                raise RuntimeError(
                    f"queue workers: {ready} of {workers} ready, {len(reports)} done in time"
                ) from None
            if kind == "error":
                raise RuntimeError(f"a queue worker failed: {payload}")
            if kind == "ready":
                ready += 1
                if ready == workers:
                    go.set()
                    sampler.start()
                    deadline = time.monotonic() + seconds + START_TIMEOUT_S
            else:
                reports.append(payload)
        sampler.stop()
        for process in processes:
            process.join(timeout=30)
        return reports, sampler.counts
    finally:
        sampler.stop()
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


class ServerSampler:
    """Every 20 ms, the state of each client backend of the benchmark's database in
    ``pg_stat_activity``: where the workers' time goes, as the server sees it."""

    INTERVAL_S = 0.02
    QUERY = (
        "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'"
    )

    def __init__(self, url: str) -> None:
        self._url = url
        self.counts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._sample, name="bench-queue-sampler")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _sample(self) -> None:
        with raw_postgresql(self._url, autocommit=True) as conn:
            while not self._stopping.wait(self.INTERVAL_S):
                for state, wait_type, wait_event in conn.execute(self.QUERY).fetchall():
                    self.counts[_backend_state(state, wait_type, wait_event)] += 1


def _backend_state(state: str | None, wait_type: str | None, wait_event: str | None) -> str:
    if state == "active":
        if wait_type is None:
            return "server working"
        if (wait_type, wait_event) == ("Lock", "object"):
            # The only object lock here: the commit-time lock of a transaction that
            # sent NOTIFY (every append does, for the feed), one database-wide.
            return "server waits for NOTIFY's commit lock"
        return f"server waits ({wait_type} {wait_event})"
    if state == "idle in transaction":
        return "client's turn, in a transaction"
    if state == "idle":
        return "client's turn, between transactions"
    return f"other ({state})"


def check_claims(
    engine: Engine, queue: Queue, reports: Sequence[WorkerReport]
) -> tuple[list[str], bool]:
    """The problems found (none: no double claim, every claim completed once, never two
    running runs in a session), and whether each session was served in queue order."""
    problems: list[str] = []
    reported = Counter(run_id for report in reports for run_id in report.claimed)
    twice = [run_id for run_id, count in reported.items() if count > 1]
    if twice:
        problems.append(f"{len(twice)} runs reported claimed by two workers or twice")
    claimer = {run_id: report.worker_id for report in reports for run_id in report.claimed}
    with engine.connect() as conn:
        runs = conn.execute(
            select(RUNS.c.id, RUNS.c.session_id, RUNS.c.status, RUNS.c.worker_id).where(
                RUNS.c.session_id.in_(queue.sessions)
            )
        ).all()
        events = conn.execute(
            select(EVENTS.c.session_id, EVENTS.c.seq, EVENTS.c.type, EVENTS.c.run_id)
            .where(
                EVENTS.c.session_id.in_(queue.sessions),
                EVENTS.c.type.in_([RunEventType.RUN_STARTED, RunEventType.RUN_COMPLETED]),
            )
            .order_by(EVENTS.c.session_id, EVENTS.c.seq)
        ).all()
    started = Counter(row.run_id for row in events if row.type == RunEventType.RUN_STARTED)
    completed = Counter(row.run_id for row in events if row.type == RunEventType.RUN_COMPLETED)
    if any(count > 1 for count in started.values()):
        problems.append(f"{sum(c > 1 for c in started.values())} runs with two run_started")
    if set(started) != set(reported):
        problems.append(
            f"run_started events for {len(started)} runs, workers reported {len(reported)}"
        )
    if completed != started:
        problems.append("claimed runs and run_completed events differ")
    status = Counter(row.status for row in runs)
    if status[RunStatus.COMPLETED] != len(reported) or status[RunStatus.RUNNING]:
        problems.append(f"statuses after the run: {dict(status)}, {len(reported)} claims")
    if status[RunStatus.QUEUED] + len(reported) != len(queue.runs):
        problems.append(f"{len(queue.runs)} seeded, {dict(status)} now")
    wrong_worker = sum(1 for row in runs if row.id in claimer and row.worker_id != claimer[row.id])
    if wrong_worker:
        problems.append(f"{wrong_worker} runs hold another worker_id than their claimer's")
    # Per session, in seq (commit) order: started(x), completed(x), started(y), ...
    by_session: defaultdict[str, list[Any]] = defaultdict(list)
    for row in events:
        by_session[row.session_id].append(row)
    overlaps = 0
    fifo = True
    position = {run_id: index for index, run_id in enumerate(queue.runs)}
    for log in by_session.values():
        running: str | None = None
        order: list[int] = []
        for row in log:
            if row.type == RunEventType.RUN_STARTED:
                if running is not None:
                    overlaps += 1
                running = row.run_id
                order.append(position[row.run_id])
            elif row.run_id != running:
                overlaps += 1
            else:
                running = None
        fifo = fifo and order == sorted(order)
    if overlaps:
        problems.append(f"{overlaps} times a session had two running runs (by its event log)")
    return problems, fifo


# --------------------------------------------------------------------------
# claim_next versus the raw driver


@dataclass
class ClaimChain:
    """A run one side claimed, to be completed by the same side."""

    ids: Ids


class RepositoryClaims:
    name = REPOSITORY

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def claim(self) -> ClaimChain:
        with unit_of_work(self._engine) as db:
            run = RunRepository(db).claim_next(REPOSITORY_WORKER)
        if run is None:
            raise RuntimeError("the queue ran dry: the repository side claimed nothing")
        return ClaimChain(Ids(run=run.id, session=run.session_id))

    def complete(self, chain: ClaimChain) -> None:
        with unit_of_work(self._engine) as db:
            RunRepository(db).complete(chain.ids.run, METRICS)


class RawClaims:
    """The captured statements on one driver connection, as hand-written driver code:
    the claimed run's id and session come from the claim UPDATE's row."""

    name = RAW

    def __init__(
        self,
        connection: sqlite3.Connection | psycopg.Connection,
        claim: Script,
        claim_columns: tuple[str, ...],
        complete: Script,
    ) -> None:
        self._connection = connection
        self._claim = claim
        self._complete = complete
        self._claim_index = next(
            index for index, s in enumerate(claim.statements) if _claims(s.sql)
        )
        self._id_column = claim_columns.index("id")
        self._session_column = claim_columns.index("session_id")

    def claim(self) -> ClaimChain:
        connection = self._connection
        ids = Ids(run="", session="")
        previous: Sequence[Any] | None = None
        for index, statement in enumerate(self._claim.statements):
            cursor = connection.execute(statement.sql, statement.parameters(ids, previous))
            if statement.returns_rows:
                rows = cursor.fetchall()
                previous = rows[0] if rows else None
                if index == self._claim_index:
                    if previous is None:
                        raise RuntimeError("the queue ran dry: the raw side claimed nothing")
                    ids = Ids(run=previous[self._id_column], session=previous[self._session_column])
        connection.commit()
        return ClaimChain(ids)

    def complete(self, chain: ClaimChain) -> None:
        connection = self._connection
        previous: Sequence[Any] | None = None
        for statement in self._complete.statements:
            cursor = connection.execute(statement.sql, statement.parameters(chain.ids, previous))
            if statement.returns_rows:
                rows = cursor.fetchall()
                previous = rows[0] if rows else None
        connection.commit()


@dataclass
class ClaimCostResult:
    backend: str
    analyzed: bool
    samples: Samples
    claim_script: Script
    plan: tuple[str, ...]  # the claim UPDATE's reads of session_runs (EXPLAIN)
    rounds: int
    batch: int
    sessions: int
    depth: int
    problems: tuple[str, ...]


def _later_timestamps(script: Script, captured: Sequence[CapturedStatement]) -> Script:
    """Timestamps the call set ahead of its ``now`` (the lease) stay that far ahead."""
    statements = []
    for statement, recorded in zip(script.statements, captured, strict=True):
        values = list(
            recorded.parameters.values()
            if isinstance(recorded.parameters, dict)
            else recorded.parameters
        )
        moments = {index: _as_datetime(value) for index, value in enumerate(values)}
        moments = {index: moment for index, moment in moments.items() if moment is not None}
        if not moments:
            statements.append(statement)
            continue
        now = min(moments.values())
        slots = dict(statement.slots)
        for index, moment in moments.items():
            if moment - now > timedelta(seconds=1):
                slots[index] = _ahead(moment - now, isinstance(values[index], str))
        statements.append(replace(statement, slots=tuple(sorted(slots.items()))))
    return Script(tuple(statements))


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and len(value) == 26:
        try:
            return datetime.strptime(value, SQLITE_TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            return None
    return None


def _ahead(offset: timedelta, as_text: bool) -> Any:
    if as_text:
        return lambda _ids, _previous: (datetime.now(UTC) + offset).strftime(
            SQLITE_TIMESTAMP_FORMAT
        )
    return lambda _ids, _previous: datetime.now(UTC) + offset


def _claims(sql: str) -> bool:
    """The claim's UPDATE: alone (SQLite) or leading the one statement that also appends
    ``run_started`` (PostgreSQL: ``WITH moved AS (UPDATE session_runs ...``)."""
    return sql.lstrip().startswith(("UPDATE session_runs", "WITH moved AS \n(UPDATE session_runs"))


def measure_claim_cost(
    backend: str,
    url: str,
    *,
    rounds: int,
    batch: int,
    sessions: int = 200,
    depth: int = 400,
    analyze: bool = True,
) -> ClaimCostResult:
    """``rounds`` measured rounds (plus one warm-up) of ``batch`` claims then completes per
    side, on a queue of ``depth`` runs over ``sessions`` sessions, refilled after each round."""
    depth = max(depth, 4 * batch)  # never fewer queued runs than a round claims, twice
    engine = create_db_engine(url)
    upgrade(engine)
    queue = seed_queue(engine, sessions=sessions, runs=depth + 1, analyze=analyze)
    # The recording: one claim_next and one complete through the repository, on an
    # engine of its own (see benchmarks.overhead: an engine that ever had a
    # cursor-event listener keeps paying for event dispatch).
    recorder = create_db_engine(url)
    with capture_statements(recorder) as capture:
        with unit_of_work(recorder) as db:
            recorded = RunRepository(db).claim_next(RAW_WORKER)
    assert recorded is not None
    recorded_ids = Ids(run=recorded.id, session=recorded.session_id)
    claim_script = _later_timestamps(
        make_script(capture.statements, recorded_ids), capture.statements
    )
    claim_update = next(s for s in capture.statements if _claims(s.sql))
    claim_columns = claim_update.result_columns
    plan = _plan(engine, claim_update)
    with capture_statements(recorder) as capture:
        with unit_of_work(recorder) as db:
            RunRepository(db).complete(recorded.id, METRICS)
    complete_script = make_script(capture.statements, recorded_ids)
    recorder.dispose()

    raw_engine = create_db_engine(url, poolclass=NullPool)
    pooled = raw_engine.raw_connection()
    sides = [
        RepositoryClaims(engine),
        RawClaims(pooled.driver_connection, claim_script, claim_columns, complete_script),
    ]
    samples = Samples()
    try:
        for round_ in range(rounds + 1):
            gc.collect()
            counted = round_ > 0
            order = sides if round_ % 2 == 0 else sides[::-1]
            chains: dict[str, list[ClaimChain]] = {side.name: [] for side in sides}
            for side in order:
                claimed = chains[side.name]
                for _ in range(batch):
                    if counted:
                        samples.time(side.name, CLAIM, lambda: claimed.append(side.claim()))  # noqa: B023
                    else:
                        claimed.append(side.claim())
            for side in order:
                for chain in chains[side.name]:
                    if counted:
                        samples.time(side.name, COMPLETE, lambda: side.complete(chain))  # noqa: B023
                    else:
                        side.complete(chain)
            queue.add(2 * batch)  # back to ``depth`` queued runs
        problems = _check_sides(engine, queue, (rounds + 1) * batch, recorded.id)
    finally:
        pooled.close()
        raw_engine.dispose()
        engine.dispose()
    return ClaimCostResult(
        backend,
        analyze,
        samples,
        claim_script,
        plan,
        rounds,
        batch,
        sessions,
        depth,
        tuple(problems),
    )


def _plan(engine: Engine, statement: CapturedStatement) -> tuple[str, ...]:
    """How the database reads ``session_runs`` for the statement: its scans, in plan order."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            ("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement.sql,
            statement.parameters,  # type: ignore[arg-type]
        ).all()
        conn.rollback()
    if sqlite:
        return tuple(
            str(row[-1]) for row in rows if str(row[-1]).startswith(("SCAN", "SEARCH", "USE"))
        )
    lines = (str(row[0]).strip().removeprefix("->").strip() for row in rows)
    return tuple(line.split("  (cost")[0] for line in lines if " on " in line)


def _check_sides(engine: Engine, queue: Queue, per_side: int, recording: str) -> list[str]:
    """Both sides claimed and completed ``per_side`` runs, each with one start and one end."""
    with engine.connect() as conn:
        runs = conn.execute(
            select(RUNS.c.worker_id, RUNS.c.status, func.count())
            .where(RUNS.c.session_id.in_(queue.sessions), RUNS.c.id != recording)
            .group_by(RUNS.c.worker_id, RUNS.c.status)
        ).all()
        events = conn.execute(
            select(
                RUNS.c.worker_id, EVENTS.c.type, func.count(), func.count(func.distinct(RUNS.c.id))
            )
            .join(EVENTS, EVENTS.c.run_id == RUNS.c.id)
            .where(
                RUNS.c.session_id.in_(queue.sessions),
                RUNS.c.id != recording,
                EVENTS.c.type.in_([RunEventType.RUN_STARTED, RunEventType.RUN_COMPLETED]),
            )
            .group_by(RUNS.c.worker_id, EVENTS.c.type)
        ).all()
    problems = []
    expected = {
        (worker, RunStatus.COMPLETED): per_side for worker in (REPOSITORY_WORKER, RAW_WORKER)
    }
    found = {(w, s): n for w, s, n in runs if s != RunStatus.QUEUED}
    if found != expected:
        problems.append(f"runs claimed and completed per side: {found}, expected {per_side}")
    for worker, type_, count, distinct in events:
        if count != per_side or distinct != per_side:
            problems.append(f"{worker}: {count} {type_} events for {distinct} runs")
    if len(events) != 4:
        problems.append(f"events per side and type: {events}")
    return problems
