"""Domain errors of the Run data layer.

Each error names what was wrong and what was expected, and carries the HTTP
status the Run API answers with (``status_code``) and a stable machine code
(``code``). ``app.api.errors.install_error_handlers`` maps them for FastAPI.

    DataLayerError (500)
    ├── NotFoundError (404): RunNotFoundError, SessionNotFoundError
    ├── ConflictError (409): InvalidTransitionError, ActiveRunExistsError, LeaseNotHeldError
    ├── BadParameterError (400): a parameter out of range, a bad resume payload
    ├── ValidationFailedError (422): a body that does not validate
    ├── IdempotencyKeyReusedError (422): one Idempotency-Key, two different requests
    ├── ReadOnlyFieldError (500): a stored row changed outside the repositories
    ├── TransactionAbortedError (500): commit of a transaction the database aborted
    ├── PayloadTooLargeError (413): a request body over the Run API's size limit
    ├── DatabaseBusyError (503): no connection or lock within its timeout; retry
    └── DatabaseUnavailableError (503): the database cannot be reached; retry
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self


class DataLayerError(Exception):
    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class NotFoundError(DataLayerError):
    status_code = 404
    code = "not_found"


class RunNotFoundError(NotFoundError):
    code = "run_not_found"

    def __init__(self, run_id: str, *, session_id: str | None = None) -> None:
        where = f" in session {session_id}" if session_id is not None else ""
        super().__init__(f"run {run_id!r} not found{where}")
        self.run_id = run_id
        self.session_id = session_id


class SessionNotFoundError(NotFoundError):
    code = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class ConflictError(DataLayerError):
    status_code = 409
    code = "conflict"


class InvalidTransitionError(ConflictError):
    code = "invalid_transition"

    def __init__(
        self, run_id: str, current: str, target: str, allowed_from: Iterable[str] = ()
    ) -> None:
        allowed = sorted(str(status) for status in allowed_from)
        expected = f" (allowed from: {', '.join(allowed)})" if allowed else ""
        super().__init__(f"run {run_id} is {current}; cannot move to {target}{expected}")
        self.run_id = run_id
        self.current = str(current)
        self.target = str(target)
        self.allowed_from = tuple(allowed)


class ActiveRunExistsError(ConflictError):
    code = "active_run_exists"

    def __init__(
        self,
        session_id: str | None,
        run_id: str | None,
        active_run_id: str | None = None,
        *,
        message: str | None = None,
    ) -> None:
        """``session_id`` is None when a concurrent start won the race (the database's
        unique index said so and the transaction is aborted; nothing more can be read).
        ``run_id`` is None when no run was made (``create`` with ``reject``)."""
        if message is None and run_id is None:
            message = (
                "another run of the session started at the same moment; this transaction "
                "is aborted: roll back and try again"
            )
        elif message is None:
            other = f" (run {active_run_id})" if active_run_id else ""
            whose = f"session {session_id}" if session_id else f"the session of run {run_id}"
            message = (
                f"{whose} already has a running run{other}; run {run_id} cannot run until it stops"
            )
        super().__init__(message)
        self.session_id = session_id
        self.run_id = run_id
        self.active_run_id = active_run_id

    @classmethod
    def rejected(cls, session_id: str, active_run_id: str, active_status: str) -> Self:
        """``create(..., multitask_strategy="reject")`` while the session has an active run."""
        return cls(
            session_id,
            None,
            active_run_id,
            message=f"session {session_id} already has an active run ({active_run_id} is "
            f"{active_status}); no new run created (multitask_strategy=reject; use enqueue "
            "to queue it, or interrupt to cancel the active runs)",
        )


class LeaseNotHeldError(ConflictError):
    """A heartbeat from a worker that does not hold the run's lease."""

    code = "lease_not_held"

    def __init__(self, run_id: str, holder: str | None, caller: str | None) -> None:
        held = f"worker {holder!r}" if holder is not None else "no worker (started without a lease)"
        asked = f"worker {caller!r}" if caller is not None else "a caller without a worker_id"
        super().__init__(
            f"run {run_id} is leased to {held}; {asked} cannot extend it: stop working on it"
        )
        self.run_id = run_id
        self.holder = holder
        self.caller = caller


class BadParameterError(DataLayerError):
    status_code = 400
    code = "bad_parameter"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


class ValidationFailedError(DataLayerError):
    status_code = 422
    code = "validation_failed"


class IdempotencyKeyReusedError(DataLayerError):
    """An ``Idempotency-Key`` seen within its window for a different request."""

    status_code = 422
    code = "idempotency_key_reused"

    def __init__(self, scope: str, scope_id: str) -> None:
        """The key itself is not in the message: clients choose it, it may carry content."""
        owner = f"session {scope_id}" if scope == "create" else f"run {scope_id}"
        super().__init__(
            f"this Idempotency-Key was already used for a different {scope} request of "
            f"{owner} within its window; send the same request to get its result, or use a "
            "new key"
        )
        self.scope = scope
        self.scope_id = scope_id


class ReadOnlyFieldError(DataLayerError):
    """A stored row's column that only the repositories may change was assigned.

    Run status and everything a transition writes change through
    ``RunRepository``; events never change once written.
    """

    code = "read_only_field"

    def __init__(self, model: str, field: str, key: object, hint: str) -> None:
        super().__init__(f"{model} {key!r}: {field} cannot be changed here; {hint}")
        self.model = model
        self.field = field


class TransactionAbortedError(DataLayerError):
    """``commit()`` of a transaction that the database has already rolled back.

    On PostgreSQL any failed statement aborts the transaction, and a plain
    COMMIT would then roll back quietly; SQLite rolls a transaction back on
    some errors (a full disk, a lock lost). The layer raises instead, so that
    earlier writes of the transaction are never lost without a word. Roll
    back and do the unit of work again.
    """

    code = "transaction_aborted"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the database aborted this transaction ({detail}); nothing of it was committed: "
            "roll back and retry the unit of work"
        )


class DatabaseBusyError(DataLayerError):
    """No pooled connection, or SQLite's write lock, within the configured timeout."""

    status_code = 503
    code = "database_busy"


class DatabaseUnavailableError(DataLayerError):
    """The database cannot be reached: the server is down or refuses connections,
    the connection was lost, or the SQLite file cannot be opened. The answer says
    nothing more; the cause is logged (``app.api.errors``)."""

    status_code = 503
    code = "database_unavailable"

    def __init__(self) -> None:
        super().__init__("the database cannot be reached; retry later")


class PayloadTooLargeError(DataLayerError):
    """A request body over the Run API's limit (``app.api.limits``), refused unread."""

    status_code = 413
    code = "too_large"

    def __init__(self, limit: int, size: int | None = None, *, setting: str = "") -> None:
        """``size``: the declared size (``Content-Length``); None while a chunked body
        is still arriving. ``setting``: where the limit comes from."""
        what = f"is {size:,} bytes, over" if size is not None else "is over"
        where = f" (set by {setting})" if setting else ""
        super().__init__(f"the request body {what} the limit of {limit:,} bytes{where}")
        self.limit = limit
        self.size = size


__all__ = [
    "ActiveRunExistsError",
    "BadParameterError",
    "ConflictError",
    "DataLayerError",
    "DatabaseBusyError",
    "DatabaseUnavailableError",
    "IdempotencyKeyReusedError",
    "InvalidTransitionError",
    "LeaseNotHeldError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ReadOnlyFieldError",
    "RunNotFoundError",
    "SessionNotFoundError",
    "TransactionAbortedError",
    "ValidationFailedError",
]
