"""``python -m migrations sql`` on PostgreSQL: the pending migrations as a psql script
that runs as it is (``python -m migrations sql | psql -v ON_ERROR_STOP=1 DATABASE``).

What ``upgrade`` decides in Python, the script decides in the database when it runs:

- Each migration is one transaction (``BEGIN`` ... ``COMMIT``) that takes the
  migration lock ``upgrade`` takes (``pg_advisory_xact_lock`` on the same key, made
  from the database and schema names), then runs one ``DO`` block: it returns at
  once when ``schema_migrations`` records the migration (and, where the migration
  says when it is complete, it is), else it runs the migration's statements, each
  guarded one inside ``IF <its condition as SQL> THEN ... END IF``, and records the
  migration's row (version, name, checksum, time, duration) as ``upgrade`` does.
- A probe that reports rows raises a ``NOTICE`` per row; one that refuses raises an
  exception, which rolls its migration back (``ON_ERROR_STOP`` then stops psql).
- Placeholders are bound: every value is written into the statement as a SQL
  literal. A value ``upgrade`` computes when it runs (the current time) is the time
  the script was printed.
- An index built online (``CREATE INDEX CONCURRENTLY``) runs after its migration's
  transaction, outside any (do not run the script with ``psql -1``); the row is
  recorded afterwards, in a transaction of its own. An INVALID index left by an
  interrupted build is not dropped by the script: ``upgrade`` does that.

So the script is safe to run twice: the second run finds every migration recorded.
It does not compare the checksums of applied migrations (``status`` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from migrations.runner import _VERSION_TABLE_DDL, status
from migrations.steps import Check, Migration, Probe, Step

_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
"""SQLAlchemy's own pattern for the placeholders of ``text()``."""
_QUOTE = "$run_layer_sql$"
_LOCK = (
    "PERFORM pg_advisory_xact_lock(('x' || substr(encode(sha256(convert_to("
    "'run-data-layer migrations ' || current_database() || ' ' || current_schema(), "
    "'UTF8')), 'hex'), 1, 16))::bit(64)::bigint);"
)
"""The migration lock of ``upgrade`` (``migrations.runner._advisory_key``), in SQL."""


class NotRunnableError(ValueError):
    """A guard has no SQL form: the script cannot decide it (use ``sql --review``)."""


def literal(value: Any) -> str:
    """``value`` as a PostgreSQL literal (standard-conforming strings)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime):
        kind = "TIMESTAMP WITH TIME ZONE" if value.tzinfo is not None else "TIMESTAMP"
        return f"CAST({literal(value.isoformat())} AS {kind})"
    if isinstance(value, dict | list):
        return literal(json.dumps(value))
    text = str(value)
    if "\x00" in text:
        raise ValueError("a NUL character cannot be written into a PostgreSQL literal")
    return "'" + text.replace("'", "''") + "'"


def bind(statement: str, params: Mapping[str, Any]) -> str:
    """``statement`` with each ``:name`` replaced by the literal of ``params[name]``."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in params:
            raise NotRunnableError(f"no value for :{name} in {' '.join(statement.split())}")
        return literal(params[name])

    return _BIND.sub(value, statement)


def _quoted(statement: str) -> str:
    if _QUOTE in statement:  # pragma: no cover - no statement holds the tag
        raise NotRunnableError(f"a statement holds {_QUOTE}")
    return f"{_QUOTE}{statement}{_QUOTE}"


def _condition(check: Check, migration: Migration) -> str:
    if check.sql is None:
        raise NotRunnableError(
            f"migration {migration.label}: the guard '{check.description}' has no SQL form; "
            "review with: python -m migrations sql --review"
        )
    return bind(check.sql, dict(check.params()) if check.params else {})


def _indent(lines: Sequence[str], depth: int) -> list[str]:
    return [("  " * depth + line) if line else line for line in lines]


def _item(item: Step | Probe, migration: Migration) -> list[str]:
    params = dict(item.params()) if item.params else {}
    if isinstance(item, Probe):
        query = bind(item.query, params)
        if item.fatal:
            body = [
                f"FOR report IN EXECUTE {_quoted(query)} LOOP",
                f"  RAISE EXCEPTION 'migration {migration.label} refused: %', report;",
                "END LOOP;",
            ]
        else:
            body = [
                f"FOR report IN EXECUTE {_quoted(query)} LOOP",
                f"  RAISE NOTICE 'migration {migration.label}: %', report;",
                "  reported := reported + 1;",
                "END LOOP;",
            ]
        comment = "-- refuse to migrate on rows of:" if item.fatal else "-- report rows of:"
    else:
        body = [f"EXECUTE {_quoted(bind(statement, params))};" for statement in item.statements]
        comment = None
    if item.only_if is not None:
        guard = _condition(item.only_if, migration)
        body = [
            f"-- only if {item.only_if.description}",
            f"IF {guard} THEN",
            *_indent(body, 1),
            "END IF;",
        ]
    return ([comment] if comment else []) + body


def _record(migration: Migration) -> list[str]:
    checksum = migration.checksum("postgresql")
    return [
        "INSERT INTO schema_migrations (version, name, checksum, applied_at, duration_ms, notes)",
        f"VALUES ({migration.version}, {literal(migration.name)}, {literal(checksum)}, now(), "
        "round(extract(epoch FROM clock_timestamp() - started) * 1000)::integer,",
        "        CASE WHEN reported > 0 THEN reported || ' rows reported (see the NOTICEs of "
        "psql)' END)",
        "ON CONFLICT (version) DO UPDATE SET name = EXCLUDED.name, checksum = EXCLUDED.checksum,",
        "  applied_at = EXCLUDED.applied_at, duration_ms = EXCLUDED.duration_ms, "
        "notes = EXCLUDED.notes;",
        f"RAISE NOTICE 'applied migration {migration.label}';",
    ]


def _done(migration: Migration) -> str:
    recorded = bind(
        "EXISTS (SELECT 1 FROM schema_migrations WHERE version = :version)",
        {"version": migration.version},
    )
    complete = migration.complete_when
    if complete is not None and complete.sql is not None:
        return f"{recorded} AND {_condition(complete, migration)}"
    return recorded


def _block(lines: Sequence[str], migration: Migration, *, record: bool) -> list[str]:
    return [
        "BEGIN;",
        "DO $migration$",
        "DECLARE",
        "  started timestamptz := clock_timestamp();",
        "  reported integer := 0;",
        "  report record;",
        "BEGIN",
        f"  {_LOCK}",
        f"  IF {_done(migration)} THEN",
        f"    RAISE NOTICE 'migration {migration.label}: already applied';",
        "    RETURN;",
        "  END IF;",
        *_indent(lines, 1),
        *(_indent(_record(migration), 1) if record else []),
        "END",
        "$migration$;",
        "COMMIT;",
    ]


def migration_script(migration: Migration) -> str:
    """One migration as psql runs it (module docstring)."""
    body = [line for item in migration.items("postgresql") for line in _item(item, migration)]
    online = migration.online_indexes("postgresql")
    parts = [
        f"-- migration {migration.label} (checksum {migration.checksum('postgresql')[:12]}): "
        f"{migration.summary}",
        *_block(body, migration, record=not online),
    ]
    if online:
        parts.append("-- outside the transaction, under no lock of this script:")
        parts += [f"{index.statement('postgresql')};" for index in online]
        parts += _block([], migration, record=True)
    return "\n".join(parts)


def runnable_sql(engine: Engine, migrations: Sequence[Migration] | None = None) -> str:
    """The migrations pending on ``engine``'s database (PostgreSQL) as a psql script that
    runs as it is; runs none of it. Raises ``NotRunnableError`` when a guard has no SQL."""
    if engine.dialect.name != "postgresql":
        raise NotRunnableError("a runnable script is printed for PostgreSQL only")
    states = status(engine, migrations)
    by_version = {migration.version: migration for migration in _all(migrations)}
    pending = [by_version[s.version] for s in states if s.state == "pending"]
    header = [
        "-- The SQL of python -m migrations upgrade, runnable as it is:",
        "--   python -m migrations sql | psql -v ON_ERROR_STOP=1 <database>",
        "-- Each migration is one transaction that checks schema_migrations first, so the",
        "-- script is safe to run again. Not in one transaction (no psql -1): an online",
        "-- index is built outside any.",
        "\\set ON_ERROR_STOP on",
    ]
    parts = ["\n".join(header), f"{_VERSION_TABLE_DDL['postgresql']};"]
    parts += [migration_script(migration) for migration in pending]
    if not pending:
        parts.append("-- nothing to do: the database is up to date")
    return "\n\n".join(parts)


def _all(migrations: Sequence[Migration] | None) -> Sequence[Migration]:
    from migrations.runner import MIGRATIONS

    return MIGRATIONS if migrations is None else migrations


__all__ = ["NotRunnableError", "bind", "literal", "migration_script", "runnable_sql"]
