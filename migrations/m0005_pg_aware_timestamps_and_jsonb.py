"""0005: PostgreSQL column types of the model for legacy columns; nothing on SQLite.

v0.7 (and hand-made ``session_runs`` tables) store timestamps as
``timestamp without time zone`` holding naive UTC, and JSON as ``json``. The
model declares ``timestamp with time zone`` and ``jsonb``. Each legacy column
is converted in place: ``USING col AT TIME ZONE 'UTC'`` reads the naive value
as UTC, so every row keeps the same instant; ``jsonb`` keeps every value (it
normalizes key order and whitespace, and keeps the last of duplicate keys).
Each conversion rewrites its table while holding it locked.

SQLite stores both as text already, and the model's types read them there.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.dialects import postgresql

from migrations.steps import Item, Migration, pg_column_is, step

_TIMESTAMP_COLUMNS = (
    ("sessions", "created_at"),
    ("sessions", "updated_at"),
    ("session_events", "created_at"),
    ("session_event_sequences", "updated_at"),
    ("session_runs", "started_at"),
    ("session_runs", "finished_at"),
    ("session_runs", "created_at"),
    ("session_runs", "updated_at"),
)
_JSON_COLUMNS = (
    ("session_events", "payload"),
    ("session_runs", "resume_payload"),
    ("session_runs", "latest_error"),
    ("session_runs", "metrics"),
    ("session_runs", "options"),
)

_POSTGRESQL: Sequence[Item] = (
    *(
        step(
            f"ALTER TABLE {table} ALTER COLUMN {column} "
            f"TYPE TIMESTAMP WITH TIME ZONE USING {column} AT TIME ZONE 'UTC'",
            only_if=pg_column_is(
                table, column, postgresql.TIMESTAMP, "timestamp without time zone"
            ),
        )
        for table, column in _TIMESTAMP_COLUMNS
    ),
    *(
        step(
            f"ALTER TABLE {table} ALTER COLUMN {column} TYPE JSONB USING CAST({column} AS JSONB)",
            only_if=pg_column_is(table, column, postgresql.JSON, "json"),
        )
        for table, column in _JSON_COLUMNS
    ),
)

MIGRATION = Migration(
    version=5,
    name="pg_aware_timestamps_and_jsonb",
    summary="PostgreSQL: legacy timestamp columns to timestamptz (naive values read as UTC, "
    "same instants) and json to jsonb. SQLite: nothing.",
    declare=lambda dialect: () if dialect == "sqlite" else _POSTGRESQL,
)
migrate_pg_aware_timestamps_and_jsonb = MIGRATION.apply
