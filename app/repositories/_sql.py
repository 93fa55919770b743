"""SQL building blocks of the repositories: typed parameters and the dialect differences.

The repositories prebuild their statements once per dialect (see their
``_statements`` functions); everything dialect-specific they need comes from
here, so the statements themselves read the same for both backends.

Parameters carry their types so that PostgreSQL gets explicit casts (psycopg
sends strings untyped, and ``:run_id IS NULL`` would not compile otherwise).

**One clock.** Every time the repositories write or compare (``created_at``,
``updated_at``, leases, ``fail_stale``'s cutoff, key expiry) is the database's
clock, read inside the statement (``NOW``, ``database_now``), never the clock of
the process that sends it: workers and servers on other machines, whose clocks
drift, then agree on which lease has expired, which key is live and which run came
first. PostgreSQL: ``statement_timestamp()``, the time the statement arrived: the
same for every use in one statement (a run's ``updated_at`` and ``finished_at``,
its lifecycle event), later for each later statement of a transaction (``now()``,
the transaction's start, would give every run created in one transaction the same
``created_at``, and a long transaction old ones; ``clock_timestamp()`` changes
within a statement). SQLite: the host's clock through SQLite's own ``strftime``
(``'now'`` is fixed within one statement step), in the layer's text format; its
resolution is a millisecond, so ``created_at`` of runs is kept in insertion order
(``run_created_at``). The database is on one host then, and so is its clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Float,
    Integer,
    Select,
    String,
    bindparam,
    exists,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement

from app.models import ChatSession, SessionRun
from app.types import JSONDocument, UTCDateTime

POSTGRESQL = "postgresql"
SQLITE = "sqlite"

InsertFactory = Callable[..., Any]

SESSION_ID = bindparam("session_id", type_=String())
RUN_ID = bindparam("run_id", type_=String())


class database_now(FunctionElement[datetime]):
    """The database's clock (module docstring), plus ``offset`` seconds if given (a bound
    ``Float``): ``statement_timestamp()`` on PostgreSQL, SQLite's ``strftime`` of
    ``'now'`` as the layer's naive-UTC text ``YYYY-MM-DD HH:MM:SS.ffffff``."""

    type = UTCDateTime()
    inherit_cache = True
    name = "database_now"


SQLITE_NOW_FORMAT = "'%Y-%m-%d %H:%M:%f'"
"""SQLite's ``%f`` is ``SS.SSS``: three digits of microseconds are appended as ``000``."""


@compiles(database_now)
def _postgresql_now(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = list(element.clauses)
    if not offset:
        return "statement_timestamp()"
    return f"(statement_timestamp() + {compiler.process(offset[0], **kw)} * INTERVAL '1 second')"


@compiles(database_now, SQLITE)
def _sqlite_now(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = list(element.clauses)
    if not offset:
        return f"(strftime({SQLITE_NOW_FORMAT}, 'now') || '000')"
    seconds = compiler.process(offset[0], **kw)
    return f"(strftime({SQLITE_NOW_FORMAT}, 'now', printf('%+.3f seconds', {seconds})) || '000')"


def now_plus(name: str) -> database_now:
    """The database's clock plus the bound number of seconds ``name`` (negative: before)."""
    return database_now(bindparam(name, type_=Float()))


NOW = database_now()
"""The database's clock (module docstring); the statements' ``now``."""


def now_text(dialect: str) -> str:
    """``NOW`` as SQL text, for the textual statements (``_batch``)."""
    return str(NOW.compile(dialect=_DIALECTS[dialect]()))


_DIALECTS = {POSTGRESQL: postgresql.dialect, SQLITE: sqlite.dialect}


class run_created_at(FunctionElement[datetime]):
    """SQLite: ``NOW``, or just after ``latest`` (the newest ``created_at`` of the new
    run's session and of the queue) when that is not older: SQLite's clock counts
    milliseconds, and runs created within one would otherwise tie and be ordered by
    their random ids. The writes are serialized (``BEGIN IMMEDIATE``), so ``created_at``
    then follows commit order. PostgreSQL: ``NOW`` (microseconds, one per statement)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "run_created_at"


@compiles(run_created_at)
def _postgresql_run_created_at(element: run_created_at, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(NOW, **kw)


@compiles(run_created_at, SQLITE)
def _sqlite_run_created_at(element: run_created_at, compiler: SQLCompiler, **kw: Any) -> str:
    (latest,) = [compiler.process(clause, **kw) for clause in element.clauses]
    now = compiler.process(NOW, **kw)
    # One microsecond later in the layer's format; at .xxx999 (a thousand runs in one
    # millisecond) or in another format, one millisecond later through strftime.
    after = (
        f"CASE WHEN length({latest}) = 26 AND substr({latest}, 24, 3) < '999' "
        f"THEN substr({latest}, 1, 23) || printf('%03d', substr({latest}, 24, 3) + 1) "
        f"ELSE strftime({SQLITE_NOW_FORMAT}, {latest}, '+0.001 seconds') || '000' END"
    )
    return f"CASE WHEN {latest} < {now} THEN {now} ELSE {after} END"


EMPTY_TEXT: ColumnClause[str] = literal_column("''")
LIMIT = bindparam("limit", type_=Integer())

SESSION_EXISTS: Select[tuple[bool]] = select(
    exists().where(ChatSession.__table__.c.id == SESSION_ID)
)
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
