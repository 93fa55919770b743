"""SQL building blocks of the repositories: typed parameters and the dialect differences.

The repositories prebuild their statements once per dialect (see their
``_statements`` functions); everything dialect-specific they need comes from
here, so the statements themselves read the same for both backends.

Parameters carry their types so that PostgreSQL gets explicit casts (psycopg
sends strings untyped, and ``:run_id IS NULL`` would not compile otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, Integer, String, bindparam, func, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import TextClause

from app.types import JSONDocument, UTCDateTime

POSTGRESQL = "postgresql"
SQLITE = "sqlite"
DIALECTS = (SQLITE, POSTGRESQL)

InsertFactory = Callable[..., Any]

SESSION_ID = bindparam("session_id", type_=String())
RUN_ID = bindparam("run_id", type_=String())
NOW = bindparam("now", type_=UTCDateTime())
LIMIT = bindparam("limit", type_=Integer())


def insert_for(dialect: str) -> InsertFactory:
    """The dialect's ``insert`` construct, which knows ``ON CONFLICT``."""
    return postgresql.insert if dialect == POSTGRESQL else sqlite.insert


def greatest(dialect: str, *values: ColumnElement[Any]) -> ColumnElement[Any]:
    """The largest of ``values``: ``GREATEST`` on PostgreSQL, multi-argument ``max`` on SQLite."""
    return func.greatest(*values) if dialect == POSTGRESQL else func.max(*values)


# Shallow merge of two JSON objects: keys of the patch replace stored ones,
# values are kept verbatim (nested objects replaced, not merged; null stays
# null). PostgreSQL's ``||`` on jsonb does exactly that. SQLite's json_patch
# would merge recursively and delete keys set to null, so the SQLite form
# rebuilds the object from the stored keys the patch does not name plus the
# patch's own; ``->`` yields each value as JSON text and ``json()`` keeps it JSON.
_MERGE_METRICS_POSTGRESQL = "COALESCE(session_runs.metrics, '{}'::jsonb) || :metrics"
_MERGE_METRICS_SQLITE = """(
    SELECT json_group_object(merged.key, json(merged.value)) FROM (
        SELECT stored.key AS key, COALESCE(session_runs.metrics, '{}') -> stored.fullkey AS value
        FROM json_each(COALESCE(session_runs.metrics, '{}')) AS stored
        WHERE stored.key NOT IN (SELECT patch.key FROM json_each(:metrics) AS patch)
        UNION ALL
        SELECT patch.key AS key, :metrics -> patch.fullkey AS value
        FROM json_each(:metrics) AS patch
    ) AS merged
)"""


def merge_metrics(dialect: str) -> TextClause:
    """``session_runs.metrics`` shallow-merged with the bound object ``:metrics``.

    Computed inside the UPDATE, so the merge reads the row it writes: no
    read-then-write race between two completions.
    """
    if dialect == POSTGRESQL:
        return text(_MERGE_METRICS_POSTGRESQL).bindparams(bindparam("metrics", type_=JSONB))
    return text(_MERGE_METRICS_SQLITE).bindparams(bindparam("metrics", type_=JSONDocument))
