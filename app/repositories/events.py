"""The event log of a session: ``seq`` allocation, de-duplication and replay.

``append`` gives the session's next ``seq`` without duplicates or gaps among
committed events, also next to v0.7 writers; writers of one session commit in
``seq`` order; a known ``event_id`` returns the stored event; no statement of
an append fails inside the caller's transaction. Pages are snapshots that
belong to no session. The transaction must use READ COMMITTED on PostgreSQL.

Contract: docs/reference.md (EventRepository). How and why: docs/design.md
(``seq`` allocation).

On PostgreSQL ``append`` and ``append_many`` call ``pg_notify`` (channel
``EVENTS_CHANNEL``, payload the session id) in their statement, so a commit
wakes ``app.feed``'s followers; bursts: docs/events.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, NoReturn

from sqlalchemy import (
    Executable,
    Integer,
    String,
    bindparam,
    cast,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlmodel import Session as DbSession

from app._params import (
    described,
    enum_param,
    json_object_param,
    optional_text_param,
    page_size,
    since_seq_param,
    text_param,
)
from app.errors import (
    BadParameterError,
    ConflictError,
    RunNotFoundError,
    SessionNotFoundError,
)
from app.json_codec import dumps, dumps_transport
from app.models import ChatSession, EventSource, SessionEvent, SessionEventSequence, SessionRun
from app.repositories._batch import append_many_statements
from app.repositories._driver import Rows, execute_core, execute_overlapped
from app.repositories._rows import inserted, register_inserted, snapshots, track_json
from app.repositories._sql import (
    EVENTS_CHANNEL,
    LIMIT,
    NOW,
    POSTGRESQL,
    RUN_EXISTS,
    RUN_ID,
    SESSION_EXISTS,
    SESSION_ID,
    greatest,
    insert_for,
)
from app.state_machine import LIFECYCLE_EVENT_TYPES, RUN_SCOPED_EVENT_TYPES
from app.types import max_json_bytes

EVENTS = SessionEvent.__table__
SEQUENCES = SessionEventSequence.__table__
SESSIONS = ChatSession.__table__
RUNS = SessionRun.__table__

EVENT_COLUMNS = tuple(column.key for column in EVENTS.c)
TYPE_MAX_LENGTH = EVENTS.c.type.type.length
EVENT_ID_MAX_LENGTH = 255
"""``event_id`` is in a unique index; PostgreSQL cannot index an entry over ~2.7 kB."""
OVERLAP_MIN_EVENTS = 32
"""PostgreSQL: from this many events, ``append_many`` builds its instances while the
database inserts the batch (``execute_overlapped``); below it the round trip that
overlapping costs is more than the work it hides."""
ALLOCATION_ATTEMPTS = 5
"""Retries when v0.7 writers keep taking the number just allocated."""

MAX_BATCH = 1000
"""Most events one ``append_many`` call takes (one JSON parameter, one statement)."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event of an ``append_many`` batch: the arguments of ``append``."""

    type: str
    payload: dict[str, Any] | None = None
    source: EventSource | str = EventSource.SESSION
    run_id: str | None = None
    event_id: str | None = None


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
            .returning(EVENTS.c.id, EVENTS.c.created_at)
            .cte("inserted")
        )
        # The commit notice for app.feed: one function call in the same statement.
        notified = (
            select(func.pg_notify(literal(EVENTS_CHANNEL, String()), SESSION_ID))
            .select_from(allocated)
            .cte("notified")
        )
        insert: Executable = select(
            allocated.c.seq, inserted.c.id, inserted.c.created_at
        ).select_from(allocated.join(notified, true()).outerjoin(inserted, true()))
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
            .returning(EVENTS.c.id, EVENTS.c.created_at)
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
    and skipping the ORM's loading halves a page's cost (``app.repositories._rows``).
    """

    def __init__(self, session: DbSession) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name
        self._sql = _statements(self._dialect)
        self._batch_sql = append_many_statements(self._dialect)

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
        ``BadParameterError`` before anything is written: also for a run-scoped
        type without ``run_id`` (``RUN_SCOPED_EVENT_TYPES``) and for a lifecycle
        type (``LIFECYCLE_EVENT_TYPES``: ``RunRepository`` writes those with the
        run's change); ``append_many`` keeps the same rules (``_checked_item``).
        """
        limit = max_json_bytes()  # read once for the call's arguments
        params = {
            "session_id": text_param(session_id, "session_id", max_bytes=limit),
            **_checked_item(NewEvent(type, payload, source, run_id, event_id), limit, _ITEM_FIELDS),
        }
        written = self._write(params)
        if isinstance(written, SessionEvent):
            return written
        return self._stored(*written, params)

    def write_lifecycle_event(
        self, session_id: str, type: str, payload: dict[str, Any], run_id: str
    ) -> None:
        """``append`` for ``RunRepository``'s lifecycle events, whose arguments it has
        checked: the event is written, no instance of it is made (the caller returns
        the run; readers get events from the pages)."""
        params = {
            "session_id": session_id,
            "type": type,
            "payload": payload,
            "source": EventSource.SESSION.value,
            "run_id": run_id,
            "event_id": None,
        }
        self._write(params)

    def write_lifecycle_events(
        self, session_id: str, type: str, payload: dict[str, Any], run_ids: Sequence[str]
    ) -> None:
        """``write_lifecycle_event`` for many runs of one session (an ``interrupt``
        create cancelling every active run): consecutive seqs in the order given, in
        batches of ``MAX_BATCH``, all in the caller's transaction."""
        item = {"type": type, "payload": payload, "source": EventSource.SESSION.value}
        for start in range(0, len(run_ids), MAX_BATCH):
            chunk = run_ids[start : start + MAX_BATCH]
            self._append_checked(
                session_id, [{**item, "run_id": run_id, "event_id": None} for run_id in chunk]
            )

    def _write(self, params: dict[str, Any]) -> tuple[int, int, datetime] | SessionEvent:
        """(new event id, seq, created_at), or the stored event of a known ``event_id``."""
        session_id, event_id = params["session_id"], params["event_id"]
        for _attempt in range(ALLOCATION_ATTEMPTS):
            seq, new_id, created_at = self._allocate_and_insert(params)
            if new_id is not None:
                return new_id, seq, created_at
            if seq is not None:
                self._give_back(session_id, seq)
            stored = self._find_by_event_id(session_id, event_id)
            if stored is not None:
                return stored
            if seq is None:
                self._raise_not_found(session_id, params["run_id"])
        raise ConflictError(
            f"session {session_id}: could not allocate an event seq in "
            f"{ALLOCATION_ATTEMPTS} attempts; older writers keep taking the same numbers"
        )

    def append_many(
        self, session_id: str, events: Sequence[NewEvent | Mapping[str, Any]]
    ) -> list[SessionEvent]:
        """Append a burst of events in one statement, with consecutive seqs in the order given.

        Each item is a ``NewEvent`` (or a mapping of its fields) and is checked
        as ``append`` checks its arguments; one bad item raises
        ``BadParameterError`` naming it (``events[3].type``) and nothing is
        written. Returns one event per item, in order: an ``event_id`` already
        stored comes back as stored and takes no seq; an ``event_id`` repeated
        in the batch is stored once (the first item) and returned for each.
        Raises ``SessionNotFoundError`` / ``RunNotFoundError`` as ``append``
        does. At most ``MAX_BATCH`` items (docs/events.md).
        """
        session_id = text_param(session_id, "session_id")
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
            raise BadParameterError(
                "events", f"expected a sequence of events, got {described(events)}"
            )
        if len(events) > MAX_BATCH:
            raise BadParameterError("events", f"at most {MAX_BATCH} per call, got {len(events)}")
        limit = max_json_bytes()  # read once for the batch, not three times an item
        items = [_batch_item(index, item, limit) for index, item in enumerate(events)]
        return self._append_checked(session_id, items)

    def _append_checked(self, session_id: str, items: list[dict[str, Any]]) -> list[SessionEvent]:
        """``append_many`` of items already checked (``_checked_item``), at most ``MAX_BATCH``."""
        firsts: dict[str, dict[str, Any]] = {}
        unique = []
        for item in items:
            if item["event_id"] is None or item["event_id"] not in firsts:
                unique.append(item)
                if item["event_id"] is not None:
                    firsts[item["event_id"]] = item
        stored: dict[int, SessionEvent] = {}  # id(item) -> event
        for _attempt in range(ALLOCATION_ATTEMPTS):
            pending = [item for item in unique if id(item) not in stored]
            if not pending:
                break
            stored.update(self._insert_batch(session_id, pending))
        else:
            raise ConflictError(
                f"session {session_id}: could not allocate event seqs in "
                f"{ALLOCATION_ATTEMPTS} attempts; older writers keep taking the same numbers"
            )
        return [
            stored[id(item if item["event_id"] is None else firsts[item["event_id"]])]
            for item in items
        ]

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
        if not events and not self._session.scalar(RUN_EXISTS, {"run_id": run_id}):
            raise RunNotFoundError(run_id)
        return events

    # ------------------------------------------------------------------

    def _execute(self, statement: Executable, params: dict[str, Any]) -> Rows:
        return execute_core(self._session, statement, params)

    def _allocate_and_insert(self, params: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(allocated seq, new event id, its created_at); ``(seq, None, None)`` when the
        insert collided, ``(None, None, None)`` when nothing was allocated."""
        if self._dialect == POSTGRESQL:
            row = self._execute(self._sql.insert, params).first()
            return (None, None, None) if row is None else row  # seq, id, created_at
        seq = self._execute(self._sql.allocate, params).scalar()
        if seq is None:
            return None, None, None
        row = self._execute(self._sql.insert, {**params, "seq": seq}).first()
        return (seq, None, None) if row is None else (seq, *row)

    def _insert_batch(
        self, session_id: str, pending: list[dict[str, Any]]
    ) -> dict[int, SessionEvent]:
        """One allocation and multi-row insert of ``pending`` (see ``app.repositories._batch``).

        Returns the events it could settle, keyed by ``id(item)``: all of them,
        or after a collision none inserted (they are undone) but those whose
        ``event_id`` turned out to be stored.
        """
        run_ids = sorted({item["run_id"] for item in pending if item["run_id"] is not None})

        tracked = False

        def build() -> list[SessionEvent]:
            """The events but for their ids and seqs, JSON tracked if that can be done
            before they join the session (on PostgreSQL, while the database inserts them)."""
            nonlocal tracked
            values = [
                (
                    None,
                    session_id,
                    None,
                    item["type"],
                    item["payload"],
                    _SOURCES[item["source"]],
                    None,  # created_at: the database's, from the rows
                    item["run_id"],
                    item["event_id"],
                )
                for item in pending
            ]
            events = snapshots(SessionEvent, EVENT_COLUMNS, values)
            tracked = track_json(SessionEvent, events)
            return events

        first_seq, rows, events = self._run_batch(session_id, pending, run_ids, build)
        if first_seq is None:
            self._raise_batch_not_found(session_id, run_ids)
        if len(rows) == len(pending):
            for position, event in enumerate(events):
                seq = first_seq + position
                values = event.__dict__  # fresh instances: no attribute events to pass
                new_id, created_at = rows[seq]
                values["id"], values["seq"] = new_id, seq
                values["created_at"] = created_at
            register_inserted(self._session, SessionEvent, events, tracked=tracked)
            return {id(item): event for item, event in zip(pending, events, strict=True)}
        if rows:
            self._execute(_BATCH_UNDO, {"ids": [new_id for new_id, _ in rows.values()]})
        self._give_back(session_id, first_seq)
        event_ids = [item["event_id"] for item in pending if item["event_id"] is not None]
        found = {
            event.event_id: event
            for event in self._session.execute(
                _BATCH_LOOKUP, {"session_id": session_id, "event_ids": event_ids}
            ).scalars()
        }
        return {id(item): found[item["event_id"]] for item in pending if item["event_id"] in found}

    def _run_batch(
        self,
        session_id: str,
        pending: list[dict[str, Any]],
        run_ids: list[str],
        build: Callable[[], list[SessionEvent]],
    ) -> tuple[int | None, dict[int, tuple[int, Any]], list[SessionEvent]]:
        """(first allocated seq or None, {seq: (new event id, created_at)} of the rows
        inserted, ``build()``'s events)."""
        # Items carry type, payload, source, run_id and event_id (``_checked_item``).
        params: dict[str, Any] = {"session_id": session_id, "count": len(pending)}
        params["run_ids"] = dumps_transport(run_ids)
        if self._dialect == POSTGRESQL:
            params["items"] = dumps_transport(
                [{**item, "position": position} for position, item in enumerate(pending)]
            )
            if len(pending) >= OVERLAP_MIN_EVENTS:
                result, events = execute_overlapped(
                    self._session, self._batch_sql[0], params, build
                )
            else:
                result, events = self._execute(self._batch_sql[0], params), build()
            if not result.rows:  # (first_seq, id, seq, created_at) rows
                return None, {}, events
            first_seq = result.rows[0][0]
            inserted = {seq: (id_, at) for _, id_, seq, at in result if id_ is not None}
            return first_seq, inserted, events
        first_seq = self._execute(self._batch_sql[0], params).scalar()
        if first_seq is None:
            return None, {}, []
        params["first_seq"] = first_seq
        params["items"] = dumps_transport(
            [
                # The payload's text as append stores it (the engine's serializer).
                {**item, "position": position, "payload": dumps(item["payload"])}
                for position, item in enumerate(pending)
            ]
        )
        inserted_rows = self._execute(self._batch_sql[1], params)  # (id, seq, created_at)
        return first_seq, {seq: (id_, at) for id_, seq, at in inserted_rows}, build()

    def _raise_batch_not_found(self, session_id: str, run_ids: list[str]) -> NoReturn:
        for run_id in run_ids:
            params = {"session_id": session_id, "run_id": run_id}
            if not self._session.scalar(_RUN_IN_SESSION, params):
                self._raise_not_found(session_id, run_id)
        self._raise_not_found(session_id, None)

    def give_back(self, session_id: str, seq: int) -> None:
        """Undo an allocation whose insert collided (see ``_give_back``)."""
        self._give_back(session_id, seq)

    def _give_back(self, session_id: str, seq: int) -> None:
        """Undo an allocation whose insert collided; this transaction still holds the row."""
        params = {"counter_session_id": session_id, "seq": seq}
        self._execute(self._sql.give_back, params)

    def _stored(
        self, new_id: int, seq: int, created_at: datetime, params: dict[str, Any]
    ) -> SessionEvent:
        """The event just inserted, in the session as if the ORM had inserted it."""
        return inserted(
            self._session,
            SessionEvent,
            {
                "id": new_id,
                "session_id": params["session_id"],
                "seq": seq,
                "type": params["type"],
                "payload": params["payload"],
                "source": EventSource(params["source"]),
                "created_at": created_at,
                "run_id": params["run_id"],
                "event_id": params["event_id"],
            },
        )

    def _find_by_event_id(self, session_id: str, event_id: str | None) -> SessionEvent | None:
        if event_id is None:
            return None
        params = {"session_id": session_id, "event_id": event_id}
        return self._session.execute(self._sql.by_event_id, params).scalar_one_or_none()

    def _raise_not_found(self, session_id: str, run_id: str | None) -> NoReturn:
        """Explain why nothing was allocated although the event_id is not stored."""
        if not self._session.scalar(SESSION_EXISTS, {"session_id": session_id}):
            raise SessionNotFoundError(session_id)
        raise RunNotFoundError(str(run_id), session_id=session_id)

    def _page(self, statement: Executable, params: dict[str, Any]) -> list[SessionEvent]:
        """Snapshots, not session objects: an event never changes (see ``rows``)."""
        return snapshots(SessionEvent, EVENT_COLUMNS, self._execute(statement, params))


_BATCH_UNDO = delete(EVENTS).where(EVENTS.c.id.in_(bindparam("ids", expanding=True)))
_BATCH_LOOKUP = select(SessionEvent).where(
    SessionEvent.session_id == SESSION_ID,
    SessionEvent.event_id.in_(bindparam("event_ids", expanding=True)),
)
_RUN_IN_SESSION = select(exists().where(RUNS.c.id == RUN_ID, RUNS.c.session_id == SESSION_ID))


_ITEM_FIELDS = ("type", "payload", "source", "run_id", "event_id")
_SOURCES = {member.value: member for member in EventSource}


def _batch_item(index: int, item: NewEvent | Mapping[str, Any], limit: int) -> dict[str, Any]:
    """``item`` checked as ``append`` checks its arguments; errors name ``events[index]``."""
    try:
        return _checked_item(item, limit, _ITEM_FIELDS)
    except BadParameterError:
        pass  # checked again below, outside this block, so that no error is chained
    # Only to raise with the item's place in every name.
    where = f"events[{index}]"
    return _checked_item(item, limit, tuple(f"{where}.{name}" for name in _ITEM_FIELDS), where)


def _checked_item(
    item: NewEvent | Mapping[str, Any], limit: int, names: tuple[str, ...], where: str = "events"
) -> dict[str, Any]:
    """An event's arguments checked as ``append`` and ``append_many`` take them; errors
    name each argument by ``names`` (type, payload, source, run_id, event_id) and
    describe a bad one by its type and size, never by its content."""
    if isinstance(item, Mapping):
        item = _from_mapping(item, where)
    if not isinstance(item, NewEvent):
        raise BadParameterError(where, f"expected a NewEvent or a mapping, got {described(item)}")
    type_name, payload_name, source_name, run_id_name, event_id_name = names
    checked = {
        "type": text_param(item.type, type_name, max_length=TYPE_MAX_LENGTH, max_bytes=limit),
        "payload": json_object_param(item.payload, payload_name, max_bytes=limit),
        "source": enum_param(EventSource, item.source, source_name).value,
        "run_id": optional_text_param(item.run_id, run_id_name, max_bytes=limit),
        "event_id": optional_text_param(
            item.event_id, event_id_name, max_length=EVENT_ID_MAX_LENGTH, max_bytes=limit
        ),
    }
    _check_type_rules(checked["type"], checked["run_id"], type_name, run_id_name)
    return checked


def _from_mapping(item: Mapping[str, Any], where: str) -> NewEvent:
    """A ``NewEvent`` of a mapping of its fields; the error names none of the mapping's
    keys and is raised outside the ``except`` block (the TypeError quotes a key)."""
    try:
        return NewEvent(**item)
    except TypeError:
        pass
    raise BadParameterError(
        where,
        f"expected the fields of NewEvent {NewEvent.__slots__} (type required), "
        f"got {described(item)}",
    )


def _check_type_rules(type: str, run_id: str | None, type_name: str, run_id_name: str) -> None:
    """The rules of event types, one for ``append`` and ``append_many``: a run-scoped type
    needs its run; a lifecycle type is ``RunRepository``'s alone (its own writes,
    ``write_lifecycle_event(s)``, do not come through here)."""
    if run_id is None and type in RUN_SCOPED_EVENT_TYPES:
        raise BadParameterError(run_id_name, f"required for the run-scoped event type {type}")
    if type in LIFECYCLE_EVENT_TYPES:
        raise BadParameterError(
            type_name,
            f"{type} is a lifecycle event type: RunRepository writes it with the run's "
            "change (start, wait_for_input, resume, complete, fail, cancel); "
            "append another type",
        )


__all__ = ["MAX_BATCH", "EventRepository", "NewEvent"]
