"""The run listings (``RunReads.page``, ``page_for_session``) walk an index in their order,
on both backends (EXPLAIN, as ``test_query_plans`` does it): a keyset page reads its
rows, never the whole table, and never sorts it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, text

from app.capture import CapturedStatement, capture_statements
from app.repositories.reads import RunReads
from tests.internals.test_query_plans import Population, _indexes_on, population

__all__ = ["population"]  # the fixture, shared with test_query_plans


def _listing_query(engine: Engine, **filters: Any) -> CapturedStatement:
    reads = RunReads(engine)  # not the shared instance: the capture must see the statement
    with capture_statements(engine) as capture:
        first = reads.page(limit=3, **filters)
        assert first.items and first.next_cursor
        reads.page(limit=3, cursor=first.next_cursor, **filters)
    selects = [s for s in capture.statements if s.sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, [s.sql for s in capture.statements]
    return selects[1]  # the page after a cursor


def _sorts(engine: Engine, query: CapturedStatement) -> list[str]:
    """PostgreSQL: the plan's full Sort nodes (an index in the order needs none)."""
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        (document,) = conn.exec_driver_sql(
            f"EXPLAIN (FORMAT JSON) {query.sql}", query.parameters
        ).one()
    plan = document if isinstance(document, list) else json.loads(document)
    found, nodes = [], [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        if node["Node Type"] == "Sort":
            found.append(node["Node Type"])
        nodes.extend(node.get("Plans", ()))
    return found


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "idx_session_runs_created"),
        ({"status": "completed"}, "idx_session_runs_queue"),
        ({"metadata": {"team": "a"}}, "idx_session_runs_created"),
    ],
    ids=["all", "status", "metadata"],
)
def test_listing_across_sessions_walks_an_index(
    engine: Engine, population: Population, filters: dict[str, Any], index: str
) -> None:
    if "metadata" in filters:
        with engine.begin() as conn:
            conn.execute(text('UPDATE session_runs SET run_metadata = \'{"team": "a"}\''))
    query = _listing_query(engine, **filters)
    used = _indexes_on(engine, query, "session_runs")
    if "metadata" in filters and engine.dialect.name == "postgresql":
        # Every run matches: the ordered walk, or the GIN index and a sort of the few
        # rows (statistics decide); never a scan of the table.
        assert used in ({index}, {"idx_session_runs_metadata"}), used
    else:
        assert used == {index}
    if engine.dialect.name == "postgresql" and "metadata" not in filters:
        # (with a metadata filter the planner may sort a few rows: statistics decide)
        assert _sorts(engine, query) == []


def test_a_sessions_listing_walks_an_index(engine: Engine, population: Population) -> None:
    reads = RunReads(engine)
    with capture_statements(engine) as capture:
        page = reads.page_for_session(population.session_id, limit=3)
        assert page.next_cursor
        reads.page_for_session(population.session_id, limit=3, cursor=page.next_cursor)
    query = [s for s in capture.statements if s.sql.lstrip().upper().startswith("SELECT")][-1]
    used = _indexes_on(engine, query, "session_runs")
    assert None not in used, "a full scan of session_runs"
    assert used & {"idx_session_runs_session_created", "idx_session_runs_created"}


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_selective_metadata_filter_reads_the_gin_index(engine: Engine) -> None:
    """5,000 runs over 50 tenants and one rare tag: a filter on the rare tag reads
    ``idx_session_runs_metadata`` (migration 0017) instead of walking every run."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sessions (id, title, created_at, updated_at) "
                "VALUES ('plan-s', 't', now(), now())"
            )
        )
        conn.execute(
            text(
                "INSERT INTO session_runs (id, session_id, status, trigger_source, "
                "created_at, updated_at, run_metadata) "
                "SELECT 'plan-r' || i, 'plan-s', 'completed', 'chat', "
                "now() - i * interval '1 second', now(), "
                "jsonb_build_object('tenant', 't' || (i % 50)) "
                "|| CASE WHEN i = 4321 THEN '{\"tag\": \"rare\"}'::jsonb ELSE '{}' END "
                "FROM generate_series(1, 5000) AS i"
            )
        )
        conn.execute(text("ANALYZE session_runs"))
    reads = RunReads(engine)
    with capture_statements(engine) as capture:
        page = reads.page(limit=3, metadata={"tag": "rare"})
    assert [run.run_id for run in page.items] == ["plan-r4321"]
    (query,) = [s for s in capture.statements if s.sql.lstrip().upper().startswith("SELECT")]
    assert _indexes_on(engine, query, "session_runs") == {"idx_session_runs_metadata"}
