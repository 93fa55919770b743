"""Column types and value rules that behave the same on SQLite and PostgreSQL.

* ``UTCDateTime``: every timestamp is timezone-aware UTC in Python. PostgreSQL
  stores ``TIMESTAMP WITH TIME ZONE``; SQLite has no time zones, so values are
  stored as naive UTC text (the format v0.7 wrote) and come back with
  ``tzinfo=UTC``. A **naive datetime given as input is taken to be UTC**, the
  convention the v0.7 application wrote its rows in; an aware one is converted.
* ``JSONDocument``: JSONB on PostgreSQL, JSON on SQLite, SQL NULL for ``None``.
  Columns that hold objects use ``MutableJSONDict``: assigning a key of the
  top-level dict (``run.metrics["tokens"] = 3``) marks the row dirty; a change
  deeper inside needs the value reassigned.
* ``StrEnumType``: a ``StrEnum`` stored by its *value* in ``VARCHAR(n)`` (the
  table carries a CHECK constraint listing the values). SQLModel's default
  would store member names and create native PostgreSQL enum types.
* ``ensure_json_object``: the rule for payloads that cross the API: a JSON
  object whose text PostgreSQL and SQLite both store unchanged.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.types import TypeDecorator, TypeEngine


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Aware UTC for any datetime; naive values are read as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware-UTC datetimes on every backend (see module docstring)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}: {value!r}")
        value = as_utc(value)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


JSONDocument: TypeEngine[Any] = JSON(none_as_null=True).with_variant(
    JSONB(none_as_null=True), "postgresql"
)
MutableJSONDict = MutableDict.as_mutable(JSONDocument)


class StrEnumType(TypeDecorator[StrEnum]):
    """A ``StrEnum`` stored by value in ``VARCHAR(length)``.

    Binding accepts a member or one of the values and rejects anything else
    before it reaches the database, so a typo fails with the list of choices.
    """

    impl = String
    cache_ok = True

    def __init__(self, enum_class: type[StrEnum], length: int = 20) -> None:
        super().__init__(length)
        self.enum_class = enum_class

    def process_bind_param(self, value: StrEnum | str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum_class(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> StrEnum | None:
        return None if value is None else self.enum_class(value)

    def __repr__(self) -> str:
        return f"StrEnumType({self.enum_class.__name__}, length={self.impl_instance.length})"


def enum_values(enum_class: type[StrEnum]) -> list[str]:
    return [member.value for member in enum_class]


def check_in(column: str, enum_class: type[StrEnum]) -> str:
    """SQL text of a CHECK constraint limiting ``column`` to the enum's values.

    Identifiers and values come from code constants, never from input.
    """
    quoted = ", ".join(f"'{value}'" for value in enum_values(enum_class))
    return f"{column} IN ({quoted})"


FLOAT_EXACT_LIMIT = 1e16
"""Floats from this magnitude up print in exponent form; PostgreSQL's JSONB keeps
numbers as ``numeric`` and gives them back as integers, so both backends would
disagree. Integers of any size are stored exactly on both."""


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored verbatim on both backends, or None.

    PostgreSQL refuses NUL characters in text and JSON; a lone surrogate (which
    a decoded JSON body may carry) is not UTF-8, so no driver can send it.
    """
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate, which is not valid Unicode"
    return None


def _find_unstorable(value: Any, path: str) -> str | None:
    """Why ``value`` cannot be stored verbatim as JSON on both backends, or None."""
    if isinstance(value, str):
        problem = text_problem(value)
        return f"{path} {problem}" if problem else None
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{path} is {value!r}, not a JSON number"
        if abs(value) >= FLOAT_EXACT_LIMIT:
            return (
                f"{path} is {value!r}: floats of magnitude 1e16 and more are not stored "
                "exactly by PostgreSQL's JSONB; send an integer or a string"
            )
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            problem = text_problem(key)
            if problem:
                return f"{path} has a key that {problem}"
            problem = _find_unstorable(item, f"{path}.{key}")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _find_unstorable(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    return f"{path} is a {type(value).__name__}, which JSON cannot represent"


def ensure_json_object(value: Any, name: str = "payload") -> dict[str, Any]:
    """Return ``value`` if it is a JSON object both backends store unchanged.

    PostgreSQL's JSONB rejects NUL characters, lone surrogates and NaN, and
    turns floats from 1e16 up into integers; SQLite would keep them. Rejecting
    them here keeps the two backends in agreement and turns a driver error in
    the middle of a transaction into a clear input error. Raises
    ``ValueError`` naming the offending place.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    problem = _find_unstorable(value, name)
    if problem:
        raise ValueError(problem)
    return value


def ensure_storable_text(value: str, name: str) -> str:
    """Text that both backends store verbatim; ``ValueError`` naming ``name`` otherwise."""
    problem = text_problem(value)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value


def merge_json_objects(stored: str | None, patch: str) -> str:
    """The JSON text of ``stored`` shallow-merged with ``patch`` (keys of ``patch`` win).

    Registered on SQLite connections as the SQL function ``json_merge_shallow``
    (``app.db``), the counterpart of PostgreSQL's ``jsonb || jsonb``: SQLite's
    own ``json_patch`` merges recursively and deletes keys set to null, and its
    JSON paths cannot name every key. Runs inside the UPDATE, so the merge reads
    the row it writes.
    """
    merged = json.loads(stored) if stored is not None else {}
    if not isinstance(merged, dict):
        raise ValueError(f"cannot merge into stored JSON of type {type(merged).__name__}")
    merged.update(json.loads(patch))
    return json.dumps(merged)
