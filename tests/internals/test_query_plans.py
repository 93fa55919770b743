"""The replay and listing queries use their indexes, on both backends (asserted with EXPLAIN).

The SQL is not copied here: each test calls the repository and captures the
statement it sends to the driver (``app.capture``), then asks the
database for that statement's plan with the same parameters. A change to a
query's shape that stops it from using its index fails here.

PostgreSQL plans from statistics, so the tables hold a few thousand rows and
are ANALYZEd, and ``enable_seqscan`` is off for the EXPLAIN: a tiny table
would otherwise be read sequentially whatever the indexes, and the test is
about whether an index *can* serve the query. SQLite's planner needs neither.
This asserts index use, never time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, text
from sqlmodel import Session as DbSession

from app.capture import CapturedStatement, capture_statements
from app.models import ChatSession, SessionEvent, SessionRun, new_id
from app.repositories import EventRepository, RunRepository

SESSIONS = 20
RUNS_PER_SESSION = 10
EVENTS_PER_RUN = 30


@dataclass(frozen=True)
class Population:
    session_id: str
    run_ids: list[str]


def _event(session_id: str, seq: int, run_id: str | None) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "seq": seq,
        "type": "task_progress",
        "payload": {"seq": seq},
        "source": "session",
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "run_id": run_id,
    }


@pytest.fixture
def population(engine: Engine) -> Population:
    """Sessions with runs and interleaved events, statistics up to date."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sessions = [new_id() for _ in range(SESSIONS)]
    runs = {session_id: [new_id() for _ in range(RUNS_PER_SESSION)] for session_id in sessions}
    events = [
        # Every seventh event is a legacy one, without a run.
        _event(session_id, seq, None if seq % 7 == 0 else run_ids[seq % RUNS_PER_SESSION])
        for session_id, run_ids in runs.items()
        for seq in range(1, RUNS_PER_SESSION * EVENTS_PER_RUN + 1)
    ]
    with engine.begin() as conn:
        conn.execute(insert(ChatSession.__table__), [{"id": s, "title": "plans"} for s in sessions])
        conn.execute(
            insert(SessionRun.__table__),
            [
                {
                    "id": run_id,
                    "session_id": session_id,
                    "status": "completed",
                    "trigger_source": "chat",
                    "created_at": start + timedelta(seconds=index),
                    "updated_at": start,
                }
                for session_id, run_ids in runs.items()
                for index, run_id in enumerate(run_ids)
            ],
        )
        conn.execute(insert(SessionEvent.__table__), events)
        # These tables only: a bare ANALYZE on PostgreSQL reads every schema of the database.
        for table in ("sessions", "session_runs", "session_events"):
            conn.execute(text(f"ANALYZE {table}"))
    return Population(sessions[0], runs[sessions[0]])


def _repository_query(engine: Engine, call: Callable[[DbSession], Any]) -> CapturedStatement:
    """The one SELECT the repository call sends (it must return rows, so nothing else runs)."""
    with capture_statements(engine) as capture, DbSession(engine) as db:
        assert call(db), "the query returned nothing; the population is wrong"
    selects = [s for s in capture.statements if s.sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1, [s.sql for s in capture.statements]
    return selects[0]


_SQLITE_INDEX_USE = re.compile(
    r"^(?:SEARCH|SCAN) (\w+)(?: AS \w+)? USING (?:COVERING )?INDEX (\w+)"
)


def _sqlite_plan(engine: Engine, query: CapturedStatement) -> Iterator[tuple[str, str | None]]:
    """(table, index or None for a full scan) per table access of the plan."""
    with engine.connect() as conn:
        details = [
            row[-1]
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query.sql}", query.parameters)
        ]
    for detail in details:
        if match := _SQLITE_INDEX_USE.match(detail):
            yield match[1], match[2]
        elif match := re.match(r"^SCAN (\w+)", detail):
            yield match[1], None


def _postgresql_plan(engine: Engine, query: CapturedStatement) -> Iterator[tuple[str, str | None]]:
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        (document,) = conn.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) {query.sql}", query.parameters
        ).one()
    plan = document if isinstance(document, list) else json.loads(document)
    yield from _postgresql_accesses(plan[0]["Plan"], parent_relation=None)


def _postgresql_accesses(
    node: dict[str, Any], parent_relation: str | None
) -> Iterator[tuple[str, str | None]]:
    relation = node.get("Relation Name")
    if node["Node Type"] == "Seq Scan":
        yield relation, None
    elif "Index Name" in node:
        # A Bitmap Index Scan names no relation; its Bitmap Heap Scan parent does.
        yield relation or parent_relation, node["Index Name"]
    for child in node.get("Plans", ()):
        yield from _postgresql_accesses(child, relation or parent_relation)


def _indexes_on(engine: Engine, query: CapturedStatement, table: str) -> set[str | None]:
    plan = _sqlite_plan if engine.dialect.name == "sqlite" else _postgresql_plan
    return {index for accessed, index in plan(engine, query) if accessed == table}


def test_list_for_run_uses_idx_session_event_run_seq(
    engine: Engine, population: Population
) -> None:
    query = _repository_query(
        engine, lambda db: EventRepository(db).list_for_run(population.run_ids[3], since_seq=40)
    )
    assert _indexes_on(engine, query, "session_events") == {"idx_session_event_run_seq"}


def test_list_for_session_uses_a_session_seq_index(engine: Engine, population: Population) -> None:
    query = _repository_query(
        engine, lambda db: EventRepository(db).list_for_session(population.session_id, since_seq=40)
    )
    used = _indexes_on(engine, query, "session_events")
    assert len(used) == 1
    assert used <= {"idx_session_event_seq", "uq_session_events_session_seq"}


@pytest.mark.parametrize("after_cursor", [False, True], ids=["first page", "next page"])
def test_run_listing_uses_idx_session_runs_session_created(
    engine: Engine, population: Population, after_cursor: bool
) -> None:
    before = population.run_ids[-3] if after_cursor else None
    query = _repository_query(
        engine,
        lambda db: RunRepository(db).list_for_session(
            population.session_id, limit=5, before=before
        ),
    )
    used = _indexes_on(engine, query, "session_runs")
    assert "idx_session_runs_session_created" in used
    assert None not in used, "a full scan of session_runs"


def test_starts_update_and_its_one_running_guard_are_index_served(
    engine: Engine, population: Population
) -> None:
    """``start``'s UPDATE finds its run by key and checks for another running run of
    the session through an index (``uq_session_runs_one_running`` or the status
    index, as the planner prefers), never by reading the table."""
    run_id = population.run_ids[0]
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE session_runs SET status = 'queued' WHERE id = :id"), {"id": run_id}
        )
    with capture_statements(engine) as capture, DbSession(engine) as db:
        RunRepository(db).start(run_id)
        db.rollback()
    (guarded,) = _updates_of_runs(capture.statements)
    accesses = _indexes_on(engine, guarded, "session_runs") | _indexes_on(
        engine, guarded, "other_run"
    )
    assert accesses and None not in accesses, accesses
    if engine.dialect.name == "postgresql":  # the same statement appends run_started
        _assert_event_allocation_is_index_served(engine, guarded)


def _updates_of_runs(statements: list[CapturedStatement]) -> list[CapturedStatement]:
    """The statements that update runs: a bare UPDATE, or on PostgreSQL the one statement
    that also appends the lifecycle event (``WITH moved AS (UPDATE session_runs ...``)."""
    return [
        s
        for s in statements
        if s.sql.lstrip().upper().startswith("UPDATE")
        or s.sql.lstrip().startswith("WITH moved AS \n(UPDATE session_runs")
    ]


def _assert_event_allocation_is_index_served(engine: Engine, statement: CapturedStatement) -> None:
    """The event part of a one-statement transition: MAX(seq) of the session's events
    and the counter upsert read through indexes (the upsert's arbiter is its key)."""
    events = _indexes_on(engine, statement, "session_events")
    assert events and None not in events, events
    assert None not in _indexes_on(engine, statement, "session_event_sequences")


def _session_runs_accesses(engine: Engine, statement: CapturedStatement) -> set[str | None]:
    """Index use of every access to ``session_runs``, under any of the queue's aliases."""
    names = ("session_runs", "candidate", "busy_run", "older_run", "other_run")
    return set().union(*(_indexes_on(engine, statement, name) for name in names))


@pytest.mark.parametrize("statistics", [True, False], ids=["analyzed", "no statistics"])
def test_claim_next_walks_the_queue_index_and_checks_sessions_through_indexes(
    engine: Engine, population: Population, statistics: bool
) -> None:
    """The candidate comes from ``idx_session_runs_queue`` in claim order; the checks
    for a busy session and an older queued run are index lookups, never a scan.
    Also on a SQLite database nobody ran ``ANALYZE`` on (the usual case), where the
    planner once preferred ``idx_session_runs_status`` and sorted every queued run."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE session_runs SET status = 'queued' WHERE id IN (:a, :b)"),
            {"a": population.run_ids[4], "b": population.run_ids[7]},
        )
        conn.execute(text("ANALYZE session_runs"))
        if not statistics and engine.dialect.name == "sqlite":
            conn.execute(text("DELETE FROM sqlite_stat1"))
    engine.dispose()  # SQLite reads its statistics when a connection opens
    with capture_statements(engine) as capture, DbSession(engine) as db:
        assert RunRepository(db).claim_next("plans") is not None
        db.rollback()
    # The queued run's claim (a resumed run's claim, tried first, found none).
    (claim,) = [s for s in _updates_of_runs(capture.statements) if "candidate" in s.sql]
    accesses = _session_runs_accesses(engine, claim)
    assert "idx_session_runs_queue" in accesses, accesses
    assert None not in accesses, accesses
    if engine.dialect.name == "sqlite":  # its plan names the aliases
        # Per session, not "every older queued run of every session" (quadratic).
        assert _indexes_on(engine, claim, "older_run") == {"idx_session_runs_session_status"}
        assert _indexes_on(engine, claim, "candidate") == {"idx_session_runs_queue"}
    else:
        _assert_event_allocation_is_index_served(engine, claim)


def test_a_rejecting_create_finds_active_runs_through_an_index(
    engine: Engine, population: Population
) -> None:
    with capture_statements(engine) as capture, DbSession(engine) as db:
        body = {"session_id": population.session_id, "message": "plans"}
        RunRepository(db).create(body, multitask_strategy="reject")
        db.rollback()
    (check,) = [s for s in capture.statements if "status IN ('queued'" in s.sql]
    accesses = _session_runs_accesses(engine, check)
    assert accesses and None not in accesses, accesses


def test_create_and_its_event_are_index_served(engine: Engine, population: Population) -> None:
    """``create``'s INSERT checks its session (and parent run) by key; on PostgreSQL the
    same statement appends ``run_created`` through the session's seq index."""
    with capture_statements(engine) as capture, DbSession(engine) as db:
        body = {"session_id": population.session_id, "message": "plans"}
        RunRepository(db).create(body, parent_run_id=population.run_ids[0])
        db.rollback()
    (create,) = [s for s in capture.statements if "INSERT INTO session_runs" in s.sql]
    assert None not in _indexes_on(engine, create, "sessions")
    assert None not in _session_runs_accesses(engine, create)
    if engine.dialect.name == "postgresql":
        _assert_event_allocation_is_index_served(engine, create)


# --------------------------------------------------------------------------
# Deleting a run: its events go by ON DELETE CASCADE, found through run_id.


_CASCADE_SQL = {
    False: "DELETE FROM session_events WHERE run_id = ?",
    True: "DELETE FROM session_events WHERE run_id = %(run_id)s",
}


def _events_by_run(engine: Engine, run_id: str) -> CapturedStatement:
    """The lookup the database's cascade makes for a deleted run (as a statement of its own,
    since neither EXPLAIN shows the work of a foreign key action)."""
    named = engine.dialect.name == "postgresql"
    return CapturedStatement(
        sql=_CASCADE_SQL[named],
        parameters={"run_id": run_id} if named else (run_id,),
        names=("run_id",),
        types=(None,),
        result_columns=(),
    )


def test_the_cascade_of_a_deleted_run_finds_its_events_through_idx_session_events_run(
    engine: Engine, population: Population
) -> None:
    query = _events_by_run(engine, population.run_ids[2])
    assert _indexes_on(engine, query, "session_events") == {"idx_session_events_run"}


@pytest.mark.parametrize("backend", ["postgresql"])
def test_deleting_a_run_scans_no_event_log_on_postgresql(
    engine: Engine, population: Population
) -> None:
    """The real cascade, counted by the server for this transaction: no sequential scan of
    ``session_events`` (planned from statistics, ``enable_seqscan`` left on)."""
    run_id = population.run_ids[4]
    with DbSession(engine) as db:
        RunRepository(db).delete(run_id)
        seq_scans, left = db.execute(
            text(
                "SELECT (SELECT seq_scan FROM pg_stat_xact_user_tables "
                "WHERE relid = 'session_events'::regclass), "
                "(SELECT count(*) FROM session_events WHERE run_id = :run_id)"
            ),
            {"run_id": run_id},
        ).one()
        db.rollback()
    assert left == 0
    assert seq_scans == 0


@pytest.mark.parametrize("backend", ["sqlite"])
def test_deleting_a_run_on_sqlite_costs_the_same_when_the_event_log_doubles(
    engine: Engine, population: Population
) -> None:
    """SQLite's virtual machine steps for the real delete and its cascade, counted by the
    progress handler (deterministic): with the index they stay flat when the event log of
    other sessions doubles; a scan of ``session_events`` would double them."""

    def steps_to_delete(run_id: str) -> int:
        count = 0

        def tick() -> int:
            nonlocal count
            count += 1
            return 0

        with DbSession(engine) as db:
            driver = db.connection().connection.driver_connection
            driver.set_progress_handler(tick, 1)
            try:
                RunRepository(db).delete(run_id)
            finally:
                driver.set_progress_handler(None, 1)
            db.commit()
        return count

    before = steps_to_delete(population.run_ids[5])
    # As many events again, in many small sessions (as a real log grows): a scan, or
    # a skip-scan per session of the (session_id, run_id, seq) index, would grow with them.
    others = [new_id() for _ in range(15 * SESSIONS)]
    per_session = RUNS_PER_SESSION * EVENTS_PER_RUN // 15
    with engine.begin() as conn:
        conn.execute(insert(ChatSession.__table__), [{"id": o, "title": "more"} for o in others])
        conn.execute(
            insert(SessionEvent.__table__),
            [_event(other, seq, None) for other in others for seq in range(1, per_session + 1)],
        )
    after = steps_to_delete(population.run_ids[6])
    assert after < before * 1.2, (before, after)
