"""Record the statements an engine sends to its driver: SQL text, bound parameters, types.

``capture_statements(engine)`` listens to SQLAlchemy's ``before_cursor_execute``
/ ``after_cursor_execute`` events while its block runs and keeps, per
statement, the text as the driver gets it, the parameters after SQLAlchemy's
bind processing, their names and types, and the result's column names.
``tests/internals/test_query_plans.py`` EXPLAINs the repositories' queries with it;
``benchmarks/capture.py`` turns recordings into replayable scripts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.types import TypeEngine


@dataclass(frozen=True, slots=True)
class CapturedStatement:
    sql: str
    parameters: tuple[Any, ...] | dict[str, Any]
    names: tuple[str, ...]  # one per parameter, in order
    types: tuple[TypeEngine[Any] | None, ...]
    result_columns: tuple[str, ...]


@dataclass
class Capture:
    statements: list[CapturedStatement] = field(default_factory=list)


@contextmanager
def capture_statements(engine: Engine) -> Iterator[Capture]:
    """Record every statement ``engine`` sends to a cursor while the block runs."""
    capture = Capture()
    pending: list[tuple[str, Any, Any]] = []

    def before(_conn: Any, _cursor: Any, sql: str, params: Any, context: Any, _many: bool) -> None:
        pending.append((sql, params, context))

    def after(_conn: Any, cursor: Any, sql: str, params: Any, context: Any, _many: bool) -> None:
        sql, params, context = pending.pop()
        names, types = _parameter_names_and_types(params, context)
        columns = tuple(column[0] for column in cursor.description or ())
        captured = CapturedStatement(sql, params, names, types, columns)
        capture.statements.append(captured)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield capture
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def _parameter_names_and_types(
    params: Any, context: Any
) -> tuple[tuple[str, ...], tuple[TypeEngine[Any] | None, ...]]:
    compiled = getattr(context, "compiled", None)
    if isinstance(params, Mapping):
        names = tuple(params)
    else:
        positions = getattr(compiled, "positiontup", None) or ()
        names = tuple(positions) if len(positions) == len(params) else ("",) * len(params)
    binds = getattr(compiled, "binds", {}) if compiled is not None else {}
    types = tuple(binds[name].type if name in binds else None for name in names)
    return names, types
