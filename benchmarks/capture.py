"""The SQL a repository call sends to the driver, captured and made replayable.

The raw side of the overhead benchmark must run exactly what the repository
runs, so it is not written by hand: a warm-up call through the repository is
recorded with SQLAlchemy's ``before_cursor_execute`` / ``after_cursor_execute``
events (statement text as the driver gets it, parameters after SQLAlchemy's
bind processing, their names and types, the result's column names). The
recording becomes a ``Script``: the same statements with the same parameters,
except the values that must change per call, each produced the way hand
written driver code would produce it:

* the run and session ids of the call (also inside strings such as
  ``checkpoint_thread = "<session>:<run>"``);
* timestamps: a fresh ``now`` in the driver's representation (text on SQLite,
  an aware datetime on PostgreSQL);
* JSON values: serialized again per call, with the engines' serializer
  (``app.json_codec.dumps``; on PostgreSQL through ``psycopg``'s ``Jsonb``, which the
  raw connection's adapters give the same one) or, for ``append_many``'s batch
  arrays, the layer's transport encoder;
* a value the previous statement returned under the same name (SQLite's
  ``seq``, allocated by one statement and inserted by the next).

The recording itself is ``app.capture`` (the query-plan tests use it too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import JSON, DateTime
from sqlalchemy.types import TypeDecorator, TypeEngine

from app.capture import CapturedStatement
from app.json_codec import JSONText, dumps, dumps_transport

SQLITE_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
"""How SQLAlchemy's SQLite ``DATETIME`` binds a datetime."""


def _is_type(type_: TypeEngine[Any] | None, kind: type[TypeEngine[Any]]) -> bool:
    if isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    return isinstance(type_, kind)


# --------------------------------------------------------------------------
# Replay


@dataclass(frozen=True, slots=True)
class Ids:
    """The ids a recording was made with, to be replaced by each call's own."""

    run: str
    session: str


Slot = Callable[[Ids, Sequence[Any] | None], Any]
"""Produces one parameter value from the call's ids and the previous statement's first row."""


@dataclass(frozen=True, slots=True)
class ScriptStatement:
    sql: str
    base: tuple[Any, ...]
    names: tuple[str, ...] | None  # None: positional parameters
    slots: tuple[tuple[int, Slot], ...]
    returns_rows: bool

    def parameters(self, ids: Ids, previous: Sequence[Any] | None) -> Any:
        values = list(self.base)
        for index, slot in self.slots:
            values[index] = slot(ids, previous)
        return values if self.names is None else dict(zip(self.names, values, strict=True))


@dataclass(frozen=True, slots=True)
class Script:
    """A recorded repository call, replayable on a raw driver connection."""

    statements: tuple[ScriptStatement, ...]

    def describe(self) -> str:
        return ";\n".join(statement.sql for statement in self.statements)


def make_script(captured: Sequence[CapturedStatement], recorded_ids: Ids) -> Script:
    """The replayable form of ``captured`` (see module docstring for what varies per call)."""
    statements: list[ScriptStatement] = []
    previous_columns: tuple[str, ...] = ()
    for statement in captured:
        named = isinstance(statement.parameters, Mapping)
        values = tuple(
            statement.parameters.values() if named else statement.parameters  # type: ignore[union-attr]
        )
        slots: list[tuple[int, Slot]] = []
        for index, (name, type_, value) in enumerate(
            zip(statement.names, statement.types, values, strict=True)
        ):
            slot = _slot_for(name, type_, value, recorded_ids, previous_columns)
            if slot is not None:
                slots.append((index, slot))
        statements.append(
            ScriptStatement(
                sql=statement.sql,
                base=values,
                names=statement.names if named else None,
                slots=tuple(slots),
                returns_rows=bool(statement.result_columns),
            )
        )
        previous_columns = statement.result_columns
    return Script(tuple(statements))


def _slot_for(
    name: str,
    type_: TypeEngine[Any] | None,
    value: Any,
    recorded: Ids,
    previous_columns: tuple[str, ...],
) -> Slot | None:
    if isinstance(value, str) and isinstance(type_, JSONText):
        # append_many's batch array: encoded per call as the layer encodes it.
        batch = json.loads(value)

        def encode(ids: Ids, _previous: Sequence[Any] | None) -> str:
            text = dumps_transport(batch)
            return text.replace(recorded.run, ids.run).replace(recorded.session, ids.session)

        return encode
    if isinstance(value, str) and (recorded.run in value or recorded.session in value):
        pattern = value.replace("{", "{{").replace("}", "}}")
        pattern = pattern.replace(recorded.run, "{run}").replace(recorded.session, "{session}")
        if pattern == "{run}":
            return lambda ids, _previous: ids.run
        if pattern == "{session}":
            return lambda ids, _previous: ids.session
        return lambda ids, _previous: pattern.format(run=ids.run, session=ids.session)
    if name and name in previous_columns:
        column = previous_columns.index(name)
        # No row before it (a lookup that found nothing): the value recorded.
        return lambda _ids, previous: value if previous is None else previous[column]
    if value is not None and _is_type(type_, DateTime):
        if isinstance(value, str):
            return lambda _ids, _previous: datetime.now(UTC).strftime(SQLITE_TIMESTAMP_FORMAT)
        return lambda _ids, _previous: datetime.now(UTC)
    if isinstance(value, Jsonb):
        document = value.obj
        return lambda _ids, _previous: Jsonb(document)
    if isinstance(value, str) and _is_type(type_, JSON):
        document = json.loads(value)
        return lambda _ids, _previous: dumps(document)  # the engines' serializer
    return None
