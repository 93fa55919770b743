"""Big tables, fast: a synthetic event log and loaders that bypass the ORM.

Scaling and migration benchmarks need up to millions of ``session_events``
rows. Writing them through the repositories would take hours, so they are
generated here and loaded in one transaction: ``executemany`` on SQLite,
``COPY`` on PostgreSQL.

Layout of the log: sessions of one "small" size and, optionally, one big
session holding a share of all events, split between two runs that alternate
(so a run's events are not contiguous in its session). Events of different
sessions interleave in insertion order, in blocks, as they would when many
sessions are active at once; within a session ``seq`` runs 1..n.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from app.models import new_id
from benchmarks.capture import SQLITE_TIMESTAMP_FORMAT
from benchmarks.environment import raw_postgresql, raw_sqlite

SESSIONS_PER_BLOCK = 100
EVENT_TYPES = ("message", "task_progress", "tool_call", "plan_update")
PAYLOAD = '{"step": "outline", "progress": 0.25, "tokens": 812}'
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SessionPlan:
    id: str
    events: int
    run_ids: tuple[str, ...]  # the runs events belong to, in turn; empty: legacy events only
    legacy_every: int = 0  # every n-th event has run_id NULL (0: none)


@dataclass
class EventLog:
    """The sessions and their sizes; ``events()`` generates the rows lazily."""

    sessions: list[SessionPlan]
    big: SessionPlan | None = None
    seed: int = 7

    @property
    def total_events(self) -> int:
        return sum(plan.events for plan in self.all_sessions())

    def all_sessions(self) -> list[SessionPlan]:
        return [*self.sessions, *([self.big] if self.big else [])]

    def events(self) -> Iterator[tuple[str, int, str | None, int]]:
        """(session_id, seq, run_id, index) in insertion order."""
        rng = random.Random(self.seed)
        blocks = [
            self.sessions[start : start + SESSIONS_PER_BLOCK]
            for start in range(0, len(self.sessions), SESSIONS_PER_BLOCK)
        ] or [[]]
        big_share = _split(self.big.events if self.big else 0, len(blocks))
        next_seq: dict[str, int] = {}
        index = 0
        for block, big_events in zip(blocks, big_share, strict=True):
            slots = [plan for plan in block for _ in range(plan.events)]
            if self.big is not None:
                slots += [self.big] * big_events
            rng.shuffle(slots)
            for plan in slots:
                seq = next_seq.get(plan.id, 0) + 1
                next_seq[plan.id] = seq
                yield plan.id, seq, _run_of(plan, seq), index
                index += 1


def _split(total: int, parts: int) -> list[int]:
    share, extra = divmod(total, parts)
    return [share + (1 if part < extra else 0) for part in range(parts)]


def _run_of(plan: SessionPlan, seq: int) -> str | None:
    if not plan.run_ids or (plan.legacy_every and seq % plan.legacy_every == 0):
        return None
    return plan.run_ids[seq % len(plan.run_ids)]


def event_log(
    total: int, *, session_size: int, big_share: float = 0.0, with_runs: bool = True
) -> EventLog:
    """``total`` events: one big session with ``big_share`` of them, the rest ``session_size`` each.

    With runs, a small session's events belong to one run except every tenth
    (a legacy event, ``run_id`` NULL); the big session alternates two runs.
    """
    big_events = round(total * big_share)
    count, remainder = divmod(total - big_events, session_size)
    sizes = [session_size] * count + ([remainder] if remainder else [])

    def runs(number: int) -> tuple[str, ...]:
        return tuple(new_id() for _ in range(number)) if with_runs else ()

    sessions = [SessionPlan(new_id(), size, runs(1), legacy_every=10) for size in sizes]
    big = SessionPlan(new_id(), big_events, runs(2)) if big_events else None
    return EventLog(sessions, big)


def timestamp(index: int, *, sqlite: bool) -> str:
    value = EPOCH + timedelta(milliseconds=index)
    return value.strftime(SQLITE_TIMESTAMP_FORMAT) if sqlite else value.isoformat()


# --------------------------------------------------------------------------
# Loaders


def load_rows(
    connection: sqlite3.Connection | psycopg.Connection,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
) -> None:
    """Insert ``rows`` into ``table`` inside the connection's current transaction.

    ``table`` and ``columns`` are constants of the benchmarks, never input.
    """
    column_list = ", ".join(columns)
    if isinstance(connection, sqlite3.Connection):
        marks = ", ".join("?" for _ in columns)
        connection.executemany(
            f"INSERT INTO {table} ({column_list}) VALUES ({marks})",  # noqa: S608
            rows,
        )
        return
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY {table} ({column_list}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)


def load_event_log(
    connection: sqlite3.Connection | psycopg.Connection, log: EventLog, *, v07: bool = False
) -> None:
    """Sessions, runs (unless ``v07``), events and the per-session counters of ``log``.

    ``v07``: only the columns of the v0.7 schema (no runs, no ``run_id``).
    The caller commits.
    """
    sqlite = isinstance(connection, sqlite3.Connection)
    created = timestamp(0, sqlite=sqlite)
    plans = log.all_sessions()
    load_rows(
        connection,
        "sessions",
        ("id", "title", "created_at", "updated_at"),
        ((plan.id, "benchmark", created, created) for plan in plans),
    )
    if not v07:
        load_rows(
            connection,
            "session_runs",
            ("id", "session_id", "status", "trigger_source", "created_at", "updated_at"),
            (
                (run_id, plan.id, "completed", "chat", created, created)
                for plan in plans
                for run_id in plan.run_ids
            ),
        )
    columns = ["session_id", "seq", "type", "payload", "source", "created_at"]
    if not v07:
        columns.append("run_id")

    def rows() -> Iterator[tuple[object, ...]]:
        for session_id, seq, run_id, index in log.events():
            row = (
                session_id,
                seq,
                EVENT_TYPES[index % len(EVENT_TYPES)],
                PAYLOAD,
                "session",
                timestamp(index, sqlite=sqlite),
            )
            yield row if v07 else (*row, run_id)

    load_rows(connection, "session_events", columns, rows())
    load_rows(
        connection,
        "session_event_sequences",
        ("session_id", "next_seq", "updated_at"),
        ((plan.id, plan.events + 1, created) for plan in plans),
    )


def load_in_bulk(backend: str, url: str, log: EventLog, *, v07: bool = False) -> None:
    """``load_event_log`` in one transaction on a raw connection, then fresh planner statistics.

    PostgreSQL's autovacuum would gather the statistics soon anyway; running
    ``VACUUM ANALYZE`` now makes the measurement independent of its timing.
    """
    if backend == "sqlite":
        sqlite_conn = raw_sqlite(url)
        try:
            sqlite_conn.execute("BEGIN IMMEDIATE")
            load_event_log(sqlite_conn, log, v07=v07)
            sqlite_conn.commit()
            if not v07:  # v0.7 never ran ANALYZE; leave its databases without sqlite_stat1
                sqlite_conn.execute("ANALYZE")
        finally:
            sqlite_conn.close()
        return
    with raw_postgresql(url) as pg_conn:
        load_event_log(pg_conn, log, v07=v07)
        pg_conn.commit()
        pg_conn.autocommit = True
        pg_conn.execute("VACUUM ANALYZE")
