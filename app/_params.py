"""Checks on repository arguments, run before any SQL so that bad input writes nothing.

Each check raises a domain error naming the argument and what was expected;
the Run API answers them with 400. Messages describe a bad value by its type
(and an integer by its value), never by its text: arguments carry user content,
and error messages reach logs and responses. Limits: ``docs/input-limits.md``.
"""

from __future__ import annotations

from collections.abc import Sized
from datetime import timedelta
from enum import StrEnum
from typing import Any, TypeVar

from app.errors import BadParameterError, RunNotFoundError
from app.input_limits import ensure_json_object, text_problem, text_size_problem
from app.models import RunStatus

E = TypeVar("E", bound=StrEnum)

MAX_PAGE_SIZE = 1000
MAX_SEQ = 2**31 - 1
"""``seq`` is an INTEGER column: a larger ``since_seq`` would be a driver error."""


def described(value: Any) -> str:
    """What a bad argument was, by its type and size, without its content: ``an empty
    str``, ``a str of 12 characters``, ``the integer 5``, ``a dict of 2 items``,
    ``a float``."""
    if isinstance(value, str):
        return f"a str of {len(value)} characters" if value else "an empty str"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**12:
        return f"the integer {value}"
    if value is None or isinstance(value, bool):
        return repr(value)
    kind = type(value).__name__
    if isinstance(value, timedelta):
        return f"a timedelta of {value.total_seconds():g} seconds"
    if isinstance(value, (bytes, bytearray)):
        return f"a {kind} of {len(value)} bytes"
    try:
        size = len(value) if isinstance(value, Sized) else None
    except Exception:  # a broken __len__ tells nothing more
        size = None
    if size is None:
        return f"a {kind}"
    return f"a {kind} of {size} item{'' if size == 1 else 's'}"


def text_param(
    value: Any, name: str, *, max_length: int | None = None, max_bytes: int | None = None
) -> str:
    """A non-empty string the database can store (PostgreSQL refuses NUL characters;
    neither driver can encode a lone surrogate, which a decoded JSON body may carry),
    within the size limit of ``app.input_limits.max_json_bytes`` (``max_bytes``: that limit,
    read once by a caller checking many arguments)."""
    if not isinstance(value, str) or not value:
        raise BadParameterError(name, f"expected a non-empty string, got {described(value)}")
    problem = text_problem(value) or text_size_problem(value, max_bytes)
    if problem:
        raise BadParameterError(name, problem)
    if max_length is not None and len(value) > max_length:
        raise BadParameterError(name, f"at most {max_length} characters, got {len(value)}")
    return value


def optional_text_param(
    value: Any, name: str, *, max_length: int | None = None, max_bytes: int | None = None
) -> str | None:
    if value is None:
        return None
    return text_param(value, name, max_length=max_length, max_bytes=max_bytes)


def json_object_param(value: Any, name: str, *, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object both backends store verbatim; ``None`` means ``{}``."""
    if value is None:
        return {}
    try:
        return ensure_json_object(value, name, max_bytes=max_bytes)
    except ValueError as exc:
        raise BadParameterError(name, str(exc)) from None


def event_payload_param(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload ``{argument: value}`` of the lifecycle event a transition appends,
    checked before the run moves: the value fits the limits on its own, but one
    level and a few bytes more may not, and the run must not move without its event."""
    try:
        return ensure_json_object(payload, "payload")
    except ValueError as exc:
        name = ", ".join(payload) or "payload"
        raise BadParameterError(name, f"does not fit in the run's lifecycle event: {exc}") from None


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def page_size(limit: Any) -> int:
    if not _int_in(limit, 1, MAX_PAGE_SIZE):
        raise BadParameterError(
            "limit", f"expected an integer from 1 to {MAX_PAGE_SIZE}, got {described(limit)}"
        )
    return limit


def since_seq_param(since_seq: Any) -> int:
    if (
        isinstance(since_seq, bool)
        or not isinstance(since_seq, int)
        or not 0 <= since_seq <= MAX_SEQ
    ):
        raise BadParameterError(
            "since_seq", f"expected an integer from 0 to {MAX_SEQ}, got {described(since_seq)}"
        )
    return since_seq


def enum_param(enum_class: type[E], value: Any, name: str) -> E:
    if type(value) is enum_class:
        return value
    try:
        return enum_class(value)
    except ValueError:
        pass  # raised below, so that the ValueError quoting the value is not its context
    choices = ", ".join(member.value for member in enum_class)
    raise BadParameterError(name, f"expected one of {choices}, got {described(value)}")


def run_page_params(
    session_id: Any, status: Any, limit: Any, before: Any
) -> tuple[dict[str, Any], tuple[bool, bool]]:
    """The checked parameters of a page of a session's runs, and the key of its
    statement (``pages[status given, before given]``): one rule for the repository
    and the read path."""
    params: dict[str, Any] = {
        "session_id": text_param(session_id, "session_id"),
        "limit": page_size(limit),
        "before": optional_text_param(before, "before"),
    }
    if status is not None:
        params["status"] = enum_param(RunStatus, status, "status")
    return params, (status is not None, before is not None)


def check_page_cursor(before: str, session_id: str, cursor_session_id: str | None) -> None:
    """An empty page after ``before``: refuse a cursor that names no run
    (``RunNotFoundError``) or a run of another session (``BadParameterError``)."""
    if cursor_session_id is None:
        raise RunNotFoundError(before)
    if cursor_session_id != session_id:
        raise BadParameterError(
            "before", f"run {before} belongs to another session, not to {session_id}"
        )
