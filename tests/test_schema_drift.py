"""The schema the migrations build is the schema ``app.models`` declares, on both backends.

One fresh database is built by ``migrations.upgrade``, another by
``metadata.create_all``; both are reflected and compared object by object, so
a column, type, default, index (with its uniqueness and partial predicate),
constraint or foreign key that one side has and the other lacks fails here
with its name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

import app.models  # noqa: F401  (registers the tables)
from app.db import create_db_engine
from migrations import upgrade
from migrations.runner import VERSION_TABLE


def _normalized(sql: Any) -> str | None:
    return None if sql is None else re.sub(r"\s+", " ", str(sql)).strip()


def _foreign_keys(engine: Engine, table: str) -> list[tuple[str, ...]]:
    """(column, referred table, referred column, ON DELETE) per foreign key.

    SQLite is asked directly: SQLAlchemy's reflection misses the ON DELETE of
    a column-level REFERENCES (what ``ADD COLUMN`` makes there).
    """
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            rows = conn.execute(
                text('SELECT "from", "table", "to", on_delete FROM pragma_foreign_key_list(:t)'),
                {"t": table},
            ).all()
        return sorted((c, t, r, "" if d == "NO ACTION" else d) for c, t, r, d in rows)
    return sorted(
        (
            ",".join(fk["constrained_columns"]),
            fk["referred_table"],
            ",".join(fk["referred_columns"]),
            (fk.get("options", {}).get("ondelete") or "").upper(),
        )
        for fk in inspect(engine).get_foreign_keys(table)
    )


def describe_schema(engine: Engine) -> dict[str, dict[str, Any]]:
    """Everything the comparison looks at, per table, in a form that compares with ``==``."""
    inspector = inspect(engine)
    schema: dict[str, dict[str, Any]] = {}
    for table in sorted(set(inspector.get_table_names()) - {VERSION_TABLE}):
        indexes = {
            index["name"]: (
                tuple(index["column_names"]),
                bool(index["unique"]),
                _normalized(index.get("dialect_options", {}).get(f"{engine.dialect.name}_where")),
            )
            for index in inspector.get_indexes(table)
        }
        schema[table] = {
            "columns": {
                col["name"]: (
                    _normalized(col["type"].compile(dialect=engine.dialect)),
                    col["nullable"],
                    _normalized(col.get("default")),
                )
                for col in inspector.get_columns(table)
            },
            "primary_key": tuple(inspector.get_pk_constraint(table)["constrained_columns"]),
            "foreign_keys": _foreign_keys(engine, table),
            "indexes": indexes,
            "unique_constraints": sorted(
                (uc["name"], tuple(uc["column_names"]))
                for uc in inspector.get_unique_constraints(table)
            ),
            "check_constraints": sorted(
                (ck["name"], _normalized(ck["sqltext"]))
                for ck in inspector.get_check_constraints(table)
            ),
        }
    if engine.dialect.name == "postgresql":
        schema["(enum types)"] = {
            enum["name"]: tuple(enum["labels"]) for enum in inspector.get_enums()
        }
    return schema


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
