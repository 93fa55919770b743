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
events and pages), which ``tests/repositories/test_read_path.py`` checks row by row.

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
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Executable
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel
from sqlmodel.main import FieldInfoMetadata

from app._params import (
    check_page_cursor,
    enum_param,
    page_size,
    run_page_params,
    since_seq_param,
    text_param,
)
from app.db import read_only
from app.errors import RunNotFoundError, SessionNotFoundError
from app.models import RunStatus
from app.replicas import routed
from app.repositories import events as _events
from app.repositories._driver import (
    _OBSERVERS,
    _OWN_OPTIONS,
    Plan,
    _execute,
    _plans,
    fast_paths,
)
from app.repositories._driver_errors import domain_error
from app.repositories._listings import (
    encode_cursor,
    listing_params,
    listing_statements,
    metadata_filter,
    metadata_matches,
)
from app.repositories._pool_loan import adopt, borrow, give_back, lender
from app.repositories._run_statements import run_statements
from app.repositories._sql import POSTGRESQL, RUN_EXISTS, SESSION_EXISTS
from app.schemas import EventPage, EventResponse, RunPage, RunResponse, SessionResponse

S = TypeVar("S", bound=BaseModel)

_READERS = "_run_layer_reads"
_NONE = type(None)


# --------------------------------------------------------------------------
# Rows into schemas


def schema_builder(
    schema: type[BaseModel],
    columns: Sequence[str],
    converters: Sequence[Any] | None,
    *,
    validated: bool = False,
) -> Callable[[Sequence[Sequence[Any]]], list[Any]]:
    """``build(rows)``: one ``schema`` instance per row of a statement with ``columns``.

    ``converters``: per column, the result processor to apply to a non-NULL value
    (driver rows), or None for rows SQLAlchemy converted. Each field is read from its
    column (``validation_alias`` or its name); a NULL first becomes what a known
    ``before`` validator makes of it. A row whose every value has a type the field
    keeps as it is (``_fast_fields``) becomes an instance as ``model_construct`` makes
    one (the four attributes of a pydantic instance; for a schema, ``SQLModel.__new__``
    sets nothing else); any other row is validated under the column names, as
    validating the repository's instance reads it.

    The function is generated for the schema and the statement (one line per field,
    no loop over the fields): a page of 100 events takes a third less time than a
    loop over the fields would. Field and column names are quoted with ``repr``;
    everything else is bound by name. ``validated``: every row is validated (the
    fast paths switched off, ``app.repositories._driver``).
    """
    known = None if validated else _fast_fields(schema)
    names = tuple(schema.model_fields)
    scope: dict[str, Any] = {
        "_new": object.__new__,
        "_set": object.__setattr__,
        "schema": schema,
        "names": frozenset(names),
    }
    lines, checks, values, sources = [], [], [], []
    for position, (name, info) in enumerate(schema.model_fields.items()):
        source = info.validation_alias if isinstance(info.validation_alias, str) else name
        value = f"v{position}"
        lines.append(f"        {value} = row[{columns.index(source)}]")
        convert = None if converters is None else converters[columns.index(source)]
        if convert is not None:
            scope[f"convert{position}"] = convert
            lines.append(f"        if {value} is not None: {value} = convert{position}({value})")
        if known is not None:
            accepted, fill = known[name]
            if fill is not None:
                scope[f"fill{position}"] = fill
                lines.append(f"        if {value} is None: {value} = fill{position}()")
            scope[f"accepted{position}"] = accepted
            checks.append(f"type({value}) in accepted{position}")
        values.append(f"{name!r}: {value}")
        sources.append(f"{source!r}: {value}")
    taken = " and ".join(checks) if checks else "False"
    source_code = "\n".join(
        [
            "def build(rows):",
            "    instances = []",
            "    for row in rows:",
            *lines,
            f"        if {taken}:",
            "            instance = _new(schema)",
            f"            _set(instance, '__dict__', {{{', '.join(values)}}})",
            "            _set(instance, '__pydantic_fields_set__', set(names))",
            "            _set(instance, '__pydantic_extra__', None)",
            "            _set(instance, '__pydantic_private__', None)",
            "        else:",
            f"            instance = schema.model_validate({{{', '.join(sources)}}})",
            "        instances.append(instance)",
            "    return instances",
        ]
    )
    exec(compile(source_code, f"<{schema.__name__} from rows>", "exec"), scope)
    build: Callable[[Sequence[Sequence[Any]]], list[Any]] = scope["build"]
    build.__doc__ = source_code
    return build


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
        schema.__new__ is not SQLModel.__new__  # what schema_builder does instead
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


class _Query:
    """One of the repositories' statements read into one schema: ``query(params)``.

    Until the statement has its plan (``_driver`` makes it at the first execution
    through SQLAlchemy, in any transaction of the engine), and whenever something
    observes statements, the read takes SQLAlchemy's path; from then on the driver's,
    with a builder made for the plan's driver rows.
    """

    __slots__ = (
        "_build",
        "_columns",
        "_converted",
        "_plan",
        "_reader",
        "_schema",
        "_statement",
        "_validated",
    )

    def __init__(self, reader: _Reader, schema: type[BaseModel], statement: Any) -> None:
        self._reader, self._schema, self._statement = reader, schema, statement
        self._columns = tuple(column.key for column in statement.selected_columns)
        self._converted = schema_builder(schema, self._columns, None)
        self._validated = schema_builder(schema, self._columns, None, validated=True)
        self._build: Callable[[Sequence[Sequence[Any]]], list[Any]] | None = None
        self._plan: Plan | None = None

    def __call__(self, params: dict[str, Any]) -> list[Any]:
        plan = self._plan or self._planned()
        reader = self._reader
        if plan is None or reader.observed():
            build = self._converted if fast_paths() else self._validated
            return build(reader.through_sqlalchemy(self._statement, params))
        return self._build(reader.on_driver(plan, params))  # type: ignore[misc]

    def _planned(self) -> Plan | None:
        """The statement's plan once it exists, with the builder for its rows."""
        plan = self._reader.plans.get(id(self._statement))
        if plan is None or plan.statement is not self._statement:
            return None
        if plan.columns != self._columns:
            raise RuntimeError(
                f"{self._schema.__name__}: the plan's columns are not the statement's"
            )
        by_index = dict(plan.converters)
        converters = [by_index.get(index) for index in range(len(self._columns))]
        self._build = schema_builder(self._schema, self._columns, converters)
        self._plan = plan  # after the builder: a thread that sees the plan finds it
        return plan


class _Reader:
    """Runs a statement on a pooled connection of one engine (one per engine)."""

    __slots__ = ("_dbapi_error", "_engine", "_postgresql", "_queries", "_reader", "plans")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._reader = read_only(engine)  # SQLAlchemy's path: BEGIN DEFERRED on SQLite
        self._postgresql = engine.dialect.name == POSTGRESQL
        self._dbapi_error = engine.dialect.loaded_dbapi.Error
        self._queries: dict[tuple[type[BaseModel], int], tuple[Any, _Query]] = {}
        self.plans = _plans(engine.dialect)

    def query(self, schema: type[BaseModel], statement: Any) -> _Query:
        """The engine's query of ``statement`` into ``schema`` (made once; statements are
        module constants, and each entry keeps its own alive, so an id is never reused)."""
        known = self._queries.get((schema, id(statement)))
        if known is None or known[0] is not statement:
            known = self._queries[schema, id(statement)] = (
                statement,
                _Query(self, schema, statement),
            )
        return known[1]

    def scalar(self, statement: Executable, params: dict[str, Any]) -> Any:
        """The first column of the first row (the statement's types applied), or None."""
        plan = self.plans.get(id(statement))
        if plan is None or plan.statement is not statement or self.observed():
            rows = self.through_sqlalchemy(statement, params)
        else:
            rows = plan.convert(self.on_driver(plan, params))
        return rows[0][0] if rows else None

    def observed(self) -> bool:
        """Whether skipping SQLAlchemy's execution could be noticed: ``_driver._direct``'s
        rule, applied to the engine the reads were made for (its listeners reach
        ``read_only(engine)`` too; that engine's own ``begin`` listener observes no
        statement, and listeners added to it alone are not looked for); always
        when the fast paths are off."""
        if not fast_paths():
            return True
        engine = self._engine
        if engine._has_events:  # noqa: SLF001 SQLAlchemy private, docs/design.md
            # As SQLAlchemy checks; pool listeners (the idle ping) observe no statement.
            dispatch = engine.dispatch
            if any(getattr(dispatch, name) for name in _OBSERVERS):
                return True
        if engine.dialect._has_events or engine._should_log_info():  # noqa: SLF001 SQLAlchemy private, docs/design.md
            return True
        options = engine._execution_options  # noqa: SLF001 SQLAlchemy private, docs/design.md
        return bool(options) and not options.keys() <= _OWN_OPTIONS

    def on_driver(self, plan: Plan, params: dict[str, Any]) -> list[Any]:
        """The statement's driver rows (unconverted), in autocommit (module docstring), on a
        connection lent by the pool without a proxy where nothing could tell
        (``_pool_loan``), else on ``engine.raw_connection()``."""
        arguments = plan.arguments(params)
        engine = self._engine
        pool = lender(engine)
        try:
            record = None if pool is None else borrow(pool)
        except self._dbapi_error as exc:  # could not connect
            Connection._handle_dbapi_exception_noconnection(exc, engine.dialect, engine)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            raise  # not reached: the call above raises
        if record is None:
            return self._on_proxy(plan, arguments, params)
        assert pool is not None
        try:
            rows, idle = self._run(record.driver_connection, plan, arguments)
        except self._dbapi_error as exc:
            connection = adopt(pool, record)
            try:
                proxied = Connection(engine, connection=connection)
                self._raise(proxied, exc, plan.sql, arguments, params)
            finally:
                self._close(connection)
        except BaseException:
            # Not the driver's (an interrupt): the proxy's close resets the connection.
            self._close(adopt(pool, record))
            raise
        if idle:
            give_back(record)
        else:  # a transaction to end: the proxy's close rolls it back
            self._close(adopt(pool, record))
        return rows

    def _on_proxy(self, plan: Plan, arguments: Any, params: dict[str, Any]) -> list[Any]:
        """``on_driver`` on ``engine.raw_connection()``."""
        engine = self._engine
        try:
            connection = engine.raw_connection()
        except self._dbapi_error as exc:
            Connection._handle_dbapi_exception_noconnection(exc, engine.dialect, engine)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            raise  # not reached: the call above raises
        idle = False
        try:
            rows, idle = self._run(connection.driver_connection, plan, arguments)
        except self._dbapi_error as exc:
            self._raise(Connection(engine, connection=connection), exc, plan.sql, arguments, params)
        finally:
            if idle:
                # No transaction to end: the pool need not roll back (as Connection.close
                # tells it after its own transaction ended).
                connection._close_special(transaction_reset=True)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            else:
                self._close(connection)
        return rows

    def _run(self, driver: Any, plan: Plan, arguments: Any) -> tuple[list[Any], bool]:
        """The statement in autocommit on a driver connection: its rows, and whether the
        connection is left with no transaction open (SQLite may open one: never in
        autocommit, but the pool's reset is then needed)."""
        if self._postgresql:
            driver.autocommit = True
            cursor = driver.execute(plan.sql, arguments)
            rows = cursor.fetchall() if plan.returns_rows else []
            driver.autocommit = False  # psycopg allows it only outside a transaction
            return rows, True
        cursor = driver.execute(plan.sql, arguments)
        return (cursor.fetchall() if plan.returns_rows else []), not driver.in_transaction

    def _close(self, connection: Any) -> None:
        """Back to the pool through the proxy: the pool resets it (a rollback); on
        PostgreSQL autocommit off first, or the connection is invalidated."""
        if self._postgresql and connection.is_valid:
            try:
                connection.driver_connection.autocommit = False
            except self._dbapi_error:  # broken: not back into the pool as it is
                connection.invalidate()
        connection.close()

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
            connection._handle_dbapi_exception(exc, sql, arguments, None, None)  # noqa: SLF001 SQLAlchemy private, docs/design.md
        except DBAPIError as wrapped:
            error = domain_error(wrapped, params)
            if error is None:
                raise
        raise error  # outside the except block: no context carrying the parameters

    def through_sqlalchemy(self, statement: Executable, params: dict[str, Any]) -> list[Any]:
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

    __slots__ = ("_across", "_by_id", "_by_status", "_for_session", "_pages", "_reader")

    def __init__(self, engine: Engine) -> None:
        reader, sql = _reader(engine), run_statements(engine.dialect.name)
        self._by_id = reader.query(RunResponse, sql.by_id)
        self._by_status = reader.query(RunResponse, sql.by_status)
        self._pages = {key: reader.query(RunResponse, page) for key, page in sql.pages.items()}
        listings = listing_statements(engine.dialect.name)
        self._for_session = {
            key: reader.query(RunResponse, page) for key, page in listings.for_session.items()
        }
        self._across = {
            key: reader.query(RunResponse, page) for key, page in listings.across_sessions.items()
        }
        self._reader = reader

    @classmethod
    def of(cls, engine: Engine) -> RunReads:
        """The engine's ``RunReads`` (made on first use, then shared)."""
        reads = engine.__dict__.get(_RUN_READS)
        if reads is None:  # with a read replica: routed (app.replicas)
            reads = engine.__dict__[_RUN_READS] = routed(engine, cls)
        return reads

    def get(self, run_id: str) -> RunResponse:
        """The run as stored now; ``RunNotFoundError`` (404) if there is none."""
        run = self.get_or_none(run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    def get_or_none(self, run_id: str) -> RunResponse | None:
        runs = self._by_id({"run_id": text_param(run_id, "run_id")})
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
        params, key = run_page_params(session_id, status, limit, before)
        runs = self._pages[key](params)
        if not runs and before is not None:
            cursor = self.get_or_none(before)
            check_page_cursor(before, session_id, None if cursor is None else cursor.session_id)
        return runs

    def list_by_status(self, status: RunStatus | str, *, limit: int) -> list[RunResponse]:
        """Runs in ``status``, oldest first (the order in which to pick queued runs)."""
        params = {"status": enum_param(RunStatus, status, "status"), "limit": page_size(limit)}
        return self._by_status(params)

    def page_for_session(
        self,
        session_id: str,
        *,
        status: RunStatus | str | None = None,
        metadata: dict[str, Any] | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> RunPage:
        """A keyset page of the session's runs, newest first (``app.repositories._listings``):
        ``GET /api/sessions/{session_id}/runs``. An unknown session raises
        ``SessionNotFoundError``; a bad argument ``BadParameterError``."""
        params, key = listing_params(
            session_id=session_id, status=status, metadata=metadata, cursor=cursor, limit=limit
        )
        runs = self._for_session[key](params)
        if not runs and not self._reader.scalar(SESSION_EXISTS, {"session_id": session_id}):
            raise SessionNotFoundError(session_id)
        return _run_page(runs, params["limit"] - 1)

    def page(
        self,
        *,
        status: RunStatus | str | None = None,
        metadata: dict[str, Any] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> RunPage:
        """A keyset page of the runs of every session, newest first: ``GET /api/runs``.

        ``created_after`` and ``created_before`` are exclusive bounds of ``created_at``;
        ``metadata`` keeps the runs whose metadata holds every key with that value;
        ``cursor`` is the ``next_cursor`` of the previous page (same filters).
        """
        params, key = listing_params(
            status=status,
            metadata=metadata,
            created_after=created_after,
            created_before=created_before,
            cursor=cursor,
            limit=limit,
        )
        return _run_page(self._across[key](params), params["limit"] - 1)


def _run_page(runs: list[RunResponse], limit: int) -> RunPage:
    """The page of the first ``limit`` runs; a run more means a next page."""
    if len(runs) <= limit:
        return RunPage(items=runs, next_cursor=None)
    del runs[limit:]
    last = runs[-1]
    return RunPage(items=runs, next_cursor=encode_cursor(last.created_at, last.run_id))


class SessionReads:
    """Chat sessions as ``SessionResponse``, read outside the ORM Session."""

    __slots__ = ("_by_id",)

    def __init__(self, engine: Engine) -> None:
        statement = listing_statements(engine.dialect.name).session_by_id
        self._by_id = _reader(engine).query(SessionResponse, statement)

    @classmethod
    def of(cls, engine: Engine) -> SessionReads:
        """The engine's ``SessionReads`` (made on first use, then shared)."""
        reads = engine.__dict__.get(_SESSION_READS)
        if reads is None:  # with a read replica: routed (app.replicas)
            reads = engine.__dict__[_SESSION_READS] = routed(engine, cls)
        return reads

    def get(self, session_id: str) -> SessionResponse:
        """The session; ``SessionNotFoundError`` (404) if there is none."""
        sessions = self._by_id({"session_id": text_param(session_id, "session_id")})
        if not sessions:
            raise SessionNotFoundError(session_id)
        return sessions[0]


class EventReads:
    """Event pages as ``EventResponse`` / ``EventPage``, read outside the ORM Session.

    Construct it once per engine (``EventReads.of(engine)``). The same arguments and
    errors as ``EventRepository.list_for_run`` / ``list_for_session``.
    """

    __slots__ = ("_for_run", "_for_session", "_reader")

    def __init__(self, engine: Engine) -> None:
        reader, sql = _reader(engine), _events._statements(engine.dialect.name)  # noqa: SLF001 same package
        self._for_run = reader.query(EventResponse, sql.page_for_run)
        self._for_session = reader.query(EventResponse, sql.page_for_session)
        self._reader = reader

    @classmethod
    def of(cls, engine: Engine) -> EventReads:
        """The engine's ``EventReads`` (made on first use, then shared)."""
        reads = engine.__dict__.get(_EVENT_READS)
        if reads is None:  # with a read replica: routed (app.replicas)
            reads = engine.__dict__[_EVENT_READS] = routed(engine, cls)
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
        events = self._for_run(params)
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
        return self._for_session(params)

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
    body = object.__new__(EventPage)  # as schema_builder makes instances
    values = {"items": events, "next_since_seq": events[-1].seq if events else since_seq}
    object.__setattr__(body, "__dict__", values)
    object.__setattr__(body, "__pydantic_fields_set__", {"items", "next_since_seq"})
    object.__setattr__(body, "__pydantic_extra__", None)
    object.__setattr__(body, "__pydantic_private__", None)
    return body


_RUN_READS = "_run_layer_run_reads"
_EVENT_READS = "_run_layer_event_reads"
_SESSION_READS = "_run_layer_session_reads"

__all__ = ["EventReads", "RunReads", "SessionReads", "metadata_filter", "metadata_matches", "page"]
"""``metadata_filter`` checks a metadata filter (``BadParameterError``), ``metadata_matches``
makes its SQL condition, for callers that build their own statement (``python -m app.runs
list --metadata``)."""
