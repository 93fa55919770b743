"""0010: ``session_events.id`` and its sequence become 64-bit on PostgreSQL.

v0.7 made ``id SERIAL``: an ``int4`` column fed by an ``int4`` sequence, so
after 2^31 - 1 events in the whole database every append failed with a raw
``DataError``. ``ALTER COLUMN ... TYPE BIGINT`` rewrites the table and its
indexes while holding an ACCESS EXCLUSIVE lock on ``session_events``: reads
and appends of the event log wait for the rewrite (see ``docs/migrations.md``
for the measured time per million events). The sequence is widened with it
(``AS BIGINT`` also lifts its maximum, which was int4's).

Other integer columns stay 32-bit on purpose: ``seq`` and ``next_seq`` count
per session (2^31 events in one session is out of reach), and no other table
has an integer key. On SQLite ``INTEGER PRIMARY KEY`` is the 64-bit rowid
already: nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text
from sqlalchemy.dialects import postgresql

from migrations.steps import Check, Item, Migration, pg_column_is, step

SEQUENCE = "session_events_id_seq"


def _sequence_is_int4(conn: Connection) -> bool:
    return (
        conn.execute(
            text(
                "SELECT 1 FROM pg_sequences WHERE schemaname = current_schema() "
                "AND sequencename = :name AND data_type = CAST('integer' AS regtype)"
            ),
            {"name": SEQUENCE},
        ).first()
        is not None
    )


_POSTGRESQL: Sequence[Item] = (
    step(
        "ALTER TABLE session_events ALTER COLUMN id TYPE BIGINT",
        only_if=pg_column_is("session_events", "id", postgresql.INTEGER, "integer"),
    ),
    step(
        f"ALTER SEQUENCE {SEQUENCE} AS BIGINT",
        only_if=Check(
            f"the sequence {SEQUENCE} is integer",
            _sequence_is_int4,
            sql="EXISTS (SELECT 1 FROM pg_sequences WHERE schemaname = current_schema() "  # noqa: S608
            f"AND sequencename = '{SEQUENCE}' AND data_type = CAST('integer' AS regtype))",
        ),
    ),
)

MIGRATION = Migration(
    version=10,
    name="bigint_event_ids",
    summary="PostgreSQL: session_events.id and its sequence to bigint (rewrites the table "
    "under an exclusive lock). SQLite: nothing (the rowid is 64-bit).",
    declare=lambda dialect: () if dialect == "sqlite" else _POSTGRESQL,
)
migrate_bigint_event_ids = MIGRATION.apply
