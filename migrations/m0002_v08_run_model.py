"""0002 ``migrate_v08_run_model``: the ``session_runs`` table of the phase document.

Creates the table with its 15 columns, the CHECK constraints on ``status`` and
``trigger_source``, the foreign keys (``session_id`` ON DELETE CASCADE,
``parent_run_id`` ON DELETE SET NULL) and its three indexes.

Some databases carry a hand-made ``session_runs`` from an early v0.8 build
with only some of the columns. Existing rows are kept; missing NOT NULL columns
are filled as documented: ``trigger_source = 'chat'``, ``status = 'queued'``,
``created_at`` and ``updated_at`` = the migration's time.

* PostgreSQL: missing columns are added (``ADD COLUMN IF NOT EXISTS``), then
  the missing constraints. A row that breaks a constraint makes the migration
  fail, naming the statement; fix the row and rerun.
* SQLite cannot add a constraint or a NOT NULL column to a table, so a table
  that lacks any of them is rebuilt inside the migration's transaction, the
  way SQLite documents it (create ``session_runs_new``, copy, drop, rename;
  the runner turns foreign-key enforcement off for the upgrade so that the
  drop cascades nowhere). The new table already has the extension columns
  ``waiting_reason`` and ``options``. A column this layer does not declare would
  be lost by the rebuild, so such a table is refused with its column names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, inspect

from migrations.steps import (
    Check,
    Item,
    Migration,
    Probe,
    Step,
    all_of,
    check_constraint_missing,
    column_missing,
    foreign_key_missing,
    has_foreign_key,
    sample,
    step,
)

_STATUS_CHECK = (
    "CONSTRAINT ck_session_runs_status CHECK "
    "(status IN ('queued', 'running', 'waiting_input', 'completed', 'failed', 'cancelled'))"
)
_TRIGGER_SOURCE_CHECK = (
    "CONSTRAINT ck_session_runs_trigger_source CHECK "
    "(trigger_source IN ('chat', 'resume', 'retry', 'system'))"
)
_INDEXES = (
    step(
        "CREATE INDEX IF NOT EXISTS idx_session_runs_session_created "
        "ON session_runs (session_id, created_at)"
    ),
    step("CREATE INDEX IF NOT EXISTS idx_session_runs_status ON session_runs (status)"),
    step("CREATE INDEX IF NOT EXISTS idx_session_runs_parent ON session_runs (parent_run_id)"),
)


def _fill_values() -> dict[str, str]:
    """Values for NOT NULL columns a hand-made table lacked or left empty."""
    return {"trigger_source": "chat", "status": "queued"}


# --------------------------------------------------------------------------
# SQLite

_SQLITE_COLUMNS = """    id VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    parent_run_id VARCHAR,
    trigger_source VARCHAR(20) NOT NULL,
    status VARCHAR(20) DEFAULT 'queued' NOT NULL,
    input_message TEXT,
    resume_payload JSON,
    checkpoint_thread VARCHAR,
    checkpoint_ns VARCHAR,
    latest_error JSON,
    metrics JSON,
    started_at DATETIME,
    finished_at DATETIME,
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
"""
_SQLITE_EXTENSION_COLUMNS = """    waiting_reason TEXT,
    options JSON,
"""
_SQLITE_CONSTRAINTS = f"""    PRIMARY KEY (id),
    {_STATUS_CHECK},
    {_TRIGGER_SOURCE_CHECK},
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE,
    FOREIGN KEY (parent_run_id) REFERENCES session_runs (id) ON DELETE SET NULL
)"""

# Column -> the type an ADD COLUMN gives it before a rebuild copies it.
_SQLITE_ADDABLE = {
    "session_id": "VARCHAR",
    "parent_run_id": "VARCHAR",
    "trigger_source": "VARCHAR(20)",
    "status": "VARCHAR(20)",
    "input_message": "TEXT",
    "resume_payload": "JSON",
    "checkpoint_thread": "VARCHAR",
    "checkpoint_ns": "VARCHAR",
    "latest_error": "JSON",
    "metrics": "JSON",
    "started_at": "DATETIME",
    "finished_at": "DATETIME",
    "created_at": "DATETIME",
    "updated_at": "DATETIME",
    "waiting_reason": "TEXT",
    "options": "JSON",
}
_DECLARED = ("id", *_SQLITE_ADDABLE)
_NOT_NULL = ("id", "session_id", "trigger_source", "status", "created_at", "updated_at")
_PHASE_COLUMNS = _DECLARED[:-2]


def _sqlite_needs_rebuild(conn: Connection) -> bool:
    """``session_runs`` exists but lacks a phase column, a NOT NULL, the key or a constraint."""
    inspector = inspect(conn)
    if not inspector.has_table("session_runs"):
        return False
    columns = {col["name"]: col for col in inspector.get_columns("session_runs")}
    checks = {ck["name"] for ck in inspector.get_check_constraints("session_runs")}
    return (
        any(name not in columns for name in _PHASE_COLUMNS)
        or any(columns[name]["nullable"] for name in _NOT_NULL)
        or inspector.get_pk_constraint("session_runs")["constrained_columns"] != ["id"]
        or not {"ck_session_runs_status", "ck_session_runs_trigger_source"} <= checks
        or not has_foreign_key(conn, "session_runs", "session_id", "sessions", "CASCADE")
        or not has_foreign_key(conn, "session_runs", "parent_run_id", "session_runs", "SET NULL")
    )


_NEEDS_REBUILD = Check(
    "session_runs lacks a column, NOT NULL, primary key or constraint of the model "
    "(a hand-made table)",
    _sqlite_needs_rebuild,
)


def _add_before_rebuild(name: str, type_: str) -> Step:
    """Give the old table a missing column so that the rebuild's copy can name it."""
    return step(
        f"ALTER TABLE session_runs ADD COLUMN {name} {type_}",
        only_if=all_of(_NEEDS_REBUILD, column_missing("session_runs", name)),
    )


def _unknown_columns(rows: Sequence[Row[Any]]) -> str:
    names = ", ".join(row[0] for row in rows)
    return (
        f"session_runs has columns this layer does not declare ({names}); rebuilding the "
        "table on SQLite would drop them. Copy them elsewhere and drop them, then rerun."
    )


def _orphans(rows: Sequence[Row[Any]]) -> str:
    return (
        f"{len(rows)} session_runs rows kept from the hand-made table reference a session that "
        f"does not exist (run id, session id): {sample(rows)}"
    )


_SQLITE: Sequence[Item] = (
    step(f"CREATE TABLE IF NOT EXISTS session_runs (\n{_SQLITE_COLUMNS}{_SQLITE_CONSTRAINTS}"),
    Probe(
        "SELECT name FROM pragma_table_info('session_runs') "
        "WHERE name NOT IN (SELECT value FROM json_each(:declared))",
        _unknown_columns,
        fatal=True,
        only_if=_NEEDS_REBUILD,
        params=lambda: {"declared": json.dumps(_DECLARED)},
    ),
    *(_add_before_rebuild(name, type_) for name, type_ in _SQLITE_ADDABLE.items()),
    step(
        "CREATE TABLE session_runs_new (\n"
        f"{_SQLITE_COLUMNS}{_SQLITE_EXTENSION_COLUMNS}{_SQLITE_CONSTRAINTS}",
        "INSERT INTO session_runs_new (id, session_id, parent_run_id, trigger_source, status, "
        "input_message, resume_payload, checkpoint_thread, checkpoint_ns, latest_error, metrics, "
        "started_at, finished_at, created_at, updated_at, waiting_reason, options) "
        "SELECT id, session_id, parent_run_id, COALESCE(trigger_source, :trigger_source), "
        "COALESCE(status, :status), input_message, resume_payload, checkpoint_thread, "
        "checkpoint_ns, latest_error, metrics, started_at, finished_at, "
        "COALESCE(created_at, CURRENT_TIMESTAMP), "
        "COALESCE(updated_at, CURRENT_TIMESTAMP), waiting_reason, options "
        "FROM session_runs",
        "DROP TABLE session_runs",
        "ALTER TABLE session_runs_new RENAME TO session_runs",
        only_if=_NEEDS_REBUILD,
        params=_fill_values,
    ),
    Probe(
        "SELECT id, session_id FROM session_runs "
        "WHERE session_id NOT IN (SELECT id FROM sessions) ORDER BY id",
        _orphans,
    ),
    *_INDEXES,
)

# --------------------------------------------------------------------------
# PostgreSQL

_POSTGRESQL: Sequence[Item] = (
    step(
        f"""CREATE TABLE IF NOT EXISTS session_runs (
    id VARCHAR NOT NULL,
    session_id VARCHAR NOT NULL,
    parent_run_id VARCHAR,
    trigger_source VARCHAR(20) NOT NULL,
    status VARCHAR(20) DEFAULT 'queued' NOT NULL,
    input_message TEXT,
    resume_payload JSONB,
    checkpoint_thread VARCHAR,
    checkpoint_ns VARCHAR,
    latest_error JSONB,
    metrics JSONB,
    started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id),
    {_STATUS_CHECK},
    {_TRIGGER_SOURCE_CHECK},
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE,
    FOREIGN KEY (parent_run_id) REFERENCES session_runs (id) ON DELETE SET NULL
)"""
    ),
    # A hand-made table: add what it lacks. The temporary defaults fill its rows.
    step(
        """ALTER TABLE session_runs
    ADD COLUMN IF NOT EXISTS session_id VARCHAR NOT NULL,
    ADD COLUMN IF NOT EXISTS parent_run_id VARCHAR,
    ADD COLUMN IF NOT EXISTS trigger_source VARCHAR(20) NOT NULL DEFAULT 'chat',
    ADD COLUMN IF NOT EXISTS status VARCHAR(20) NOT NULL DEFAULT 'queued',
    ADD COLUMN IF NOT EXISTS input_message TEXT,
    ADD COLUMN IF NOT EXISTS resume_payload JSONB,
    ADD COLUMN IF NOT EXISTS checkpoint_thread VARCHAR,
    ADD COLUMN IF NOT EXISTS checkpoint_ns VARCHAR,
    ADD COLUMN IF NOT EXISTS latest_error JSONB,
    ADD COLUMN IF NOT EXISTS metrics JSONB,
    ADD COLUMN IF NOT EXISTS started_at TIMESTAMP WITH TIME ZONE,
    ADD COLUMN IF NOT EXISTS finished_at TIMESTAMP WITH TIME ZONE,
    ADD COLUMN IF NOT EXISTS created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now()""",
        """ALTER TABLE session_runs
    ALTER COLUMN trigger_source DROP DEFAULT,
    ALTER COLUMN created_at DROP DEFAULT,
    ALTER COLUMN updated_at DROP DEFAULT,
    ALTER COLUMN status SET DEFAULT 'queued'""",
        # Columns it had, but nullable: fill, then enforce.
        """UPDATE session_runs
SET trigger_source = COALESCE(trigger_source, :trigger_source),
    status = COALESCE(status, :status),
    created_at = COALESCE(created_at, now()),
    updated_at = COALESCE(updated_at, now())
WHERE trigger_source IS NULL OR status IS NULL OR created_at IS NULL OR updated_at IS NULL""",
        """ALTER TABLE session_runs
    ALTER COLUMN session_id SET NOT NULL,
    ALTER COLUMN trigger_source SET NOT NULL,
    ALTER COLUMN status SET NOT NULL,
    ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN updated_at SET NOT NULL""",
        params=_fill_values,
    ),
    step(
        f"ALTER TABLE session_runs ADD {_STATUS_CHECK}",
        only_if=check_constraint_missing("session_runs", "ck_session_runs_status"),
    ),
    step(
        f"ALTER TABLE session_runs ADD {_TRIGGER_SOURCE_CHECK}",
        only_if=check_constraint_missing("session_runs", "ck_session_runs_trigger_source"),
    ),
    step(
        "ALTER TABLE session_runs ADD CONSTRAINT session_runs_session_id_fkey "
        "FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE",
        only_if=foreign_key_missing("session_runs", "session_id", "sessions", "CASCADE"),
    ),
    step(
        "ALTER TABLE session_runs ADD CONSTRAINT session_runs_parent_run_id_fkey "
        "FOREIGN KEY (parent_run_id) REFERENCES session_runs (id) ON DELETE SET NULL",
        only_if=foreign_key_missing("session_runs", "parent_run_id", "session_runs", "SET NULL"),
    ),
    *_INDEXES,
)

MIGRATION = Migration(
    version=2,
    name="v08_run_model",
    summary="session_runs with its 15 columns, CHECK constraints, foreign keys and three "
    "indexes; completes a hand-made session_runs (SQLite: rebuilt in the transaction).",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
)
migrate_v08_run_model = MIGRATION.apply
