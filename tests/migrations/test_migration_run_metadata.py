"""Migration 0016: ``session_runs.run_metadata`` and ``idx_session_runs_created``.

Existing runs read as having no metadata, PostgreSQL adds the column without
rewriting the table, the index is valid, and running the migration again changes
nothing (an interrupted upgrade re-runs it).
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from migrations import MIGRATIONS, status, upgrade
from migrations.runner import index_validity

MIGRATION = next(m for m in MIGRATIONS if m.version == 16)


def _before_0016(engine: Engine) -> None:
    upgrade(engine, migrations=[m for m in MIGRATIONS if m.version < 16])
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sessions (id, title, created_at, updated_at) "
                "VALUES ('s', 't', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO session_runs (id, session_id, status, trigger_source, "
                "created_at, updated_at) VALUES ('r', 's', 'completed', 'chat', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )


def _metadata_of_r(engine: Engine) -> object:
    with engine.connect() as conn:
        value = conn.execute(text("SELECT run_metadata FROM session_runs WHERE id = 'r'")).scalar()
    return value


def test_existing_runs_get_an_empty_object_and_a_rerun_changes_nothing(
    empty_engine: Engine,
) -> None:
    _before_0016(empty_engine)
    applied = upgrade(empty_engine)
    assert [m.version for m in applied] == [16, 17]
    assert _metadata_of_r(empty_engine) in ({}, "{}")
    with empty_engine.begin() as conn:  # applied again by hand: every step is guarded
        MIGRATION.apply(conn)
        conn.execute(text("UPDATE session_runs SET run_metadata = '{\"a\": 1}' WHERE id = 'r'"))
    with empty_engine.begin() as conn:
        MIGRATION.apply(conn)
    assert _metadata_of_r(empty_engine) in ({"a": 1}, '{"a": 1}')
    assert all(state.state == "applied" for state in status(empty_engine))
    assert upgrade(empty_engine) == []


def test_a_run_inserted_without_metadata_gets_the_default(empty_engine: Engine) -> None:
    """An older writer that names no metadata (the column is NOT NULL DEFAULT '{}')."""
    _before_0016(empty_engine)
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO session_runs (id, session_id, status, trigger_source, "
                "created_at, updated_at) VALUES ('r2', 's', 'queued', 'chat', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        value = conn.execute(text("SELECT run_metadata FROM session_runs WHERE id = 'r2'"))
        assert value.scalar() in ({}, "{}")


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_adds_the_column_without_a_rewrite_and_builds_a_valid_index(
    empty_engine: Engine,
) -> None:
    """PostgreSQL only: a table rewrite changes the table's relfilenode; a constant
    default since PostgreSQL 11 is kept in the catalog instead."""
    _before_0016(empty_engine)
    query = text("SELECT relfilenode FROM pg_class WHERE relname = 'session_runs'")
    with empty_engine.connect() as conn:
        before = conn.execute(query).scalar()
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        assert conn.execute(query).scalar() == before
        assert index_validity(conn, "idx_session_runs_created") is True
        missing = conn.execute(
            text(
                "SELECT atthasmissing FROM pg_attribute "
                "WHERE attrelid = 'session_runs'::regclass AND attname = 'run_metadata'"
            )
        ).scalar()
        assert missing is True  # the default of old rows lives in the catalog


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_dropped_listing_index_makes_0016_pending_again(empty_engine: Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(text("DROP INDEX idx_session_runs_created"))
    assert [s.version for s in status(empty_engine) if s.state == "pending"] == [16]
    assert [m.version for m in upgrade(empty_engine)] == [16]
    with empty_engine.connect() as conn:
        assert index_validity(conn, "idx_session_runs_created") is True
