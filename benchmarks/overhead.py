"""Overhead: each hot path through the repositories versus the same SQL on the raw driver.

Sides, measured in one process on one database per backend:

* ``repository``: what the Run Service does per request: a ``sqlmodel``
  Session on the engine of ``app.db.create_db_engine`` (pool, idle ping and
  pragmas included), one repository call, ``commit``.
* ``raw``: the statements that repository call sent, captured once
  (``app._capture``, ``benchmarks.capture``) and replayed with ``sqlite3`` / ``psycopg`` on one
  open connection (made by ``create_db_engine``'s connect hooks, so with the
  same pragmas, SQL functions and settings, then used without SQLAlchemy):
  the same SQL and parameters in an equivalent transaction (SQLite: the
  captured ``BEGIN IMMEDIATE`` ... ``COMMIT``; PostgreSQL: psycopg's implicit
  ``BEGIN`` ... ``COMMIT``), every result row fetched.
* ``naive ORM`` (``start`` only): load the run, set attributes, add an event
  object with the next seq from the session's counter row, commit; the usual
  ORM way, for comparison.

Each run goes through a lifecycle on each side, one transaction per step;
the sides take turns step by step (and swap who goes first every round), so
that drift in the machine's speed hits both alike. The first round warms up
and is not counted.
"""

from __future__ import annotations

import gc
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.pool import NullPool
from sqlmodel import Session as DbSession

from app._capture import capture_statements
from app.db import create_db_engine
from app.models import (
    RunStatus,
    SessionEvent,
    SessionEventSequence,
    SessionRun,
    new_id,
)
from app.models import Session as ChatSession
from app.repositories import EventRepository, RunRepository
from app.state_machine import RunEventType
from app.types import utc_now
from benchmarks.capture import Ids, Script, make_script
from benchmarks.stats import Samples
from migrations import upgrade

MESSAGE = "Draft the quarterly report from the attached figures"
PROGRESS = {"step": "outline", "progress": 0.25, "tokens": 812}
PAGE_OF_EVENTS = 100
PAGE_OF_RUNS = 50

LIFECYCLES: tuple[tuple[str, ...], ...] = (
    (
        "create run",
        "start",
        "append event",
        "append event",
        "wait_for_input",
        "resume",
        "complete",
    ),
    ("create run", "start", "fail"),
    ("create run", "start", "cancel"),
)
FLOOR = "floor: Session, SELECT 1, commit"
"""Not a hot path: what any repository call pays before its own SQL (reported as the floor)."""
READS = ("get run", "list_for_run (page of 100)", "list_for_session (page of 50 runs)", FLOOR)
OPERATIONS = (
    "create run",
    "start",
    "wait_for_input",
    "resume",
    "complete",
    "fail",
    "cancel",
    "append event",
    *READS,
)
NAIVE_OPERATION = "start"

REPOSITORY, RAW, NAIVE = "repository", "raw", "naive ORM"


@dataclass
class Chain:
    """One run on its way through a lifecycle, on one side."""

    session_id: str
    run_id: str = ""

    @property
    def ids(self) -> Ids:
        return Ids(run=self.run_id, session=self.session_id)


Operation = Callable[[DbSession, Chain], object]


def _create(db: DbSession, chain: Chain) -> None:
    run = RunRepository(db).create({"session_id": chain.session_id, "message": MESSAGE})
    chain.run_id = run.id


REPOSITORY_OPERATIONS: dict[str, Operation] = {
    "create run": _create,
    "start": lambda db, chain: RunRepository(db).start(chain.run_id),
    "wait_for_input": lambda db, chain: RunRepository(db).wait_for_input(
        chain.run_id, "Which figures should the summary use?"
    ),
    "resume": lambda db, chain: RunRepository(db).resume(
        chain.run_id, {"user_feedback": "Use the audited ones"}
    ),
    "complete": lambda db, chain: RunRepository(db).complete(
        chain.run_id, {"tokens": 4096, "cost_usd": 0.12}
    ),
    "fail": lambda db, chain: RunRepository(db).fail(
        chain.run_id, {"code": "tool_error", "message": "renderer crashed"}
    ),
    "cancel": lambda db, chain: RunRepository(db).cancel(chain.run_id),
    "append event": lambda db, chain: EventRepository(db).append(
        chain.session_id, "task_progress", PROGRESS, run_id=chain.run_id
    ),
    "get run": lambda db, chain: RunRepository(db).get(chain.run_id),
    "list_for_run (page of 100)": lambda db, chain: EventRepository(db).list_for_run(
        chain.run_id, limit=PAGE_OF_EVENTS
    ),
    "list_for_session (page of 50 runs)": lambda db, chain: RunRepository(db).list_for_session(
        chain.session_id, limit=PAGE_OF_RUNS
    ),
    FLOOR: lambda db, _chain: db.execute(text("SELECT 1")).all(),
}


def naive_start(db: DbSession, chain: Chain) -> None:
    """``start`` as plain ORM code: read, check, set attributes, add the event, commit."""
    run = db.get(SessionRun, chain.run_id)
    if run is None or run.status is not RunStatus.QUEUED:
        raise RuntimeError(f"run {chain.run_id} cannot start")
    now = utc_now()
    run.status = RunStatus.RUNNING
    run.started_at = run.started_at or now
    run.updated_at = now
    counter = db.get(SessionEventSequence, run.session_id)
    if counter is None:
        counter = SessionEventSequence(session_id=run.session_id, next_seq=1)
        db.add(counter)
    seq = counter.next_seq
    counter.next_seq = seq + 1
    db.add(
        SessionEvent(
            session_id=run.session_id,
            seq=seq,
            type=RunEventType.RUN_STARTED,
            payload={},
            run_id=run.id,
        )
    )


class Side(Protocol):
    name: str

    def run(self, operation: str, chain: Chain) -> None: ...


class RepositorySide:
    """One Session per operation, committed, as the request session does per request."""

    def __init__(
        self,
        engine: Engine,
        overrides: dict[str, Operation] | None = None,
        *,
        name: str = REPOSITORY,
    ) -> None:
        self.name = name
        self._engine = engine
        self._operations = {**REPOSITORY_OPERATIONS, **(overrides or {})}

    def run(self, operation: str, chain: Chain) -> None:
        with DbSession(self._engine, expire_on_commit=False) as db:
            self._operations[operation](db, chain)
            db.commit()


class RawSide:
    """Replays the captured scripts on one driver connection, one transaction per operation."""

    name = RAW

    def __init__(
        self, connection: sqlite3.Connection | psycopg.Connection, scripts: dict[str, Script]
    ) -> None:
        self._connection = connection
        self._scripts = scripts

    def run(self, operation: str, chain: Chain) -> None:
        if operation == "create run":
            chain.run_id = new_id()
        ids = chain.ids
        connection = self._connection
        previous: Sequence[Any] | None = None
        for statement in self._scripts[operation].statements:
            cursor = connection.execute(statement.sql, statement.parameters(ids, previous))
            if statement.returns_rows:
                rows = cursor.fetchall()
                previous = rows[0] if rows else None
        connection.commit()


# --------------------------------------------------------------------------
# Setup


def add_sessions(engine: Engine, count: int) -> list[str]:
    """``count`` new chat sessions, written in one statement (setup, not measured)."""
    ids = [new_id() for _ in range(count)]
    with engine.begin() as conn:
        now = utc_now()
        conn.execute(
            insert(ChatSession.__table__),
            [
                {"id": id_, "title": "benchmark", "created_at": now, "updated_at": now}
                for id_ in ids
            ],
        )
    return ids


def _read_fixture(engine: Engine, runs: int, events: int) -> Chain:
    """A session with ``runs`` runs, the last of which has ``events`` events."""
    chain = Chain(session_id=add_sessions(engine, 1)[0])
    with DbSession(engine, expire_on_commit=False) as db:
        for _ in range(runs):
            _create(db, chain)
        events_repository = EventRepository(db)
        for _ in range(events):
            events_repository.append(
                chain.session_id, "task_progress", PROGRESS, run_id=chain.run_id
            )
        db.commit()
    return chain


def _record_scripts(engine: Engine, side: RepositorySide, read_chain: Chain) -> dict[str, Script]:
    """Each operation's statements, recorded from one repository call."""
    scripts: dict[str, Script] = {}
    for lifecycle in LIFECYCLES:
        chain = Chain(session_id=add_sessions(engine, 1)[0])
        for operation in lifecycle:
            with capture_statements(engine) as capture:
                side.run(operation, chain)
            scripts.setdefault(operation, make_script(capture.statements, chain.ids))
    for operation in READS:
        with capture_statements(engine) as capture:
            side.run(operation, read_chain)
        scripts[operation] = make_script(capture.statements, read_chain.ids)
    return scripts


# --------------------------------------------------------------------------
# Measurement


@dataclass
class OverheadResult:
    backend: str
    samples: Samples
    scripts: dict[str, Script]
    rounds: int
    batch: int


def measure_overhead(backend: str, url: str, *, rounds: int, batch: int) -> OverheadResult:
    """Run the lifecycles and reads ``rounds`` times (plus one warm-up), ``batch`` runs each."""
    engine = create_db_engine(url)
    upgrade(engine)
    repository = RepositorySide(engine)
    naive = RepositorySide(engine, {NAIVE_OPERATION: naive_start}, name=NAIVE)
    read_chain = _read_fixture(engine, runs=PAGE_OF_RUNS + 10, events=3 * PAGE_OF_EVENTS)
    scripts = _record_scripts(engine, repository, read_chain)
    # The driver connection is made by an engine of the same configuration, so
    # it has the same pragmas, SQL functions and session settings, and is then
    # used directly, without SQLAlchemy.
    raw_engine = create_db_engine(url, poolclass=NullPool)
    pooled = raw_engine.raw_connection()
    connection = pooled.driver_connection
    raw = RawSide(connection, scripts)
    sides: list[Side] = [repository, raw, naive]
    # Each side has its own sessions; a lifecycle ends in a terminal status, so
    # the next lifecycle may start a run in the same session.
    sessions = {side.name: add_sessions(engine, batch) for side in sides}
    samples = Samples()
    try:
        for round_ in range(rounds + 1):
            gc.collect()
            counted = round_ > 0
            order = sides if round_ % 2 == 0 else sides[::-1]
            for lifecycle in LIFECYCLES:
                chains = {side.name: [Chain(s) for s in sessions[side.name]] for side in order}
                for operation in lifecycle:
                    for side in order:
                        _time_batch(samples, side, operation, chains[side.name], counted)
            for operation in READS:
                for side in order:
                    _time_batch(samples, side, operation, [read_chain] * batch, counted)
        _check_sides_agree(engine, sessions)
    finally:
        pooled.close()
        raw_engine.dispose()
        engine.dispose()
    return OverheadResult(backend, samples, scripts, rounds, batch)


def _check_sides_agree(engine: Engine, sessions: dict[str, list[str]]) -> None:
    """Every side left the same runs and events: the raw replay really did the work."""
    states = {}
    with engine.connect() as conn:
        for side, session_ids in sessions.items():
            runs = conn.execute(
                select(SessionRun.status, func.count())
                .where(SessionRun.session_id.in_(session_ids))
                .group_by(SessionRun.status)
                .order_by(SessionRun.status)
            ).all()
            events = conn.execute(
                select(SessionEvent.type, func.count(), func.count(func.distinct(SessionEvent.seq)))
                .where(SessionEvent.session_id.in_(session_ids))
                .group_by(SessionEvent.type)
                .order_by(SessionEvent.type)
            ).all()
            states[side] = (tuple(runs), tuple(events))
    if len(set(states.values())) != 1:
        raise RuntimeError(f"the sides disagree on what they wrote: {states}")


def _time_batch(
    samples: Samples, side: Side, operation: str, chains: list[Chain], counted: bool
) -> None:
    for chain in chains:
        if counted:
            samples.time(side.name, operation, lambda: side.run(operation, chain))  # noqa: B023
        else:
            side.run(operation, chain)
