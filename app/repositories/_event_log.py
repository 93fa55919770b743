"""The event log's write rule, in one place: ``seq`` allocation, the insert, the
number given back after a collision, and the commit notice.

The rule (why: docs/design.md, ``seq`` allocation):

- each session has a counter row in ``session_event_sequences``; one upsert takes
  the next numbers and locks that row until the transaction ends, so writers of one
  session commit in ``seq`` order and a rollback leaves no gap;
- the counter moves to ``max(next_seq, MAX(seq) + 1) + n`` (``_next_free``): the
  guard repairs a counter a v0.7 writer left behind the real maximum;
- events are inserted with ``ON CONFLICT DO NOTHING``: after a collision (a v0.7
  writer's number, an ``event_id`` written concurrently) the rows are undone, the
  numbers given back (``give_back``) and the allocation retried or the stored event
  returned; no statement fails, so the caller's transaction stays usable;
- on PostgreSQL the statement that allocates also calls ``pg_notify`` (channel
  ``EVENTS_CHANNEL``, payload the session id), so a commit wakes ``app.feed``.

It has three shapes, one per way events are written, all built here:

- ``log_statements(dialect)``: one event (``EventRepository.append``; lifecycle
  events on SQLite and after a collision);
- ``with_lifecycle_event(statement)``: PostgreSQL, a run's INSERT or UPDATE and its
  lifecycle event in one statement (``RunRepository``);
- ``append_many_statements(dialect)``: a batch, as fixed SQL text with one JSON
  parameter, the same for 1 or 1,000 events (``append_many``, ``interrupt``).

``EventLog`` runs them in the caller's transaction (retries, giving numbers back,
instances of the new events); ``EventRepository`` checks the caller's arguments
and ``RunRepository`` writes its lifecycle events through it. The SQL each renders
to: ``docs/sql/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, NoReturn

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Executable,
    Integer,
    Select,
    String,
    bindparam,
    cast,
    column,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlmodel import Session as DbSession
from sqlmodel import col

from app.errors import ConflictError, RunNotFoundError, SessionNotFoundError
from app.json_codec import JSONText, dumps, dumps_transport
from app.models import ChatSession, EventSource, SessionEvent, SessionEventSequence, SessionRun
from app.repositories._driver import Rows, execute_core, execute_overlapped
from app.repositories._rows import inserted, register_inserted, snapshots, track_json
from app.repositories._sql import (
    EVENTS_CHANNEL,
    NOW,
    POSTGRESQL,
    RUN_ID,
    SESSION_EXISTS,
    SESSION_ID,
    SQLITE,
    greatest,
    insert_for,
    now_text,
)
from app.types import UTCDateTime

EVENTS = SessionEvent.__table__
SEQUENCES = SessionEventSequence.__table__
SESSIONS = ChatSession.__table__
RUNS = SessionRun.__table__

EVENT_COLUMNS = tuple(column.key for column in EVENTS.c)
MAX_BATCH = 1000
"""Most events one ``append_many`` call takes (one JSON parameter, one statement)."""
OVERLAP_MIN_EVENTS = 32
"""PostgreSQL: from this many events, ``append_many`` builds its instances while the
database inserts the batch (``execute_overlapped``); below it the round trip that
overlapping costs is more than the work it hides."""
ALLOCATION_ATTEMPTS = 5
"""Retries when v0.7 writers keep taking the number just allocated."""

_COUNTER_COLUMNS = ["session_id", "next_seq", "updated_at"]


# --------------------------------------------------------------------------
# The rule's parts, shared by the Core statements


def _next_free(session_id: Any, label: str | None = None) -> Select[Any]:
    """``MAX(seq) + 1`` of the session's events (1 for none): the first number no
    stored event holds, the counter's floor."""
    value: ColumnElement[Any] = func.coalesce(func.max(EVENTS.c.seq), 0) + 1
    return select(value if label is None else value.label(label)).where(
        EVENTS.c.session_id == session_id
    )


def _take_numbers(
    dialect: str,
    rows: Select[Any],
    next_seq: Callable[[Any], ColumnElement[Any]],
    *returning: ColumnElement[Any],
) -> Any:
    """The counter upsert: insert ``rows`` (session_id, next_seq, updated_at) into the
    session's counter row or, when it exists, move it to ``next_seq(excluded)``; the
    row stays locked until the transaction ends."""
    upsert = insert_for(dialect)(SEQUENCES).from_select(_COUNTER_COLUMNS, rows)
    return upsert.on_conflict_do_update(
        index_elements=[SEQUENCES.c.session_id],
        set_={"next_seq": next_seq(upsert.excluded), "updated_at": upsert.excluded.updated_at},
    ).returning(*returning)


def _insert_events(columns: list[str], rows: Select[Any], *returning: Any) -> Any:
    """PostgreSQL: the events of ``rows``, skipping any that collides (``DO NOTHING``)."""
    return (
        postgresql.insert(EVENTS)
        .from_select(columns, rows)
        .on_conflict_do_nothing()
        .returning(*returning)
        .cte("inserted")
    )


def _notified(session_id: Any, allocated: Any) -> Any:
    """PostgreSQL: the commit notice for ``app.feed``, one function call in the
    statement that allocated (sent when, and only if, the transaction commits)."""
    return (
        select(func.pg_notify(literal(EVENTS_CHANNEL, String()), session_id))
        .select_from(allocated)
        .cte("notified")
    )


# --------------------------------------------------------------------------
# One event


@dataclass(frozen=True, slots=True)
class LogStatements:
    """The one-event statements of one dialect.

    Parameters: ``session_id``, ``run_id``, ``event_id``, ``type``, ``payload``,
    ``source``; SQLite's insert also ``seq``; ``give_back``: ``counter_session_id``
    and ``seq``.
    """

    allocate: Executable  # SQLite: upsert returning ``seq``; PostgreSQL: unused
    insert: Executable  # SQLite: insert returning ``id``; PostgreSQL: allocate + insert
    give_back: Executable
    by_event_id: Executable


@cache
def log_statements(dialect: str) -> LogStatements:
    event_id = bindparam("event_id", type_=String())
    next_free = _next_free(SESSION_ID).scalar_subquery()
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
    allocate = _take_numbers(
        dialect,
        counter_row,
        lambda excluded: greatest(dialect, SEQUENCES.c.next_seq, next_free) + 1,
        (SEQUENCES.c.next_seq - 1).label("seq"),
    )

    event_columns = ["session_id", "seq", "type", "payload", "source", "created_at"]
    event_columns.extend(["run_id", "event_id"])
    event_values = {
        "type": bindparam("type", type_=String()),
        "payload": bindparam("payload", type_=EVENTS.c.payload.type),
        "source": cast(bindparam("source", type_=String()), EVENTS.c.source.type),
    }
    if dialect == POSTGRESQL:
        allocated = allocate.cte("allocated")
        inserted = _insert_events(
            event_columns,
            select(SESSION_ID, allocated.c.seq, *event_values.values(), NOW, RUN_ID, event_id),
            EVENTS.c.id,
            EVENTS.c.created_at,
        )
        notified = _notified(SESSION_ID, allocated)
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
    return LogStatements(
        allocate=allocate,
        insert=insert,
        # "session_id" is reserved for the column in an UPDATE: another name.
        give_back=update(SEQUENCES)
        .where(SEQUENCES.c.session_id == bindparam("counter_session_id", type_=String()))
        .values(next_seq=bindparam("seq", type_=Integer()), updated_at=NOW),
        by_event_id=select(SessionEvent).where(
            col(SessionEvent.session_id) == SESSION_ID, col(SessionEvent.event_id) == event_id
        ),
    )


# --------------------------------------------------------------------------
# A run's change and its lifecycle event (PostgreSQL)


def with_lifecycle_event(statement: Any) -> Executable:
    """PostgreSQL: ``statement`` (an INSERT or UPDATE of one run) and its lifecycle
    event in **one** statement, with data-modifying CTEs: one round trip instead of two.

    The event is ``append``'s, for the run the statement returned: the session's
    counter row is upserted (locked after the run row, the layer's lock order) to
    ``max(next_seq, MAX(seq) + 1) + 1``, the event inserted with ``ON CONFLICT DO
    NOTHING`` and the commit notice sent. Parameters: the statement's, plus
    ``event_type`` and ``event_payload``. Returns the run's columns, then
    ``event_seq`` (NULL when no run was written) and ``event_row_id`` (NULL when the
    insert collided): ``EventLog.settle_lifecycle_event`` reads those two.
    """
    moved = statement.returning(*RUNS.c).cte("moved")
    free = _next_free(select(moved.c.session_id).scalar_subquery(), "next_free").cte("free")
    # excluded.next_seq is MAX(seq) + 2: the same as append's
    # greatest(next_seq, MAX(seq) + 1) + 1, without a subquery in the SET clause.
    allocated = _take_numbers(
        POSTGRESQL,
        select(moved.c.session_id, free.c.next_free + 1, NOW).select_from(moved.join(free, true())),
        lambda excluded: func.greatest(SEQUENCES.c.next_seq + 1, excluded.next_seq),
        SEQUENCES.c.session_id,
        (SEQUENCES.c.next_seq - 1).label("seq"),
    ).cte("allocated")
    inserted = _insert_events(
        ["session_id", "seq", "type", "payload", "source", "created_at", "run_id"],
        select(
            allocated.c.session_id,
            allocated.c.seq,
            bindparam("event_type", type_=String()),
            bindparam("event_payload", type_=EVENTS.c.payload.type),
            cast(literal(EventSource.SESSION.value, String()), EVENTS.c.source.type),
            NOW,
            moved.c.id,
        ).select_from(allocated.join(moved, true())),
        EVENTS.c.id,
    )
    notified = _notified(allocated.c.session_id, allocated)
    return select(
        *moved.c,
        allocated.c.seq.label("event_seq"),
        inserted.c.id.label("event_row_id"),
    ).select_from(
        moved.outerjoin(allocated, true()).outerjoin(notified, true()).outerjoin(inserted, true())
    )


# --------------------------------------------------------------------------
# A batch, as SQL text
#
# The batch travels as **one JSON parameter** (an array of items, each with its
# ``position`` among the new events) and the database unpacks it
# (``jsonb_to_recordset`` on PostgreSQL, ``json_each`` on SQLite). The statements
# are therefore fixed texts, the same for 1 or 1,000 events: nothing is compiled
# per batch size, and the SQL can be read below as it is sent. The rule is the one
# above, for N numbers at once: the counter moves to ``max(next_seq, MAX(seq) + 1)
# + N`` (``_NEXT_FREE`` is ``_next_free``), the events take ``first_seq + position``
# and the database's clock as ``created_at`` (one for the batch). On PostgreSQL the
# upsert, the insert and the notice are one statement; SQLite runs two. When fewer
# rows come back than were sent, ``EventLog`` deletes the rows just inserted, gives
# the numbers back, looks the stored events up and allocates the rest again.

_NEXT_FREE = "(SELECT coalesce(max(seq), 0) + 1 FROM session_events WHERE session_id = :session_id)"

# Allocates only when the session exists and every run of the batch belongs to it.
_ALLOCATE = """\
INSERT INTO session_event_sequences AS counter (session_id, next_seq, updated_at)
SELECT :session_id, {next_free} + :count, {now}
WHERE EXISTS (SELECT 1 FROM sessions WHERE sessions.id = :session_id)
  AND NOT EXISTS (
    SELECT 1 FROM {run_ids}
    WHERE NOT EXISTS (
      SELECT 1 FROM session_runs
      WHERE session_runs.id = batch_run.{run_id} AND session_runs.session_id = :session_id))
ON CONFLICT (session_id) DO UPDATE
SET next_seq = {greatest}(counter.next_seq, {next_free}) + :count,
    updated_at = excluded.updated_at
RETURNING next_seq - :count AS first_seq"""

_APPEND_MANY_POSTGRESQL = """\
WITH allocated AS (
{allocate}
), inserted AS (
INSERT INTO session_events (session_id, seq, type, payload, source, created_at, run_id, event_id)
SELECT :session_id, allocated.first_seq + item.position, item.type, item.payload,
       CAST(item.source AS session_event_source), {now}, item.run_id, item.event_id
FROM allocated CROSS JOIN jsonb_to_recordset(CAST(:items AS jsonb)) AS item(
    position integer, type text, payload jsonb, source text, run_id text, event_id text)
ON CONFLICT DO NOTHING
RETURNING id, seq, created_at
), notified AS (
SELECT pg_notify(:channel, :session_id) FROM allocated
)
SELECT allocated.first_seq, inserted.id, inserted.seq, inserted.created_at
FROM allocated CROSS JOIN notified LEFT JOIN inserted ON true"""
APPEND_MANY_POSTGRESQL = _APPEND_MANY_POSTGRESQL.format(
    allocate=_ALLOCATE.format(
        next_free=_NEXT_FREE,
        run_ids="jsonb_array_elements_text(CAST(:run_ids AS jsonb)) AS batch_run(run_id)",
        run_id="run_id",
        greatest="greatest",
        now=now_text(POSTGRESQL),
    ),
    now=now_text(POSTGRESQL),
)

ALLOCATE_MANY_SQLITE = _ALLOCATE.format(
    next_free=_NEXT_FREE,
    run_ids="json_each(:run_ids) AS batch_run",
    run_id="value",
    greatest="max",
    now=now_text(SQLITE),
)

# WHERE true: SQLite's parser needs a WHERE before ON CONFLICT in INSERT ... SELECT.
_INSERT_MANY_SQLITE = """\
INSERT INTO session_events (session_id, seq, type, payload, source, created_at, run_id, event_id)
SELECT :session_id, :first_seq + json_extract(item.value, '$.position'),
       json_extract(item.value, '$.type'), json_extract(item.value, '$.payload'),
       json_extract(item.value, '$.source'), {now},
       json_extract(item.value, '$.run_id'), json_extract(item.value, '$.event_id')
FROM json_each(:items) AS item
WHERE true
ON CONFLICT DO NOTHING
RETURNING id, seq, created_at"""
INSERT_MANY_SQLITE = _INSERT_MANY_SQLITE.format(now=now_text(SQLITE))


@cache
def append_many_statements(dialect: str) -> tuple[Executable, ...]:
    """PostgreSQL: (allocate + insert + notify,); SQLite: (allocate, insert).

    Parameters: ``session_id``, ``count``, ``run_ids`` and ``items``
    (JSON arrays as text, ``app.json_codec.dumps_transport``; on SQLite the payloads
    inside as JSON text, as ``append`` stores them), and
    ``first_seq`` for SQLite's insert. The channel of the notice is a constant.
    The inserted rows' columns are typed: ``created_at`` comes back as the column's
    aware datetime.
    """
    inserted = (
        column("id", BigInteger()),
        column("seq", Integer()),
        column("created_at", UTCDateTime()),
    )
    session_id = bindparam("session_id", type_=String())
    count = bindparam("count", type_=Integer())
    if dialect == POSTGRESQL:
        statement = text(APPEND_MANY_POSTGRESQL).bindparams(
            session_id,
            count,
            bindparam("run_ids", type_=JSONText()),
            bindparam("items", type_=JSONText()),
            bindparam("channel", EVENTS_CHANNEL, type_=String()),
        )
        return (statement.columns(column("first_seq", Integer()), *inserted),)
    allocate = text(ALLOCATE_MANY_SQLITE).bindparams(
        session_id, count, bindparam("run_ids", type_=JSONText())
    )
    insert = text(INSERT_MANY_SQLITE).bindparams(
        session_id,
        bindparam("first_seq", type_=Integer()),
        bindparam("items", type_=JSONText()),
    )
    return allocate, insert.columns(*inserted)


# --------------------------------------------------------------------------
# Writing


_BATCH_UNDO = delete(EVENTS).where(EVENTS.c.id.in_(bindparam("ids", expanding=True)))
_BATCH_LOOKUP = select(SessionEvent).where(
    col(SessionEvent.session_id) == SESSION_ID,
    col(SessionEvent.event_id).in_(bindparam("event_ids", expanding=True)),
)
_RUN_IN_SESSION = select(exists().where(RUNS.c.id == RUN_ID, RUNS.c.session_id == SESSION_ID))
_SOURCES = {member.value: member for member in EventSource}


class EventLog:
    """Writes events by the rule above, in the caller's transaction; flushes, never
    commits. Its callers have checked every argument (``EventRepository``'s checks,
    or ``RunRepository``'s own lifecycle events)."""

    def __init__(self, session: DbSession) -> None:
        self._session = session
        self._dialect = session.get_bind().dialect.name
        self._sql = log_statements(self._dialect)
        self._batch_sql = append_many_statements(self._dialect)

    def append(self, params: dict[str, Any]) -> SessionEvent:
        """One event of checked ``params`` (session_id, type, payload, source, run_id,
        event_id) with the session's next ``seq``, in the session as if the ORM had
        inserted it; or the stored event of a known ``event_id``."""
        written = self._write(params)
        if isinstance(written, SessionEvent):
            return written
        return self._stored(*written, params)

    def append_many(self, session_id: str, items: list[dict[str, Any]]) -> list[SessionEvent]:
        """Checked items (as ``append``'s params, without session_id), at most
        ``MAX_BATCH``, with consecutive seqs in the order given; one event per item
        (a repeated ``event_id``: the first item's, stored once)."""
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

    def write_lifecycle_event(
        self, session_id: str, type: str, payload: dict[str, Any], run_id: str
    ) -> None:
        """``append`` for ``RunRepository``'s lifecycle events: the event is written, no
        instance of it is made (the caller returns the run; readers get events from
        the pages)."""
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
            self.append_many(
                session_id, [{**item, "run_id": run_id, "event_id": None} for run_id in chunk]
            )

    def settle_lifecycle_event(
        self,
        session_id: str,
        run_id: str,
        type: str,
        payload: dict[str, Any],
        written: Sequence[Any],
    ) -> None:
        """The lifecycle event of a run's change, once the change is written.

        ``written``: what the change's statement returned after the run's columns:
        ``(event_seq, event_row_id)`` from ``with_lifecycle_event``, or nothing when
        the statement wrote no event (SQLite). The event is then written here; also
        when that insert collided with a v0.7 writer's number, which is given back
        first."""
        if written:
            seq, event_row_id = written[0], written[1]
            if event_row_id is not None:
                return
            self._give_back(session_id, seq)
        self.write_lifecycle_event(session_id, type, payload, run_id)

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
        """One allocation and multi-row insert of ``pending`` (``append_many_statements``).

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


__all__ = [
    "ALLOCATION_ATTEMPTS",
    "EVENT_COLUMNS",
    "MAX_BATCH",
    "OVERLAP_MIN_EVENTS",
    "EventLog",
    "LogStatements",
    "append_many_statements",
    "log_statements",
    "with_lifecycle_event",
]
