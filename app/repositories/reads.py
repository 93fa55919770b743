"""Reads outside the ORM Session: the repositories' own statements, straight into the
API's response schemas.

    runs, events = RunReads.of(engine), EventReads.of(engine)   # one each per engine
    runs.get(run_id)                                    # RunResponse, or RunNotFoundError
    runs.list_for_session(session_id, status="queued")  # [RunResponse], newest first
    events.page_for_run(run_id, since_seq=0, limit=100) # EventPage, as GET .../events answers
    events.list_for_session(session_id, since_seq=12)   # [EventResponse]: the SSE catch-up

A read that only answers a request has no use for an identity map or change
tracking, and the SQLAlchemy Session costs more than the statement
(docs/benchmarks.md). Each call here checks a connection out of the engine's
pool, runs one of the repositories' compiled statements on the driver (the plan
``app.repositories._driver`` made from what SQLAlchemy compiled: the SQL text of
``docs/sql/``, the bind and result processors of the column types), and builds the
response schema from the row. The values are the repositories' own: aware UTC
datetimes, enum members, JSON as stored; a response equals
``RunResponse.model_validate(RunRepository(db).get(run_id))`` (and likewise for
events and pages), which ``tests/test_read_path.py`` checks row by row.

* **Transactions.** A read is one statement in autocommit: on PostgreSQL one round
  trip (the driver's autocommit is switched on for the statement and off again
  before the connection goes back to the pool: no state is left on it); on SQLite
  a statement-level read transaction, which in WAL mode never takes or waits for
  the write lock. A follow-up statement (is an empty page's run unknown? is a
  ``before`` cursor in the session?) sees the database as of its own start, as
  READ COMMITTED does.
* **Errors** as the repositories raise them: bad arguments ``BadParameterError``
  (400) before any SQL, an unknown run ``RunNotFoundError`` (404); a driver error
  goes through SQLAlchemy's ``Connection._handle_dbapi_exception`` (wrapped, and a
  lost connection invalidated with the pool's older connections), then the
  repositories' ``_driver_errors.domain_error``; a pool timeout is SQLAlchemy's.
* **Schemas without validation where it cannot matter.** A row's values already have
  the schema's types (the column types made them); when each value's type is
  exactly the one its field accepts as it is, the instance is made as
  ``model_construct`` makes one, without a copy of the dict; any other value (a
  legacy NULL, a type the field would coerce or refuse) goes through
  ``model_validate``, which gives the reference result or error. A schema with
  validators, constraints or settings this module does not know is always validated.
* **Observers win.** With SQL echo, or execute / cursor-execute listeners on the engine
  (instrumentation, the tests' statement capture), or before a statement's plan
  exists, the read runs through SQLAlchemy's own execution on ``app.db.read_only``'s
  engine (``BEGIN DEFERRED`` on SQLite), exactly as ``_driver`` decides for the
  repositories.

Thread-safe; the instances hold no connection. Reference: docs/read-path.md.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import Enum
from operator import contains, itemgetter
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Executable
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel
from sqlmodel.main import FieldInfoMetadata

from app.db import read_only
from app.errors import BadParameterError, RunNotFoundError
from app.models import RunStatus
from app.repositories import events as _events
from app.repositories import runs as _runs
from app.repositories._driver import _OBSERVERS, _OWN_OPTIONS, Plan, _execute, _plans
from app.repositories._driver_errors import domain_error
from app.repositories._params import (
    enum_param,
    optional_text_param,
    page_size,
    since_seq_param,
    text_param,
)
from app.repositories._sql import POSTGRESQL, RUN_EXISTS
from app.schemas import EventPage, EventResponse, RunResponse

S = TypeVar("S", bound=BaseModel)

_READERS = "_run_layer_reads"
_NONE = type(None)


# --------------------------------------------------------------------------
# Rows into schemas


class _Shape:
    """How rows of one statement become instances of one schema: per field, its column,
    the result processor to apply to it (driver rows; none for rows SQLAlchemy converted),
    the types of value validation would keep as they are, and what a NULL becomes first
    (a known ``before`` validator). A row whose values all have those types is made into
    an instance as ``model_construct`` makes one; any other row is validated."""

    __slots__ = ("accepted", "converters", "fast", "fills", "names", "pick", "schema", "sources")

    def __init__(
        self, schema: type[BaseModel], columns: Sequence[str], converters: Sequence[Any] | None
    ) -> None:
        known = _fast_fields(schema)
        self.schema = schema
        self.fast = known is not None
        """Whether rows may skip validation at all (see ``_fast_fields``)."""
        names, sources, indexes, accepted, fills = [], [], [], [], []
        for position, (name, info) in enumerate(schema.model_fields.items()):
            source = info.validation_alias if isinstance(info.validation_alias, str) else name
            names.append(name)
            sources.append(source)
            indexes.append(columns.index(source))
            types_, fill = (frozenset(), None) if known is None else known[name]
            accepted.append(types_)
            if fill is not None:
                fills.append((position, fill))
        self.names, self.sources = tuple(names), tuple(sources)
        self.accepted, self.fills = tuple(accepted), tuple(fills)
        self.pick = itemgetter(*indexes) if len(indexes) > 1 else lambda row: (row[indexes[0]],)
        self.converters = tuple(
            (position, converters[index])
            for position, index in enumerate(indexes)
            if converters is not None and converters[index] is not None
        )

    def build(self, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """One instance per row, in order."""
        schema, names, accepted = self.schema, self.names, self.accepted
        converters, fills, fast = self.converters, self.fills, self.fast
        instances = []
        for row in rows:
            values = list(self.pick(row))
            for position, convert in converters:
                value = values[position]
                if value is not None:
                    values[position] = convert(value)
            for position, fill in fills:
                if values[position] is None:
                    values[position] = fill()
            if fast and all(map(contains, accepted, map(type, values))):
                # As model_construct makes one (SQLModel.__new__ of a schema: just this).
                instance = _new(schema)
                _set(instance, "__dict__", dict(zip(names, values, strict=True)))
                _set(instance, "__pydantic_fields_set__", set(names))
                _set(instance, "__pydantic_extra__", None)
                _set(instance, "__pydantic_private__", None)
            else:
                # What validating the repository's instance reads, under the same names.
                instance = schema.model_validate(dict(zip(self.sources, values, strict=True)))
            instances.append(instance)
        return instances


_set = object.__setattr__
_new = object.__new__


def _known_before_validators() -> dict[tuple[type[BaseModel], str], Callable[[], Any]]:
    """``before`` field validators whose whole effect is known: what a NULL becomes."""
    return {(EventResponse, "_always_an_object"): dict}


_CONFIG_CHANGING_VALUES = frozenset(
    {
        "str_strip_whitespace",
        "str_to_lower",
        "str_to_upper",
        "str_min_length",
        "str_max_length",
        "use_enum_values",
        "coerce_numbers_to_str",
        "val_json_bytes",
    }
)


def _fast_fields(schema: type[BaseModel]) -> dict[str, tuple[frozenset[type], Any]] | None:
    """Per field, the value types validation keeps as they are, and a known NULL fill;
    None when the schema has anything else that validation would apply (a model or
    unknown field validator, a constraint, a value-changing setting)."""
    decorators = schema.__pydantic_decorators__
    if (
        schema.__new__ is not SQLModel.__new__  # what _Shape.build does instead
        or schema.model_config.get("table")
        or schema.__pydantic_root_model__
        or decorators.model_validators
        or decorators.root_validators
        or decorators.validators
        or schema.__pydantic_post_init__
        or schema.__private_attributes__
        or any(schema.model_config.get(key) for key in _CONFIG_CHANGING_VALUES)
    ):
        return None
    known = _known_before_validators()
    fills: dict[str, Any] = {}
    for name, validator in decorators.field_validators.items():
        fill = known.get((schema, name))
        if fill is None or validator.info.mode != "before":
            return None
        for field in validator.info.fields:
            fills[field] = fill
    fast = {}
    for name, info in schema.model_fields.items():
        if any(not isinstance(item, FieldInfoMetadata) for item in info.metadata):
            return None  # a constraint (max_length, Strict, ...): validation decides
        accepted = _accepted(info.annotation)
        if accepted is None:
            return None
        fast[name] = (accepted, fills.get(name))
    return fast


_SCALARS = frozenset({str, int, datetime})


def _accepted(annotation: Any) -> frozenset[type] | None:
    """The types of value that validating against ``annotation`` returns unchanged (or as
    an equal shallow copy: ``dict[str, Any]``); None for any other annotation."""
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        accepted: set[type] = set()
        for argument in get_args(annotation):
            if argument is _NONE:
                accepted.add(_NONE)
                continue
            part = _accepted(argument)
            if part is None:
                return None
            accepted |= part
        return frozenset(accepted)
    if origin is dict and get_args(annotation) == (str, Any):
        return frozenset({dict})  # JSON objects: keys are str, values unvalidated
    if annotation in _SCALARS:
        return frozenset({annotation})
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return frozenset({annotation})
    return None


# --------------------------------------------------------------------------
# Execution


class _Reader:
    """Runs a statement on a pooled connection and builds schemas from its rows."""

    __slots__ = (
        "_dbapi_error",
        "_engine",
        "_plans",
        "_postgresql",
        "_reader",
        "_shapes",
    )

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._reader = read_only(engine)  # SQLAlchemy's path: BEGIN DEFERRED on SQLite
        self._postgresql = engine.dialect.name == POSTGRESQL
        self._plans = _plans(engine.dialect)
        self._dbapi_error = engine.dialect.loaded_dbapi.Error
        self._shapes: dict[tuple[Any, ...], tuple[Executable, Plan | None, _Shape]] = {}

    def instances(self, schema: type[S], statement: Executable, params: dict[str, Any]) -> list[S]:
        """``schema`` instances of the statement's rows."""
        plan = self._plans.get(id(statement))
        if plan is None or plan.statement is not statement or self._observed():
            rows = self._through_sqlalchemy(statement, params)
            return self._shape(schema, statement, None).build(rows)
        return self._shape(schema, statement, plan).build(self._on_driver(plan, params))

    def _shape(self, schema: type[BaseModel], statement: Any, plan: Plan | None) -> _Shape:
        """How ``statement``'s rows become ``schema`` instances: driver rows of ``plan``, or
        rows SQLAlchemy converted (None). Made once; each entry keeps its statement and
        plan alive, so their ids are never reused."""
        key = (schema, id(statement), None if plan is None else id(plan))
        known = self._shapes.get(key)
        if known is None or known[0] is not statement or known[1] is not plan:
            columns = [column.key for column in statement.selected_columns]
            converters = None
            if plan is not None:
                if tuple(columns) != plan.columns:
                    raise RuntimeError("the statement's columns are not the plan's")
                by_index = dict(plan.converters)
                converters = [by_index.get(index) for index in range(len(columns))]
            known = self._shapes[key] = (statement, plan, _Shape(schema, columns, converters))
        return known[2]

    def scalar(self, statement: Executable, params: dict[str, Any]) -> Any:
        """The first column of the first row (the statement's types applied), or None."""
        plan = self._plans.get(id(statement))
        if plan is None or plan.statement is not statement or self._observed():
            rows = self._through_sqlalchemy(statement, params)
        else:
            rows = plan.convert(self._on_driver(plan, params))
        return rows[0][0] if rows else None

    def _observed(self) -> bool:
        """Whether skipping SQLAlchemy's execution could be noticed: ``_driver._direct``'s
        rule, applied to the engine the reads were made for (its listeners reach
        ``read_only(engine)`` too; that engine's own ``begin`` listener observes no
        statement, and listeners added to it alone are not looked for)."""
        engine = self._engine
        if engine._has_events:
            # As SQLAlchemy checks; pool listeners (the idle ping) observe no statement.
            dispatch = engine.dispatch
            if any(getattr(dispatch, name) for name in _OBSERVERS):
                return True
        if engine.dialect._has_events or engine._should_log_info():
            return True
        options = engine._execution_options
        return bool(options) and not options.keys() <= _OWN_OPTIONS

    def _on_driver(self, plan: Plan, params: dict[str, Any]) -> list[Any]:
        """The statement's driver rows (unconverted), in autocommit (module docstring)."""
        arguments = plan.arguments(params)
        engine = self._engine
        try:
            connection = engine.raw_connection()
        except self._dbapi_error as exc:
            Connection._handle_dbapi_exception_noconnection(exc, engine.dialect, engine)
            raise  # not reached: the call above raises
        driver: Any = connection.driver_connection
        postgresql, idle = self._postgresql, False
        try:
            if postgresql:
                driver.autocommit = True
            cursor = driver.execute(plan.sql, arguments)
            rows = cursor.fetchall() if plan.returns_rows else []
            if postgresql:
                driver.autocommit = False  # psycopg allows it only outside a transaction
                idle = True
            else:
                idle = not driver.in_transaction
        except self._dbapi_error as exc:
            self._raise(Connection(engine, connection=connection), exc, plan.sql, arguments, params)
        finally:
            if idle:
                # No transaction to end: the pool need not roll back (as Connection.close
                # tells it after its own transaction ended).
                connection._close_special(transaction_reset=True)
            else:
                if postgresql and connection.is_valid:
                    try:
                        driver.autocommit = False
                    except self._dbapi_error:  # broken: not back into the pool as it is
                        connection.invalidate()
                connection.close()
        return rows

    def _raise(
        self,
        connection: Connection,
        exc: Exception,
        sql: str,
        arguments: Any,
        params: dict[str, Any],
    ) -> None:
        """SQLAlchemy's wrapping and invalidation, then the repositories' domain mapping."""
        try:
            connection._handle_dbapi_exception(exc, sql, arguments, None, None)  # type: ignore[arg-type]
        except DBAPIError as wrapped:
            error = domain_error(wrapped, params)
            if error is None:
                raise
        raise error  # outside the except block: no context carrying the parameters

    def _through_sqlalchemy(self, statement: Executable, params: dict[str, Any]) -> list[Any]:
        """SQLAlchemy's execution on the read-only engine (``_driver._execute``: it also makes
        the statement's plan); rows converted."""
        try:
            with self._reader.connect() as connection:
                rows, _ = _execute(connection, statement, params, None)
        except DBAPIError as exc:
            error = domain_error(exc, params)
            if error is None:
                raise
        else:
            return rows.rows
        raise error  # outside the except block: no context carrying the parameters


def _reader(engine: Engine) -> _Reader:
    reader = engine.__dict__.get(_READERS)
    if reader is None:
        reader = engine.__dict__[_READERS] = _Reader(engine)
    return reader


# --------------------------------------------------------------------------
# The public reads


class RunReads:
    """Runs as ``RunResponse``, read outside the ORM Session (see the module docstring).

    Construct it once per engine (``RunReads.of(engine)``); every method checks a
    connection out and back in. The same arguments and errors as ``RunRepository``'s
    reads of the same names.
    """

    __slots__ = ("_reader", "_sql")

    def __init__(self, engine: Engine) -> None:
        self._reader = _reader(engine)
        self._sql = _runs._statements(engine.dialect.name)

    @classmethod
    def of(cls, engine: Engine) -> RunReads:
        """The engine's ``RunReads`` (made on first use, then shared)."""
        reads = engine.__dict__.get(_RUN_READS)
        if reads is None:
            reads = engine.__dict__[_RUN_READS] = cls(engine)
        return reads

    def get(self, run_id: str) -> RunResponse:
        """The run as stored now; ``RunNotFoundError`` (404) if there is none."""
        run = self.get_or_none(run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    def get_or_none(self, run_id: str) -> RunResponse | None:
        runs = self._reader.instances(
            RunResponse, self._sql.by_id, {"run_id": text_param(run_id, "run_id")}
        )
        return runs[0] if runs else None

    def list_for_session(
        self,
        session_id: str,
        *,
        status: RunStatus | str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunResponse]:
        """The session's runs, newest first (``created_at``, then ``id``, descending).

        Keyset pagination: ``before`` is the ``run_id`` of the last run of the previous
        page. An unknown ``before`` run raises ``RunNotFoundError``, a run of another
        session ``BadParameterError``; ``status`` keeps the runs in that status.
        """
        params: dict[str, Any] = {
            "session_id": text_param(session_id, "session_id"),
            "limit": page_size(limit),
            "before": optional_text_param(before, "before"),
        }
        if status is not None:
            params["status"] = enum_param(RunStatus, status, "status")
        page = self._sql.pages[status is not None, before is not None]
        runs = self._reader.instances(RunResponse, page, params)
        if not runs and before is not None:
            cursor = self.get_or_none(before)
            if cursor is None:
                raise RunNotFoundError(before)
            if cursor.session_id != session_id:
                raise BadParameterError(
                    "before", f"run {before} belongs to another session, not to {session_id}"
                )
        return runs

    def list_by_status(self, status: RunStatus | str, *, limit: int) -> list[RunResponse]:
        """Runs in ``status``, oldest first (the order in which to pick queued runs)."""
        params = {"status": enum_param(RunStatus, status, "status"), "limit": page_size(limit)}
        return self._reader.instances(RunResponse, self._sql.by_status, params)


class EventReads:
    """Event pages as ``EventResponse`` / ``EventPage``, read outside the ORM Session.

    Construct it once per engine (``EventReads.of(engine)``). The same arguments and
    errors as ``EventRepository.list_for_run`` / ``list_for_session``.
    """

    __slots__ = ("_reader", "_sql")

    def __init__(self, engine: Engine) -> None:
        self._reader = _reader(engine)
        self._sql = _events._statements(engine.dialect.name)

    @classmethod
    def of(cls, engine: Engine) -> EventReads:
        """The engine's ``EventReads`` (made on first use, then shared)."""
        reads = engine.__dict__.get(_EVENT_READS)
        if reads is None:
            reads = engine.__dict__[_EVENT_READS] = cls(engine)
        return reads

    def list_for_run(
        self, run_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> list[EventResponse]:
        """The run's events with ``seq > since_seq``, in seq order (session seqs).

        An empty page of an unknown run raises ``RunNotFoundError``.
        """
        params = {
            "run_id": text_param(run_id, "run_id"),
            "since_seq": since_seq_param(since_seq),
            "limit": page_size(limit),
        }
        events = self._reader.instances(EventResponse, self._sql.page_for_run, params)
        if not events and not self._reader.scalar(RUN_EXISTS, {"run_id": run_id}):
            raise RunNotFoundError(run_id)
        return events

    def list_for_session(
        self, session_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> list[EventResponse]:
        """The session's events with ``seq > since_seq``, in seq order, legacy ones
        included (an unknown session has none): the catch-up of ``app.feed``."""
        params = {
            "session_id": text_param(session_id, "session_id"),
            "since_seq": since_seq_param(since_seq),
            "limit": page_size(limit),
        }
        return self._reader.instances(EventResponse, self._sql.page_for_session, params)

    def page_for_run(self, run_id: str, *, since_seq: int = 0, limit: int = 100) -> EventPage:
        """``list_for_run`` as the body of ``GET /api/runs/{run_id}/events``."""
        return page(self.list_for_run(run_id, since_seq=since_seq, limit=limit), since_seq)

    def page_for_session(
        self, session_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> EventPage:
        """``list_for_session`` as an ``EventPage``."""
        return page(self.list_for_session(session_id, since_seq=since_seq, limit=limit), since_seq)


def page(events: list[EventResponse], since_seq: int) -> EventPage:
    """The ``EventPage`` of ``events`` read after ``since_seq`` (equal to ``EventPage.of``
    of the same events as ``SessionEvent``; made without validating them again)."""
    body = EventPage.__new__(EventPage)
    _set(
        body,
        "__dict__",
        {"items": events, "next_since_seq": events[-1].seq if events else since_seq},
    )
    _set(body, "__pydantic_fields_set__", {"items", "next_since_seq"})
    return body


_RUN_READS = "_run_layer_run_reads"
_EVENT_READS = "_run_layer_event_reads"

__all__ = ["EventReads", "RunReads", "page"]
