"""0017: ``idx_session_runs_metadata``, a GIN index on ``session_runs.run_metadata``
(PostgreSQL).

A metadata filter (``GET /api/runs?metadata={"tenant": "acme"}``, ``RunReads.page``) is
``run_metadata @> :metadata``: jsonb containment. Without an index it reads the runs in
``(created_at, id)`` order and keeps the matching ones, which costs a walk over every
run when few match. ``jsonb_path_ops`` indexes each path-and-value of the objects and
serves ``@>`` only, smaller and faster than the default GIN operator class; the planner
takes it when the filter is selective and keeps the ordered walk when most runs match.

``session_runs`` is a big live table: the index is an ``OnlineIndex``, built with
``CREATE INDEX CONCURRENTLY`` outside the migration's transaction, under the migration
lock; an interrupted build is dropped and built again by the next upgrade, and the
migration is recorded only once the index is valid.

SQLite has no index for a JSON object's keys; its filter keeps reading in
``(created_at, id)`` order. The migration is recorded there with nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection

from migrations.steps import Check, Item, Migration, OnlineIndex

INDEX = OnlineIndex(
    name="idx_session_runs_metadata",
    table="session_runs",
    definition="USING gin (run_metadata jsonb_path_ops)",
)


def _complete(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return True
    from migrations.runner import index_validity  # the runner imports this module

    return index_validity(conn, INDEX.name) is True


def _declared(_dialect: str) -> Sequence[Item]:
    return ()


MIGRATION = Migration(
    version=17,
    name="index_run_metadata",
    summary="index idx_session_runs_metadata on session_runs USING gin (run_metadata "
    "jsonb_path_ops), built with CREATE INDEX CONCURRENTLY on PostgreSQL: a selective "
    "metadata filter reads the matching runs only. Nothing on SQLite.",
    declare=_declared,
    complete_when=Check(f"a valid {INDEX.name} exists on PostgreSQL", _complete),
    online=lambda dialect: (INDEX,) if dialect == "postgresql" else (),
)
migrate_index_run_metadata = MIGRATION.apply
