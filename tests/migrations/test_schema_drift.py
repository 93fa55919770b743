"""The schema the migrations build is the schema ``app.models`` declares, on both backends.

One fresh database is built by ``migrations.upgrade``, another by
``metadata.create_all``; both are reflected and compared object by object, so
a column, type, default, index (with its uniqueness and partial predicate),
constraint or foreign key that one side has and the other lacks fails here
with its name.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

from app.db import create_db_engine
from migrations import upgrade
from tests.schema import describe_schema


def test_migrated_schema_equals_the_models(
    make_database_url: Callable[[], str],
) -> None:
    migrated = create_db_engine(make_database_url())
    declared = create_db_engine(make_database_url())
    try:
        upgrade(migrated)
        SQLModel.metadata.create_all(declared)
        got, want = describe_schema(migrated), describe_schema(declared)
    finally:
        migrated.dispose()
        declared.dispose()

    assert set(got) == set(want)
    for table in want:
        assert got[table] == want[table], f"{table} differs from app.models"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_comparison_notices_a_missing_partial_index(
    make_database_url: Callable[[], str],
) -> None:
    """The drift check can fail: drop one partial index and it sees the difference."""
    engine = create_db_engine(make_database_url())
    try:
        upgrade(engine)
        before = describe_schema(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX uq_session_events_session_event_id")
        after = describe_schema(engine)
    finally:
        engine.dispose()
    assert before["session_events"]["indexes"]["uq_session_events_session_event_id"] == (
        ("session_id", "event_id"),
        True,
        "event_id IS NOT NULL",
    )
    assert "uq_session_events_session_event_id" not in after["session_events"]["indexes"]


def test_a_tests_migrated_database_equals_a_freshly_migrated_one(
    engine: Engine, make_database_url: Callable[[], str]
) -> None:
    """The harness does not migrate per test: it copies a migrated SQLite file, or
    replays the recorded migration into a new PostgreSQL schema (``conftest.py``).
    What a test's ``engine`` gets must be exactly what ``upgrade`` builds."""
    migrated = create_db_engine(make_database_url())
    try:
        upgrade(migrated)
        assert describe_schema(engine) == describe_schema(migrated)
        assert _versions(engine) == _versions(migrated)
    finally:
        migrated.dispose()


def _versions(engine: Engine) -> list[tuple[int, str, str]]:
    query = text("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def test_every_foreign_key_leads_an_index(engine: Engine) -> None:
    """Each foreign key's columns are the first columns of an index (or of the primary
    key), so that deleting or updating a referenced row finds the referencing rows
    without scanning their table (0013 added the one that was missing)."""
    inspector = inspect(engine)
    unindexed = []
    for table in inspector.get_table_names():
        leading = [tuple(inspector.get_pk_constraint(table)["constrained_columns"])]
        leading += [tuple(index["column_names"]) for index in inspector.get_indexes(table)]
        leading += [tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)]
        for key in inspector.get_foreign_keys(table):
            columns = tuple(key["constrained_columns"])
            if not any(index[: len(columns)] == columns for index in leading):
                unindexed.append(f"{table}({', '.join(columns)}) -> {key['referred_table']}")
    assert unindexed == []
