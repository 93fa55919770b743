"""0003 ``migrate_v08_event_run_columns``: ``run_id`` and ``event_id`` on ``session_events``.

Both nullable; no row changes, so historical events keep ``run_id = NULL``
and stay readable through the session view. ``run_id`` references
``session_runs`` ON DELETE CASCADE, as the model declares, and
``idx_session_event_run_seq (session_id, run_id, seq)`` serves run-scoped
replay. Adding a nullable column without a default rewrites no rows on either
backend. On SQLite the foreign key comes with ``ADD COLUMN``; a ``run_id``
that a hand-made build already added without one is left as it is (adding a
foreign key there would mean rebuilding the whole event table).
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.steps import Item, Migration, column_missing, foreign_key_missing, step

_INDEX = step(
    "CREATE INDEX IF NOT EXISTS idx_session_event_run_seq "
    "ON session_events (session_id, run_id, seq)"
)

_SQLITE: Sequence[Item] = (
    step(
        "ALTER TABLE session_events ADD COLUMN run_id VARCHAR "
        "REFERENCES session_runs (id) ON DELETE CASCADE",
        only_if=column_missing("session_events", "run_id"),
    ),
    step(
        "ALTER TABLE session_events ADD COLUMN event_id VARCHAR",
        only_if=column_missing("session_events", "event_id"),
    ),
    _INDEX,
)

_POSTGRESQL: Sequence[Item] = (
    step(
        "ALTER TABLE session_events "
        "ADD COLUMN IF NOT EXISTS run_id VARCHAR, ADD COLUMN IF NOT EXISTS event_id VARCHAR"
    ),
    step(
        "ALTER TABLE session_events ADD CONSTRAINT session_events_run_id_fkey "
        "FOREIGN KEY (run_id) REFERENCES session_runs (id) ON DELETE CASCADE",
        only_if=foreign_key_missing("session_events", "run_id", "session_runs", "CASCADE"),
    ),
    _INDEX,
)

MIGRATION = Migration(
    version=3,
    name="v08_event_run_columns",
    summary="session_events.run_id (FK to session_runs, ON DELETE CASCADE) and event_id, both "
    "nullable; idx_session_event_run_seq. No row changes: old events keep run_id NULL.",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
)
migrate_v08_event_run_columns = MIGRATION.apply
