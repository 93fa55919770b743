"""Column types that behave the same on SQLite and PostgreSQL.

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
* ``merge_json_objects``: SQLite's counterpart of PostgreSQL's ``jsonb || jsonb``.

What JSON and text may enter the layer (depth, integer range, size): ``app.input_limits``.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

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

    # A run row carries four timestamps and a write binds ``now`` several times, so
    # both directions are one function each instead of SQLAlchemy's two steps
    # (process_*_value around the impl's conversion). On SQLite each is checked
    # against SQLAlchemy's own conversion when it is made, and that one is used if
    # they ever differ (tests/internals/test_types.py compares them on many values).

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """SQLite: the naive-UTC text SQLAlchemy's ``DATETIME`` writes
        (``YYYY-MM-DD HH:MM:SS.ffffff``), made by ``isoformat``."""
        general = super().bind_processor(dialect)
        if dialect.name != "sqlite" or general is None:
            return general

        def process(value: Any) -> str | None:
            if value is None:
                return None
            if not isinstance(value, datetime):
                raise TypeError(f"expected a datetime, got {type(value).__name__}: {value!r}")
            tzinfo = value.tzinfo
            if tzinfo is not None:
                value = value.replace(tzinfo=None) if tzinfo is UTC else _naive_utc(value)
            return value.isoformat(" ", "microseconds")

        return process if _agree(process, general, _SAMPLE_DATETIMES) else general

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        """SQLite: the stored naive-UTC text read as an aware datetime in one parse;
        PostgreSQL: psycopg's value, already aware UTC in the session time zone."""
        general = super().result_processor(dialect, coltype)
        parse = self.impl_instance.result_processor(dialect, coltype)

        def process(value: Any) -> datetime | None:
            if value is None:
                return None
            if parse is None:  # psycopg
                tzinfo = value.tzinfo
                if tzinfo is UTC:
                    return value
                return value.replace(tzinfo=UTC) if tzinfo is None else value.astimezone(UTC)
            if type(value) is str and len(value) == _SQLITE_TEXT_LENGTH:
                try:
                    read = datetime.fromisoformat(value + "+00:00")
                except ValueError:
                    read = None
                if read is not None and read.tzinfo is UTC:
                    return read
            return as_utc(cast(datetime, parse(value)))  # not the layer's own format

        if general is None or parse is None:
            return process
        samples = [text for value in _SAMPLE_DATETIMES if (text := _sqlite_text(value))]
        return process if _agree(process, general, samples) else general


_SQLITE_TEXT_LENGTH = len("2026-12-06 03:18:27.123456")
"""SQLAlchemy's SQLite ``DATETIME`` always writes microseconds: every value this
layer wrote has this length."""


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def _sqlite_text(value: datetime) -> str:
    return _naive_utc(value).isoformat(" ", "microseconds") if value.tzinfo else ""


_SAMPLE_DATETIMES = (
    datetime(2026, 12, 6, 3, 18, 27, 123456, tzinfo=UTC),
    datetime(2026, 12, 6, 3, 18, 27, tzinfo=UTC),
    datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    datetime(2026, 1, 1, 1, 0, 0, 1),
)


def _agree(fast: Callable[[Any], Any], general: Callable[[Any], Any], samples: Any) -> bool:
    """Whether ``fast`` gives what SQLAlchemy's ``general`` conversion gives."""
    return all(fast(sample) == general(sample) for sample in samples)


JSONDocument: TypeEngine[Any] = JSON(none_as_null=True).with_variant(
    JSONB(none_as_null=True), "postgresql"
)


class _Parents:
    """``MutableBase._parents`` of a tracked JSON value: its parents' instance states
    and attribute keys, held weakly as SQLAlchemy's ``WeakKeyDictionary`` holds them.

    A value almost always has one parent, and a page of runs reads a hundred
    values: the first parent is kept inline (one weak reference), others in a
    list, at a fraction of a ``WeakKeyDictionary`` per value.
    ``sqlalchemy.ext.mutable`` uses only ``[state] = key``, ``pop(state, default)``
    and ``items()`` (``tests/internals/test_types.py`` checks it).
    """

    __slots__ = ("_first", "_key", "_more")

    def __init__(self) -> None:
        self._first: weakref.ref[Any] | None = None
        self._key: Any = None
        self._more: list[tuple[weakref.ref[Any], Any]] | None = None

    def __setitem__(self, state: Any, key: Any) -> None:
        if self._first is not None:
            self.pop(state)
        first = self._first
        if first is None or first() is None:
            self._first, self._key = weakref.ref(state), key
            return
        more = [entry for entry in self._more or () if entry[0]() is not None]
        more.append((weakref.ref(state), key))
        self._more = more

    def pop(self, state: Any, default: Any = None) -> Any:
        first = self._first
        if first is not None and first() is state:
            key = self._key
            if self._more:
                (self._first, self._key), *rest = self._more
                self._more = rest or None
            else:
                self._first = self._key = None
            return key
        for index, (ref, key) in enumerate(self._more or ()):
            if ref() is state:
                del self._more[index]  # type: ignore[union-attr]
                return key
        return default

    def items(self) -> list[tuple[Any, Any]]:
        entries = [] if self._first is None else [(self._first, self._key)]
        entries.extend(self._more or ())
        return [(state, key) for ref, key in entries if (state := ref()) is not None]


class TrackedJSONDict(MutableDict):
    """``MutableDict`` with a lighter registry of parents (``_Parents``)."""

    @property
    def _parents(self) -> _Parents:  # type: ignore[override]
        parents = self.__dict__.get("_parents")
        if parents is None:
            parents = self.__dict__["_parents"] = _Parents()
        return parents


MutableJSONDict = TrackedJSONDict.as_mutable(JSONDocument)


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

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        """``process_result_value`` as a lookup of the stored value (``Enum.__call__`` is
        the slowest step of reading a run); an unknown value still raises ``ValueError``."""
        members = {member.value: member for member in self.enum_class}
        convert = self.enum_class

        def process(value: Any) -> StrEnum | None:
            if value is None:
                return None
            member = members.get(value)
            return convert(value) if member is None else member

        return process

    def __repr__(self) -> str:
        length = cast(String, self.impl_instance).length
        return f"StrEnumType({self.enum_class.__name__}, length={length})"


def enum_values(enum_class: type[StrEnum]) -> list[str]:
    return [member.value for member in enum_class]


def check_in(column: str, enum_class: type[StrEnum]) -> str:
    """SQL text of a CHECK constraint limiting ``column`` to the enum's values.

    Identifiers and values come from code constants, never from input.
    """
    quoted = ", ".join(f"'{value}'" for value in enum_values(enum_class))
    return f"{column} IN ({quoted})"


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
