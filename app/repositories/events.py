"""The event log of a session: ``seq`` allocation, de-duplication and replay.

How ``append`` allocates ``seq``
    Each session has a counter row in ``session_event_sequences`` (the v0.7
    table). One upsert takes the next number and locks that row until the
    transaction ends:

    * writers of one session queue on the lock, so their events commit in
      ``seq`` order (a reader polling with ``since_seq`` never skips an event
      that commits later), and a rollback gives its number back (no gap);
    * the counter moves to ``max(next_seq, MAX(seq) + 1) + 1``: the guard
      repairs a counter that a v0.7 writer (which reads the row and writes it
      back without a lock) left behind the real maximum;
    * the event is inserted with ``ON CONFLICT DO NOTHING``. If it collides with
      an event a v0.7 writer inserted meanwhile (unique ``(session_id, seq)``)
      or with the same ``event_id`` written concurrently, nothing is inserted,
      the number is given back and the allocation is retried or the stored event
      returned. No statement fails, so the caller's transaction stays usable
      without savepoints (a failed statement aborts a PostgreSQL transaction).

    On PostgreSQL the upsert and the insert are one statement (data-modifying
    CTEs): one round trip per append. SQLite has no DML in CTEs and runs them
    as two statements; its ``BEGIN IMMEDIATE`` transactions serialize writers.

    Limits: the transaction must use READ COMMITTED on PostgreSQL (the
    default). On a database adopted from v0.7 whose duplicate seqs kept the
    migration from creating ``uq_session_events_session_seq``, a v0.7 writer
    racing with ``append`` can still duplicate a number; the new code never
    reuses one that is committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, NoReturn

from sqlalchemy import (
    CursorResult,
    Executable,
    Integer,
    String,
    bindparam,
    cast,
    exists,
    func,
    or_,
    select,
    true,
    update,
)
from sqlmodel import Session as DbSession

from app.errors import BadParameterError, ConflictError, RunNotFoundError, SessionNotFoundError
from app.models import EventSource, Session, SessionEvent, SessionEventSequence, SessionRun
from app.repositories.params import (
    enum_param,
    json_object_param,
    optional_text_param,
    page_size,
    since_seq_param,
    text_param,
)
from app.repositories.rows import detached, execute_core, snapshots
from app.repositories.sql import LIMIT, NOW, POSTGRESQL, RUN_ID, SESSION_ID, greatest, insert_for
from app.state_machine import RUN_SCOPED_EVENT_TYPES
from app.types import utc_now

EVENTS = SessionEvent.__table__
SEQUENCES = SessionEventSequence.__table__
SESSIONS = Session.__table__
RUNS = SessionRun.__table__

EVENT_COLUMNS = tuple(column.key for column in EVENTS.c)
TYPE_MAX_LENGTH = EVENTS.c.type.type.length
EVENT_ID_MAX_LENGTH = 255
"""``event_id`` is in a unique index; PostgreSQL cannot index an entry over ~2.7 kB."""
ALLOCATION_ATTEMPTS = 5
"""Retries when v0.7 writers keep taking the number just allocated."""


@dataclass(frozen=True, slots=True)
class _Statements:
    """The statements of one dialect.

    Parameters: ``session_id``, ``run_id``, ``event_id``, ``now``, ``type``,
    ``payload``, ``source``, ``seq``; pages take ``since_seq`` and ``limit``.
    """

    allocate: Executable  # SQLite: upsert returning ``seq``; PostgreSQL: unused
    insert: Executable  # SQLite: insert returning ``id``; PostgreSQL: allocate + insert
    give_back: Executable
    by_event_id: Executable
    page_for_session: Executable
    page_for_run: Executable


@cache
def _statements(dialect: str) -> _Statements:
    event_id = bindparam("event_id", type_=String())
    next_free = (
        select(func.coalesce(func.max(EVENTS.c.seq), 0) + 1)
        .where(EVENTS.c.session_id == SESSION_ID)
        .scalar_subquery()
    )
    # Allocates only when the session exists, the run belongs to it and the
    # event_id is new; otherwise it returns no row and changes nothing.
    counter_row = select(SESSION_ID, next_free + 1, NOW).where(
        exists().where(SESSIONS.c.id == SESSION_ID),
        or_(
            RUN_ID.is_(None),
            exists().where(RUNS.c.id == RUN_ID, RUNS.c.session_id == SESSION_ID),
        ),
        ~exists().where(EVENTS.c.session_id == SESSION_ID, EVENTS.c.event_id == event_id),
    )
    upsert = insert_for(dialect)(SEQUENCES).from_select(
        ["session_id", "next_seq", "updated_at"], counter_row
    )
    allocate = upsert.on_conflict_do_update(
        index_elements=[SEQUENCES.c.session_id],
        set_={
            "next_seq": greatest(dialect, SEQUENCES.c.next_seq, next_free) + 1,
            "updated_at": upsert.excluded.updated_at,
        },
    ).returning((SEQUENCES.c.next_seq - 1).label("seq"))

    event_columns = ["session_id", "seq", "type", "payload", "source", "created_at"]
    event_columns.extend(["run_id", "event_id"])
    event_values = {
        "type": bindparam("type", type_=String()),
        "payload": bindparam("payload", type_=EVENTS.c.payload.type),
        "source": cast(bindparam("source", type_=String()), EVENTS.c.source.type),
    }
    if dialect == POSTGRESQL:
        allocated = allocate.cte("allocated")
        inserted = (
            insert_for(dialect)(EVENTS)
            .from_select(
                event_columns,
                select(
                    SESSION_ID,
                    allocated.c.seq,
                    *event_values.values(),
                    NOW,
                    RUN_ID,
                    event_id,
                ),
            )
            .on_conflict_do_nothing()
            .returning(EVENTS.c.id)
            .cte("inserted")
        )
        insert: Executable = select(allocated.c.seq, inserted.c.id).select_from(
            allocated.outerjoin(inserted, true())
        )
    else:
        insert = (
            insert_for(dialect)(EVENTS)
            .values(
                session_id=SESSION_ID,
                seq=bindparam("seq", type_=Integer()),
                created_at=NOW,
                run_id=RUN_ID,
                event_id=event_id,
                **event_values,
            )
            .on_conflict_do_nothing()
            .returning(EVENTS.c.id)
        )

    since = bindparam("since_seq", type_=Integer())
    run_session = select(RUNS.c.session_id).where(RUNS.c.id == RUN_ID).scalar_subquery()
    return _Statements(
        allocate=allocate,
        insert=insert,
        # "session_id" is reserved for the column in an UPDATE: another name.
        give_back=update(SEQUENCES)
        .where(SEQUENCES.c.session_id == bindparam("counter_session_id", type_=String()))
        .values(next_seq=bindparam("seq", type_=Integer()), updated_at=NOW),
        by_event_id=select(SessionEvent).where(
            SessionEvent.session_id == SESSION_ID, SessionEvent.event_id == event_id
        ),
        # Pages are Core selects read into detached events (``_page``).
        page_for_session=select(*EVENTS.c)
        .where(EVENTS.c.session_id == SESSION_ID, EVENTS.c.seq > since)
        .order_by(EVENTS.c.seq)
        .limit(LIMIT),
        # The session_id term lets idx_session_event_run_seq serve the query.
        page_for_run=select(*EVENTS.c)
        .where(
            EVENTS.c.session_id == run_session,
            EVENTS.c.run_id == RUN_ID,
            EVENTS.c.seq > since,
        )
        .order_by(EVENTS.c.seq)
        .limit(LIMIT),
    )


class EventRepository:
    """Appends to and reads the per-session event log; flushes, never commits.

    Pages (``list_for_*``) are snapshots in no session: events never change,
    and skipping the ORM's loading halves a page's cost (``app.repositories.rows``).
    """

    def __init__(self, session: DbSession) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name
        self._sql = _statements(self._dialect)

    def append(
        self,
        session_id: str,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        source: EventSource | str = EventSource.SESSION,
        run_id: str | None = None,
        event_id: str | None = None,
    ) -> SessionEvent:
        """Append an event with the session's next ``seq`` (see module docstring).

        With an ``event_id`` already stored for the session, the stored event
        comes back and nothing is written. Raises ``SessionNotFoundError``,
        ``RunNotFoundError`` (the run is not in that session) or
        ``BadParameterError`` (also for a run-scoped type without ``run_id``,
        see ``RUN_SCOPED_EVENT_TYPES``) before anything is written.
        """
        params = {
            "session_id": text_param(session_id, "session_id"),
            "type": text_param(type, "type", max_length=TYPE_MAX_LENGTH),
            "payload": json_object_param(payload, "payload"),
            "source": enum_param(EventSource, source, "source").value,
            "run_id": optional_text_param(run_id, "run_id"),
            "event_id": optional_text_param(event_id, "event_id", max_length=EVENT_ID_MAX_LENGTH),
        }
        if params["run_id"] is None and params["type"] in RUN_SCOPED_EVENT_TYPES:
            raise BadParameterError("run_id", f"required for the run-scoped event type {type}")
        for _attempt in range(ALLOCATION_ATTEMPTS):
            params["now"] = utc_now()
            seq, new_id = self._allocate_and_insert(params)
            if new_id is not None:
                return self._stored(new_id, seq, params)
            if seq is not None:
                self._give_back(session_id, seq, params["now"])
            stored = self._find_by_event_id(session_id, event_id)
            if stored is not None:
                return stored
            if seq is None:
                self._raise_not_found(session_id, run_id)
        raise ConflictError(
            f"session {session_id}: could not allocate an event seq in "
            f"{ALLOCATION_ATTEMPTS} attempts; older writers keep taking the same numbers"
        )

    def list_for_session(
        self, session_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> list[SessionEvent]:
        """Events of the session with ``seq > since_seq``, oldest first, legacy ones included."""
        params = {
            "session_id": text_param(session_id, "session_id"),
            "since_seq": since_seq_param(since_seq),
        }
        return self._page(self._sql.page_for_session, {**params, "limit": page_size(limit)})

    def list_for_run(
        self, run_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> list[SessionEvent]:
        """Events of the run with ``seq > since_seq`` (session seqs, not renumbered).

        An empty page of an unknown run raises ``RunNotFoundError``.
        """
        params = {"run_id": text_param(run_id, "run_id"), "since_seq": since_seq_param(since_seq)}
        events = self._page(self._sql.page_for_run, {**params, "limit": page_size(limit)})
        if not events and self._session.get(SessionRun, run_id) is None:
            raise RunNotFoundError(run_id)
        return events

    # ------------------------------------------------------------------

    def _execute(self, statement: Executable, params: dict[str, Any]) -> CursorResult[Any]:
        return execute_core(self._session, statement, params)

    def _allocate_and_insert(self, params: dict[str, Any]) -> tuple[int | None, int | None]:
        """(allocated seq, new event id); ``(seq, None)`` when the insert collided."""
        if self._dialect == POSTGRESQL:
            row = self._execute(self._sql.insert, params).first()
            return (None, None) if row is None else (row.seq, row.id)
        seq = self._execute(self._sql.allocate, params).scalar()
        if seq is None:
            return None, None
        return seq, self._execute(self._sql.insert, {**params, "seq": seq}).scalar()

    def _give_back(self, session_id: str, seq: int, now: datetime) -> None:
        """Undo an allocation whose insert collided; this transaction still holds the row."""
        params = {"counter_session_id": session_id, "seq": seq, "now": now}
        self._execute(self._sql.give_back, params)

    def _stored(self, new_id: int, seq: int, params: dict[str, Any]) -> SessionEvent:
        """The event just inserted, attached to the session as a loaded row."""
        event = detached(
            SessionEvent,
            {
                "id": new_id,
                "session_id": params["session_id"],
                "seq": seq,
                "type": params["type"],
                "payload": params["payload"],
                "source": EventSource(params["source"]),
                "created_at": params["now"],
                "run_id": params["run_id"],
                "event_id": params["event_id"],
            },
        )
        self._session.add(event)
        return event

    def _find_by_event_id(self, session_id: str, event_id: str | None) -> SessionEvent | None:
        if event_id is None:
            return None
        params = {"session_id": session_id, "event_id": event_id}
        return self._session.execute(self._sql.by_event_id, params).scalar_one_or_none()

    def _raise_not_found(self, session_id: str, run_id: str | None) -> NoReturn:
        """Explain why nothing was allocated although the event_id is not stored."""
        if self._session.get(Session, session_id) is None:
            raise SessionNotFoundError(session_id)
        raise RunNotFoundError(str(run_id), session_id=session_id)

    def _page(self, statement: Executable, params: dict[str, Any]) -> list[SessionEvent]:
        """Snapshots, not session objects: an event never changes (see ``rows``)."""
        return snapshots(SessionEvent, EVENT_COLUMNS, self._execute(statement, params))


__all__ = ["EventRepository"]
