"""0015: an index on ``session_runs (finished_at, id)`` for retention, built online.

``python -m app.runs purge`` (``app.retention``) picks the oldest finished runs
in batches: ``WHERE status IN (terminal) AND finished_at < cutoff ORDER BY
finished_at, id LIMIT n``. Without an index each batch read and sorted the
whole run table; with ``idx_session_runs_finished`` it reads the batch's rows
in order and stops (``EXPLAIN`` on both backends: ``docs/operations.md``).
Partial (``WHERE finished_at IS NOT NULL``): active runs, which are the ones
written all the time, are not in it.

The first migration with an ``OnlineIndex``: on PostgreSQL the runner builds
it with ``CREATE INDEX CONCURRENTLY`` outside the migration's transaction,
under the migration lock, so reads and writes of ``session_runs`` go on while
it builds; an INVALID index left by an interrupted build is dropped and built
again by the next upgrade, and the migration is recorded only once the index
is valid. On SQLite a plain ``CREATE INDEX`` in the migration's transaction.
"""

from __future__ import annotations

from sqlalchemy import Connection

from migrations.steps import Check, Migration, OnlineIndex, index_exists

INDEX = OnlineIndex(
    name="idx_session_runs_finished",
    table="session_runs",
    definition="(finished_at, id) WHERE finished_at IS NOT NULL",
)


def _index_ready(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return index_exists(INDEX.table, INDEX.name).holds(conn)
    from migrations.runner import index_validity  # the runner imports this module

    return index_validity(conn, INDEX.name) is True


MIGRATION = Migration(
    version=15,
    name="index_finished_runs_online",
    summary="index idx_session_runs_finished on session_runs (finished_at, id) WHERE "
    "finished_at IS NOT NULL, built with CREATE INDEX CONCURRENTLY on PostgreSQL: "
    "retention's oldest-finished-first batches read only their rows.",
    declare=lambda dialect: (),
    complete_when=Check(f"{INDEX.name} exists and is valid", _index_ready),
    online=lambda dialect: (INDEX,),
)
migrate_index_finished_runs_online = MIGRATION.apply
