"""Runs and their state machine.

Each transition of ``app.state_machine`` is one conditional ``UPDATE ...
WHERE id = :run_id AND status IN (<allowed>) RETURNING *`` plus its lifecycle
event, in the caller's transaction. At most one run per session is running
(``ActiveRunExistsError``); a start that loses a race on PostgreSQL leaves its
transaction aborted (``_driver_errors``, ``_move``; a later ``commit()`` raises
``TransactionAbortedError``). On PostgreSQL a transition locks the
run row, then the session's event counter: move a run before appending to its
session in one transaction.

Contract: docs/reference.md (RunRepository). Why: docs/design.md (Transitions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, NoReturn

from pydantic import ValidationError
from sqlalchemy import (
    Executable,
    String,
    Update,
    bindparam,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlmodel import Session as DbSession

from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    ConflictError,
    InvalidTransitionError,
    RunNotFoundError,
    SessionNotFoundError,
    ValidationFailedError,
)
from app.models import RunOptions, RunStatus, Session, SessionRun, TriggerSource, new_id
from app.repositories._params import (
    enum_param,
    event_payload_param,
    json_object_param,
    optional_text_param,
    page_size,
    text_param,
)
from app.repositories._rows import execute_core, in_session, inserted
from app.repositories._sql import LIMIT, NOW, RUN_ID, SESSION_EXISTS, SESSION_ID, merge_metrics
from app.repositories.events import EventRepository
from app.schemas.run import RunCreate, RunResumeRequest
from app.state_machine import (
    CANCEL,
    COMPLETE,
    FAIL,
    RESUME,
    START,
    TERMINAL_STATUSES,
    TRANSITIONS,
    WAIT_FOR_INPUT,
    RunEventType,
    Transition,
)
from app.types import UTCDateTime, is_name, utc_now

RUNS = SessionRun.__table__
RUN_COLUMNS = tuple(column.key for column in RUNS.c)
RETRYABLE_STATUSES = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})
OPTION_FIELDS = frozenset(RunOptions.model_fields)


def _status_in(statuses: frozenset[RunStatus]) -> Any:
    return or_(*(RUNS.c.status == status for status in sorted(statuses)))


def _transition_update(dialect: str, transition: Transition) -> Update:
    """The SET clause of ``transition``, derived from its source and target statuses.

    Parameters: ``now``, plus ``reason`` (wait_for_input), ``resume_payload``
    (resume), ``metrics`` (complete) or ``error`` (fail).
    """
    values: dict[str, Any] = {"status": transition.target, "updated_at": NOW}
    if transition.target is RunStatus.RUNNING:
        values["started_at"] = func.coalesce(RUNS.c.started_at, NOW)
    if transition.target in TERMINAL_STATUSES:
        values["finished_at"] = NOW
    if transition.target is RunStatus.WAITING_INPUT:
        values["waiting_reason"] = bindparam("reason", type_=RUNS.c.waiting_reason.type)
    elif RunStatus.WAITING_INPUT in transition.sources:
        values["waiting_reason"] = None
    if transition is RESUME:
        values["resume_payload"] = bindparam("resume_payload", type_=RUNS.c.resume_payload.type)
    if transition is COMPLETE:
        values["metrics"] = merge_metrics(dialect)
    if transition is FAIL:
        values["latest_error"] = bindparam("error", type_=RUNS.c.latest_error.type)
    statement = update(RUNS).where(_status_in(transition.sources)).values(values)
    if transition.target is RunStatus.RUNNING:
        # The common conflict is a condition, not an error: no savepoint needed.
        # 'running' as a literal, not a parameter: psycopg prepares a statement
        # after a few executions, and PostgreSQL's generic plan can use the partial
        # index uq_session_runs_one_running (WHERE status = 'running') only then.
        other = RUNS.alias("other_run")
        statement = statement.where(
            ~exists().where(
                other.c.session_id == RUNS.c.session_id,
                other.c.status == literal_column(f"'{RunStatus.RUNNING.value}'"),
            )
        )
    return statement


def _loading(statement: Any) -> Executable:
    """``statement`` returning every column, to be read back as the session's runs."""
    return statement.returning(*RUNS.c)


@dataclass(frozen=True, slots=True)
class _Statements:
    create: Executable
    by_id: Executable
    transitions: dict[str, Executable]
    heartbeat: Executable
    update_metrics: Executable
    fail_stale: Executable
    active_run: Executable
    pages: dict[tuple[bool, bool], Executable]  # (status filter?, before cursor?) -> page
    by_status: Executable
    children: Executable
    latest_waiting: Executable
    delete: Executable


@cache
def _statements(dialect: str) -> _Statements:
    parent_run_id = bindparam("parent_run_id", type_=String())
    status = bindparam("status", type_=RUNS.c.status.type)

    created_values = {
        "id": RUN_ID,
        "session_id": SESSION_ID,
        "status": bindparam("queued", type_=RUNS.c.status.type),
        "trigger_source": bindparam("trigger_source", type_=RUNS.c.trigger_source.type),
        "parent_run_id": parent_run_id,
        "input_message": bindparam("input_message", type_=RUNS.c.input_message.type),
        "options": bindparam("options", type_=RUNS.c.options.type),
        "checkpoint_thread": bindparam("checkpoint_thread", type_=String()),
        "checkpoint_ns": bindparam("checkpoint_ns", type_=String()),
        "created_at": NOW,
        "updated_at": NOW,
    }
    # Inserts nothing unless the session exists and the parent run is in it.
    create = RUNS.insert().from_select(
        list(created_values),
        select(*created_values.values()).where(
            exists().where(Session.__table__.c.id == SESSION_ID),
            or_(
                parent_run_id.is_(None),
                exists().where(RUNS.c.id == parent_run_id, RUNS.c.session_id == SESSION_ID),
            ),
        ),
    )

    newest_first = (SessionRun.created_at.desc(), SessionRun.id.desc())
    pages: dict[tuple[bool, bool], Executable] = {}
    for filtered in (False, True):
        for after_cursor in (False, True):
            page = select(SessionRun).where(SessionRun.session_id == SESSION_ID)
            if filtered:
                page = page.where(SessionRun.status == status)
            if after_cursor:
                cursor = (
                    select(RUNS.c.created_at, RUNS.c.id)
                    .where(
                        RUNS.c.id == bindparam("before", type_=String()),
                        RUNS.c.session_id == SESSION_ID,
                    )
                    .subquery("cursor")
                )
                page = page.join(cursor, true()).where(
                    SessionRun.created_at <= cursor.c.created_at,
                    or_(
                        SessionRun.created_at < cursor.c.created_at,
                        SessionRun.id < cursor.c.id,
                    ),
                )
            pages[filtered, after_cursor] = page.order_by(*newest_first).limit(LIMIT)

    other = RUNS.alias("other")
    return _Statements(
        create=_loading(create),
        by_id=select(*RUNS.c).where(RUNS.c.id == RUN_ID),
        transitions={
            transition.name: _loading(
                _transition_update(dialect, transition).where(RUNS.c.id == RUN_ID)
            )
            for transition in TRANSITIONS
        },
        heartbeat=_loading(
            update(RUNS)
            .where(RUNS.c.id == RUN_ID, RUNS.c.status == RunStatus.RUNNING)
            .values(updated_at=NOW)
        ),
        update_metrics=_loading(
            update(RUNS)
            .where(RUNS.c.id == RUN_ID)
            .values(metrics=merge_metrics(dialect), updated_at=NOW)
        ),
        fail_stale=select(SessionRun).from_statement(
            _loading(
                _transition_update(dialect, FAIL).where(
                    RUNS.c.updated_at < bindparam("cutoff", type_=UTCDateTime())
                )
            )
        ),
        active_run=select(
            RUNS.c.session_id,
            select(other.c.id)
            .where(other.c.session_id == RUNS.c.session_id, other.c.status == RunStatus.RUNNING)
            .scalar_subquery()
            .label("active_run_id"),
        ).where(RUNS.c.id == RUN_ID),
        pages=pages,
        # Oldest first: the order in which a worker should pick queued runs.
        by_status=select(SessionRun)
        .where(SessionRun.status == status)
        .order_by(SessionRun.created_at, SessionRun.id)
        .limit(LIMIT),
        children=select(SessionRun)
        .where(SessionRun.parent_run_id == RUN_ID)
        .order_by(SessionRun.created_at, SessionRun.id),
        latest_waiting=select(SessionRun)
        .where(SessionRun.session_id == SESSION_ID, SessionRun.status == RunStatus.WAITING_INPUT)
        .order_by(*newest_first)
        .limit(1),
        delete=delete(SessionRun).where(SessionRun.id == RUN_ID),
    )


class RunRepository:
    """Creates, reads and moves runs; flushes, never commits (the caller owns the transaction)."""

    def __init__(self, session: DbSession) -> None:
        self._session = session
        self._sql = _statements(session.get_bind().dialect.name)
        self._events = EventRepository(session)

    # ---------------------------------------------------------------- create

    def create(
        self,
        data: RunCreate | Mapping[str, Any],
        *,
        trigger_source: TriggerSource | str = TriggerSource.CHAT,
        parent_run_id: str | None = None,
        checkpoint_ns: str | None = None,
    ) -> SessionRun:
        """A new ``queued`` run and its ``run_created`` event.

        ``data`` is validated through ``RunCreate`` (``ValidationFailedError``);
        the options are stored in ``session_runs.options``. An unknown session
        raises ``SessionNotFoundError``; a parent run outside that session
        ``RunNotFoundError``.
        """
        body = _run_create(data)
        return self._insert(
            session_id=body.session_id,
            input_message=body.message,
            options=body.model_dump(include=OPTION_FIELDS),
            trigger_source=enum_param(TriggerSource, trigger_source, "trigger_source"),
            parent_run_id=optional_text_param(parent_run_id, "parent_run_id"),
            checkpoint_ns=optional_text_param(checkpoint_ns, "checkpoint_ns"),
        )

    def retry(self, run_id: str) -> SessionRun:
        """A new queued run with the input and options of a failed or cancelled run.

        Terminal runs never change, so reading the source run first is safe.
        """
        source = self.get(run_id)
        if source.status not in RETRYABLE_STATUSES:
            raise InvalidTransitionError(run_id, source.status, "retry", RETRYABLE_STATUSES)
        return self._insert(
            session_id=source.session_id,
            input_message=source.input_message,
            options=source.options,
            trigger_source=TriggerSource.RETRY,
            parent_run_id=source.id,
            checkpoint_ns=source.checkpoint_ns,
        )

    # ------------------------------------------------------------------ read

    def get(self, run_id: str) -> SessionRun:
        run = self.get_or_none(run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    def get_or_none(self, run_id: str) -> SessionRun | None:
        """The run as stored now (the session's copy is refreshed)."""
        return self._run(self._sql.by_id, {"run_id": text_param(run_id, "run_id")})

    def list_for_session(
        self,
        session_id: str,
        *,
        status: RunStatus | str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[SessionRun]:
        """The session's runs, newest first (``created_at``, then ``id``, descending).

        Keyset pagination: ``before`` is the ``id`` of the last run of the
        previous page; the page holds the runs that come after it in this
        order. An unknown ``before`` run raises ``RunNotFoundError``, a run of
        another session ``BadParameterError``.
        """
        params: dict[str, Any] = {
            "session_id": text_param(session_id, "session_id"),
            "limit": page_size(limit),
            "before": optional_text_param(before, "before"),
        }
        if status is not None:
            params["status"] = enum_param(RunStatus, status, "status")
        page = self._sql.pages[status is not None, before is not None]
        runs = self._runs(page, params)
        if not runs and before is not None:
            cursor = self.get_or_none(before)
            if cursor is None:
                raise RunNotFoundError(before)
            if cursor.session_id != session_id:
                raise BadParameterError(
                    "before", f"run {before} belongs to another session, not to {session_id}"
                )
        return runs

    def list_by_status(self, status: RunStatus | str, *, limit: int) -> list[SessionRun]:
        """Runs in ``status``, oldest first (the order in which to pick queued runs)."""
        params = {"status": enum_param(RunStatus, status, "status"), "limit": page_size(limit)}
        return self._runs(self._sql.by_status, params)

    def children(self, run_id: str) -> list[SessionRun]:
        """Runs whose ``parent_run_id`` is ``run_id`` (its retries), oldest first."""
        runs = self._runs(self._sql.children, {"run_id": text_param(run_id, "run_id")})
        if not runs:
            self.get(run_id)
        return runs

    def latest_waiting(self, session_id: str) -> SessionRun | None:
        """The session's newest run that waits for input, if any."""
        params = {"session_id": text_param(session_id, "session_id")}
        return next(iter(self._runs(self._sql.latest_waiting, params)), None)

    # ----------------------------------------------------------- transitions

    def start(self, run_id: str) -> SessionRun:
        return self._transition(run_id, START, {}, {})

    def wait_for_input(self, run_id: str, reason: str) -> SessionRun:
        reason = text_param(reason, "reason")
        return self._transition(run_id, WAIT_FOR_INPUT, {"reason": reason}, {"reason": reason})

    def resume(self, run_id: str, payload: dict[str, Any] | RunResumeRequest) -> SessionRun:
        """Back to ``running`` with the user's answer (``BadParameterError`` if not an object)."""
        if isinstance(payload, RunResumeRequest):
            payload = payload.resume
        if payload is None:
            raise BadParameterError("resume", "expected a JSON object, got None")
        payload = json_object_param(payload, "resume")
        return self._transition(run_id, RESUME, {"resume_payload": payload}, {"resume": payload})

    def complete(self, run_id: str, metrics: dict[str, Any] | None = None) -> SessionRun:
        """Completed; ``metrics`` is merged key by key into the stored ones."""
        metrics = json_object_param(metrics, "metrics")
        return self._transition(run_id, COMPLETE, {"metrics": metrics}, {"metrics": metrics})

    def fail(self, run_id: str, error: dict[str, Any]) -> SessionRun:
        error = json_object_param(error, "error")
        return self._transition(run_id, FAIL, {"error": error}, {"error": error})

    def cancel(self, run_id: str) -> tuple[SessionRun, bool]:
        """Cancel, idempotently: a terminal run comes back unchanged with ``False``."""
        run = self._move(run_id, CANCEL, {}, {})
        if run is not None:
            return run, True
        current = self.get(run_id)
        if current.status in TERMINAL_STATUSES:
            return current, False
        raise InvalidTransitionError(run_id, current.status, CANCEL.target, CANCEL.sources)

    def update_metrics(self, run_id: str, metrics: dict[str, Any]) -> SessionRun:
        """Merge ``metrics`` into the run's metrics (keys given replace stored ones), in
        any status: token and cost figures while a run works, or after it ended.

        The merge happens inside the UPDATE, as ``complete``'s does, so two
        writers never lose each other's keys.
        """
        params = {
            "run_id": text_param(run_id, "run_id"),
            "metrics": json_object_param(metrics, "metrics"),
            "now": utc_now(),
        }
        run = self._run(self._sql.update_metrics, params)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    def heartbeat(self, run_id: str) -> SessionRun:
        """Touch ``updated_at`` of a running run, so ``fail_stale`` leaves it alone.

        A run that is no longer running (for example failed as stale) raises
        ``InvalidTransitionError``: the worker should stop.
        """
        params = {"run_id": text_param(run_id, "run_id"), "now": utc_now()}
        run = self._run(self._sql.heartbeat, params)
        if run is None:
            current = self.get(run_id)
            raise InvalidTransitionError(
                run_id, current.status, "running (heartbeat)", {RunStatus.RUNNING}
            )
        return run

    def fail_stale(self, older_than: timedelta) -> list[str]:
        """Fail the runs left ``running`` without a heartbeat for ``older_than``.

        One UPDATE picks and fails them; a worker that comes back late cannot
        overwrite that, its ``complete`` raises ``InvalidTransitionError``.
        Returns the ids of the failed runs.
        """
        if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
            raise BadParameterError(
                "older_than", f"expected a positive timedelta, got {older_than!r}"
            )
        now = utc_now()
        try:
            cutoff = now - older_than
        except OverflowError:
            raise BadParameterError(
                "older_than", f"reaches before the year 1, got {older_than!r}"
            ) from None
        error = {
            "code": "stale_run",
            "message": f"no heartbeat since {cutoff.isoformat()} (older than {older_than})",
        }
        stale = self._runs(self._sql.fail_stale, {"now": now, "cutoff": cutoff, "error": error})
        for run in stale:
            self._events.append(run.session_id, FAIL.event_type, {"error": error}, run_id=run.id)
        return [run.id for run in stale]

    def delete(self, run_id: str) -> None:
        """Delete the run and its events; its retries keep living with ``parent_run_id`` NULL."""
        result = self._session.execute(self._sql.delete, {"run_id": text_param(run_id, "run_id")})
        if result.rowcount == 0:
            raise RunNotFoundError(run_id)

    # -------------------------------------------------------------- internal

    def _insert(
        self,
        *,
        session_id: str,
        input_message: str | None,
        options: dict[str, Any] | None,
        trigger_source: TriggerSource,
        parent_run_id: str | None,
        checkpoint_ns: str | None,
    ) -> SessionRun:
        run_id = new_id()
        params = {
            "run_id": run_id,
            "session_id": session_id,
            "queued": RunStatus.QUEUED,
            "trigger_source": trigger_source,
            "parent_run_id": parent_run_id,
            "input_message": input_message,
            "options": options,
            "checkpoint_thread": f"{session_id}:{run_id}",
            "checkpoint_ns": checkpoint_ns,
            "now": utc_now(),
        }
        row = execute_core(self._session, self._sql.create, params).one_or_none()
        if row is None:
            if not self._session.scalar(SESSION_EXISTS, {"session_id": session_id}):
                raise SessionNotFoundError(session_id)
            raise RunNotFoundError(str(parent_run_id), session_id=session_id)
        run = inserted(self._session, SessionRun, dict(zip(RUN_COLUMNS, row, strict=True)))
        event = {"trigger_source": trigger_source.value, "parent_run_id": parent_run_id}
        self._events.append(session_id, RunEventType.RUN_CREATED, event, run_id=run_id)
        return run

    def _transition(
        self,
        run_id: str,
        transition: Transition,
        params: dict[str, Any],
        event_payload: dict[str, Any],
    ) -> SessionRun:
        run = self._move(run_id, transition, params, event_payload)
        if run is None:
            current = self.get(run_id)
            if current.status in transition.sources:  # only the one-running guard refuses that
                self._raise_active_run_exists(run_id)
            raise InvalidTransitionError(
                run_id, current.status, transition.target, transition.sources
            )
        return run

    def _move(
        self,
        run_id: str,
        transition: Transition,
        params: dict[str, Any],
        event_payload: dict[str, Any],
    ) -> SessionRun | None:
        """Apply ``transition`` with one conditional UPDATE and append its event.

        None when the run is not in a source status (or does not exist).
        """
        params = {**params, "run_id": text_param(run_id, "run_id"), "now": utc_now()}
        event_payload = event_payload_param(event_payload)
        statement = self._sql.transitions[transition.name]
        try:
            run = self._run(statement, params)
            if run is not None:
                self._events.append(
                    run.session_id, transition.event_type, event_payload, run_id=run.id
                )
            return run
        except ConflictError as exc:
            if transition.target is not RunStatus.RUNNING or isinstance(exc, ActiveRunExistsError):
                raise
        # A deadlock while entering running (``_driver_errors`` maps it to a plain
        # ConflictError): a transaction that created a run, so holds its session's
        # event counter, and then starts it, against a concurrent start that holds
        # the one-running index entry and waits for that counter. PostgreSQL aborts
        # one of the two; for the caller, another run of the session got there first.
        raise ActiveRunExistsError(None, params["run_id"])

    def _raise_active_run_exists(self, run_id: str) -> NoReturn:
        row = self._session.execute(self._sql.active_run, {"run_id": run_id}).one()
        raise ActiveRunExistsError(row.session_id, run_id, row.active_run_id)

    def _run(self, statement: Executable, params: dict[str, Any]) -> SessionRun | None:
        """One row of a Core statement as the session's run (see ``app.repositories._rows``).

        For a single row this is about twice as cheap as the ORM's loading.
        """
        row = execute_core(self._session, statement, params).one_or_none()
        return None if row is None else in_session(self._session, SessionRun, RUN_COLUMNS, row)

    def _runs(self, statement: Executable, params: dict[str, Any]) -> list[SessionRun]:
        """Many rows: the ORM's loader, which is cheaper per row than ``in_session``."""
        return list(
            self._session.execute(
                statement, params, execution_options={"populate_existing": True}
            ).scalars()
        )


def _loc_part(part: str | int) -> str:
    """A field name or index; an unknown field that is not a name is not quoted."""
    return str(part) if isinstance(part, int) or is_name(part) else "(unknown field)"


def _run_create(data: RunCreate | Mapping[str, Any]) -> RunCreate:
    if isinstance(data, RunCreate):
        return data
    try:
        return RunCreate.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(_loc_part(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
    # Raised outside the except block: the ValidationError (which holds the input)
    # must not travel along as the error's context.
    raise ValidationFailedError(f"invalid run: {problems}")


__all__ = ["RunRepository"]
