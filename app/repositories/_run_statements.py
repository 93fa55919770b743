"""The statements of ``RunRepository``, built once per dialect (``run_statements``).

Each transition of ``app.state_machine`` becomes one conditional ``UPDATE ...
WHERE id = :run_id AND status IN (<allowed>) RETURNING *``; on PostgreSQL the
same statement also writes its lifecycle event
(``_event_log.with_lifecycle_event``). The queue's statements (claim, heartbeat,
give back, lease expiry) and the reads of runs live here too. The SQL each
renders to: ``docs/sql/``.

Why these shapes: docs/design.md (Transitions), docs/queue.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

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
    tuple_,
    update,
)

from app.models import (
    ChatSession,
    RunStatus,
    SessionRun,
)
from app.repositories._event_log import with_lifecycle_event
from app.repositories._sql import (
    EMPTY_TEXT,
    LIMIT,
    NOW,
    POSTGRESQL,
    RUN_ID,
    SESSION_ID,
    merge_metrics,
    now_plus,
    run_created_at,
)
from app.state_machine import (
    ACTIVE_STATUSES,
    CANCEL,
    EXECUTING_STATUSES,
    FAIL,
    GIVE_BACK,
    RETRY_EXPIRED,
    START,
    TRANSITIONS,
    Set,
    Transition,
    Write,
)

RUNS = SessionRun.__table__
RUN_COLUMNS = tuple(column.key for column in RUNS.c)
"""The columns every run statement returns, in this order (``RunStatements``)."""


def _literal(status: RunStatus) -> Any:
    """A status as an SQL literal: PostgreSQL's generic plan of a prepared statement can
    then use the partial indexes whose predicates name statuses (see ``_transition_update``)."""
    return literal_column(f"'{status.value}'")


def _literal_in(column: Any, statuses: frozenset[RunStatus]) -> Any:
    return column.in_([_literal(status) for status in sorted(statuses)])


def _status_in(statuses: frozenset[RunStatus]) -> Any:
    return or_(*(RUNS.c.status == status for status in sorted(statuses)))


def _written(dialect: str, write: Set) -> Any:
    """The SQL value of one of a transition's ``writes``."""
    column = RUNS.c[write.column]
    match write.write:
        case Write.NOW:
            return NOW
        case Write.NOW_IF_UNSET:
            return func.coalesce(column, NOW)
        case Write.CLEAR:
            return None
        case Write.PARAMETER:
            return bindparam(write.parameter, type_=column.type)
        case Write.MERGE if write.column == "metrics":
            return merge_metrics(dialect)
        case Write.ADD_ONE:
            return column + 1
        case Write.SUBTRACT_ONE:
            return column - 1
        case Write.ZERO:
            return literal_column("0")
    raise ValueError(f"no SQL for {write}")


def _transition_update(dialect: str, transition: Transition) -> Update:
    """The UPDATE of ``transition`` where the run is in one of its source statuses: the
    target status, ``updated_at`` and the transition's ``writes`` (``app.state_machine``).

    Parameters: those the writes name: ``reason`` (wait_for_input), ``resume_payload``
    (resume), ``metrics`` (complete) or ``error`` (fail).
    """
    values: dict[str, Any] = {"status": transition.target, "updated_at": NOW}
    values.update((write.column, _written(dialect, write)) for write in transition.writes)
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
                other.c.status == _literal(RunStatus.RUNNING),
            )
        )
    return statement


def _next_claimable() -> Any:
    """The id of the run ``claim_next`` takes: the oldest queued run that heads its
    session's queue (no older queued run) in a session with no running or waiting
    run. On PostgreSQL the row is locked, and rows other claimers hold are skipped.

    A claimer that skips a locked head moves on to other sessions: the run behind
    that head is never a candidate while the head is queued, so per-session FIFO
    holds. Served by ``idx_session_runs_queue`` and ``idx_session_runs_session_status``.
    """
    candidate = RUNS.alias("candidate")
    busy = RUNS.alias("busy_run")
    older = RUNS.alias("older_run")
    return (
        select(candidate.c.id)
        .where(
            candidate.c.status == _literal(RunStatus.QUEUED),
            ~exists().where(
                busy.c.session_id == candidate.c.session_id,
                _literal_in(busy.c.status, EXECUTING_STATUSES),
            ),
            ~exists().where(
                older.c.session_id == candidate.c.session_id,
                older.c.status == _literal(RunStatus.QUEUED),
                tuple_(older.c.created_at, older.c.id)
                < tuple_(candidate.c.created_at, candidate.c.id),
            ),
        )
        .order_by(candidate.c.created_at, candidate.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


def _unclaimed_resumed(runs: Any) -> tuple[Any, ...]:
    """A resumed run nobody executes yet: running, with a resume payload, without a
    worker or a lease (``resume`` clears both; ``start`` writes no payload)."""
    return (
        runs.c.status == _literal(RunStatus.RUNNING),
        runs.c.worker_id.is_(None),
        runs.c.lease_expires_at.is_(None),
        runs.c.resume_payload.is_not(None),
    )


def _next_resumed() -> Any:
    """The id of the resumed run ``claim_next`` leases first: the one resumed longest
    ago. It is its session's running run, so FIFO within the session is kept."""
    candidate = RUNS.alias("resumed")
    return (
        select(candidate.c.id)
        .where(*_unclaimed_resumed(candidate))
        .order_by(candidate.c.updated_at, candidate.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


def _loading(statement: Any) -> Executable:
    """``statement`` returning every column, to be read back as the session's runs."""
    return statement.returning(*RUNS.c)


@dataclass(frozen=True, slots=True)
class RunStatements:
    """The statements of one dialect; the run statements return ``RUN_COLUMNS``."""

    create: Executable
    by_id: Executable
    transitions: dict[str, Executable]
    # PostgreSQL: the same with their lifecycle event in one statement; SQLite: None
    create_with_event: Executable | None
    transitions_with_event: dict[str, Executable] | None
    claim_with_event: Executable | None
    claim: Executable
    claim_resumed: Executable
    give_back: Executable
    give_back_with_event: Executable | None
    retry_expired: Executable
    heartbeat: Executable
    heartbeat_leased: Executable
    update_metrics: Executable
    fail_stale: Executable
    fail_expired_leases: Executable
    active_run: Executable
    lock_session: Executable
    first_active: Executable
    interrupt: Executable
    pages: dict[tuple[bool, bool], Executable]  # (status filter?, before cursor?) -> page
    by_status: Executable
    children: Executable
    latest_waiting: Executable
    delete: Executable


@cache
def run_statements(dialect: str) -> RunStatements:
    parent_run_id = bindparam("parent_run_id", type_=String())
    status = bindparam("status", type_=RUNS.c.status.type)
    # Not the column names: those are reserved for SET clauses of the same name.
    worker_id = bindparam("worker", type_=String())
    lease_expires_at = now_plus("lease_seconds")

    if dialect == POSTGRESQL:
        created_at: Any
        created_at, newest = NOW, None
    else:  # SQLite: after the session's newest run and the queue's (``run_created_at``)
        newest_run = RUNS.alias("newest_run")
        newest = select(
            func.max(
                func.coalesce(
                    select(func.max(newest_run.c.created_at))
                    .where(newest_run.c.session_id == SESSION_ID)
                    .scalar_subquery(),
                    EMPTY_TEXT,
                ),
                func.coalesce(
                    select(func.max(newest_run.c.created_at))
                    .where(newest_run.c.status == _literal(RunStatus.QUEUED))
                    .scalar_subquery(),
                    EMPTY_TEXT,
                ),
            ).label("created_at")
        ).subquery("newest")
        created_at = run_created_at(newest.c.created_at)
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
        "run_metadata": bindparam("run_metadata", type_=RUNS.c.run_metadata.type),
        "created_at": created_at,
        "updated_at": created_at,
    }
    created_row = select(*created_values.values())
    if newest is not None:
        created_row = created_row.select_from(newest)
    # Inserts nothing unless the session exists and the parent run is in it.
    # include_defaults=False: the columns not named take their server defaults
    # (attempt), not a parameter per Python-side default.
    create = RUNS.insert().from_select(
        list(created_values),
        created_row.where(
            exists().where(ChatSession.__table__.c.id == SESSION_ID),
            or_(
                parent_run_id.is_(None),
                exists().where(RUNS.c.id == parent_run_id, RUNS.c.session_id == SESSION_ID),
            ),
        ),
        include_defaults=False,
    )

    newest_first = (RUNS.c.created_at.desc(), RUNS.c.id.desc())
    pages: dict[tuple[bool, bool], Executable] = {}
    for filtered in (False, True):
        for after_cursor in (False, True):
            page = select(*RUNS.c).where(RUNS.c.session_id == SESSION_ID)
            if filtered:
                page = page.where(RUNS.c.status == status)
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
                    RUNS.c.created_at <= cursor.c.created_at,
                    or_(
                        RUNS.c.created_at < cursor.c.created_at,
                        RUNS.c.id < cursor.c.id,
                    ),
                )
            pages[filtered, after_cursor] = page.order_by(*newest_first).limit(LIMIT)

    other = RUNS.alias("other")
    transitions = {
        transition.name: _transition_update(dialect, transition).where(RUNS.c.id == RUN_ID)
        for transition in TRANSITIONS
    }
    claim = (
        _transition_update(dialect, START)
        .where(RUNS.c.id == _next_claimable())
        .values(worker_id=worker_id, lease_expires_at=lease_expires_at)
    )
    give_back = _transition_update(dialect, GIVE_BACK).where(
        RUNS.c.id == RUN_ID, RUNS.c.worker_id == worker_id
    )
    one_statement = dialect == POSTGRESQL
    return RunStatements(
        create=_loading(create),
        by_id=select(*RUNS.c).where(RUNS.c.id == RUN_ID),
        transitions={name: _loading(update) for name, update in transitions.items()},
        create_with_event=with_lifecycle_event(create) if one_statement else None,
        transitions_with_event=(
            {name: with_lifecycle_event(update) for name, update in transitions.items()}
            if one_statement
            else None
        ),
        claim_with_event=with_lifecycle_event(claim) if one_statement else None,
        claim=_loading(claim),
        claim_resumed=_loading(
            update(RUNS)
            .where(RUNS.c.id == _next_resumed(), *_unclaimed_resumed(RUNS))
            .values(
                worker_id=worker_id,
                lease_expires_at=lease_expires_at,
                attempt=RUNS.c.attempt + 1,
                updated_at=NOW,
            )
        ),
        give_back=_loading(give_back),
        give_back_with_event=with_lifecycle_event(give_back) if one_statement else None,
        retry_expired=_loading(
            _transition_update(dialect, RETRY_EXPIRED).where(
                RUNS.c.lease_expires_at < NOW,
                RUNS.c.attempt < bindparam("max_attempts", type_=RUNS.c.attempt.type),
            )
        ),
        heartbeat=_loading(
            update(RUNS)
            .where(RUNS.c.id == RUN_ID, RUNS.c.status == RunStatus.RUNNING)
            .where(RUNS.c.worker_id.is_(None))
            .values(updated_at=NOW)
        ),
        heartbeat_leased=_loading(
            update(RUNS)
            .where(RUNS.c.id == RUN_ID, RUNS.c.status == RunStatus.RUNNING)
            .where(RUNS.c.worker_id == worker_id)
            .values(updated_at=NOW, lease_expires_at=lease_expires_at)
        ),
        update_metrics=_loading(
            update(RUNS)
            .where(RUNS.c.id == RUN_ID)
            .values(metrics=merge_metrics(dialect), updated_at=NOW)
        ),
        fail_stale=_loading(
            _transition_update(dialect, FAIL).where(
                RUNS.c.lease_expires_at.is_(None),
                RUNS.c.updated_at < now_plus("cutoff_seconds"),
            )
        ),
        fail_expired_leases=_loading(
            _transition_update(dialect, FAIL).where(RUNS.c.lease_expires_at < NOW)
        ),
        active_run=select(
            RUNS.c.session_id,
            select(other.c.id)
            .where(other.c.session_id == RUNS.c.session_id, other.c.status == RunStatus.RUNNING)
            .scalar_subquery()
            .label("active_run_id"),
        ).where(RUNS.c.id == RUN_ID),
        # FOR NO KEY UPDATE: serializes the creates that check the session's runs
        # (reject, interrupt) without blocking inserts that reference the session.
        lock_session=select(ChatSession.__table__.c.id)
        .where(ChatSession.__table__.c.id == SESSION_ID)
        .with_for_update(key_share=True),
        first_active=select(RUNS.c.id, RUNS.c.status)
        .where(RUNS.c.session_id == SESSION_ID, _literal_in(RUNS.c.status, ACTIVE_STATUSES))
        .order_by(RUNS.c.created_at, RUNS.c.id)
        .limit(1),
        interrupt=_loading(
            _transition_update(dialect, CANCEL).where(
                RUNS.c.session_id == bindparam("busy_session", type_=String())
            )
        ),
        pages=pages,
        # Oldest first: the order in which a worker should pick queued runs.
        by_status=select(*RUNS.c)
        .where(RUNS.c.status == status)
        .order_by(RUNS.c.created_at, RUNS.c.id)
        .limit(LIMIT),
        children=select(*RUNS.c)
        .where(RUNS.c.parent_run_id == RUN_ID)
        .order_by(RUNS.c.created_at, RUNS.c.id),
        latest_waiting=select(*RUNS.c)
        .where(RUNS.c.session_id == SESSION_ID, RUNS.c.status == RunStatus.WAITING_INPUT)
        .order_by(*newest_first)
        .limit(1),
        delete=delete(RUNS).where(RUNS.c.id == RUN_ID),
    )
