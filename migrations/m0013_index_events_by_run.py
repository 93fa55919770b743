"""0013: an index on ``session_events (run_id)``, the one foreign key without one.

``session_events.run_id`` references ``session_runs (id) ON DELETE CASCADE``
(migration 0003). Deleting a run, by ``RunRepository.delete`` or through a
session's deletion, makes the database delete that run's events by ``run_id``.
The only index that held ``run_id``, ``idx_session_event_run_seq (session_id,
run_id, seq)``, does not start with it, so every deleted run cost a scan of the
whole event log: on PostgreSQL with 1,000,000 events, 90 ms per run and about
1 s to delete a session of 10 runs, holding its locks all along; 1-2 ms with
this index. Every other foreign key of the schema starts an index.

A plain ``CREATE INDEX``, as in 0007, 0008 and 0012: on PostgreSQL it holds a
write lock on ``session_events`` while it builds (0.8 s for a million events
with run ids, on two cores; ``docs/migrations.md``). An operator who cannot pause writes that
long creates the index beforehand with ``CREATE INDEX CONCURRENTLY IF NOT EXISTS
idx_session_events_run ON session_events (run_id)``; this migration then finds it
and builds nothing.
"""

from __future__ import annotations

from migrations.steps import Migration, step

_STEPS = (step("CREATE INDEX IF NOT EXISTS idx_session_events_run ON session_events (run_id)"),)

MIGRATION = Migration(
    version=13,
    name="index_events_by_run",
    summary="index idx_session_events_run on session_events (run_id): deleting a run "
    "(its events go with it) no longer scans the event log.",
    declare=lambda dialect: _STEPS,
)
migrate_index_events_by_run = MIGRATION.apply
