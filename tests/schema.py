"""How the test suite builds the schema of a fresh database, and how it compares schemas.

The suite builds every schema through the migrations: the harness
(``conftest.py``) migrates one template per run and backend along the same
path as an adopted v0.7 database (baseline, then each migration) and gives
tests copies of it; ``tests/migrations/test_schema_drift.py`` proves that path ends at
what ``app.models`` declares, and that a copy equals a migrated database.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, inspect, text

import app.models  # noqa: F401  (registers the tables for create_all in the drift test)
from migrations import upgrade
from migrations.runner import VERSION_TABLE


def build_schema(engine: Engine) -> None:
    upgrade(engine)


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
