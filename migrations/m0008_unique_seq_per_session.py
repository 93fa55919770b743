"""0008: ``(session_id, seq)`` unique, where the legacy rows allow it (an extension).

The v0.7 writer read ``session_event_sequences`` and wrote it back without a
lock, so some databases hold two events with one ``seq``. Where none does,
the unique index makes a racing writer fail instead of duplicating a
``seq``. Where some do, nothing is changed or deleted: the index is skipped,
the duplicates are reported (upgrade output, log, the version row's notes,
``status``), and ``idx_session_event_seq`` keeps serving reads. The migration
then stays pending; every upgrade retries it until the duplicates are gone.
"""

from __future__ import annotations

from migrations.steps import Migration, index_exists, unique_index_unless_duplicates

MIGRATION = Migration(
    version=8,
    name="unique_seq_per_session",
    summary="unique index uq_session_events_session_seq on (session_id, seq) when no legacy "
    "duplicates exist; otherwise skipped and the duplicates reported, no row changed.",
    declare=lambda dialect: unique_index_unless_duplicates(
        dialect,
        table="session_events",
        index="uq_session_events_session_seq",
        ddl="CREATE UNIQUE INDEX IF NOT EXISTS uq_session_events_session_seq "
        "ON session_events (session_id, seq)",
        duplicates_query="SELECT session_id, seq, COUNT(*) FROM session_events "
        "GROUP BY session_id, seq HAVING COUNT(*) > 1 ORDER BY session_id, seq",
        key="(session_id, seq)",
    ),
    complete_when=index_exists("session_events", "uq_session_events_session_seq"),
)
migrate_unique_seq_per_session = MIGRATION.apply
