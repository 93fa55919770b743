"""0009: legacy ``json`` values that ``jsonb`` refuses are kept as text, then converted.

PostgreSQL's ``json`` type stores the text it was given; ``jsonb`` parses it
and refuses some valid JSON: the escape ``\\u0000`` (``jsonb`` cannot hold
NUL), lone UTF-16 surrogate escapes such as ``\\ud800``, numbers beyond
``numeric``'s range. One such v0.7 event made 0005's ``CAST(payload AS
JSONB)`` fail on every run. 0005 now leaves a column with a value that may
be refused (a conservative pattern) as ``json``, and this migration converts
it without losing anything:

* every value of such a column is tried (``pg_temp`` function catching the
  cast's error); each refused one is replaced by the object
  ``{"_legacy_json": "<the original text, exactly>"}``, which ``jsonb`` holds;
* the column then becomes ``jsonb``;
* the affected rows (table, column, id, PostgreSQL's reason) are reported in
  the upgrade output, the log, ``schema_migrations.notes`` and ``status``.

The documented key ``_legacy_json`` is the way back: ``payload->>'_legacy_json'``
is the text v0.7 stored, byte for byte. No row is deleted. The timestamp
conversions of 0005 refuse no value (every naive ``timestamp`` has a UTC
instant), so only the JSON columns need this. SQLite stores JSON as text and
converts nothing: nothing to do there.

Why a new migration rather than an edit of 0005: databases in the field
applied 0005's SQL, and its checksum must stay theirs. 0005's SQL is unchanged;
only its guard (a Python check, outside the checksum) skips a column this
migration then converts. Where 0005 already succeeded, every value converted,
so the guard would have held and 0005 did exactly what it does now.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from sqlalchemy import Row
from sqlalchemy.dialects import postgresql

from migrations.steps import Item, Migration, Probe, pg_column_is, sample, step

LEGACY_JSON_KEY = "_legacy_json"
JSON_COLUMNS = (
    ("session_events", "payload"),
    ("session_runs", "resume_payload"),
    ("session_runs", "latest_error"),
    ("session_runs", "metrics"),
    ("session_runs", "options"),
)
"""(table, column): every legacy JSON column; each table's key is ``id``."""

_REFUSAL = """CREATE OR REPLACE FUNCTION pg_temp.run_layer_jsonb_refusal(value json)
RETURNS text LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM CAST(value AS jsonb);
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN SQLERRM;
END
$fn$"""
_REFUSED = """CREATE TEMPORARY TABLE IF NOT EXISTS run_layer_refused_json (
    table_name VARCHAR NOT NULL,
    column_name VARCHAR NOT NULL,
    row_id VARCHAR NOT NULL,
    reason TEXT NOT NULL
) ON COMMIT DROP"""


def _is_json(table: str, column: str) -> Any:
    return pg_column_is(table, column, postgresql.JSON, "json")


def _explain(rows: Sequence[Row[Any]]) -> str:
    values: list[tuple[Any, ...]] = [tuple(row) for row in rows]
    ids = ", ".join(f"{table}.{column} id {row_id}" for table, column, row_id, _ in values)
    reasons = sorted({reason for *_, reason in values})
    return (
        f"{len(rows)} legacy JSON values could not be stored as jsonb ({'; '.join(reasons)}); "
        f'each is now the object {{"{LEGACY_JSON_KEY}": <its original text>}}, nothing '
        f"else changed: {ids}"
        if len(rows) <= 100
        else f"{len(rows)} legacy JSON values could not be stored as jsonb "
        f'({"; ".join(reasons)}); each is now the object {{"{LEGACY_JSON_KEY}": <its '
        f"original text>}}. The first ones (table, column, id, reason): {sample(rows, 100)}; "
        f"the others carry the key {LEGACY_JSON_KEY!r} too"
    )


# Identifiers below come from JSON_COLUMNS (constants); every value is a parameter.
def _record_refused(table: str, column: str) -> str:
    return (
        "INSERT INTO run_layer_refused_json (table_name, column_name, row_id, reason) "  # noqa: S608
        f"SELECT :table_name, :column_name, CAST(id AS VARCHAR), reason FROM "
        f"(SELECT id, pg_temp.run_layer_jsonb_refusal({column}) AS reason FROM {table}) AS tried "
        "WHERE reason IS NOT NULL"
    )


def _keep_refused_as_text(table: str, column: str) -> str:
    return (
        f"UPDATE {table} SET {column} = "  # noqa: S608
        f"json_build_object(CAST(:key AS TEXT), CAST({column} AS TEXT)) "
        "WHERE CAST(id AS VARCHAR) IN (SELECT row_id FROM run_layer_refused_json "
        "WHERE table_name = :table_name AND column_name = :column_name)"
    )


def _to_jsonb(table: str, column: str) -> str:
    return f"ALTER TABLE {table} ALTER COLUMN {column} TYPE JSONB USING CAST({column} AS JSONB)"


def _declare(dialect: str) -> Sequence[Item]:
    if dialect != "postgresql":
        return ()
    return (
        step(_REFUSAL, _REFUSED),
        *(
            step(
                _record_refused(table, column),
                only_if=_is_json(table, column),
                params=partial(dict, table_name=table, column_name=column),
            )
            for table, column in JSON_COLUMNS
        ),
        Probe(
            "SELECT table_name, column_name, row_id, reason FROM run_layer_refused_json "
            "ORDER BY table_name, column_name, length(row_id), row_id",
            _explain,
        ),
        *(
            step(
                _keep_refused_as_text(table, column),
                _to_jsonb(table, column),
                only_if=_is_json(table, column),
                params=partial(dict, key=LEGACY_JSON_KEY, table_name=table, column_name=column),
            )
            for table, column in JSON_COLUMNS
        ),
    )


MIGRATION = Migration(
    version=9,
    name="legacy_json_kept_as_text",
    summary="PostgreSQL: json columns 0005 left (a value jsonb may refuse) become jsonb; each "
    f'refused value becomes {{"{LEGACY_JSON_KEY}": <original text>}} and is reported. '
    "SQLite: nothing.",
    declare=_declare,
)
migrate_legacy_json_kept_as_text = MIGRATION.apply
