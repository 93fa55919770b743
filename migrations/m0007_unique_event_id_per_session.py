"""0007: ``(session_id, event_id)`` unique where ``event_id`` is set (an extension).

``event_id`` is the envelope's de-duplication key (spec section 7); the index
lets the event layer turn a replayed event into a conflict instead of a
second row. Legacy events have no ``event_id`` and are not covered. Should a
database already hold duplicates, the index is skipped and reported, never
by deleting rows (see ``unique_index_unless_duplicates``), and the migration
stays pending: every upgrade retries it until the index exists.
"""

from __future__ import annotations

from migrations.steps import Migration, index_exists, unique_index_unless_duplicates

MIGRATION = Migration(
    version=7,
    name="unique_event_id_per_session",
    summary="partial unique index uq_session_events_session_event_id on (session_id, event_id) "
    "WHERE event_id IS NOT NULL; skipped and reported if duplicates exist.",
    declare=lambda dialect: unique_index_unless_duplicates(
        dialect,
        table="session_events",
        index="uq_session_events_session_event_id",
        ddl="CREATE UNIQUE INDEX IF NOT EXISTS uq_session_events_session_event_id "
        "ON session_events (session_id, event_id) WHERE event_id IS NOT NULL",
        duplicates_query="SELECT session_id, event_id, COUNT(*) FROM session_events "
        "WHERE event_id IS NOT NULL GROUP BY session_id, event_id HAVING COUNT(*) > 1 "
        "ORDER BY session_id, event_id",
        key="(session_id, event_id)",
    ),
    complete_when=index_exists("session_events", "uq_session_events_session_event_id"),
)
migrate_unique_event_id_per_session = MIGRATION.apply
