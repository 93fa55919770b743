"""0004: the run's ``waiting_reason`` and ``options`` columns (extensions to the phase table).

``waiting_reason`` is what the API returns while a run waits for input (spec
8.2). ``options`` holds the create options (``generate_now``,
``style_reference``, ``target_pages``) as one JSON object, for the worker
that starts a queued run later. Both nullable, so existing runs need nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations.steps import Item, Migration, column_missing, step

_SQLITE: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs ADD COLUMN waiting_reason TEXT",
        only_if=column_missing("session_runs", "waiting_reason"),
    ),
    step(
        "ALTER TABLE session_runs ADD COLUMN options JSON",
        only_if=column_missing("session_runs", "options"),
    ),
)

_POSTGRESQL: Sequence[Item] = (
    step(
        "ALTER TABLE session_runs "
        "ADD COLUMN IF NOT EXISTS waiting_reason TEXT, ADD COLUMN IF NOT EXISTS options JSONB"
    ),
)

MIGRATION = Migration(
    version=4,
    name="run_waiting_reason_and_options",
    summary="session_runs.waiting_reason (TEXT) and session_runs.options (the create options "
    "as one JSON object), both nullable.",
    declare=lambda dialect: _SQLITE if dialect == "sqlite" else _POSTGRESQL,
)
migrate_run_waiting_reason_and_options = MIGRATION.apply
