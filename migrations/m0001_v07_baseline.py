"""0001: the v0.7 schema, as the v0.7 application's ``create_all`` made it.

Databases in the field were made by v0.7 with no version table; this baseline
creates the same tables on an empty database and leaves existing ones exactly
as they are (``IF NOT EXISTS``; on PostgreSQL the native enum type
``session_event_source`` is created only when missing). The legacy column
types (naive ``TIMESTAMP``, ``JSON``) are brought to the model's by 0005, so a
fresh database and an adopted one take the same path from here on.

Only the ``sessions`` columns this layer uses are created; the v0.7 metadata
columns (``product_type``, ``model_*``, ...) belong to the host application.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.steps import Item, Migration, enum_type_missing, step

_SQLITE: Sequence[Item] = (
    step(
        """CREATE TABLE IF NOT EXISTS sessions (
    id VARCHAR NOT NULL,
    title VARCHAR NOT NULL,
    created_at DATETIME,
    updated_at DATETIME,
    current_version INTEGER,
    PRIMARY KEY (id)
)"""
    ),
    step(
        """CREATE TABLE IF NOT EXISTS session_events (
    id INTEGER NOT NULL,
    session_id VARCHAR NOT NULL,
    seq INTEGER NOT NULL,
    type VARCHAR(100) NOT NULL,
    payload JSON,
    source VARCHAR(7) NOT NULL,
    created_at DATETIME,
    PRIMARY KEY (id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE
)"""
    ),
    step("CREATE INDEX IF NOT EXISTS idx_session_event_seq ON session_events (session_id, seq)"),
    step(
        """CREATE TABLE IF NOT EXISTS session_event_sequences (
    session_id VARCHAR NOT NULL,
    next_seq INTEGER DEFAULT '1' NOT NULL,
    updated_at DATETIME,
    PRIMARY KEY (session_id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE
)"""
    ),
)

_POSTGRESQL: Sequence[Item] = (
    step(
        "CREATE TYPE session_event_source AS ENUM ('session', 'plan', 'task')",
        only_if=enum_type_missing("session_event_source"),
    ),
    step(
        """CREATE TABLE IF NOT EXISTS sessions (
    id VARCHAR NOT NULL,
    title VARCHAR NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE,
    updated_at TIMESTAMP WITHOUT TIME ZONE,
    current_version INTEGER,
    PRIMARY KEY (id)
)"""
    ),
    step(
        """CREATE TABLE IF NOT EXISTS session_events (
    id SERIAL NOT NULL,
    session_id VARCHAR NOT NULL,
    seq INTEGER NOT NULL,
    type VARCHAR(100) NOT NULL,
    payload JSON,
    source session_event_source NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE,
    PRIMARY KEY (id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE
)"""
    ),
    step("CREATE INDEX IF NOT EXISTS idx_session_event_seq ON session_events (session_id, seq)"),
    step(
        """CREATE TABLE IF NOT EXISTS session_event_sequences (
    session_id VARCHAR NOT NULL,
    next_seq INTEGER DEFAULT '1' NOT NULL,
    updated_at TIMESTAMP WITHOUT TIME ZONE,
    PRIMARY KEY (session_id),
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE
)"""
    ),
)

MIGRATION = Migration(
    version=1,
    name="v07_baseline",
    summary="v0.7 tables sessions, session_events (+ idx_session_event_seq), "
    "session_event_sequences; PostgreSQL enum session_event_source. Existing ones untouched.",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
)
migrate_v07_baseline = MIGRATION.apply
