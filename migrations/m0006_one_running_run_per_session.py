"""0006: at most one ``running`` run per session (partial unique index, an extension).

A database may already break the rule (two app instances started runs of
one session). The migration resolves it deterministically instead of
failing: per session the newest running run (latest ``created_at``, then
highest ``id``) stays ``running``; each older one becomes ``failed`` with a
``latest_error`` saying why, ``finished_at`` set if empty. The changed runs
are listed in the upgrade report. On PostgreSQL the table is locked against
writers first, so no new running run can slip in between the repair and the
index. The ``run_failed`` events of the runs failed here are appended by 0011
(this migration's SQL stays what databases in the field applied).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row

from migrations.steps import Item, Migration, Probe, sample, step
from migrations.timestamps import storage_now

_LATEST_ERROR = {
    "code": "superseded_running_run",
    "message": "another run of this session was running too when migration "
    "0006_one_running_run_per_session allowed only one; the newest kept running",
}


def _explain(rows: Sequence[Row[Any]]) -> str:
    return (
        f"{len(rows)} runs were running alongside a newer running run of the same session "
        f"and are now failed (run id, session id): {sample(rows)}"
    )


def _declare(dialect: str) -> Sequence[Item]:
    def params() -> Mapping[str, Any]:
        return {
            "running": "running",
            "failed": "failed",
            "latest_error": json.dumps(_LATEST_ERROR),
            "now": storage_now(dialect),
        }

    lock: Sequence[Item] = (
        (step("LOCK TABLE session_runs IN SHARE ROW EXCLUSIVE MODE"),)
        if dialect == "postgresql"
        else ()
    )
    return (
        *lock,
        Probe(
            """SELECT id, session_id FROM session_runs
WHERE status = :running AND EXISTS (
    SELECT 1 FROM session_runs AS newer
    WHERE newer.session_id = session_runs.session_id
      AND newer.status = :running
      AND (newer.created_at > session_runs.created_at
           OR (newer.created_at = session_runs.created_at AND newer.id > session_runs.id))
)
ORDER BY session_id, id""",
            _explain,
            params=params,
        ),
        step(
            """UPDATE session_runs
SET status = :failed, latest_error = :latest_error,
    finished_at = COALESCE(finished_at, :now), updated_at = :now
WHERE status = :running AND EXISTS (
    SELECT 1 FROM session_runs AS newer
    WHERE newer.session_id = session_runs.session_id
      AND newer.status = :running
      AND (newer.created_at > session_runs.created_at
           OR (newer.created_at = session_runs.created_at AND newer.id > session_runs.id))
)""",
            params=params,
        ),
        step(
            "CREATE UNIQUE INDEX IF NOT EXISTS uq_session_runs_one_running "
            "ON session_runs (session_id) WHERE status = 'running'"
        ),
    )


MIGRATION = Migration(
    version=6,
    name="one_running_run_per_session",
    summary="partial unique index uq_session_runs_one_running; existing violations resolved "
    "(newest stays running, older become failed with latest_error) and reported.",
    declare=_declare,
)
migrate_one_running_run_per_session = MIGRATION.apply
