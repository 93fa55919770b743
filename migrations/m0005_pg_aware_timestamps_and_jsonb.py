"""0005: PostgreSQL column types of the model for legacy columns; nothing on SQLite.

v0.7 (and hand-made ``session_runs`` tables) store timestamps as
``timestamp without time zone`` holding naive UTC, and JSON as ``json``. The
model declares ``timestamp with time zone`` and ``jsonb``. Each legacy column
is converted in place: ``USING col AT TIME ZONE 'UTC'`` reads the naive value
as UTC, so every row keeps the same instant; ``jsonb`` keeps every value (it
normalizes key order and whitespace, and keeps the last of duplicate keys).
Each conversion rewrites its table while holding it locked.

A JSON column with a value ``jsonb`` may refuse (a ``\\u0000`` or surrogate
escape, a huge exponent: ``_MAY_BE_REFUSED``, deliberately broader than what
fails) is left as ``json`` here; 0009 converts it, keeping refused values as
text. This guard is Python, outside the checksum: the SQL is what databases in
the field applied, and where it succeeded every value converted, so the guard
held there.

SQLite stores both as text already, and the model's types read them there.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.dialects import postgresql

from migrations.steps import Item, Migration, all_of, no_rows, pg_column_is, step

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

_MAY_BE_REFUSED = r"\\u(0000|[dD][89a-fA-F])|[0-9][eE][-+]?[0-9]{4}"
"""A NUL or surrogate escape, or an exponent of 4+ digits, anywhere in the JSON text."""


def _may_be_refused(table: str, column: str) -> str:
    return f"SELECT 1 FROM {table} WHERE CAST({column} AS TEXT) ~ :pattern"  # noqa: S608


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
            only_if=all_of(
                pg_column_is(table, column, postgresql.JSON, "json"),
                no_rows(
                    f"no value of {table}.{column} may be refused by jsonb (else 0009 converts it)",
                    _may_be_refused(table, column),
                    params=lambda: {"pattern": _MAY_BE_REFUSED},
                ),
            ),
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
