"""0012: the run queue (worker leases) and idempotency keys (extensions, issue 12).

``session_runs`` gains ``worker_id`` and ``lease_expires_at``: the worker that
claimed a run with ``RunRepository.claim_next`` and until when its lease
holds. Both nullable; existing runs have no lease, and ``fail_stale`` treats
them by ``updated_at`` as before. Two indexes serve the queue:
``idx_session_runs_queue (status, created_at, id)`` walks the queued runs
oldest first (and any status in that order, for operators), and
``idx_session_runs_session_status (session_id, status, created_at, id)``
answers "does this session have an active run, or an older queued one" per
session (on PostgreSQL partial, for the active statuses). Their equality
columns come first, so SQLite's planner takes them without statistics: a
partial ``(created_at, id) WHERE status = 'queued'`` lost to
``idx_session_runs_status`` plus a sort of every queued run, and SQLite cannot
match ``status = 'queued'`` to a partial index on ``status IN (...)``.

``run_idempotency_keys`` records an ``Idempotency-Key`` per scope: ``create``
keys belong to a session, ``resume`` keys to a run. The primary key is what
makes two requests with one key at the same moment settle on one answer,
across processes. ``run_id`` is the run the first request produced (NULL while
that request's transaction is open); a row goes with its run
(``idx_run_idempotency_keys_run`` serves that cascade).
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.steps import Item, Migration, column_missing, step

_SCOPE_CHECK = "CONSTRAINT ck_run_idempotency_keys_scope CHECK (scope IN ('create', 'resume'))"

_ACTIVE = "status IN ('queued', 'running', 'waiting_input')"


def _indexes(session_status_where: str) -> Sequence[Item]:
    return (
        step(
            "CREATE INDEX IF NOT EXISTS idx_session_runs_queue "
            "ON session_runs (status, created_at, id)",
            "CREATE INDEX IF NOT EXISTS idx_session_runs_session_status "
            f"ON session_runs (session_id, status, created_at, id){session_status_where}",
            "CREATE INDEX IF NOT EXISTS idx_run_idempotency_keys_expires "
            "ON run_idempotency_keys (expires_at)",
            "CREATE INDEX IF NOT EXISTS idx_run_idempotency_keys_run "
            "ON run_idempotency_keys (run_id)",
        ),
    )


_SQLITE: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs ADD COLUMN worker_id VARCHAR",
        only_if=column_missing("session_runs", "worker_id"),
    ),
    step(
        "ALTER TABLE session_runs ADD COLUMN lease_expires_at DATETIME",
        only_if=column_missing("session_runs", "lease_expires_at"),
    ),
    step(
        f"""CREATE TABLE IF NOT EXISTS run_idempotency_keys (
    scope VARCHAR(10) NOT NULL,
    scope_id VARCHAR NOT NULL,
    key VARCHAR(255) NOT NULL,
    request_hash VARCHAR(64) NOT NULL,
    run_id VARCHAR,
    created_at DATETIME NOT NULL,
    expires_at DATETIME NOT NULL,
    PRIMARY KEY (scope, scope_id, key),
    {_SCOPE_CHECK},
    FOREIGN KEY(run_id) REFERENCES session_runs (id) ON DELETE CASCADE
)"""
    ),
    *_indexes(""),
)

_POSTGRESQL: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs ADD COLUMN IF NOT EXISTS worker_id VARCHAR, "
        "ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMP WITH TIME ZONE"
    ),
    step(
        f"""CREATE TABLE IF NOT EXISTS run_idempotency_keys (
    scope VARCHAR(10) NOT NULL,
    scope_id VARCHAR NOT NULL,
    key VARCHAR(255) NOT NULL,
    request_hash VARCHAR(64) NOT NULL,
    run_id VARCHAR,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (scope, scope_id, key),
    {_SCOPE_CHECK},
    FOREIGN KEY(run_id) REFERENCES session_runs (id) ON DELETE CASCADE
)"""
    ),
    # Partial here: PostgreSQL proves status = 'queued' implies the IN list, and a
    # full index would win over idx_session_runs_session_created for run listings.
    *_indexes(f" WHERE {_ACTIVE}"),
)

MIGRATION = Migration(
    version=12,
    name="run_queue_and_idempotency_keys",
    summary="session_runs.worker_id and lease_expires_at (nullable), queue indexes "
    "idx_session_runs_queue and idx_session_runs_session_status, table run_idempotency_keys "
    "with indexes on expires_at and run_id.",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
)
migrate_run_queue_and_idempotency_keys = MIGRATION.apply
