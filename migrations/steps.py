"""Building blocks of a migration: plain SQL per dialect, guarded where SQL cannot guard itself.

A migration declares, per dialect, the full list of what it may do: ``Step``
(statements to execute) and ``Probe`` (a query whose rows become a note in the
upgrade report, or an error). Either may carry a ``Check``: a condition on the
database decided when the runner reaches it, because SQLite has no
``ADD COLUMN IF NOT EXISTS`` and neither dialect has ``ADD CONSTRAINT IF NOT
EXISTS``. The declared list, checks included, is what ``python -m migrations
sql`` prints, the same whatever state the target database is in.

The checksum covers the SQL a migration runs, statements and probe queries in
order, and nothing else: rewording a check's description or a probe's
report changes no checksum. A change to the SQL of a released migration is a
new migration, never an edit (``docs/migrations.md``).

Every value in a statement is a bound parameter; identifiers are constants of
the migration modules. DDL cannot take parameters, so the few literals in DDL
(enum labels, CHECK lists, index predicates) are constants written out in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Row, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import PGInspector
from sqlalchemy.exc import DBAPIError, NoSuchTableError

DIALECTS = ("sqlite", "postgresql")
_CHECKSUM_SEPARATOR = "\n;\n"


class MigrationError(Exception):
    """A migration could not be applied; nothing of it was kept."""


class StatementFailedError(MigrationError):
    """A statement of a migration failed; names both so the operator can find it."""

    def __init__(self, migration: str, statement: str, cause: BaseException) -> None:
        detail = str(getattr(cause, "orig", None) or cause).strip().splitlines()[0]
        super().__init__(
            f"migration {migration} failed (rolled back, nothing recorded) at statement:\n"
            f"  {statement}\n"
            f"  error: {detail}"
        )
        self.migration = migration
        self.statement = statement


@dataclass(frozen=True)
class Check:
    """A condition decided on the database when the runner reaches the guarded item."""

    description: str
    holds: Callable[[Connection], bool]
    sql: str | None = None
    """The same condition as a PostgreSQL boolean expression, for the runnable script of
    ``python -m migrations sql`` (``migrations.psql``); None where it has none."""
    params: Params | None = None
    """The values of ``sql``'s placeholders."""


Params = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class Step:
    """Statements executed in order, or all skipped when ``only_if`` does not hold.

    Grouping matters for multi-statement changes such as a SQLite table
    rebuild: the check is decided once, before the first statement changes
    what it looks at. ``params`` is called at execution time (for values such
    as "now"); each statement takes the parameters it names.
    """

    statements: tuple[str, ...]
    only_if: Check | None = None
    params: Params | None = None

    def render(self) -> str:
        body = ";\n".join(self.statements) + ";"
        if self.only_if is None:
            return body
        return f"-- only if {self.only_if.description}:\n{body}"


@dataclass(frozen=True)
class Probe:
    """A read-only query; rows mean something to report (``fatal``: refuse to go on)."""

    query: str
    explain: Callable[[Sequence[Row[Any]]], str]
    fatal: bool = False
    only_if: Check | None = None
    params: Params | None = None

    def render(self) -> str:
        purpose = "refuse to migrate" if self.fatal else "report"
        guard = f" (only if {self.only_if.description})" if self.only_if else ""
        return f"-- {purpose} the rows of{guard}:\n-- " + self.query.replace("\n", "\n-- ") + ";"


Item = Step | Probe


@dataclass(frozen=True)
class OnlineIndex:
    """An index built outside the migration's transaction (``migrations.runner``).

    PostgreSQL: ``CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS``, which
    cannot run in a transaction and takes no lock that stops reads or writes;
    the runner drops an INVALID index an interrupted build left, and records
    the migration only once the index is valid. SQLite: a plain ``CREATE
    INDEX IF NOT EXISTS`` inside the migration's transaction.
    """

    name: str
    table: str
    definition: str
    """The part after ``ON table``: ``(col, ...)`` and any ``WHERE ...``."""
    unique: bool = False

    def statement(self, dialect: str) -> str:
        unique = "UNIQUE " if self.unique else ""
        online = " CONCURRENTLY" if dialect == "postgresql" else ""
        return (
            f"CREATE {unique}INDEX{online} IF NOT EXISTS {self.name} "
            f"ON {self.table} {self.definition}"
        )


def step(*statements: str, only_if: Check | None = None, params: Params | None = None) -> Step:
    return Step(tuple(statements), only_if, params)


@dataclass(frozen=True)
class Migration:
    """One numbered migration: per dialect, the items it declares.

    ``apply`` runs the items on a connection inside the caller's transaction
    and returns the notes its probes produced. Every module exposes
    ``apply`` under the migration's function name (``migrate_v08_run_model``).
    """

    version: int
    name: str
    summary: str
    declare: Callable[[str], Sequence[Item]]
    complete_when: Check | None = None
    online: Callable[[str], Sequence[OnlineIndex]] | None = None
    """Indexes built after the transactional items, outside the transaction (``OnlineIndex``)."""

    def online_indexes(self, dialect: str) -> Sequence[OnlineIndex]:
        return self.online(dialect) if self.online is not None else ()

    def is_complete(self, conn: Connection) -> bool:
        """Whether an applied migration did all it declares (e.g. an index it had to skip).

        An incomplete one counts as pending: ``upgrade`` runs it again.
        """
        return self.complete_when is None or self.complete_when.holds(conn)

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def items(self, dialect: str) -> Sequence[Item]:
        if dialect not in DIALECTS:
            raise ValueError(f"unsupported dialect {dialect!r}: expected one of {DIALECTS}")
        return self.declare(dialect)

    def render_sql(self, dialect: str) -> str:
        rendered = [item.render() for item in self.items(dialect)]
        rendered += [
            (
                "-- outside the transaction, under the migration lock:\n"
                if dialect == "postgresql"
                else ""
            )
            + index.statement(dialect)
            + ";"
            for index in self.online_indexes(dialect)
        ]
        return "\n\n".join(rendered) if rendered else f"-- nothing to do on {dialect}"

    def sql(self, dialect: str) -> tuple[str, ...]:
        """Every statement and probe query the migration may run on ``dialect``, in order."""
        return tuple(
            statement
            for item in self.items(dialect)
            for statement in (item.statements if isinstance(item, Step) else (item.query,))
        ) + tuple(index.statement(dialect) for index in self.online_indexes(dialect))

    def checksum(self, dialect: str) -> str:
        """SHA-256 of the SQL the migration runs on ``dialect`` (``sql``), and nothing else."""
        return hashlib.sha256(_CHECKSUM_SEPARATOR.join(self.sql(dialect)).encode()).hexdigest()

    def apply(self, conn: Connection) -> list[str]:
        notes: list[str] = []
        for item in self.items(conn.dialect.name):
            if item.only_if is not None and not item.only_if.holds(conn):
                continue
            params = dict(item.params()) if item.params else {}
            if isinstance(item, Probe):
                rows = self._execute(conn, item.query, params).all()
                if rows and item.fatal:
                    raise MigrationError(f"migration {self.label} refused: {item.explain(rows)}")
                if rows:
                    notes.append(item.explain(rows))
                continue
            for statement in item.statements:
                self._execute(conn, statement, params)
        if conn.dialect.name != "postgresql":  # PostgreSQL: the runner builds them online
            for index in self.online_indexes(conn.dialect.name):
                self._execute(conn, index.statement(conn.dialect.name), {})
        return notes

    def _execute(self, conn: Connection, statement: str, params: Mapping[str, Any]) -> Any:
        try:
            return conn.execute(text(statement), params)
        except DBAPIError as exc:
            raise StatementFailedError(self.label, statement, exc) from exc


# --------------------------------------------------------------------------
# Checks. Each inspects afresh: an earlier item may just have changed the schema.


def _columns(conn: Connection, table: str) -> dict[str, dict[str, Any]]:
    try:
        return {col["name"]: dict(col) for col in inspect(conn).get_columns(table)}
    except NoSuchTableError:
        return {}


def _pg_column(table: str, column: str) -> str:
    return (
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "  # noqa: S608 names, not values
        f"AND table_name = '{table}' AND column_name = '{column}'"
    )


def column_missing(table: str, column: str) -> Check:
    return Check(
        f"{table}.{column} does not exist",
        lambda conn: column not in _columns(conn, table),
        sql=f"NOT EXISTS ({_pg_column(table, column)})",
    )


def _pg_inspector(conn: Connection) -> PGInspector:
    """PostgreSQL's inspector (``get_enums``), for the checks that run there only."""
    return cast(PGInspector, inspect(conn))


def enum_type_missing(name: str) -> Check:
    return Check(
        f"the enum type {name} does not exist",
        lambda conn: name not in {enum["name"] for enum in _pg_inspector(conn).get_enums()},
        sql="NOT EXISTS (SELECT 1 FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = "  # noqa: S608 names, not values
        f"t.typnamespace WHERE t.typtype = 'e' AND t.typname = '{name}' "
        "AND n.nspname = current_schema())",
    )


def check_constraint_missing(table: str, name: str) -> Check:
    return Check(
        f"{table} has no CHECK constraint {name}",
        lambda conn: name not in {ck["name"] for ck in inspect(conn).get_check_constraints(table)},
        sql="NOT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'c' "  # noqa: S608 names, not values
        f"AND conrelid = to_regclass('{table}') AND conname = '{name}')",
    )


def has_foreign_key(
    conn: Connection, table: str, column: str, referred_table: str, ondelete: str
) -> bool:
    """Whether ``table.column`` references ``referred_table`` with this ON DELETE action.

    SQLite is asked directly (``pragma_foreign_key_list``): SQLAlchemy's
    reflection misses the action of a column-level ``REFERENCES``, which is
    what ``ALTER TABLE ... ADD COLUMN`` creates there.
    """
    if conn.dialect.name == "sqlite":
        rows = conn.execute(
            text('SELECT "from", "table", on_delete FROM pragma_foreign_key_list(:table)'),
            {"table": table},
        )
        return (column, referred_table, ondelete) in {tuple(row) for row in rows}
    return any(
        fk["constrained_columns"] == [column]
        and fk["referred_table"] == referred_table
        and (fk.get("options", {}).get("ondelete") or "").upper() == ondelete
        for fk in inspect(conn).get_foreign_keys(table)
    )


_PG_ON_DELETE = {"CASCADE": "c", "SET NULL": "n", "RESTRICT": "r", "NO ACTION": "a"}
"""``pg_constraint.confdeltype`` of each ON DELETE action."""


def foreign_key_missing(table: str, column: str, referred_table: str, ondelete: str) -> Check:
    return Check(
        f"{table}.{column} has no foreign key to {referred_table} ON DELETE {ondelete}",
        lambda conn: not has_foreign_key(conn, table, column, referred_table, ondelete),
        sql="NOT EXISTS (SELECT 1 FROM pg_constraint AS c JOIN pg_attribute AS a "  # noqa: S608 names, not values
        f"ON a.attrelid = c.conrelid AND a.attname = '{column}' WHERE c.contype = 'f' "
        f"AND c.conrelid = to_regclass('{table}') "
        f"AND c.confrelid = to_regclass('{referred_table}') AND c.conkey = ARRAY[a.attnum] "
        f"AND c.confdeltype = '{_PG_ON_DELETE[ondelete]}')",
    )


_PG_DATA_TYPES: dict[type[Any], str] = {
    postgresql.TIMESTAMP: "timestamp without time zone",
    postgresql.JSON: "json",
    postgresql.JSONB: "jsonb",
    postgresql.INTEGER: "integer",
    postgresql.BIGINT: "bigint",
}
"""``information_schema.columns.data_type`` of the types ``pg_column_is`` checks."""


def pg_column_is(table: str, column: str, type_class: type[Any], description: str) -> Check:
    """``table.column`` has exactly this reflected PostgreSQL type class (not a subclass)."""

    def holds(conn: Connection) -> bool:
        col = _columns(conn, table).get(column)
        if col is None:
            return False
        reflected = col["type"]
        if type_class is postgresql.TIMESTAMP:
            return type(reflected) is postgresql.TIMESTAMP and not reflected.timezone
        return type(reflected) is type_class

    data_type = _PG_DATA_TYPES.get(type_class)
    sql = None
    if data_type is not None:
        sql = f"EXISTS ({_pg_column(table, column)} AND data_type = '{data_type}')"
    return Check(f"{table}.{column} is {description}", holds, sql=sql)


def index_exists(table: str, index: str) -> Check:
    return Check(
        f"{table} has the index {index}",
        lambda conn: index in {ix["name"] for ix in inspect(conn).get_indexes(table)},
        sql="EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() "  # noqa: S608 names, not values
        f"AND tablename = '{table}' AND indexname = '{index}')",
    )


def no_rows(description: str, query: str, params: Params | None = None) -> Check:
    """Holds when ``query`` returns nothing (e.g. no duplicates block a unique index)."""

    def holds(conn: Connection) -> bool:
        return conn.execute(text(query), dict(params()) if params else {}).first() is None

    return Check(
        f"{description} ({' '.join(query.split())})",
        holds,
        sql=f"NOT EXISTS ({query})",
        params=params,
    )


def all_of(*checks: Check) -> Check:
    sql = None
    if all(check.sql is not None for check in checks):
        sql = " AND ".join(f"({check.sql})" for check in checks)

    def params() -> Mapping[str, Any]:
        return {
            key: value
            for check in checks
            if check.params is not None
            for key, value in check.params().items()
        }

    return Check(
        " and ".join(check.description for check in checks),
        lambda conn: all(check.holds(conn) for check in checks),
        sql=sql,
        params=params if any(check.params is not None for check in checks) else None,
    )


def sample(rows: Sequence[Row[Any]], limit: int = 10) -> str:
    """The first rows of a probe, readable in a log line."""
    shown = ", ".join("(" + ", ".join(repr(value) for value in row) + ")" for row in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return shown + more


def unique_index_unless_duplicates(
    dialect: str, *, table: str, index: str, ddl: str, duplicates_query: str, key: str
) -> Sequence[Item]:
    """A unique index on data that may already break it: create it, or report why not.

    Legacy rows are never changed or deleted to make room for an index; the
    duplicates are listed in the report and in the version row, and the
    index is skipped. Give the migration ``complete_when=index_exists(...)``:
    it then stays pending, and every ``upgrade`` retries it, until the index
    exists. On PostgreSQL the table is locked against writers (not
    readers) first, so no duplicate can appear between the check and the
    index.
    """

    def explain(rows: Sequence[Row[Any]]) -> str:
        return (
            f"{index} was NOT created: {len(rows)} {key} values occur more than once in "
            f"{table} ({key}, rows): {sample(rows)}. No row was changed. Resolve the "
            "duplicates, then rerun upgrade: it retries the index (status shows this "
            "migration pending until then)"
        )

    lock = (step(f"LOCK TABLE {table} IN SHARE MODE"),) if dialect == "postgresql" else ()
    return (
        *lock,
        Probe(duplicates_query, explain),
        step(ddl, only_if=no_rows(f"no {key} value occurs twice", duplicates_query)),
    )
