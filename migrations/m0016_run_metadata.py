"""0016: ``session_runs.run_metadata``, the caller's JSON object, and an index for listings.

A run carries the metadata its creator gave (``POST /api/runs`` with
``"metadata": {...}``, bounded by the JSON limits), returned with the run and
used to filter listings (``GET /api/runs?metadata=...``). The column is
``run_metadata``: ``metadata`` is the table registry of SQLModel's models.
``JSONB NOT NULL DEFAULT '{}'`` on PostgreSQL, ``JSON NOT NULL DEFAULT '{}'`` on
SQLite: existing
runs read as having no metadata. On PostgreSQL 11+ a column with a constant
default is added without rewriting the table (the default is kept in the
catalog), so the ``ALTER TABLE`` holds its lock for a moment only.

``idx_session_runs_created`` on ``(created_at, id)`` serves the listing of runs
across sessions, newest first, one keyset page at a time (a status filter uses
``idx_session_runs_queue``, a session's runs ``idx_session_runs_session_created``).
``session_runs`` is a big live table: the index is an ``OnlineIndex``, built with
``CREATE INDEX CONCURRENTLY`` on PostgreSQL outside the migration's transaction,
under the migration lock; an interrupted build is dropped and built again by the
next upgrade, and the migration is recorded only once the index is valid.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection

from migrations.steps import Check, Item, Migration, OnlineIndex, column_missing, index_exists, step

_SQLITE: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs ADD COLUMN run_metadata JSON NOT NULL DEFAULT '{}'",
        only_if=column_missing("session_runs", "run_metadata"),
    ),
)

_POSTGRESQL: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs ADD COLUMN IF NOT EXISTS run_metadata JSONB NOT NULL DEFAULT '{}'"
    ),
)

INDEX = OnlineIndex(
    name="idx_session_runs_created",
    table="session_runs",
    definition="(created_at, id)",
)


def _complete(conn: Connection) -> bool:
    if column_missing("session_runs", "run_metadata").holds(conn):
        return False
    if conn.dialect.name != "postgresql":
        return index_exists(INDEX.table, INDEX.name).holds(conn)
    from migrations.runner import index_validity  # the runner imports this module

    return index_validity(conn, INDEX.name) is True


MIGRATION = Migration(
    version=16,
    name="run_metadata",
    summary="session_runs.run_metadata (a JSON object, NOT NULL DEFAULT '{}': the caller's "
    "metadata, added without a table rewrite) and index idx_session_runs_created on "
    "session_runs (created_at, id), built with CREATE INDEX CONCURRENTLY on PostgreSQL: "
    "listings across sessions read one keyset page at a time.",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
    complete_when=Check(f"session_runs.run_metadata and a valid {INDEX.name} exist", _complete),
    online=lambda dialect: (INDEX,),
)
migrate_run_metadata = MIGRATION.apply
