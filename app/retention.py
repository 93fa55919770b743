"""Retention: delete finished runs (or only their events) in batches.

``python -m app.runs purge --finished-before 30d [--events-only] [--batch 1000]
[--dry-run]`` calls ``purge``. Every SQL statement it sends is written out
below, per dialect, so that a reader sees exactly what runs.

Rules (``docs/operations.md``):

* Only runs in a terminal status (``completed``, ``failed``, ``cancelled``)
  whose ``finished_at`` is older than the cutoff (the database's clock minus
  ``older_than``) are eligible. Queued, running (leased or not) and
  ``waiting_input`` runs and their events are never touched; neither is a run
  whose retry (a run with ``parent_run_id`` = it) is still active, so no
  active run is ever updated by ``ON DELETE SET NULL``. Session-level events
  (``run_id`` NULL) are never touched. Terminal runs never change status, so
  an eligible run stays eligible.
* One batch (at most ``batch`` runs with all their events) per transaction;
  no lock is held longer than one batch. A run's events go in the same
  transaction as the run, all at once: a reader never sees part of a run's log.
* Several purgers at once: on PostgreSQL the batch's runs are picked with
  ``FOR UPDATE SKIP LOCKED`` (``FOR NO KEY UPDATE`` for ``events_only``, which
  does not block appends' foreign-key checks), so purgers never wait for each
  other nor delete the same run twice; on SQLite each batch is a ``BEGIN
  IMMEDIATE`` transaction (the engine's default), so batches take turns.
* Expired idempotency keys are purged too (``RunRepository.purge_idempotency_keys``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, text
from sqlalchemy.sql.elements import TextClause

from app.db import read_only, unit_of_work
from app.repositories import RunRepository

RETENTION_ENVIRONMENT_VARIABLE = "RUN_RETENTION_DAYS"
DEFAULT_BATCH = 1000
MAX_BATCH = 100_000
MAX_AGE = timedelta(days=3650)

_TERMINAL = "('completed', 'failed', 'cancelled')"
_ACTIVE = "('queued', 'running', 'waiting_input')"
_CUTOFF = {
    "postgresql": "statement_timestamp() - :older_than_seconds * INTERVAL '1 second'",
    "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', "
    "-:older_than_seconds)) || '000'",
}


def _eligible(dialect: str) -> str:
    """The WHERE clause of a purgeable run (alias ``r``)."""
    # SQLite: ``+r.status`` keeps its planner (no statistics) off idx_session_runs_status,
    # which holds nearly every run, and on idx_session_runs_finished (0015), in order.
    status = "+r.status" if dialect == "sqlite" else "r.status"
    return f"""{status} IN {_TERMINAL}
  AND r.finished_at < {_CUTOFF[dialect]}
  AND NOT EXISTS (
    SELECT 1 FROM session_runs AS child
    WHERE child.parent_run_id = r.id AND child.status IN {_ACTIVE})"""  # noqa: S608 (constant fragments)


def _pick(dialect: str, *, events_only: bool, keyset: bool) -> str:
    has_events = (
        "\n  AND EXISTS (SELECT 1 FROM session_events AS e WHERE e.run_id = r.id)"
        if events_only
        else ""
    )
    lock = ""
    if dialect == "postgresql":
        lock = "\nFOR NO KEY UPDATE SKIP LOCKED" if events_only else "\nFOR UPDATE SKIP LOCKED"
    # Keyset: (finished_at, id) after the last run this purger saw, so runs it
    # skipped (an active retry) or emptied (events_only) are not scanned again.
    after = (
        "\n  AND (r.finished_at > :after_finished"
        " OR (r.finished_at = :after_finished AND r.id > :after_id))"
        if keyset
        else ""
    )
    return f"""SELECT r.id, r.finished_at FROM session_runs AS r
WHERE {_eligible(dialect)}{has_events}{after}
ORDER BY r.finished_at, r.id
LIMIT :batch{lock}"""  # noqa: S608 (constant fragments; values are parameters)


@dataclass(frozen=True)
class Statements:
    """The purge's SQL on one dialect, as text."""

    pick_runs: str
    pick_more_runs: str
    pick_runs_with_events: str
    pick_more_runs_with_events: str
    delete_events: str
    delete_runs: str
    count_eligible: str
    count_expired_keys: str


def statements(dialect: str) -> Statements:
    now = {
        "postgresql": "statement_timestamp()",
        "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now') || '000'",
    }[dialect]
    return Statements(
        pick_runs=_pick(dialect, events_only=False, keyset=False),
        pick_more_runs=_pick(dialect, events_only=False, keyset=True),
        pick_runs_with_events=_pick(dialect, events_only=True, keyset=False),
        pick_more_runs_with_events=_pick(dialect, events_only=True, keyset=True),
        delete_events="DELETE FROM session_events WHERE run_id IN :run_ids",
        delete_runs="DELETE FROM session_runs WHERE id IN :run_ids",
        count_eligible=f"""SELECT count(*) AS runs,
  COALESCE(sum((SELECT count(*) FROM session_events AS e WHERE e.run_id = r.id)), 0) AS events
FROM session_runs AS r
WHERE {_eligible(dialect)}""",  # noqa: S608 (constant fragments)
        count_expired_keys="SELECT count(*) FROM run_idempotency_keys "  # noqa: S608
        f"WHERE expires_at <= {now}",
    )


def _compiled(sql: str) -> TextClause:
    clause = text(sql)
    if ":run_ids" in sql:
        clause = clause.bindparams(bindparam("run_ids", expanding=True))
    return clause


@dataclass
class PurgeResult:
    runs: int = 0
    events: int = 0
    idempotency_keys: int = 0
    batches: int = 0
    dry_run: bool = False
    events_only: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "events": self.events,
            "idempotency_keys": self.idempotency_keys,
            "batches": self.batches,
            "dry_run": self.dry_run,
            "events_only": self.events_only,
        }


def purge(
    engine: Engine,
    older_than: timedelta,
    *,
    events_only: bool = False,
    batch: int = DEFAULT_BATCH,
    dry_run: bool = False,
    progress: Callable[[PurgeResult, int], None] | None = None,
) -> PurgeResult:
    """Purge the runs finished more than ``older_than`` ago (or only their events).

    ``progress(result_so_far, total_estimate)`` is called after each batch.
    Returns how many runs (0 with ``events_only``), events and expired
    idempotency keys went (``dry_run``: would go).
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be an integer from 1 to {MAX_BATCH}")
    if not timedelta(0) <= older_than <= MAX_AGE:
        raise ValueError("older_than must be from 0 to 3650 days")
    dialect = engine.dialect.name
    sql = statements(dialect)
    seconds = older_than.total_seconds()
    result = PurgeResult(dry_run=dry_run, events_only=events_only)
    with read_only(engine).connect() as conn:  # SQLite: no write lock for counting
        with conn.begin():
            runs, events = conn.execute(
                text(sql.count_eligible), {"older_than_seconds": seconds}
            ).one()
            keys = conn.execute(text(sql.count_expired_keys)).scalar_one()
    total = int(events) if events_only else int(runs)
    if dry_run:
        result.runs = 0 if events_only else int(runs)
        result.events = int(events)
        result.idempotency_keys = int(keys)
        return result
    first = text(sql.pick_runs_with_events if events_only else sql.pick_runs)
    more = text(sql.pick_more_runs_with_events if events_only else sql.pick_more_runs)
    delete_events = _compiled(sql.delete_events)
    delete_runs = _compiled(sql.delete_runs)
    after: tuple[Any, str] | None = None
    with engine.connect() as conn:
        while True:
            with conn.begin():
                params: dict[str, Any] = {"older_than_seconds": seconds, "batch": batch}
                if after is not None:
                    params["after_finished"], params["after_id"] = after
                picked = conn.execute(first if after is None else more, params).all()
                if not picked:
                    break
                ids = [row.id for row in picked]
                result.events += conn.execute(delete_events, {"run_ids": ids}).rowcount
                if not events_only:
                    result.runs += conn.execute(delete_runs, {"run_ids": ids}).rowcount
            result.batches += 1
            after = (picked[-1].finished_at, picked[-1].id)
            if progress is not None:
                progress(result, total)
    with unit_of_work(engine) as db:
        result.idempotency_keys = RunRepository(db).purge_idempotency_keys()
    return result


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_age(raw: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w``; a bare number is days."""
    match = _AGE.match(raw)
    if match is None:
        raise ValueError("expected an age such as 30d, 12h, 90m, 45s or 2w (a bare number is days)")
    age = timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    if age > MAX_AGE:
        raise ValueError("expected an age of at most 3650 days")
    return age


def retention_from_environment() -> timedelta | None:
    """``RUN_RETENTION_DAYS`` (a number of days), or ``None`` when unset or empty: off."""
    raw = os.environ.get(RETENTION_ENVIRONMENT_VARIABLE, "").strip()
    if not raw:
        return None
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not 0 <= days <= MAX_AGE.days or days != days:
        raise ValueError(
            f"{RETENTION_ENVIRONMENT_VARIABLE} must be a number of days from 0 to "
            f"{MAX_AGE.days}, or empty for no retention"
        )
    return timedelta(days=days)
