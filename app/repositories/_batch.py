"""``EventRepository.append_many``: a burst of events in one multi-row statement.

The batch travels as **one JSON parameter** (an array of items, each with its
``position`` among the new events) and the database unpacks it
(``jsonb_to_recordset`` on PostgreSQL, ``json_each`` on SQLite). The
statements are therefore fixed texts, the same for 1 or 1,000 events: nothing
is compiled per batch size, and the SQL can be read below as it is sent.

Seq allocation is ``append``'s, for N numbers at once: the upsert of the
session's counter row moves it to ``max(next_seq, MAX(seq) + 1) + N`` and
locks it until the transaction ends; the events take ``first_seq + position``,
and the database's clock as ``created_at`` (``_sql.NOW``, one for the batch).
On PostgreSQL the upsert, the insert and the commit notice (``pg_notify``) are
one statement; SQLite runs the upsert and the insert as two.

The insert says ``ON CONFLICT DO NOTHING``: when an ``event_id`` is already
stored (or a v0.7 writer took a number meanwhile) fewer rows come back than
were sent. Then the rows just inserted are deleted, the numbers given back,
the stored events looked up, and the rest allocated again: no statement
fails, so the caller's transaction stays usable, and the seqs stay gap-free.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy import (
    BigInteger,
    Executable,
    Integer,
    String,
    bindparam,
    column,
    text,
)

from app.json_codec import JSONText
from app.repositories._sql import EVENTS_CHANNEL, POSTGRESQL, SQLITE, now_text
from app.types import UTCDateTime

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
