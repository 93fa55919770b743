"""What must hold in the database whatever happened to the writers, read from the tables alone.

The load and fault tests drive the repositories hard, kill processes, and
then ask this module what is wrong: they never trust what a worker believes
it did, only what is stored. ``violations`` lists every broken invariant in
words (an empty list is the pass); ``fingerprint`` summarizes every table so
a test can prove that a refused call changed nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, inspect, text

from app.models import RunStatus
from app.state_machine import ALLOWED, EVENT_TARGET, TERMINAL_STATUSES, TRANSITIONS, RunEventType

LIFECYCLE_TYPES = frozenset(event_type.value for event_type in RunEventType)
SOURCES_OF_EVENT: dict[str, frozenset[RunStatus]] = {
    transition.event_type.value: transition.sources for transition in TRANSITIONS
}
"""Where each transition event may start from: ``run_started`` and ``run_resumed``
both end in ``running`` but leave from different statuses, which ``ALLOWED`` alone
cannot tell apart."""

TABLES = ("sessions", "session_runs", "session_events", "session_event_sequences")
_ORDER_BY = {
    "sessions": "id",
    "session_runs": "id",
    "session_events": "id",
    "session_event_sequences": "session_id",
}


@dataclass(frozen=True, slots=True)
class _Run:
    id: str
    session_id: str
    status: str
    started_at: Any
    finished_at: Any
    waiting_reason: str | None


def _rows(engine: Engine, query: str) -> list[Any]:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(sqlite_begin="DEFERRED")
        with conn.begin():
            return list(conn.execute(text(query)))


def violations(engine: Engine) -> list[str]:
    """Every broken invariant of the run table and the event log, in words."""
    runs = {row.id: _Run(*row) for row in _rows(engine, _RUNS)}
    events = _rows(engine, _EVENTS)
    counters = {row.session_id: row.next_seq for row in _rows(engine, _COUNTERS)}
    found: list[str] = []
    found += _seq_problems(events, counters)
    found += _event_id_problems(events)
    found += _lifecycle_problems(runs, events)
    found += _running_problems(runs.values())
    return found


_RUNS = "SELECT id, session_id, status, started_at, finished_at, waiting_reason FROM session_runs"
_EVENTS = (
    "SELECT session_id, seq, type, run_id, event_id FROM session_events ORDER BY session_id, seq"
)
_COUNTERS = "SELECT session_id, next_seq FROM session_event_sequences"


def _seq_problems(events: list[Any], counters: dict[str, int]) -> list[str]:
    """Each session's seqs are exactly 1..n, and its counter hands out n + 1 next."""
    seqs: defaultdict[str, list[int]] = defaultdict(list)
    for event in events:
        seqs[event.session_id].append(event.seq)
    found = []
    for session_id, numbers in seqs.items():
        if numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
            duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
            found.append(
                f"session {session_id}: seqs are not 1..{len(numbers)} "
                f"(missing {missing[:5]}, duplicated {duplicated[:5]})"
            )
        if counters.get(session_id) != len(numbers) + 1:
            found.append(
                f"session {session_id}: counter next_seq={counters.get(session_id)} "
                f"but {len(numbers)} events are stored"
            )
    return found


def _event_id_problems(events: list[Any]) -> list[str]:
    seen: set[tuple[str, str]] = set()
    found = []
    for event in events:
        if event.event_id is None:
            continue
        key = (event.session_id, event.event_id)
        if key in seen:
            found.append(f"session {event.session_id}: event_id {event.event_id!r} stored twice")
        seen.add(key)
    return found


def _lifecycle_problems(runs: dict[str, _Run], events: list[Any]) -> list[str]:
    """Each run's lifecycle events are a legal path ending in its stored status, and the
    stored columns agree with that status (no run change without its event, and vice versa)."""
    paths: defaultdict[str, list[Any]] = defaultdict(list)
    found = []
    for event in events:
        if event.type not in LIFECYCLE_TYPES:
            continue
        if event.run_id is None or event.run_id not in runs:
            found.append(f"lifecycle event {event.type} seq {event.seq} has no run")
            continue
        if runs[event.run_id].session_id != event.session_id:
            found.append(f"run {event.run_id}: lifecycle event in another session")
        paths[event.run_id].append(event)
    for run in runs.values():
        found += _path_problems(run, sorted(paths[run.id], key=lambda event: event.seq))
    return found


def _path_problems(run: _Run, path: list[Any]) -> list[str]:
    if not path or path[0].type != RunEventType.RUN_CREATED:
        return [f"run {run.id}: lifecycle does not start with run_created"]
    status = EVENT_TARGET[RunEventType.RUN_CREATED]
    found = []
    for event in path[1:]:
        target = EVENT_TARGET[RunEventType(event.type)]
        sources = SOURCES_OF_EVENT.get(event.type, frozenset())
        if status not in sources or target not in ALLOWED[status]:
            found.append(f"run {run.id}: illegal {status} -> {event.type} at seq {event.seq}")
        status = target
    if status != run.status:
        found.append(f"run {run.id}: stored status {run.status}, lifecycle events end in {status}")
    stored = RunStatus(run.status)
    if (run.finished_at is not None) != (stored in TERMINAL_STATUSES):
        found.append(f"run {run.id}: {stored} with finished_at={run.finished_at}")
    if (run.waiting_reason is not None) != (stored is RunStatus.WAITING_INPUT):
        found.append(f"run {run.id}: {stored} with waiting_reason={run.waiting_reason!r}")
    ever_started = any(event.type == RunEventType.RUN_STARTED for event in path)
    if (run.started_at is not None) != ever_started:
        found.append(f"run {run.id}: started_at={run.started_at} but started={ever_started}")
    return found


def _running_problems(runs: Iterable[_Run]) -> list[str]:
    running: defaultdict[str, list[str]] = defaultdict(list)
    for run in runs:
        if run.status == RunStatus.RUNNING:
            running[run.session_id].append(run.id)
    return [
        f"session {session_id}: {len(ids)} running runs {ids}"
        for session_id, ids in running.items()
        if len(ids) > 1
    ]


def _canonical(value: Any) -> Any:
    """One spelling per value, whichever backend, driver or column type returned it.

    JSON text and parsed JSON compare equal, and so do a naive UTC timestamp and
    the same instant as an aware one (what 0005 turns legacy columns into)."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    if isinstance(value, str) and value[:1] in "{[":
        return _parsed_json(value)
    return value


@lru_cache(maxsize=4096)
def _parsed_json(value: str) -> Any:
    """Parsed once per distinct text: bulk rows repeat their payloads."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def digest(engine: Engine, query: str) -> tuple[int, str]:
    """(row count, sha256 of the rows in the query's order); ``query`` is a constant of a test."""
    rows = _rows(engine, query)
    hashed = hashlib.sha256()
    for row in rows:
        canonical = [_canonical(value) for value in row]
        hashed.update(json.dumps(canonical, sort_keys=True, default=str).encode())
    return len(rows), hashed.hexdigest()


def fingerprint(engine: Engine) -> dict[str, tuple[int, str]]:
    """``digest`` of every table of the layer, all columns, in primary-key order."""
    present = set(inspect(engine).get_table_names())
    return {
        # Table and column names are the constants above, never input.
        table: digest(engine, f"SELECT * FROM {table} ORDER BY {_ORDER_BY[table]}")  # noqa: S608
        for table in TABLES
        if table in present
    }


def count(engine: Engine, table: str) -> int:
    """Rows of one of ``TABLES``."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    return _rows(engine, f"SELECT COUNT(*) FROM {table}")[0][0]  # noqa: S608
