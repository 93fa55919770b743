"""Checks on repository arguments, run before any SQL so that bad input writes nothing.

Each check raises a domain error naming the argument and what was expected;
the Run API answers them with 400.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from app.errors import BadParameterError
from app.types import ensure_json_object, text_problem

E = TypeVar("E", bound=StrEnum)

MAX_PAGE_SIZE = 1000
MAX_SEQ = 2**31 - 1
"""``seq`` is an INTEGER column: a larger ``since_seq`` would be a driver error."""


def text_param(value: Any, name: str, *, max_length: int | None = None) -> str:
    """A non-empty string the database can store (PostgreSQL refuses NUL characters;
    neither driver can encode a lone surrogate, which a decoded JSON body may carry)."""
    if not isinstance(value, str) or not value:
        raise BadParameterError(name, f"expected a non-empty string, got {value!r}")
    problem = text_problem(value)
    if problem:
        raise BadParameterError(name, problem)
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
        return ensure_json_object(value, name)
    except ValueError as exc:
        raise BadParameterError(name, str(exc)) from None


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
