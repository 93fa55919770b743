"""The one place that turns a statement's driver error into a domain error.

A driver error's text carries the SQL and its parameters, payloads included;
none may leave the layer. ``app.repositories._driver.execute_core`` runs every
statement that writes and hands its ``DBAPIError`` here. The domain error is
built from the statement's id parameters (``session_id``, ``run_id``,
``parent_run_id``) and the constraint the database names, never from the
driver's message, and is raised with no cause or context attached.

What the layer's own statements can meet, all in races with other
transactions (the statements guard against everything else up front):

* a foreign key violation: the session or run the statement refers to was
  deleted by a transaction that committed after our statement's checks saw
  it (PostgreSQL; SQLite's writers never overlap): ``SessionNotFoundError``
  or ``RunNotFoundError``;
* the unique index ``uq_session_runs_one_running``: ``ActiveRunExistsError``;
* a deadlock or serialization failure: ``ConflictError`` (roll back, retry).

On PostgreSQL the failed statement has aborted the transaction: the caller
must roll back, as after any database error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError

from app.errors import (
    ActiveRunExistsError,
    ConflictError,
    DataLayerError,
    RunNotFoundError,
    SessionNotFoundError,
)

ONE_RUNNING_INDEX = "uq_session_runs_one_running"
FOREIGN_KEY_VIOLATION = "23503"
RETRY_STATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure
_MISSING_KEY = re.compile(r'^Key \((?P<column>\w+)\)=.* is not present in table "(?P<table>\w+)"')


def domain_error(exc: DBAPIError, params: Mapping[str, Any]) -> DataLayerError | None:
    """The domain error for ``exc`` raised by a statement run with ``params``; None
    for an error this layer has no meaning for (a lost connection, for instance)."""
    state = getattr(exc.orig, "sqlstate", None)
    diagnostics = getattr(exc.orig, "diag", None)
    if state == FOREIGN_KEY_VIOLATION and diagnostics is not None:
        return _missing_reference(diagnostics.message_detail or "", params)
    if state in RETRY_STATES:
        return ConflictError(
            "a concurrent transaction changed the same rows (the database aborted this one); "
            "roll back and retry"
        )
    if not isinstance(exc, IntegrityError):
        return None
    if _violates_one_running(exc):
        run_id = params.get("run_id")
        return ActiveRunExistsError(None, None if run_id is None else str(run_id))
    if "FOREIGN KEY constraint failed" in str(exc.orig):
        return _missing_reference("", params)
    name = getattr(diagnostics, "constraint_name", None) or "a constraint"
    return ConflictError(f"the database refused the write ({name}); roll back and retry")


def _missing_reference(detail: str, params: Mapping[str, Any]) -> DataLayerError:
    """Which row was gone, from the constraint's column and table (not the key's value)."""
    session_id = params.get("session_id")
    found = _MISSING_KEY.match(detail)
    table, column = (found["table"], found["column"]) if found else ("", "")
    if table == "sessions":
        return SessionNotFoundError(str(session_id))
    if table == "session_runs":
        run_id = params.get("parent_run_id" if column == "parent_run_id" else "run_id")
        return RunNotFoundError(str(run_id), session_id=session_id)
    return ConflictError(
        f"session {session_id} or a run it refers to was deleted meanwhile; roll back and retry"
    )


def _violates_one_running(exc: IntegrityError) -> bool:
    """Whether the driver error comes from ``uq_session_runs_one_running``.

    PostgreSQL names the index; SQLite names the column, which no other
    unique index of the table covers alone.
    """
    diagnostics = getattr(exc.orig, "diag", None)
    if diagnostics is not None:
        return diagnostics.constraint_name == ONE_RUNNING_INDEX
    return "UNIQUE constraint failed: session_runs.session_id" in str(exc.orig)


__all__ = ["domain_error"]
