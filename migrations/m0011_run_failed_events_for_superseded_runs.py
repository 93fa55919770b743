"""0011: a ``run_failed`` event for every run 0006 turned from ``running`` to ``failed``.

0006 resolves sessions with several running runs by failing the older ones
(``latest_error.code = "superseded_running_run"``) but wrote no event, so the
event log of such a run ended with it running. This migration appends the
missing ``run_failed`` event, once per run, to runs 0006 failed on this
database, whether 0006 ran just now or in an earlier upgrade. (A new migration
rather than an edit of 0006: databases in the field applied 0006's SQL, and its
checksum must stay theirs.)

Each event gets the next ``seq`` of its session, allocated as
``EventRepository.append`` does: from the session's counter in
``session_event_sequences``, never below ``MAX(seq) + 1`` (a v0.7 writer may
have left the counter behind), and the counter is moved past it. Several
superseded runs of one session get consecutive seqs in the order they were
created. On PostgreSQL the counters are locked against writers first, so an
append running meanwhile waits instead of taking the same number.

The event: ``type = 'run_failed'``, ``source = 'session'``, the run's id,
``event_id = 'run_failed:<run id>'`` (what makes a rerun add nothing),
``created_at`` = the run's ``finished_at``, and the payload
``{"error": <the run's latest_error>, "migration": "0006_one_running_run_per_session"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row

from migrations.steps import Item, Migration, Probe, sample, step
from migrations.timestamps import storage_now

SUPERSEDED_CODE = "superseded_running_run"
EVENT_ID_PREFIX = "run_failed:"

# Runs 0006 failed that have no run_failed event yet, numbered per session.
_SUPERSEDED = {
    "postgresql": "CAST(r.latest_error AS JSONB) ->> 'code' = :code",
    "sqlite": "json_extract(r.latest_error, '$.code') = :code",
}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "max"}


def _superseded_runs(dialect: str) -> str:
    return f"""superseded AS (
    SELECT r.id AS run_id, r.session_id, r.finished_at, r.latest_error,
           ROW_NUMBER() OVER (PARTITION BY r.session_id ORDER BY r.created_at, r.id) AS n
    FROM session_runs AS r
    WHERE r.status = :failed AND {_SUPERSEDED[dialect]}
      AND NOT EXISTS (
          SELECT 1 FROM session_events AS e
          WHERE e.session_id = r.session_id AND e.run_id = r.id AND e.type = :type
      )
)"""  # noqa: S608 (identifiers and SQL fragments are constants; values are parameters)


def _append_events(dialect: str) -> str:
    greatest = _GREATEST[dialect]
    payload = (
        "jsonb_build_object('error', s.latest_error, 'migration', CAST(:migration AS TEXT))"
        if dialect == "postgresql"
        else "json_object('error', json(s.latest_error), 'migration', :migration)"
    )
    source = "CAST(:source AS session_event_source)" if dialect == "postgresql" else ":source"
    return f"""WITH {_superseded_runs(dialect)},
first_free AS (
    SELECT t.session_id, {greatest}(
        COALESCE((SELECT q.next_seq FROM session_event_sequences AS q
                  WHERE q.session_id = t.session_id), 1),
        COALESCE((SELECT MAX(e.seq) FROM session_events AS e
                  WHERE e.session_id = t.session_id), 0) + 1
    ) AS seq
    FROM (SELECT DISTINCT session_id FROM superseded) AS t
)
INSERT INTO session_events (session_id, seq, type, payload, source, created_at, run_id, event_id)
SELECT s.session_id, f.seq + s.n - 1, CAST(:type AS VARCHAR), {payload}, {source},
       COALESCE(s.finished_at, :now), s.run_id, CAST(:event_id_prefix AS VARCHAR) || s.run_id
FROM superseded AS s JOIN first_free AS f ON f.session_id = s.session_id"""  # noqa: S608


def _move_counters(dialect: str) -> str:
    greatest = _GREATEST[dialect]
    return f"""INSERT INTO session_event_sequences (session_id, next_seq, updated_at)
SELECT e.session_id, MAX(e.seq) + 1, :now FROM session_events AS e
WHERE e.type = :type AND substr(e.event_id, 1, :prefix_length) = :event_id_prefix
GROUP BY e.session_id
ON CONFLICT (session_id) DO UPDATE SET
    next_seq = {greatest}(session_event_sequences.next_seq, excluded.next_seq),
    updated_at = excluded.updated_at"""  # noqa: S608


def _declare(dialect: str) -> Sequence[Item]:
    def params() -> Mapping[str, Any]:
        return {
            "failed": "failed",
            "code": SUPERSEDED_CODE,
            "type": "run_failed",
            "source": "session",
            "migration": "0006_one_running_run_per_session",
            "now": storage_now(dialect),
            "event_id_prefix": EVENT_ID_PREFIX,
            "prefix_length": len(EVENT_ID_PREFIX),
        }

    lock: Sequence[Item] = (
        (step("LOCK TABLE session_event_sequences IN SHARE ROW EXCLUSIVE MODE"),)
        if dialect == "postgresql"
        else ()
    )
    return (
        *lock,
        Probe(
            f"WITH {_superseded_runs(dialect)} SELECT run_id, session_id FROM superseded "  # noqa: S608
            "ORDER BY session_id, n",
            _explain_pending,
            params=params,
        ),
        step(_append_events(dialect), _move_counters(dialect), params=params),
    )


def _explain_pending(rows: Sequence[Row[Any]]) -> str:
    return (
        f"{len(rows)} runs failed by 0006 had no run_failed event; one was appended to each, "
        f"with the next seq of its session (run id, session id): {sample(rows)}"
    )


MIGRATION = Migration(
    version=11,
    name="run_failed_events_for_superseded_runs",
    summary="a run_failed event (next seq of its session, counter moved) for each run 0006 "
    "failed that has none; reported.",
    declare=_declare,
)
migrate_run_failed_events_for_superseded_runs = MIGRATION.apply
