"""Listings of runs and reads of chat sessions: their statements and parameters.

Every listing is a keyset page, newest first: ``ORDER BY created_at DESC, id DESC``
and ``WHERE (created_at, id) < (:before_at, :before_id)``, never an ``OFFSET``. The
page's bound is one pair, made in Python from the cursor and ``created_before``
(whichever comes first in the order), so each listing is one statement per
combination of the two optional filters (status, metadata), the same for any
cursor or time range; ``created_after`` is always bound (the earliest time when not
given). ``RunReads`` (``app.repositories.reads``) runs them on the read path.

* **Order and indexes.** Across sessions ``idx_session_runs_created (created_at,
  id)`` (migration 0016), or ``idx_session_runs_queue (status, created_at, id)``
  with a status; a session's runs ``idx_session_runs_session_created``.
* **Cursor.** ``next_cursor`` is the last run's ``(created_at, id)`` as base64url
  JSON: opaque to clients, checked when it comes back (a bad one is a
  ``BadParameterError`` on ``cursor``). Runs created while a client pages sort
  before its first page (``created_at`` is the database's clock at insert), so
  paging to the end lists every run that existed at the start, once each.
* **Metadata filter** (``{"key": scalar, ...}``): every key present with that value.
  PostgreSQL: ``metadata @> :metadata`` (jsonb containment, served by the GIN index
  ``idx_session_runs_metadata`` of migration 0017 when it keeps few runs); SQLite: per key of the
  filter (``json_each``), the run's ``json_type`` and ``json_extract`` at ``$."key"``.
  Values are scalars (string, number, boolean, null), where the two agree: a number
  matches an equal number (``1`` and ``1.0``), never a string or a boolean. Keys are
  1-100 characters without ``"``, ``\\`` or control characters (SQLite paths quote
  them).

The SQL text: ``docs/sql/`` (``RunListings``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Executable,
    Select,
    String,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    not_,
    or_,
    select,
)

from app._params import described, enum_param, page_size, text_param
from app.errors import BadParameterError
from app.input_limits import ensure_json_object
from app.models import ChatSession, RunStatus, SessionRun
from app.repositories._sql import LIMIT, POSTGRESQL, SESSION_ID
from app.types import as_utc

RUNS = SessionRun.__table__
SESSIONS = ChatSession.__table__

EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
"""The bounds a listing binds when no time or cursor limits it."""

MAX_FILTER_KEYS = 20
MAX_CURSOR_LENGTH = 400
_FILTER_KEY = re.compile(r'[^"\\\x00-\x1f\x7f]{1,100}')
_NUMBERS: list[ColumnElement[str]] = [literal_column("'integer'"), literal_column("'real'")]
_WITHOUT_VALUE: list[ColumnElement[str]] = [
    literal_column(f"'{kind}'") for kind in ("true", "false", "null")
]
"""``json_each`` / ``json_type`` type names, written into the SQL (constants, not input)."""


@dataclass(frozen=True)
class _Statements:
    session_by_id: Executable
    for_session: dict[tuple[bool, bool], Executable]
    """A session's runs: ``[status given, metadata given]``."""
    across_sessions: dict[tuple[bool, bool], Executable]
    """Runs of every session: ``[status given, metadata given]``."""


def metadata_matches(dialect: str, wanted: Any = None) -> Any:
    """The condition "the run's metadata holds every key of the filter with its value"
    (module docstring): on the bound parameter ``:metadata``, or with ``wanted`` (a
    filter ``metadata_filter`` passed) bound in (for statements built per call)."""
    if wanted is None:
        wanted = bindparam("metadata", type_=RUNS.c.run_metadata.type)
    else:
        wanted = bindparam("metadata", metadata_filter(wanted), type_=RUNS.c.run_metadata.type)
    if dialect == POSTGRESQL:
        return RUNS.c.run_metadata.op("@>")(wanted)
    member = func.json_each(wanted).table_valued("key", "value", "type").alias("wanted")
    path = literal_column("'$.\"'", String()) + member.c.key + literal_column("'\"'", String())
    found = func.coalesce(func.json_type(RUNS.c.run_metadata, path), literal_column("''"))
    same_type = case(
        (member.c.type.in_(_NUMBERS), found.in_(_NUMBERS)),
        else_=found == member.c.type,
    )
    same_value = or_(
        member.c.type.in_(_WITHOUT_VALUE),
        func.json_extract(RUNS.c.run_metadata, path) == member.c.value,
    )
    mismatch: Select[Any] = (
        select(literal_column("1")).select_from(member).where(not_(and_(same_type, same_value)))
    )
    return not_(exists(mismatch))


def _page(dialect: str, *, in_session: bool, status: bool, metadata: bool) -> Executable:
    before_at = bindparam("before_at", type_=RUNS.c.created_at.type)
    before_id = bindparam("before_id", type_=String())
    page = select(*RUNS.c).where(
        RUNS.c.created_at > bindparam("after_at", type_=RUNS.c.created_at.type),
        RUNS.c.created_at <= before_at,
        or_(RUNS.c.created_at < before_at, RUNS.c.id < before_id),
    )
    if in_session:
        page = page.where(RUNS.c.session_id == SESSION_ID)
    if status:
        page = page.where(RUNS.c.status == bindparam("status", type_=RUNS.c.status.type))
    if metadata:
        page = page.where(metadata_matches(dialect))
    return page.order_by(RUNS.c.created_at.desc(), RUNS.c.id.desc()).limit(LIMIT)


@cache
def listing_statements(dialect: str) -> _Statements:
    """The listings' statements on ``dialect``, built once."""
    combinations = [(status, metadata) for status in (False, True) for metadata in (False, True)]
    return _Statements(
        session_by_id=select(
            SESSIONS.c.id, SESSIONS.c.title, SESSIONS.c.created_at, SESSIONS.c.updated_at
        ).where(SESSIONS.c.id == SESSION_ID),
        for_session={
            key: _page(dialect, in_session=True, status=key[0], metadata=key[1])
            for key in combinations
        },
        across_sessions={
            key: _page(dialect, in_session=False, status=key[0], metadata=key[1])
            for key in combinations
        },
    )


_statements = listing_statements
"""Under the name ``tests/internals/test_sql_text.py`` reads every module's statements by."""


# --------------------------------------------------------------------------
# Parameters


def encode_cursor(created_at: datetime, run_id: str) -> str:
    """The opaque cursor after the run ``(created_at, run_id)``."""
    raw = json.dumps([as_utc(created_at).isoformat(), run_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: Any) -> tuple[datetime, str]:
    """``(created_at, run_id)`` of a cursor ``encode_cursor`` made; ``BadParameterError``
    on ``cursor`` for anything else (described, never quoted)."""
    bad = BadParameterError(
        "cursor", f"expected a next_cursor of an earlier page, got {described(cursor)}"
    )
    if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR_LENGTH:
        raise bad
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, run_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        created_at = datetime.fromisoformat(at)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise bad from None
    if created_at.tzinfo is None or not isinstance(run_id, str) or not run_id:
        raise bad
    return as_utc(created_at), text_param(run_id, "cursor")


def time_param(value: Any, name: str) -> datetime:
    """An aware datetime (a naive one is UTC, as everywhere in the layer)."""
    if not isinstance(value, datetime):
        raise BadParameterError(name, f"expected a datetime, got {described(value)}")
    return as_utc(value)


def metadata_filter(value: Any) -> dict[str, Any]:
    """A metadata filter: a JSON object of at most ``MAX_FILTER_KEYS`` keys (see the module
    docstring) whose values are strings, numbers, booleans or null."""
    if not isinstance(value, dict) or not value:
        raise BadParameterError(
            "metadata", f"expected a non-empty JSON object, got {described(value)}"
        )
    try:
        ensure_json_object(value, "metadata", max_depth=1)
    except ValueError as exc:
        problem = str(exc)
        if "nested deeper" in problem:
            problem = "values must be strings, numbers, booleans or null"
        raise BadParameterError("metadata", problem) from None
    if len(value) > MAX_FILTER_KEYS:
        raise BadParameterError("metadata", f"at most {MAX_FILTER_KEYS} keys, got {len(value)}")
    for position, key in enumerate(value):
        if not _FILTER_KEY.fullmatch(key):
            raise BadParameterError(
                "metadata",
                f"key {position + 1} must be 1-100 characters without a double quote, "
                "a backslash or a control character",
            )
    return value


def listing_params(
    *,
    session_id: Any = None,
    status: Any = None,
    metadata: Any = None,
    created_after: Any = None,
    created_before: Any = None,
    cursor: Any = None,
    limit: Any = 50,
) -> tuple[dict[str, Any], tuple[bool, bool]]:
    """The checked parameters of a listing and its statement's key ``[status, metadata]``.

    The page's bound ``(before_at, before_id)`` is whichever of the cursor and
    ``created_before`` (exclusive) comes first in the newest-first order; the query
    asks for one run more than ``limit``, to know whether a next page exists.
    """
    params: dict[str, Any] = {"limit": page_size(limit) + 1}
    if session_id is not None:
        params["session_id"] = text_param(session_id, "session_id")
    if status is not None:
        params["status"] = enum_param(RunStatus, status, "status")
    if metadata is not None:
        params["metadata"] = metadata_filter(metadata)
    after = EARLIEST if created_after is None else time_param(created_after, "created_after")
    bound = (LATEST, "")
    if created_before is not None:
        bound = (time_param(created_before, "created_before"), "")
    if cursor is not None:
        bound = min(bound, decode_cursor(cursor))
    params["after_at"], (params["before_at"], params["before_id"]) = after, bound
    return params, (status is not None, metadata is not None)


__all__ = [
    "decode_cursor",
    "encode_cursor",
    "listing_params",
    "listing_statements",
    "metadata_filter",
    "metadata_matches",
]
