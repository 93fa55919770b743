"""The repositories' statements, compiled once and sent straight to the driver.

SQLAlchemy's ``Connection.execute`` costs several times the driver's own call
for each statement: the compiled-cache lookup, an execution context, a
``CursorResult`` with its metadata (on psycopg, reading ``cursor.description``
builds an object per column: ~40 µs for a run's 19 columns), and rows built
through the result machinery. The repositories' statements are module
constants, so they are prepared once per dialect from what SQLAlchemy itself
compiled and sent at the first execution:

* the SQL text, exactly as SQLAlchemy sent it (``docs/sql/`` shows every one);
* the driver parameters in the dialect's paramstyle, each value passed through
  its type's bind processor for that dialect (``TypeEngine.dialect_impl`` and
  ``bind_processor``, public API), constants of the statement included;
* the result columns' processors (``result_processor``), so rows come back
  with the same Python values (aware datetimes, enums, decoded JSON).

Later executions call the driver connection of the session's connection
(``Connection.connection.driver_connection``) with them and fetch plain
tuples. A driver error goes through ``Connection._handle_dbapi_exception``
(private; ``tests/internals/test_sqlalchemy_contract.py``), so it is wrapped, and a lost
connection invalidated, exactly as SQLAlchemy's own path does.

Whatever would notice that SQLAlchemy's execution is skipped takes it instead:
a connection with execute or cursor-execute listeners (instrumentation, the
tests' statement capture), SQL echo, execution options other than the
layer's own ``sqlite_begin``, dialect-level listeners, and statements whose
parameters SQLAlchemy expands or renders at execution time.
``tests/internals/test_driver_path.py`` checks that both paths send the same SQL and
parameters and read the same values.

``execute_overlapped`` runs a statement and some Python work at once: on
psycopg the statement goes out in pipeline mode, the work runs while the
server executes it, then the rows are fetched (``append_many`` builds its
events meanwhile).

The fast paths can be switched off (``RUN_LAYER_FAST_PATHS=0``, read here once at
import; ``set_fast_paths`` for a test or a triage session): then no plan is made or
used, every statement goes through ``Connection.execute``, and the read path
(``app.repositories.reads``) reads through SQLAlchemy and validates each row, so
a SQLAlchemy upgrade can be told apart from the layer's shortcuts around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, CursorResult, Executable, TextClause
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import Session as DbSession

from app._dialects import SQLITE_BEGIN
from app.repositories._driver_errors import domain_error

Processor = Callable[[Any], Any]
T = TypeVar("T")

FAST_PATHS = "RUN_LAYER_FAST_PATHS"
"""The environment variable of the switch: ``0`` off, ``1`` (or unset) on."""


def _switch_from_environment() -> bool:
    value = os.environ.get(FAST_PATHS, "1").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{FAST_PATHS} must be 0 (off) or 1 (on), got {value!r}")
    return value != "0"


_fast_paths = _switch_from_environment()


def fast_paths() -> bool:
    """Whether the driver path and the read path's direct rows are on (module docstring)."""
    return _fast_paths


def set_fast_paths(enabled: bool) -> bool:
    """Switch the fast paths on or off for the whole process; returns the old setting.
    Plans already made are kept, and used again once switched back on."""
    global _fast_paths
    previous, _fast_paths = _fast_paths, bool(enabled)
    return previous


_OWN_OPTIONS = frozenset({SQLITE_BEGIN})
"""Execution options that do not concern statement execution (app._dialects)."""
_OBSERVERS = ("before_execute", "after_execute", "before_cursor_execute", "after_cursor_execute")


class Rows:
    """What a statement returned: its rows as tuples (in the statement's column
    order), and the driver's row count. The same from both paths."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def one_or_none(self) -> tuple[Any, ...] | None:
        rows = self.rows
        if len(rows) > 1:
            raise RuntimeError(f"expected at most one row, got {len(rows)}")
        return rows[0] if rows else None

    def scalar(self) -> Any:
        """The first column of the first row, or None."""
        return self.rows[0][0] if self.rows else None


@dataclass(frozen=True, slots=True)
class Plan:
    """A statement as its dialect's driver receives it (see module docstring)."""

    statement: Executable
    sql: str
    positional: bool
    binds: tuple[tuple[str, Any, Processor | None], ...]
    """Per parameter: (the caller's key, the value used when the caller gives none
    (the statement's own constant), bind processor); each processed once per call."""
    names: tuple[str, ...]
    """The driver's name of each parameter (named paramstyle)."""
    order: tuple[int, ...] | None
    """Positional paramstyle: the parameter at each placeholder (a name used twice,
    such as ``now``, fills two); None when each is used once, in order."""
    returns_rows: bool
    columns: tuple[str, ...]
    converters: tuple[tuple[int, Processor], ...]
    """(column index, result processor) of the columns that have one; NULL is not
    passed to them (a plan is made only when each gives None for None)."""

    def arguments(self, params: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver parameters for ``params`` (the caller's keys)."""
        values = []
        for key, default, process in self.binds:
            value = params[key] if key in params else default
            values.append(value if process is None else process(value))
        if not self.positional:
            return dict(zip(self.names, values, strict=True))
        order = self.order
        return values if order is None else [values[index] for index in order]

    def convert(self, rows: list[Any]) -> list[tuple[Any, ...]]:
        """Driver rows with the result processors applied, as tuples."""
        converters = self.converters
        if not converters:
            return [tuple(row) for row in rows] if rows and type(rows[0]) is not tuple else rows
        converted = []
        for row in rows:
            values = list(row)
            for index, process in converters:
                value = values[index]
                if value is not None:
                    values[index] = process(value)
            converted.append(tuple(values))
        return converted


def execute_core(session: DbSession, statement: Executable, params: dict[str, Any]) -> Rows:
    """``statement`` on the session's connection, after the session's pending changes.

    A driver error becomes a domain error (``_driver_errors``), raised outside the
    ``except`` block so that no chained exception carries the statement's parameters.
    """
    return _in_session(session, statement, params, None)[0]


def execute_overlapped(
    session: DbSession, statement: Executable, params: dict[str, Any], work: Callable[[], T]
) -> tuple[Rows, T]:
    """``execute_core``, and ``work()`` done while the database executes the statement.

    On psycopg the statement goes out in pipeline mode: ``execute`` sends it and
    returns, ``work`` runs (client CPU beside the server's), then the rows are
    fetched; leaving pipeline mode costs a round trip, so it pays for big
    statements only (``append_many``'s batches). Elsewhere ``work`` runs after.
    """
    return _in_session(session, statement, params, work)  # type: ignore[return-value]


def _in_session(
    session: DbSession,
    statement: Executable,
    params: dict[str, Any],
    work: Callable[[], T] | None,
) -> tuple[Rows, T | None]:
    session.flush()
    connection = session.connection()
    overlapped = work if connection.dialect.driver == "psycopg" else None
    try:
        rows, done = _execute(connection, statement, params, overlapped)
    except DBAPIError as exc:
        error = domain_error(exc, params)
        if error is None:
            raise
    else:
        if work is not None and overlapped is None:
            done = work()
        return rows, done
    raise error  # outside the except block: no context carrying the parameters


def _execute(
    connection: Connection,
    statement: Executable,
    params: dict[str, Any],
    work: Callable[[], T] | None,
) -> tuple[Rows, T | None]:
    plan = (
        _plans(connection.dialect).get(id(statement))
        if _fast_paths and _direct(connection)
        else None
    )
    if plan is None or plan.statement is not statement:
        rows = _through_sqlalchemy(connection, statement, params)
        return rows, None if work is None else work()
    arguments = plan.arguments(params)
    driver = connection.connection.driver_connection
    done = None
    try:
        if work is None:
            cursor = driver.execute(plan.sql, arguments)  # type: ignore[union-attr]
            rows = cursor.fetchall() if plan.returns_rows else []
        else:
            with driver.pipeline():  # type: ignore[union-attr]
                cursor = driver.execute(plan.sql, arguments)  # type: ignore[union-attr]
                done = work()
                rows = cursor.fetchall() if plan.returns_rows else []
    except connection.dialect.loaded_dbapi.Error as exc:
        connection._handle_dbapi_exception(exc, plan.sql, arguments, None, None)  # noqa: SLF001 SQLAlchemy private, docs/design.md
    return Rows(plan.convert(rows), cursor.rowcount), done


def _direct(connection: Connection) -> bool:
    """Whether skipping SQLAlchemy's execution would go unnoticed (module docstring)."""
    if connection._echo or connection.dialect._has_events:  # noqa: SLF001 SQLAlchemy private, docs/design.md
        return False
    options = connection._execution_options  # noqa: SLF001 SQLAlchemy private, docs/design.md
    if options and not options.keys() <= _OWN_OPTIONS:
        return False
    if connection._has_events or connection.engine._has_events:  # noqa: SLF001 SQLAlchemy private, docs/design.md
        # As SQLAlchemy checks. The sqlite_begin listener alone observes no statement.
        dispatch = connection.dispatch
        return not any(getattr(dispatch, name) for name in _OBSERVERS)
    return True


def _through_sqlalchemy(
    connection: Connection, statement: Executable, params: dict[str, Any]
) -> Rows:
    """SQLAlchemy's own execution; the first one of a statement also makes its plan."""
    result = connection.execute(statement, params)
    rows = Rows([tuple(row) for row in result] if result.returns_rows else [], result.rowcount)
    if _fast_paths:
        plans = _plans(connection.dialect)
        if id(statement) not in plans:
            plans[id(statement)] = _plan(statement, result)
    return rows


_PLANS = "_run_layer_driver_plans"


def _plans(dialect: Dialect) -> dict[int, Plan | None]:
    """The dialect's plans by ``id(statement)`` (kept on the dialect: a compiled form
    refers to its dialect, so a mapping keyed by dialects would keep every engine's
    dialect alive). None marks a statement that always takes SQLAlchemy's path; the
    statements are module constants, and a plan names its own, so a reused id is
    never mistaken for it."""
    plans = dialect.__dict__.get(_PLANS)
    if plans is None:
        plans = dialect.__dict__[_PLANS] = {}
    return plans


def _plan(statement: Executable, result: CursorResult[Any]) -> Plan | None:
    compiled = result.context.compiled
    if not isinstance(compiled, SQLCompiler) or compiled.has_out_parameters:
        return None
    dialect = compiled.dialect
    by_name: dict[str, Any] = {}
    for bind, name in compiled.bind_names.items():
        seen = by_name.setdefault(name, bind)
        if seen.key != bind.key or type(seen.type) is not type(bind.type):
            return None  # one name for two different parameters: not a statement of ours
    placeholders = compiled.positiontup if compiled.positional else list(by_name)
    if placeholders is None:
        return None
    unique = list(dict.fromkeys(placeholders))
    binds = []
    for name in unique:
        bind = by_name[name]
        if bind.expanding or bind.literal_execute or bind.callable is not None:
            return None  # rendered or computed at execution time
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        binds.append((bind.key, bind.value, process))
    order = tuple(unique.index(name) for name in placeholders)
    columns: tuple[str, ...] = tuple(result.keys()) if result.returns_rows else ()
    types = _result_types(statement, len(columns))
    if types is None:
        return None
    converters = tuple(
        (index, process)
        for index, type_ in enumerate(types)
        if type_ is not None
        and (process := type_.dialect_impl(dialect).result_processor(dialect, None)) is not None
    )
    if any(process(None) is not None for _index, process in converters):
        return None  # a type that reads NULL as a value: SQLAlchemy's path calls it
    return Plan(
        statement=statement,
        sql=compiled.string,
        positional=compiled.positional,
        binds=tuple(binds),
        names=tuple(compiled.escaped_bind_names.get(name, name) for name in unique),
        order=None if order == tuple(range(len(unique))) else order,
        returns_rows=result.returns_rows,
        columns=columns,
        converters=converters,
    )


def _result_types(statement: Executable, count: int) -> list[Any] | None:
    """The types of the statement's result columns (None each for textual SQL, which
    SQLAlchemy does not convert either); None when they cannot be told."""
    if count == 0:
        return []
    if getattr(statement, "is_select", False) or getattr(statement, "is_dml", False):
        exported = statement.selected_columns if statement.is_select else statement.exported_columns  # type: ignore[attr-defined]
        types = [column.type for column in exported]
        return types if len(types) == count else None
    if isinstance(statement, TextClause):
        return [None] * count
    return None


__all__ = [
    "FAST_PATHS",
    "Plan",
    "Rows",
    "execute_core",
    "execute_overlapped",
    "fast_paths",
    "set_fast_paths",
]
