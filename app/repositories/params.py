"""Checks on repository arguments, run before any SQL so that bad input writes nothing.

Each check raises a domain error naming the argument and what was expected;
the Run API answers them with 400.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, TypeVar

from app.errors import BadParameterError
from app.types import ensure_json_object

E = TypeVar("E", bound=StrEnum)

MAX_PAGE_SIZE = 1000
MAX_SEQ = 2**31 - 1
"""``seq`` is an INTEGER column: a larger ``since_seq`` would be a driver error."""


def text_param(value: Any, name: str, *, max_length: int | None = None) -> str:
    """A non-empty string the database can store (PostgreSQL refuses NUL characters;
    neither driver can encode a lone surrogate, which a decoded JSON body may carry)."""
    if not isinstance(value, str) or not value:
        raise BadParameterError(name, f"expected a non-empty string, got {value!r}")
    if "\x00" in value:
        raise BadParameterError(name, "contains a NUL character")
    if not _encodable(value):
        raise BadParameterError(name, "is not valid Unicode text (contains a lone surrogate)")
    if max_length is not None and len(value) > max_length:
        raise BadParameterError(name, f"at most {max_length} characters, got {len(value)}")
    return value


def optional_text_param(value: Any, name: str, *, max_length: int | None = None) -> str | None:
    return None if value is None else text_param(value, name, max_length=max_length)


def json_object_param(value: Any, name: str) -> dict[str, Any]:
    """A JSON object both backends store verbatim; ``None`` means ``{}``."""
    if value is None:
        return {}
    try:
        checked = ensure_json_object(value, name)
    except ValueError as exc:
        raise BadParameterError(name, str(exc)) from None
    # PostgreSQL's JSONB refuses an escaped lone surrogate that SQLite would store.
    if not _encodable(json.dumps(checked, ensure_ascii=False)):
        raise BadParameterError(name, "contains a lone surrogate, which is not valid Unicode")
    return checked


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def page_size(limit: Any) -> int:
    if not _int_in(limit, 1, MAX_PAGE_SIZE):
        raise BadParameterError(
            "limit", f"expected an integer from 1 to {MAX_PAGE_SIZE}, got {limit!r}"
        )
    return limit


def since_seq_param(since_seq: Any) -> int:
    if (
        isinstance(since_seq, bool)
        or not isinstance(since_seq, int)
        or not 0 <= since_seq <= MAX_SEQ
    ):
        raise BadParameterError(
            "since_seq", f"expected an integer from 0 to {MAX_SEQ}, got {since_seq!r}"
        )
    return since_seq


def enum_param(enum_class: type[E], value: Any, name: str) -> E:
    try:
        return enum_class(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_class)
        raise BadParameterError(name, f"expected one of {choices}, got {value!r}") from None
