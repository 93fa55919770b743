"""The migration runner: applies pending migrations in order, one transaction each.

Version table ``schema_migrations``: one row per applied migration with its
version, name, the checksum of its declared SQL for the database's dialect,
``applied_at`` (UTC), ``duration_ms`` and ``notes`` (what the migration
reported, e.g. an index it had to skip). A database without the table (new,
or made by v0.7) has nothing applied; the baseline adopts v0.7 tables as they
are.

Each migration runs in its own transaction together with its version row, so
a failure leaves no trace and the error names the migration and the statement
(DDL is transactional on both backends; see ``app.db`` for SQLite).

Several processes may upgrade at once (app instances starting together):

* PostgreSQL: a session-level advisory lock, taken on a dedicated
  autocommit connection by polling ``pg_try_advisory_lock`` until a deadline,
  serializes the runners. The key is derived from the database and the
  current schema, so runners on two schemas of one database do not wait for
  each other.
* SQLite: every migration's transaction begins with ``BEGIN IMMEDIATE`` (the
  engine's default), so checking the version row and applying the migration
  happen under the write lock; a waiting runner finds the row and skips. The
  busy timeout is raised to the lock timeout for the upgrade's connection.

Either way the others wait, then find nothing to do; none fails.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, Engine, bindparam, inspect, text
from sqlalchemy.exc import OperationalError

from app.types import UTCDateTime, utc_now
from migrations import (
    m0001_v07_baseline,
    m0002_v08_run_model,
    m0003_v08_event_run_columns,
    m0004_run_waiting_reason_and_options,
    m0005_pg_aware_timestamps_and_jsonb,
    m0006_one_running_run_per_session,
    m0007_unique_event_id_per_session,
    m0008_unique_seq_per_session,
)
from migrations.steps import Migration, MigrationError

MIGRATIONS: tuple[Migration, ...] = (
    m0001_v07_baseline.MIGRATION,
    m0002_v08_run_model.MIGRATION,
    m0003_v08_event_run_columns.MIGRATION,
    m0004_run_waiting_reason_and_options.MIGRATION,
    m0005_pg_aware_timestamps_and_jsonb.MIGRATION,
    m0006_one_running_run_per_session.MIGRATION,
    m0007_unique_event_id_per_session.MIGRATION,
    m0008_unique_seq_per_session.MIGRATION,
)

logger = logging.getLogger("migrations")

VERSION_TABLE = "schema_migrations"
DEFAULT_LOCK_TIMEOUT = 300.0
_LOCK_POLL_SECONDS = 0.2

_VERSION_TABLE_DDL = {
    "sqlite": """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL PRIMARY KEY,
    name VARCHAR NOT NULL,
    checksum VARCHAR(64) NOT NULL,
    applied_at DATETIME NOT NULL,
    duration_ms INTEGER NOT NULL,
    notes TEXT
)""",
    "postgresql": """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL PRIMARY KEY,
    name VARCHAR NOT NULL,
    checksum VARCHAR(64) NOT NULL,
    applied_at TIMESTAMP WITH TIME ZONE NOT NULL,
    duration_ms INTEGER NOT NULL,
    notes TEXT
)""",
}
_SELECT_RECORDED = text(
    "SELECT version, name, checksum, applied_at, duration_ms, notes FROM schema_migrations "
    "ORDER BY version"
).columns(applied_at=UTCDateTime)
_INSERT_RECORD = text(
    "INSERT INTO schema_migrations (version, name, checksum, applied_at, duration_ms, notes) "
    "VALUES (:version, :name, :checksum, :applied_at, :duration_ms, :notes)"
).bindparams(bindparam("applied_at", type_=UTCDateTime))
_NOTE_SEPARATOR = "\n"


class ChangedMigrationError(MigrationError):
    """Applied migrations whose code changed since; refused unless explicitly allowed."""


class MigrationLockTimeoutError(MigrationError):
    """Another runner held the migration lock for longer than the timeout."""


@dataclass(frozen=True)
class AppliedMigration:
    """A migration this call applied, with what it reported."""

    version: int
    name: str
    duration_ms: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Recorded:
    version: int
    name: str
    checksum: str
    applied_at: datetime
    duration_ms: int
    notes: tuple[str, ...]


State = Literal["applied", "pending", "changed", "unknown"]


@dataclass(frozen=True)
class MigrationStatus:
    """Where one migration stands on a database.

    ``changed``: applied, but its declared SQL differs from the code now.
    ``unknown``: recorded by a newer version of this layer; this code has no such migration.
    """

    version: int
    name: str
    state: State
    recorded: Recorded | None
    checksum: str | None


def _check_order(migrations: Sequence[Migration]) -> None:
    versions = [migration.version for migration in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migration versions must be unique and increasing, got {versions}")


def _has_version_table(conn: Connection) -> bool:
    return inspect(conn).has_table(VERSION_TABLE)


def _recorded(conn: Connection) -> dict[int, Recorded]:
    if not _has_version_table(conn):
        return {}
    return {
        row.version: Recorded(
            version=row.version,
            name=row.name,
            checksum=row.checksum,
            applied_at=row.applied_at,
            duration_ms=row.duration_ms,
            notes=tuple(row.notes.split(_NOTE_SEPARATOR)) if row.notes else (),
        )
        for row in conn.execute(_SELECT_RECORDED)
    }


def _statuses(
    dialect: str, recorded: dict[int, Recorded], migrations: Sequence[Migration]
) -> list[MigrationStatus]:
    known = {migration.version for migration in migrations}
    result: list[MigrationStatus] = []
    for migration in migrations:
        checksum = migration.checksum(dialect)
        record = recorded.get(migration.version)
        state: State = "pending"
        if record is not None:
            state = "applied" if record.checksum == checksum else "changed"
        result.append(MigrationStatus(migration.version, migration.name, state, record, checksum))
    for version, record in sorted(recorded.items()):
        if version not in known:
            result.append(MigrationStatus(version, record.name, "unknown", record, None))
    return sorted(result, key=lambda status: status.version)


@contextmanager
def _read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for reading; on SQLite a deferred transaction, so readers never queue."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(sqlite_begin="DEFERRED")
        yield conn


def status(engine: Engine, migrations: Sequence[Migration] | None = None) -> list[MigrationStatus]:
    """Every migration's state on ``engine``'s database, by version; changes nothing."""
    migrations = _default(migrations)
    _check_order(migrations)
    with _read_connection(engine) as conn, conn.begin():
        recorded = _recorded(conn)
    return _statuses(engine.dialect.name, recorded, migrations)


def pending_sql(engine: Engine, migrations: Sequence[Migration] | None = None) -> str:
    """The SQL ``upgrade`` would run on ``engine``'s database, for review; runs none of it.

    Guarded statements are printed with their condition; the runner decides
    each condition when it reaches it, after the earlier migrations ran.
    """
    migrations = _default(migrations)
    dialect = engine.dialect.name
    with _read_connection(engine) as conn, conn.begin():
        has_table = _has_version_table(conn)
    pending_versions = {
        state.version for state in status(engine, migrations) if state.state == "pending"
    }
    pending = [migration for migration in migrations if migration.version in pending_versions]
    parts = [] if has_table else [f"-- the runner's version table\n{_VERSION_TABLE_DDL[dialect]};"]
    for migration in pending:
        parts.append(
            f"-- migration {migration.label} (checksum {migration.checksum(dialect)[:12]}): "
            f"{migration.summary}\n{migration.render_sql(dialect)}"
        )
    return "\n\n".join(parts) if parts else "-- nothing to do: the database is up to date"


def upgrade(
    engine: Engine,
    *,
    allow_changed: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    migrations: Sequence[Migration] | None = None,
) -> list[AppliedMigration]:
    """Apply the pending migrations in order; return what this call applied, with notes.

    Raises ``ChangedMigrationError`` (before applying anything) when an
    applied migration's code changed, unless ``allow_changed``: then the new
    checksum is recorded and the change logged. Raises
    ``StatementFailedError`` / ``MigrationError`` when a migration fails (it is
    rolled back; later ones are not tried) and ``MigrationLockTimeoutError``
    when another runner holds the lock past ``lock_timeout`` seconds.
    """
    migrations = _default(migrations)
    _check_order(migrations)
    dialect = engine.dialect.name
    applied: list[AppliedMigration] = []
    with _upgrade_connection(engine, lock_timeout) as conn:
        with _write_transaction(conn, lock_timeout):
            conn.execute(text(_VERSION_TABLE_DDL[dialect]))
            _accept_or_refuse_changes(conn, migrations, allow_changed)
        for migration in migrations:
            with _write_transaction(conn, lock_timeout):
                if conn.execute(
                    text("SELECT 1 FROM schema_migrations WHERE version = :version"),
                    {"version": migration.version},
                ).first():
                    continue
                started = time.perf_counter()
                notes = migration.apply(conn)
                duration_ms = round((time.perf_counter() - started) * 1000)
                conn.execute(
                    _INSERT_RECORD,
                    {
                        "version": migration.version,
                        "name": migration.name,
                        "checksum": migration.checksum(dialect),
                        "applied_at": utc_now(),
                        "duration_ms": duration_ms,
                        "notes": _NOTE_SEPARATOR.join(notes) or None,
                    },
                )
            logger.info("applied migration %s in %d ms", migration.label, duration_ms)
            for note in notes:
                logger.warning("migration %s: %s", migration.label, note)
            applied.append(
                AppliedMigration(migration.version, migration.name, duration_ms, tuple(notes))
            )
    return applied


def _accept_or_refuse_changes(
    conn: Connection, migrations: Sequence[Migration], allow_changed: bool
) -> None:
    dialect = conn.dialect.name
    changed = [
        state
        for state in _statuses(dialect, _recorded(conn), migrations)
        if state.state == "changed"
    ]
    if not changed:
        return
    listing = ", ".join(
        f"{state.version:04d}_{state.name} (recorded {state.recorded.checksum[:12]}, "
        f"code {(state.checksum or '')[:12]})"
        for state in changed
        if state.recorded is not None
    )
    if not allow_changed:
        raise ChangedMigrationError(
            f"applied migrations changed since they ran: {listing}. A changed migration is "
            "not rerun; restore its code, or accept the change with --allow-changed "
            "(allow_changed=True)."
        )
    for state in changed:
        conn.execute(
            text("UPDATE schema_migrations SET checksum = :checksum WHERE version = :version"),
            {"checksum": state.checksum, "version": state.version},
        )
    logger.warning("accepted changed migrations (new checksums recorded): %s", listing)


def _default(migrations: Sequence[Migration] | None) -> Sequence[Migration]:
    return MIGRATIONS if migrations is None else migrations


# --------------------------------------------------------------------------
# Exclusive access for one upgrade


@contextmanager
def _upgrade_connection(engine: Engine, lock_timeout: float) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with _pg_advisory_lock(engine, lock_timeout), engine.connect() as conn:
            yield conn
        return
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        foreign_keys = driver.execute("PRAGMA foreign_keys").fetchone()[0]
        busy_timeout = driver.execute("PRAGMA busy_timeout").fetchone()[0]
        # Outside a transaction, where SQLite honours it: a table rebuild must
        # not cascade its DROP into child tables (SQLite's documented recipe).
        driver.execute("PRAGMA foreign_keys = OFF")
        driver.execute(f"PRAGMA busy_timeout = {int(lock_timeout * 1000)}")
        try:
            yield conn
        finally:
            driver.execute(f"PRAGMA foreign_keys = {int(foreign_keys)}")
            driver.execute(f"PRAGMA busy_timeout = {int(busy_timeout)}")


@contextmanager
def _write_transaction(conn: Connection, lock_timeout: float) -> Iterator[None]:
    """A transaction; on SQLite, a busy timeout at BEGIN IMMEDIATE becomes a lock timeout."""
    try:
        transaction = conn.begin()
    except OperationalError as exc:
        if "locked" not in str(exc.orig):
            raise
        raise MigrationLockTimeoutError(
            f"another process held the SQLite write lock for more than {lock_timeout:g} s; "
            "is an upgrade or a long transaction stuck? Retry, or raise the timeout."
        ) from exc
    with transaction:
        yield


def _advisory_key(conn: Connection) -> int:
    """A signed 64-bit key for this database and schema (one lock per schema, not per server)."""
    database, schema = conn.execute(text("SELECT current_database(), current_schema()")).one()
    digest = hashlib.sha256(f"run-data-layer migrations {database} {schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _pg_advisory_lock(engine: Engine, timeout: float) -> Iterator[None]:
    with engine.connect() as lock_conn:
        lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        key = _advisory_key(lock_conn)
        deadline = time.monotonic() + timeout
        waiting_logged = False
        while not lock_conn.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
        ).scalar_one():
            if time.monotonic() >= deadline:
                raise MigrationLockTimeoutError(
                    f"another process held the migration lock (advisory key {key}) for more "
                    f"than {timeout:g} s; is an upgrade stuck? Retry, or raise the timeout."
                )
            if not waiting_logged:
                logger.info("waiting for another process to finish migrating (key %d)", key)
                waiting_logged = True
            time.sleep(_LOCK_POLL_SECONDS)
        try:
            yield
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
