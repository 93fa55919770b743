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

from sqlalchemy import ColumnElement, Integer, Select, String, bindparam, exists, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import TextClause

from app.models import Session, SessionRun
from app.types import JSONDocument, UTCDateTime

POSTGRESQL = "postgresql"
SQLITE = "sqlite"

InsertFactory = Callable[..., Any]

SESSION_ID = bindparam("session_id", type_=String())
RUN_ID = bindparam("run_id", type_=String())
NOW = bindparam("now", type_=UTCDateTime())
LIMIT = bindparam("limit", type_=Integer())

SESSION_EXISTS: Select[tuple[bool]] = select(exists().where(Session.__table__.c.id == SESSION_ID))
"""Whether the chat session is stored now; asks the database, not the identity map,
which may hold a copy of a session another transaction has deleted."""
RUN_EXISTS: Select[tuple[bool]] = select(exists().where(SessionRun.__table__.c.id == RUN_ID))
"""Whether the run is stored now (see ``SESSION_EXISTS``)."""


def insert_for(dialect: str) -> InsertFactory:
    """The dialect's ``insert`` construct, which knows ``ON CONFLICT``."""
    return postgresql.insert if dialect == POSTGRESQL else sqlite.insert


def greatest(dialect: str, *values: ColumnElement[Any]) -> ColumnElement[Any]:
    """The largest of ``values``: ``GREATEST`` on PostgreSQL, multi-argument ``max`` on SQLite."""
    return func.greatest(*values) if dialect == POSTGRESQL else func.max(*values)


# Shallow merge of two JSON objects: keys of the patch replace stored ones,
# values are kept verbatim (nested objects replaced, not merged; null stays
# null). PostgreSQL's ``||`` on jsonb does exactly that; on SQLite the same is
# the function ``json_merge_shallow`` that ``app.db`` registers on every
# connection (``app.types.merge_json_objects``).
_MERGE_METRICS_POSTGRESQL = "COALESCE(session_runs.metrics, '{}'::jsonb) || :metrics"
_MERGE_METRICS_SQLITE = "json_merge_shallow(session_runs.metrics, :metrics)"


def merge_metrics(dialect: str) -> TextClause:
    """``session_runs.metrics`` shallow-merged with the bound object ``:metrics``.

    Computed inside the UPDATE, so the merge reads the row it writes: no
    read-then-write race between two completions.
    """
    if dialect == POSTGRESQL:
        return text(_MERGE_METRICS_POSTGRESQL).bindparams(bindparam("metrics", type_=JSONB))
    return text(_MERGE_METRICS_SQLITE).bindparams(bindparam("metrics", type_=JSONDocument))


EVENTS_CHANNEL = "session_events"
"""PostgreSQL ``NOTIFY`` channel of committed events; the payload is the session id.

Writers of events call ``pg_notify`` inside their transaction, so the notice
goes out when (and only if) it commits; ``app.feed`` listens."""
