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
* ``ensure_json_object``: the rule for JSON that enters the layer: an object
  whose text PostgreSQL and SQLite both store unchanged, bounded in depth,
  integer range and size (``docs/input-limits.md``).
"""

from __future__ import annotations

import json
import math
import os
import re
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from itertools import repeat
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


FLOAT_EXACT_LIMIT = 1e16
"""Floats from this magnitude up print in exponent form; PostgreSQL's JSONB keeps
numbers as ``numeric`` and gives them back as integers, so both backends would
disagree."""

MAX_JSON_DEPTH = 64
"""Containers nested at most this deep (the top-level object is level 1). Every
reader parses that back from any call stack; a value ~980 levels deep would be
stored and then fail to load from an async route."""

JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**63 - 1
"""Integers are signed 64-bit: SQLite's JSON functions read larger ones as floats
and PostgreSQL casts them to ``bigint`` only within this range; Python's encoder
refuses integers of more than 4300 digits outright."""

MAX_JSON_BYTES_ENV = "RUN_DATA_MAX_JSON_BYTES"
DEFAULT_MAX_JSON_BYTES = 1024 * 1024
"""Largest JSON value (UTF-8 bytes of its compact encoding) and largest text argument."""

_NAME_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
"""Keys that error messages quote: short identifiers are names. Any other key is
payload content and is named by its position (``[key 3]``)."""


def is_name(key: str) -> bool:
    """Whether an error message may quote ``key`` (a short identifier), see ``_NAME_KEY``."""
    return _NAME_KEY.fullmatch(key) is not None


def max_json_bytes() -> int:
    """The size limit: ``RUN_DATA_MAX_JSON_BYTES`` if set, else 1 MiB (read at each call)."""
    raw = os.environ.get(MAX_JSON_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_JSON_BYTES
    if not raw.isdigit() or int(raw) <= 0:
        raise RuntimeError(f"{MAX_JSON_BYTES_ENV} must be a positive number of bytes")
    return int(raw)


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


_Path = str | tuple[Any, Any]
"""A place in a value: the argument's name, or (parent place, list index or (key, position))."""


def _render(path: _Path) -> str:
    steps: list[str] = []
    while isinstance(path, tuple):
        path, step = path
        if isinstance(step, int):
            steps.append(f"[{step}]")
        else:
            key, position = step
            steps.append(f".{key}" if is_name(key) else f"[key {position}]")
    steps.reverse()
    if len(steps) > 8:  # deep places: their start and end say enough
        steps[4:-4] = [f"...({len(steps) - 8} levels)..."]
    return str(path) + "".join(steps)


_LEAVE = object()


def _find_unstorable(value: Any, name: str, max_depth: int, max_bytes: int) -> str | None:
    """Why ``value`` cannot be stored verbatim as JSON on both backends, or None.

    An iterative walk (no recursion, whatever the depth) that stops at the first
    problem: a container deeper than ``max_depth`` or inside itself, an integer
    outside 64 bits, a float JSONB would change, text PostgreSQL refuses, a type
    JSON lacks, or more than ``max_bytes`` (counted from below as it goes, so a
    huge value is refused without being walked whole). Messages name the place
    and the limit, never a value.
    """
    size = 1  # every value takes a byte at least, counted when it is met; the rest when read
    most = 0  # and at most: 6 bytes a character (\u001f), 20 an integer, 24 a float
    ancestors: set[int] = set()
    stack: list[tuple[Any, Any, int]] = [(value, name, 1)]
    while stack:
        item, path, depth = stack.pop()
        if item is _LEAVE:
            ancestors.discard(path)
            continue
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{_render(path)} {problem}"
            size += len(item) + 1
            most += 6 * len(item) + 2
        elif item is None or isinstance(item, bool):
            size += 3
            most += 5
        elif isinstance(item, int):
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return (
                    f"{_render(path)} is an integer outside the signed 64-bit range "
                    "(-2**63 to 2**63-1) that both backends read back exactly; send a string"
                )
            most += 20
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_render(path)} is NaN or infinite, not a JSON number"
            if abs(item) >= FLOAT_EXACT_LIMIT:
                return (
                    f"{_render(path)} is a float of magnitude 1e16 or more, which PostgreSQL's "
                    "JSONB does not store exactly; send an integer or a string"
                )
            most += 24
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return f"{_render(path)} is nested deeper than {max_depth} levels"
            if id(item) in ancestors:
                return f"{_render(path)} contains itself; a self-referencing value is not JSON"
            ancestors.add(id(item))
            stack.append((_LEAVE, id(item), depth))
            children: list[tuple[Any, Any, int]] = []
            size += 1
            most += 2 + max(len(item) - 1, 0)  # brackets and commas
            # A wide container is refused before its elements are looked at: each
            # takes 2 bytes at least (``0,``), an object member 5 (``"":0,``).
            floor = len(item) * (5 if isinstance(item, dict) else 2) - 1
            if size + floor > max_bytes:
                size += floor
                break
            if isinstance(item, dict):
                for position, (key, child) in enumerate(item.items()):
                    if not isinstance(key, str):
                        kind = type(key).__name__
                        return f"{_render(path)} has a key of type {kind}, not a string"
                    problem = text_problem(key)
                    if problem:
                        return f"{_render(path)} has a key that {problem}"
                    size += len(key) + 4 + (position > 0)  # "key": value, and a comma
                    most += 6 * len(key) + 3
                    if size > max_bytes:
                        break
                    children.append((child, (path, (key, position)), depth + 1))
            else:
                for index, child in enumerate(item):
                    size += 1 + (index > 0)  # the value and a comma
                    if size > max_bytes:
                        break
                    children.append((child, (path, index), depth + 1))
            stack.extend(reversed(children))
        else:
            return f"{_render(path)} is a {type(item).__name__}, which JSON cannot represent"
        if size > max_bytes:
            break
    if size <= max_bytes < most:
        # The exact count, once the walk has proved the value finite and encodable.
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > max_bytes:
        return (
            f"{name} is larger than {max_bytes} bytes as JSON "
            f"(the limit is set by {MAX_JSON_BYTES_ENV})"
        )
    return None


_FLAT_MEMBERS = 16


_ELEMENT = object()
"""The key ``_most_bytes`` gets with an array's elements (None is a dict key JSON refuses)."""


def _flat_and_storable(value: dict[Any, Any], max_bytes: int, *, nested: bool = False) -> bool:
    """True when ``value`` is a small object of scalars that ``_find_unstorable`` would
    pass (the common event payload), decided without its walk; False means "walk it",
    so every refusal and its message still come from ``_find_unstorable``.

    ``nested``: its members may also be small objects of scalars or small lists of
    scalars, one level down (a lifecycle event's ``{"metrics": {...}}``, the create
    options' ``"target_pages": []``); only where two levels are allowed.
    """
    if len(value) > _FLAT_MEMBERS:
        return False
    most = _most_bytes(value.items(), len(value), nested)
    return 0 <= most <= max_bytes


def _most_bytes(members: Iterable[tuple[Any, Any]], count: int, nested: bool) -> int:
    """At most how many bytes a container takes as JSON, given its ``count`` members as
    (key, value) pairs, the key ``_ELEMENT`` for an array's elements; -1 unless every key
    is a storable string and every value a storable scalar (with ``nested``, or a small
    object or list of them)."""
    most = 2 + count  # brackets and commas, as _find_unstorable counts them
    for key, item in members:
        if key is not _ELEMENT:
            if type(key) is not str or "\x00" in key or not key.isascii():
                return -1
            most += 6 * len(key) + 3
        kind = type(item)
        if kind is str:
            if "\x00" in item or not item.isascii():
                return -1
            most += 6 * len(item) + 2
        elif kind is int:
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return -1
            most += 20
        elif kind is float:
            if not math.isfinite(item) or abs(item) >= FLOAT_EXACT_LIMIT:
                return -1
            most += 24
        elif item is None or kind is bool:
            most += 5
        elif nested and (kind is dict or kind is list) and len(item) <= _FLAT_MEMBERS:
            pairs = item.items() if kind is dict else zip(repeat(_ELEMENT), item)
            inner = _most_bytes(pairs, len(item), False)
            if inner < 0:
                return -1
            most += inner
        else:
            return -1
    return most


def ensure_json_object(
    value: Any,
    name: str = "payload",
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object both backends store unchanged.

    The one rule for JSON that enters the layer (schemas, repository arguments,
    model attributes); the limits are in ``docs/input-limits.md``. PostgreSQL's
    JSONB rejects NUL characters, lone surrogates and NaN, and turns floats from
    1e16 up into integers; SQLite would keep them. The value is bounded in depth
    (``MAX_JSON_DEPTH``), integer range (signed 64-bit) and encoded size
    (``max_json_bytes()``), and must not contain itself. Raises ``ValueError``
    naming the offending place and the limit, never quoting a value.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    limit = max_json_bytes() if max_bytes is None else max_bytes
    if max_depth >= 1 and _flat_and_storable(value, limit, nested=max_depth >= 2):
        return value
    problem = _find_unstorable(value, name, max_depth, limit)
    if problem:
        raise ValueError(problem)
    return value


def text_size_problem(value: str, max_bytes: int | None = None) -> str | None:
    """Why ``value`` is too long to take as a text argument, or None (see ``max_json_bytes``;
    ``max_bytes``: that limit, read once by a caller checking many values)."""
    limit = max_json_bytes() if max_bytes is None else max_bytes
    if len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit:
        return f"is longer than {limit} bytes (the limit is set by {MAX_JSON_BYTES_ENV})"
    return None


def ensure_storable_text(value: str, name: str) -> str:
    """Text that both backends store verbatim, within the size limit; ``ValueError``
    naming ``name`` otherwise."""
    problem = text_problem(value) or text_size_problem(value)
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
