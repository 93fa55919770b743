"""Overhead: each hot path through the repositories versus the same SQL on the raw driver.

Sides, measured in one process on one database per backend:

* ``repository``: what the Run Service does per request: a ``sqlmodel``
  Session on the engine of ``app.db.create_db_engine`` (pool, idle ping and
  pragmas included), one repository call, ``commit``.
* ``raw``: the statements that repository call sent, captured once
  (``app.capture``, ``benchmarks.capture``) and replayed with ``sqlite3`` / ``psycopg`` on one
  open connection (made by ``create_db_engine``'s connect hooks, so with the
  same pragmas, SQL functions and settings, then used without SQLAlchemy):
  the same SQL and parameters in an equivalent transaction (SQLite:
  ``BEGIN IMMEDIATE`` ... ``COMMIT``, as the engine's dialect sends them;
  PostgreSQL: psycopg's implicit ``BEGIN`` ... ``COMMIT``), every result row
  fetched.
* peers (``benchmarks.peers``), for comparison: ``naive SQLModel`` (plain
  table models; load the run, set attributes, add an event object with the
  next seq from the session's counter row, commit: the usual ORM way) and
  ``advanced-alchemy`` (its ``SQLAlchemySyncRepository`` over the same models,
  when the ``bench`` extra is installed), each with its own sessions.

The reads are also measured on the read path outside the ORM Session
(``app.repositories.reads``: ``RunReads`` / ``EventReads``, a pooled connection, the
repository's statement in autocommit, response schemas built from the rows), against:

* ``raw read``: the same statements replayed the way the read path sends them, one
  statement in autocommit (SQLite: no BEGIN; PostgreSQL: a connection in autocommit),
  every row fetched;
* ``raw read + schemas``: that, plus what hand-written driver code does to return the
  same response schemas: each value converted (aware datetimes, enums, decoded JSON)
  and ``model_construct`` per row.

And the ways of making the response schemas from rows already read are timed side by
side (``SCHEMA_BUILDS``): ``model_validate`` of the ORM instance (what the routes do),
``model_validate`` of a dict, ``model_construct``, and the read path's own build.

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
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import psycopg
from sqlalchemy import Engine, func, insert, select
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.orm import class_mapper
from sqlalchemy.pool import NullPool
from sqlmodel import Session as DbSession

from app.capture import capture_statements
from app.db import create_db_engine
from app.json_codec import loads
from app.models import (
    ChatSession,
    SessionEvent,
    SessionRun,
    new_id,
)
from app.repositories import EventReads, EventRepository, RunReads, RunRepository
from app.repositories.events import EVENT_COLUMNS
from app.repositories.reads import schema_builder
from app.repositories.runs import RUN_COLUMNS
from app.schemas import EventResponse, RunResponse
from app.state_machine import RunEventType
from app.types import StrEnumType, UTCDateTime, utc_now
from benchmarks import peers
from benchmarks.capture import Ids, Script, make_script
from benchmarks.environment import Placement
from benchmarks.peers import NaiveRun
from benchmarks.stats import Samples
from migrations import upgrade

MESSAGE = "Draft the quarterly report from the attached figures"
PROGRESS = {"step": "outline", "progress": 0.25, "tokens": 812}
PAGE_OF_EVENTS = 100
PAGE_OF_RUNS = 100

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
    # Every side claims the runs it has just created: the others' are claimed
    # already or created after its turn (no other run of the database is queued).
    ("create run", "claim_next", "complete"),
)
FLOOR = "floor: the Session alone (begin, commit)"
"""Not a hot path: what any repository call pays before its own SQL (reported as the
floor). The Session begins its transaction (``connection()``: a pooled connection, and
``BEGIN IMMEDIATE`` on SQLite) and commits, with no statement of its own; the raw side
replays the same (SQLite: ``BEGIN IMMEDIATE``, ``COMMIT``; PostgreSQL: a commit with
nothing to commit)."""
READS = ("get run", "list_for_run (page of 100)", "list_for_session (page of 100 runs)", FLOOR)
OPERATIONS = (
    "create run",
    "start",
    "wait_for_input",
    "resume",
    "complete",
    "fail",
    "cancel",
    "append event",
    "claim_next",
    *READS,
)
WORKER = "bench-worker"

REPOSITORY, RAW, NAIVE, ADVANCED_ALCHEMY = "repository", "raw", "naive SQLModel", "advanced-alchemy"
READ_PATH, RAW_READ, RAW_READ_SCHEMAS = "read path", "raw read", "raw read + schemas"
READ_PATH_READS = READS[:3]
"""The reads that the read path serves (the floor is the Session's)."""


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
    "claim_next": lambda db, chain: _claimed(chain, RunRepository(db).claim_next(WORKER)),
    "append event": lambda db, chain: EventRepository(db).append(
        chain.session_id, "task_progress", PROGRESS, run_id=chain.run_id
    ),
    "get run": lambda db, chain: RunRepository(db).get(chain.run_id),
    "list_for_run (page of 100)": lambda db, chain: EventRepository(db).list_for_run(
        chain.run_id, limit=PAGE_OF_EVENTS
    ),
    "list_for_session (page of 100 runs)": lambda db, chain: RunRepository(db).list_for_session(
        chain.session_id, limit=PAGE_OF_RUNS
    ),
    FLOOR: lambda db, _chain: db.connection(),
}


def _read_path_operations(engine: Engine) -> dict[str, Operation]:
    """The reads on ``app.repositories.reads``: no Session (the ``db`` argument is unused)."""
    runs, events = RunReads.of(engine), EventReads.of(engine)
    return {
        "get run": lambda _db, chain: runs.get(chain.run_id),
        "list_for_run (page of 100)": lambda _db, chain: events.list_for_run(
            chain.run_id, limit=PAGE_OF_EVENTS
        ),
        "list_for_session (page of 100 runs)": lambda _db, chain: runs.list_for_session(
            chain.session_id, limit=PAGE_OF_RUNS
        ),
    }


def _claimed(chain: Chain, run: SessionRun | NaiveRun | None) -> None:
    """A side claims the run its chain created (see ``LIFECYCLES``), or the
    comparison would be between different work."""
    if run is None or run.id != chain.run_id:
        raise RuntimeError(f"claimed {run and run.id}, expected {chain.run_id}")


def _peer_operations(
    move: Callable[..., NaiveRun],
    add_event: Callable[..., object],
    events_of_run: Callable[[DbSession, str, int], list[Any]],
    runs_of_session: Callable[[DbSession, str, int], list[Any]],
    get: Callable[[DbSession, str], object],
) -> dict[str, Operation]:
    """A peer's operations: each move is load, check, set, and its event added."""

    def create(db: DbSession, chain: Chain) -> None:
        run_id = new_id()
        run = NaiveRun(
            id=run_id,
            session_id=chain.session_id,
            input_message=MESSAGE,
            options={"generate_now": False, "style_reference": None, "target_pages": []},
            checkpoint_thread=f"{chain.session_id}:{run_id}",
        )
        db.add(run)
        add_event(
            db,
            chain.session_id,
            RunEventType.RUN_CREATED,
            {"trigger_source": "chat", "parent_run_id": None},
            run_id,
        )
        chain.run_id = run_id

    def transition(
        event_type: str,
        payload: Callable[[], dict[str, Any]],
        sources: tuple[str, ...],
        **values: Any,
    ) -> Operation:
        def operation(db: DbSession, chain: Chain) -> None:
            now = utc_now()
            extra = {name: (now if value is _NOW else value) for name, value in values.items()}
            run = move(db, chain.run_id, sources, **extra)
            add_event(db, run.session_id, event_type, payload(), run.id)

        return operation

    running = {"status": "running", "started_at": _NOW, "lease_expires_at": None}
    return {
        "create run": create,
        "start": transition(RunEventType.RUN_STARTED, dict, ("queued",), **running),
        "wait_for_input": transition(
            RunEventType.RUN_WAITING_INPUT,
            lambda: {"reason": "Which figures should the summary use?"},
            ("running",),
            status="waiting_input",
            waiting_reason="Which figures should the summary use?",
        ),
        "resume": transition(
            RunEventType.RUN_RESUMED,
            lambda: {"resume": {"user_feedback": "Use the audited ones"}},
            ("waiting_input",),
            status="running",
            waiting_reason=None,
            resume_payload={"user_feedback": "Use the audited ones"},
        ),
        "complete": transition(
            RunEventType.RUN_COMPLETED,
            lambda: {"metrics": {"tokens": 4096, "cost_usd": 0.12}},
            ("running",),
            status="completed",
            finished_at=_NOW,
            metrics={"tokens": 4096, "cost_usd": 0.12},
        ),
        "fail": transition(
            RunEventType.RUN_FAILED,
            lambda: {"error": {"code": "tool_error", "message": "renderer crashed"}},
            ("running",),
            status="failed",
            finished_at=_NOW,
            latest_error={"code": "tool_error", "message": "renderer crashed"},
        ),
        "cancel": transition(
            RunEventType.RUN_CANCELLED,
            dict,
            ("queued", "running", "waiting_input"),
            status="cancelled",
            finished_at=_NOW,
            lease_expires_at=None,
        ),
        "append event": lambda db, chain: add_event(
            db, chain.session_id, "task_progress", PROGRESS, chain.run_id
        ),
        "get run": lambda db, chain: get(db, chain.run_id),
        "list_for_run (page of 100)": lambda db, chain: events_of_run(
            db, chain.run_id, PAGE_OF_EVENTS
        ),
        "list_for_session (page of 100 runs)": lambda db, chain: runs_of_session(
            db, chain.session_id, PAGE_OF_RUNS
        ),
        FLOOR: REPOSITORY_OPERATIONS[FLOOR],
    }


_NOW = object()
"""Stands for the time of the call in a peer's values."""


def _naive_claim(db: DbSession, chain: Chain) -> None:
    """The usual claim: the oldest queued run, locked (SKIP LOCKED), moved in Python."""
    run = db.scalars(
        select(NaiveRun)
        .where(NaiveRun.status == "queued")
        .order_by(NaiveRun.created_at, NaiveRun.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    _claimed(chain, run)
    now = utc_now()
    run.status, run.worker_id, run.started_at = "running", WORKER, run.started_at or now
    run.lease_expires_at, run.updated_at = now + timedelta(minutes=5), now
    peers.add_event(db, run.session_id, RunEventType.RUN_STARTED, {"worker_id": WORKER}, run.id)


NAIVE_OPERATIONS: dict[str, Operation] = {
    **_peer_operations(
        peers.move,
        peers.add_event,
        peers.events_of_run,
        peers.runs_of_session,
        lambda db, run_id: db.get(NaiveRun, run_id),
    ),
    "claim_next": _naive_claim,
}


def _advanced_alchemy_operations() -> dict[str, Operation]:
    """advanced-alchemy's repository; ``claim_next`` has no natural equivalent there
    (a locked, skip-locked pick of the queue head is hand-written SQL in any case)."""
    return {
        **_peer_operations(
            peers.aa_move,
            peers.aa_add_event,
            peers.aa_events_of_run,
            peers.aa_runs_of_session,
            lambda db, run_id: peers.AARunRepository(session=db).get(run_id),
        ),
        "claim_next": _naive_claim,  # keeps the lifecycle going; not reported
    }


NOT_REPORTED = {(ADVANCED_ALCHEMY, "claim_next"): "no natural equivalent"}
"""Peer operations that are run but have no counterpart in that peer's API."""


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


class ReadPathSide:
    """The read path: one call each, no Session, nothing to commit."""

    name = READ_PATH

    def __init__(self, engine: Engine) -> None:
        self._operations = _read_path_operations(engine)

    def run(self, operation: str, chain: Chain) -> None:
        self._operations[operation](None, chain)  # type: ignore[arg-type]


class RawSide:
    """Replays the captured scripts on one driver connection, one transaction per operation."""

    name = RAW

    def __init__(
        self, connection: sqlite3.Connection | psycopg.Connection, scripts: dict[str, Script]
    ) -> None:
        self._connection = connection
        self._scripts = scripts
        # SQLite: the driver's own transaction handling is off (app.db), and the
        # engine's dialect sends BEGIN IMMEDIATE itself, which no cursor event sees.
        self._begin = "BEGIN IMMEDIATE" if isinstance(connection, sqlite3.Connection) else None

    def run(self, operation: str, chain: Chain) -> None:
        if operation == "create run":
            chain.run_id = new_id()
        ids = chain.ids
        connection = self._connection
        if self._begin is not None:
            connection.execute(self._begin)
        previous: Sequence[Any] | None = None
        for statement in self._scripts[operation].statements:
            cursor = connection.execute(statement.sql, statement.parameters(ids, previous))
            if statement.returns_rows:
                rows = cursor.fetchall()
                previous = rows[0] if rows else None
        connection.commit()


PAGES = {
    "list_for_run (page of 100)": SessionEvent,
    "list_for_session (page of 100 runs)": SessionRun,
}
"""The page reads, and the model a raw driver would build from their rows."""
RAW_OBJECTS = "raw + objects"


def _converter(column: Any, sqlite: bool) -> Callable[[Any], Any] | None:
    """What hand-written driver code does to a column's value to get the model's type."""
    type_ = column.type
    if isinstance(type_, UTCDateTime):
        if sqlite:
            return lambda v: None if v is None else datetime.fromisoformat(v).replace(tzinfo=UTC)
        return None  # psycopg returns aware datetimes (the session's TimeZone is UTC)
    if isinstance(type_, StrEnumType):
        return type_.enum_class
    if isinstance(type_, SqlEnum) and type_.enum_class is not None:
        return type_.enum_class
    if sqlite and column.key in _JSON_COLUMNS:
        # The engines' decoder (app.json_codec): the comparison is about building objects.
        return lambda v: None if v is None else loads(v)
    return None  # psycopg decodes jsonb (with the same decoder); text and integers as they come


_JSON_COLUMNS = frozenset({"payload", "latest_error", "metrics", "resume_payload", "options"})


class RawObjectsSide(RawSide):
    """The raw replay of a page that also builds the model instances from its rows, as
    hand-written driver code would (aware datetimes, enums, decoded JSON), in no session."""

    name = RAW_OBJECTS

    def __init__(
        self, connection: sqlite3.Connection | psycopg.Connection, scripts: dict[str, Script]
    ) -> None:
        super().__init__(connection, scripts)
        sqlite = isinstance(connection, sqlite3.Connection)
        self._models = {
            operation: (
                model,
                tuple(column.key for column in model.__table__.c),
                tuple(_converter(column, sqlite) for column in model.__table__.c),
            )
            for operation, model in PAGES.items()
        }

    def run(self, operation: str, chain: Chain) -> None:
        model, columns, converters = self._models[operation]
        (statement,) = self._scripts[operation].statements
        connection = self._connection
        if self._begin is not None:
            connection.execute(self._begin)
        rows = connection.execute(statement.sql, statement.parameters(chain.ids, None)).fetchall()
        new_instance = class_mapper(model).class_manager.new_instance
        instances = []
        for row in rows:
            instance = new_instance()
            instance.__dict__.update(
                (name, value if convert is None else convert(value))
                for name, convert, value in zip(columns, converters, row, strict=True)
            )
            instances.append(instance)
        connection.commit()


class RawReadSide:
    """Replays a read's captured statement as the read path sends it: one statement in
    autocommit (``connection``: SQLite's with the driver's transaction handling off, as
    ``app.db`` leaves it; a PostgreSQL connection in autocommit), every row fetched."""

    name = RAW_READ

    def __init__(
        self, connection: sqlite3.Connection | psycopg.Connection, scripts: dict[str, Script]
    ) -> None:
        self._connection = connection
        self._scripts = scripts

    def run(self, operation: str, chain: Chain) -> None:
        for statement in self._scripts[operation].statements:
            self._connection.execute(
                statement.sql, statement.parameters(chain.ids, None)
            ).fetchall()


SCHEMAS = {
    "get run": (RunResponse, RUN_COLUMNS),
    "list_for_run (page of 100)": (EventResponse, EVENT_COLUMNS),
    "list_for_session (page of 100 runs)": (RunResponse, RUN_COLUMNS),
}
"""The response schema the read path returns for each read, and the columns of its rows."""


class RawReadSchemasSide(RawReadSide):
    """``raw read``, plus the response schemas made as hand-written driver code would make
    them without validation: each value converted as ``RawObjectsSide`` converts it, then
    ``model_construct`` per row (fields from their columns: ``run_id`` from ``id``,
    ``timestamp`` from ``created_at``, a NULL payload as ``{}``)."""

    name = RAW_READ_SCHEMAS

    def __init__(
        self, connection: sqlite3.Connection | psycopg.Connection, scripts: dict[str, Script]
    ) -> None:
        super().__init__(connection, scripts)
        sqlite = isinstance(connection, sqlite3.Connection)
        self._builds: dict[str, Callable[[list[Any]], list[Any]]] = {}
        for operation, (schema, columns) in SCHEMAS.items():
            table = (SessionRun if schema is RunResponse else SessionEvent).__table__
            self._builds[operation] = _construct(schema, columns, table, sqlite)

    def run(self, operation: str, chain: Chain) -> None:
        (statement,) = self._scripts[operation].statements
        rows = self._connection.execute(
            statement.sql, statement.parameters(chain.ids, None)
        ).fetchall()
        self._builds[operation](rows)


def _construct(
    schema: type[Any], columns: tuple[str, ...], table: Any, sqlite: bool
) -> Callable[[list[Any]], list[Any]]:
    fields = []
    for name, info in schema.model_fields.items():
        source = info.validation_alias if isinstance(info.validation_alias, str) else name
        index = columns.index(source)
        fields.append((name, index, _converter(table.c[source], sqlite)))
    construct = schema.model_construct
    payload = "payload" if schema is EventResponse else None

    def build(rows: list[Any]) -> list[Any]:
        built = []
        for row in rows:
            values = {
                name: value if convert is None or value is None else convert(value)
                for name, index, convert in fields
                for value in (row[index],)
            }
            if payload is not None and values[payload] is None:
                values[payload] = {}
            built.append(construct(**values))
        return built

    return build


# --------------------------------------------------------------------------
# Making the response schemas from rows already read

SCHEMA_BUILDS = (
    "model_validate(instance)",
    "model_validate(dict)",
    "model_construct(**dict)",
    "read path build",
)
SCHEMA_CASES = ("RunResponse, 1 run", "EventResponse, 100 events", "RunResponse, 100 runs")


def _schema_builds(
    runs: list[SessionRun], events: list[SessionEvent]
) -> dict[str, dict[str, Callable[[], object]]]:
    """Per case and way, a call that makes the schemas from the same stored values."""
    cases = {
        "RunResponse, 1 run": (RunResponse, RUN_COLUMNS, runs[:1]),
        "EventResponse, 100 events": (EventResponse, EVENT_COLUMNS, events[:PAGE_OF_EVENTS]),
        "RunResponse, 100 runs": (RunResponse, RUN_COLUMNS, runs[:PAGE_OF_RUNS]),
    }
    builds: dict[str, dict[str, Callable[[], object]]] = {}
    for case, (schema, columns, instances) in cases.items():
        rows = [tuple(instance.__dict__[column] for column in columns) for instance in instances]
        dicts = [dict(zip(columns, row, strict=True)) for row in rows]
        named = [
            {
                name: row[columns.index(alias if isinstance(alias, str) else name)]
                for name, info in schema.model_fields.items()
                for alias in (info.validation_alias,)
            }
            for row in rows
        ]
        for values in named:
            if values.get("payload", {}) is None:
                values["payload"] = {}
        build = schema_builder(schema, columns, None)
        validate, construct = schema.model_validate, schema.model_construct
        builds[case] = {
            "model_validate(instance)": lambda v=validate, i=instances: [v(x) for x in i],
            "model_validate(dict)": lambda v=validate, d=dicts: [v(x) for x in d],
            "model_construct(**dict)": lambda c=construct, n=named: [c(**x) for x in n],
            "read path build": lambda b=build, r=rows: b(r),
        }
    return builds


def _time_schema_builds(
    samples: Samples, builds: dict[str, dict[str, Callable[[], object]]], batch: int, round_: int
) -> None:
    for case, ways in builds.items():
        order = list(SCHEMA_BUILDS) if round_ % 2 == 0 else list(SCHEMA_BUILDS)[::-1]
        for _ in range(batch):
            for way in order:
                samples.time(way, case, ways[way])


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
            # No run of the fixture is queued: claim_next takes only the runs
            # each side has just created (LIFECYCLES).
            RunRepository(db).cancel(chain.run_id)
        events_repository = EventRepository(db)
        for _ in range(events):
            events_repository.append(
                chain.session_id, "task_progress", PROGRESS, run_id=chain.run_id
            )
        db.commit()
    return chain


def _stored_rows(engine: Engine, chain: Chain) -> tuple[list[SessionRun], list[SessionEvent]]:
    """The fixture's runs and the page of events, as the repositories read them."""
    with DbSession(engine, expire_on_commit=False) as db:
        runs = RunRepository(db).list_for_session(chain.session_id, limit=PAGE_OF_RUNS)
        events = EventRepository(db).list_for_run(chain.run_id, limit=PAGE_OF_EVENTS)
        db.commit()
    return runs, events


def _check_read_path_agrees(
    engine: Engine, chain: Chain, runs: list[SessionRun], events: list[SessionEvent]
) -> None:
    """The read path answers what the repositories' rows validate into."""
    agree = (
        RunReads.of(engine).get(chain.run_id)
        == RunResponse.model_validate(next(run for run in runs if run.id == chain.run_id))
        and RunReads.of(engine).list_for_session(chain.session_id, limit=PAGE_OF_RUNS)
        == [RunResponse.model_validate(run) for run in runs]
        and EventReads.of(engine).list_for_run(chain.run_id, limit=PAGE_OF_EVENTS)
        == [EventResponse.model_validate(event) for event in events]
    )
    if not agree:
        raise RuntimeError("the read path and the repositories disagree")


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
    placement: str = ""


def measure_overhead(
    backend: str, url: str, *, rounds: int, batch: int, placement: str = "apart"
) -> OverheadResult:
    """Run the lifecycles and reads ``rounds`` times (plus one warm-up), ``batch`` runs each.
    On PostgreSQL the client and the server processes are placed as ``placement`` says
    (``benchmarks.environment.Placement``)."""
    pinning = Placement(placement if backend == "postgresql" else "free")
    engine = create_db_engine(url)
    pinning.pin_server_of(engine)
    upgrade(engine)
    repository = RepositorySide(engine)
    naive = RepositorySide(engine, NAIVE_OPERATIONS, name=NAIVE)
    peer_sides: list[Side] = [naive]
    if peers.advanced_alchemy_available():
        peer_sides.append(
            RepositorySide(engine, _advanced_alchemy_operations(), name=ADVANCED_ALCHEMY)
        )
    read_chain = _read_fixture(engine, runs=PAGE_OF_RUNS + 10, events=3 * PAGE_OF_EVENTS)
    # Recorded on an engine of its own: SQLAlchemy keeps checking for event
    # dispatch on an engine that ever had a cursor-event listener (the recorder's),
    # which would slow down every later call of the measured side.
    recorder = create_db_engine(url)
    try:
        scripts = _record_scripts(recorder, RepositorySide(recorder), read_chain)
    finally:
        recorder.dispose()
    # The driver connection is made by an engine of the same configuration, so
    # it has the same pragmas, SQL functions and session settings, and is then
    # used directly, without SQLAlchemy.
    raw_engine = create_db_engine(url, poolclass=NullPool)
    pinning.pin_server_of(raw_engine)
    pooled = raw_engine.raw_connection()
    connection = pooled.driver_connection
    raw = RawSide(connection, scripts)
    sides: list[Side] = [repository, raw, *peer_sides]
    raw_objects = RawObjectsSide(connection, scripts)
    # The read path's raw counterpart: its own driver connection, in autocommit.
    pooled_reader = raw_engine.raw_connection()
    reader_connection = pooled_reader.driver_connection
    if isinstance(reader_connection, psycopg.Connection):
        reader_connection.autocommit = True
    read_sides: list[Side] = [
        ReadPathSide(engine),
        RawReadSide(reader_connection, scripts),
        RawReadSchemasSide(reader_connection, scripts),
    ]
    stored_runs, stored_events = _stored_rows(engine, read_chain)
    _check_read_path_agrees(engine, read_chain, stored_runs, stored_events)
    builds = _schema_builds(stored_runs, stored_events)
    # Each side has its own sessions; a lifecycle ends in a terminal status, so
    # the next lifecycle may start a run in the same session.
    sessions = {side.name: add_sessions(engine, batch) for side in sides}
    samples = Samples()
    pinning.pin_client()
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
                page_sides = list(order)
                if operation in PAGES:
                    page_sides.append(raw_objects)
                if operation in READ_PATH_READS:
                    page_sides += read_sides
                if round_ % 2:
                    page_sides.reverse()
                for side in page_sides:
                    _time_batch(samples, side, operation, [read_chain] * batch, counted)
            if counted:
                _time_schema_builds(samples, builds, batch, round_)
        _check_sides_agree(engine, sessions)
    finally:
        pinning.release_client()
        pooled_reader.close()
        pooled.close()
        raw_engine.dispose()
        engine.dispose()
    described = pinning.described if backend == "postgresql" else ""
    return OverheadResult(backend, samples, scripts, rounds, batch, described)


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
