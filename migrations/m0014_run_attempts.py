"""0014: ``session_runs.attempt``, how many times workers have claimed the run's current execution.

The worker runtime (``app.worker``, docs/worker.md) retries a run whose lease
expired (its worker died) instead of failing it at once: ``claim_next`` counts
``attempt = attempt + 1``, and ``fail_stale(..., max_attempts=n)`` puts a run whose
lease expired back in the queue (event ``run_retried``) while ``attempt < n``, and
fails it with ``stale_run`` after the last attempt. A worker that gives its lease
back on shutdown returns the attempt it did not use; ``resume`` starts a new
execution at 0. ``INTEGER NOT NULL DEFAULT 0``: existing runs read as never claimed
under the new count, which changes nothing for them (``max_attempts`` defaults to 1,
the old behaviour). On PostgreSQL 11+ a column with a constant default is added
without rewriting the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.steps import Item, Migration, column_missing, step

_SQLITE: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
        only_if=column_missing("session_runs", "attempt"),
    ),
)

_POSTGRESQL: Sequence[Item] = (
    step("ALTER TABLE session_runs ADD COLUMN IF NOT EXISTS attempt INTEGER NOT NULL DEFAULT 0"),
)

MIGRATION = Migration(
    version=14,
    name="run_attempts",
    summary="session_runs.attempt (INTEGER NOT NULL DEFAULT 0): the claims of the run's "
    "current execution, for retries of runs whose lease expired.",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
)
migrate_run_attempts = MIGRATION.apply
