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

* PostgreSQL: every migration's transaction first takes a transaction-level
  advisory lock (``pg_advisory_xact_lock``) on the connection that applies
  it, then re-reads the version row under the lock. The lock lives exactly as
  long as the work it protects: a dead connection ends both, and the next
  runner finds the version unrecorded and applies it. The key is derived from
  the database and the current schema, so runners on two schemas of one
  database do not wait for each other.
* SQLite: every migration's transaction begins with ``BEGIN IMMEDIATE`` (the
  engine's default), so checking the version row and applying the migration
  happen under the write lock; a waiting runner finds the row and skips. The
  busy timeout is raised to the lock timeout for the upgrade's connection.

Either way the others wait, then find nothing to do; none fails.

Waits are bounded (``Waits``): on PostgreSQL every statement runs under a
short ``lock_timeout``, so a migration stuck behind a long transaction never
holds the queue of readers behind its pending ``ALTER`` for longer than that;
it is rolled back and retried with backoff until the total wait is spent,
then the upgrade stops naming the backends that hold the locks.

Behind a transaction pooler (``app.db.is_pooled``) the upgrade runs on the
engine's direct URL (``DATABASE_DIRECT_URL``) when it has one. Without one,
the transactional migrations still run through the pooler (the lock and the
timeouts above last one transaction each, which the pooler keeps on one
server connection), but an online index build, which needs a server session
of its own for its session lock and ``CREATE INDEX CONCURRENTLY``, stops with
a ``MigrationError`` asking for the direct URL.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Literal, TypeVar

from sqlalchemy import Connection, Engine, bindparam, inspect, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from app.db import create_db_engine, direct_url, is_pooled, set_sqlite_busy_timeout
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
    m0009_legacy_json_kept_as_text,
    m0010_bigint_event_ids,
    m0011_run_failed_events_for_superseded_runs,
    m0012_run_queue_and_idempotency_keys,
    m0013_index_events_by_run,
    m0014_run_attempts,
    m0015_index_finished_runs_online,
    m0016_run_metadata,
    m0017_index_run_metadata,
)
from migrations.steps import Migration, MigrationError, OnlineIndex

MIGRATIONS: tuple[Migration, ...] = (
    m0001_v07_baseline.MIGRATION,
    m0002_v08_run_model.MIGRATION,
    m0003_v08_event_run_columns.MIGRATION,
    m0004_run_waiting_reason_and_options.MIGRATION,
    m0005_pg_aware_timestamps_and_jsonb.MIGRATION,
    m0006_one_running_run_per_session.MIGRATION,
    m0007_unique_event_id_per_session.MIGRATION,
    m0008_unique_seq_per_session.MIGRATION,
    m0009_legacy_json_kept_as_text.MIGRATION,
    m0010_bigint_event_ids.MIGRATION,
    m0011_run_failed_events_for_superseded_runs.MIGRATION,
    m0012_run_queue_and_idempotency_keys.MIGRATION,
    m0013_index_events_by_run.MIGRATION,
    m0014_run_attempts.MIGRATION,
    m0015_index_finished_runs_online.MIGRATION,
    m0016_run_metadata.MIGRATION,
    m0017_index_run_metadata.MIGRATION,
)

logger = logging.getLogger("migrations")

VERSION_TABLE = "schema_migrations"
DEFAULT_LOCK_TIMEOUT = 300.0
DEFAULT_STATEMENT_LOCK_TIMEOUT = 2.0
DEFAULT_STATEMENT_TIMEOUT = 900.0
MIN_TIMEOUT = 0.001
"""Timeouts go to the database in whole milliseconds: a smaller one would round to 0,
which PostgreSQL reads as no limit at all."""
MAX_TIMEOUT = 2_147_483.647
"""PostgreSQL's largest ``lock_timeout`` and ``statement_timeout`` (INT_MAX ms, ~24.8
days); SQLite's ``busy_timeout`` is an int of milliseconds too."""
wait_logger = logging.getLogger("migrations.waits")
T = TypeVar("T")

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
# Checksums recorded before checksums covered the SQL alone (up to v0.8 of this layer
# they hashed the rendered text, helper prose included): (version, dialect) ->
# (recorded, the SQL-only checksum of that same code). A recorded old-format
# checksum counts as applied only while the migration's SQL is still that code's;
# upgrade then records the new format.
_RENDERED_CHECKSUMS: dict[tuple[int, str], tuple[str, str]] = {
    (1, "sqlite"): (
        "14ea83f4e831330b310b221e8cf4592d595680fbe47ff41539986871abaa190d",
        "f4f11568ab7ac9104fe4798bc283b5d9c5c115c635d729e10a75aa4701938776",
    ),
    (1, "postgresql"): (
        "040b0923cd0ce9df85d955c630fea1718ea44c7e570767df0903a536519aff86",
        "33b7965dca0310a2a0479b607f8c508bfd750955066164e91bf5f09ea1149a7c",
    ),
    (2, "sqlite"): (
        "4b0f56638564cbd64046d24f3eb877076ce778f58a19745c8e080b3ccaf0e36d",
        "5058a308dcee9575233be5f85f2bf937b6a7b0b0c78df0e1063b9c4c5565cc18",
    ),
    (2, "postgresql"): (
        "e147ed6e1b043f36adcb641617f8a0e4bbf13aebabac2e9440d4774a09850629",
        "f54c5c385e1778b36e42a9ff1831ddf7c84dde4aacce38167f1aea24b45ca79b",
    ),
    (3, "sqlite"): (
        "ff520e447be6f49aebc6dc92fbe6c2fb6a306886f566518ea1bd908f0c20726a",
        "47ee1fd45bc2190dd20418b83d668052893a65cf1a9f85a6917c8bc9667f87b1",
    ),
    (3, "postgresql"): (
        "ca272fd04c5cc3d3372c16590d2f5ed7d820180bfeda30ad059a5b48904783ee",
        "f28ffff9c6e0933892ab3c1a077c11e89c747de2316980e26cb9ad7d307e8258",
    ),
    (4, "sqlite"): (
        "f2df10f9cd0df54f7298a5e002a5b22905d80c7bf50d5a91e645608ce6b1bb4d",
        "303ca225a83d54b0fbf48a56a3fe653cba4c9a55ddbd97001ef0e19a50a540cd",
    ),
    (4, "postgresql"): (
        "a11267d9cc46490bc45f8966bd5bf5a0655fa6c745a5deb29bfdc14f8bb09f61",
        "f9490b53db7ec55d2f395ed375c8042b58631f0118d8df7c19ff0d08ae06e348",
    ),
    (5, "sqlite"): (
        "643059f0b46903d174613c930ea0a1e0a6092e8d7f1e0840f09db35a31a0616b",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ),
    (5, "postgresql"): (
        "26034d9b5d2fb0fe49ed8560a896678ae8b5d750c8a2f8a01d1c8ccdf704ead5",
        "9184280768ef05ffe4a6fd20487205cae907972e63ce913c0715f0f91cc7e67b",
    ),
    (6, "sqlite"): (
        "04cee322995d9c8d1057b466b45a508b821e6449a9dbdc486baf1d02bc41acdb",
        "b69b0045afb212cabfd3a42e5dc08677b57083d77d37afc9399ae032acf83c75",
    ),
    (6, "postgresql"): (
        "29cc69e3d57099aaed3a72433d83df3173c6d55c80dbf52cc9e1e247607714c6",
        "06720f418e0acb92f29e5e544c8ea992a33e2d741f4b81b16e22a4e7afba8983",
    ),
    (7, "sqlite"): (
        "c741cf9813a7da4d5b4dbb8cded14f5c248195613f9dea68439bf5f7cd98eac2",
        "a5b279622573a82de5e414b10f5f3053786774ee5230cbbc38ccee9c6c248608",
    ),
    (7, "postgresql"): (
        "55dd78ffc6301ab3483c8880075d75c29f33dce7d3308faed17d9b400ddcb892",
        "4eec57866c86661977dd736e070ace836b15d4a8c78982f6336931b7c247559d",
    ),
    (8, "sqlite"): (
        "b4cbc8a508a03784dcfb8b75c4cbb99576a4538c358d80d064438f8d20f2768c",
        "0964e357aa9dc50bd4cb4bfccb5f4ff2dbf82fc88e8e9f899ba8e4ce3fab50b0",
    ),
    (8, "postgresql"): (
        "0a551b49c8196886538c0ac862072851e11b7b6ccf096c3f0963875ba4d01160",
        "ccb3b218af9ad7eda77fdd6e9a4a59024a82996e08475ed9d7d6ea1404163f5b",
    ),
}
_UPDATE_RECORD = text(
    "UPDATE schema_migrations SET checksum = :checksum, applied_at = :applied_at, "
    "duration_ms = :duration_ms, notes = :notes WHERE version = :version AND name = :name"
).bindparams(bindparam("applied_at", type_=UTCDateTime))
_NOTE_SEPARATOR = "\n"


class ChangedMigrationError(MigrationError):
    """Applied migrations whose code changed since; refused unless explicitly allowed."""


class MigrationLockTimeoutError(MigrationError):
    """The upgrade waited for locks (another runner's, or its statements') past its total."""


class MigrationConnectionLostError(MigrationError):
    """The connection died mid-migration: that migration and its lock ended with it."""

    def __init__(self, what: str, cause: BaseException) -> None:
        detail = str(_database_error(cause) or cause).strip().splitlines()[0]
        super().__init__(
            f"lost the database connection while applying {what} ({detail}). Its transaction "
            "and its migration lock ended with the connection, so nothing of it was kept "
            "unless its commit got through; rerun upgrade to apply whatever is still pending "
            "(status shows which)."
        )


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

    ``pending`` with a ``recorded`` row: applied, but incomplete (an index it
    had to skip for legacy duplicates); the next ``upgrade`` runs it again.
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


def _same_sql(record: Recorded, checksum: str, dialect: str) -> bool:
    return record.checksum == checksum or _RENDERED_CHECKSUMS.get((record.version, dialect)) == (
        record.checksum,
        checksum,
    )


def _statuses(
    dialect: str,
    recorded: dict[int, Recorded],
    migrations: Sequence[Migration],
    incomplete: frozenset[int] = frozenset(),
) -> list[MigrationStatus]:
    known = {migration.version for migration in migrations}
    result: list[MigrationStatus] = []
    for migration in migrations:
        checksum = migration.checksum(dialect)
        record = recorded.get(migration.version)
        state: State = "pending"
        if record is not None:
            state = "applied" if _same_sql(record, checksum, dialect) else "changed"
            if state == "applied" and migration.version in incomplete:
                state = "pending"
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
        incomplete = frozenset(
            migration.version
            for migration in migrations
            if migration.version in recorded and not migration.is_complete(conn)
        )
    return _statuses(engine.dialect.name, recorded, migrations, incomplete)


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
    statement_lock_timeout: float = DEFAULT_STATEMENT_LOCK_TIMEOUT,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    migrations: Sequence[Migration] | None = None,
) -> list[AppliedMigration]:
    """Apply the pending migrations in order; return what this call applied, with notes.

    Waits are bounded (see ``Waits``): ``lock_timeout`` seconds in all for
    the migration lock and for the locks the DDL needs; on PostgreSQL each
    statement waits at most ``statement_lock_timeout`` before its migration
    is rolled back and retried, and runs at most ``statement_timeout``
    (``0``: no limit).

    Raises ``ChangedMigrationError`` (before applying anything) when an
    applied migration's code changed, unless ``allow_changed``: then the new
    checksum is recorded and the change logged. Raises
    ``StatementFailedError`` / ``MigrationError`` when a migration fails (it is
    rolled back; later ones are not tried), ``MigrationLockTimeoutError``
    when the waits used up ``lock_timeout`` (naming who holds the locks) and
    ``MigrationConnectionLostError`` when the connection died mid-migration.
    """
    migrations = _default(migrations)
    _check_order(migrations)
    waits = Waits(lock_timeout, statement_lock_timeout, statement_timeout)
    dialect = engine.dialect.name
    applied: list[AppliedMigration] = []
    with _upgrade_connection(engine, waits) as conn:
        attempts = _Attempts(conn, waits)

        def prepare() -> None:
            conn.execute(text(_VERSION_TABLE_DDL[dialect]))
            _accept_or_refuse_changes(conn, migrations, allow_changed)

        attempts.run("the version table", prepare)
        for migration in migrations:
            if attempts.postgresql and migration.online_indexes(dialect):
                if is_pooled(conn.engine):
                    _refuse_online_through_pooler(conn, migration, attempts)
                    continue
                result = _apply_online(conn, migration, attempts)
            else:
                result = attempts.run(migration.label, partial(_apply_one, conn, migration))
            if result is None:
                continue
            logger.info("applied migration %s in %d ms", migration.label, result.duration_ms)
            for note in result.notes:
                logger.warning("migration %s: %s", migration.label, note)
            applied.append(result)
    return applied


def _refuse_online_through_pooler(
    conn: Connection, migration: Migration, attempts: _Attempts
) -> None:
    """A pooled connection without a direct URL: fine if ``migration`` is applied, else stop."""
    done = attempts.run(
        migration.label,
        lambda: _is_recorded(conn, migration) and migration.is_complete(conn),
    )
    if not done:
        raise MigrationError(
            f"{migration.label} builds an index online (CREATE INDEX CONCURRENTLY), which "
            "needs a server session of its own, and this URL goes through a transaction "
            "pooler (DATABASE_POOLER=transaction). Set DATABASE_DIRECT_URL to the database "
            "without the pooler and rerun upgrade."
        )


def _apply_one(
    conn: Connection, migration: Migration, *, record: bool = True
) -> AppliedMigration | None:
    """Apply ``migration`` unless it is recorded (and complete); under the caller's lock.

    ``record=False``: leave the version row to the caller (``_apply_online``).
    """
    if _is_recorded(conn, migration) and migration.is_complete(conn):
        return None
    started = time.perf_counter()
    notes = migration.apply(conn)
    duration_ms = round((time.perf_counter() - started) * 1000)
    if record:
        _record(conn, migration, notes, duration_ms)
    return AppliedMigration(migration.version, migration.name, duration_ms, tuple(notes))


def _is_recorded(conn: Connection, migration: Migration) -> bool:
    return (
        conn.execute(
            text("SELECT 1 FROM schema_migrations WHERE version = :version"),
            {"version": migration.version},
        ).first()
        is not None
    )


def _record(conn: Connection, migration: Migration, notes: Sequence[str], duration_ms: int) -> None:
    row = {
        "version": migration.version,
        "name": migration.name,
        "checksum": migration.checksum(conn.dialect.name),
        "applied_at": utc_now(),
        "duration_ms": duration_ms,
        "notes": _NOTE_SEPARATOR.join(notes) or None,
    }
    conn.execute(_UPDATE_RECORD if _is_recorded(conn, migration) else _INSERT_RECORD, row)


# --------------------------------------------------------------------------
# Online index builds (PostgreSQL): outside the transaction, under the migration lock

_INDEX_VALID = text(
    """SELECT i.indisvalid AND i.indisready FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indexrelid
WHERE c.relname = :name AND c.relnamespace = to_regnamespace(current_schema())"""
)


def index_validity(conn: Connection, name: str) -> bool | None:
    """PostgreSQL: whether the index ``name`` of the current schema is valid; ``None``
    when there is no such index. An interrupted ``CREATE INDEX CONCURRENTLY`` leaves
    an INVALID one: kept up to date by writes, never used by reads."""
    return conn.execute(_INDEX_VALID, {"name": name}).scalar()


@contextmanager
def _autocommit(conn: Connection) -> Iterator[None]:
    """Statements outside any transaction (``CONCURRENTLY`` refuses to run in one)."""
    conn.execution_options(isolation_level="AUTOCOMMIT")
    try:
        yield
    finally:
        if not conn.invalidated:
            conn.execution_options(isolation_level=conn.default_isolation_level)


def _apply_online(
    conn: Connection, migration: Migration, attempts: _Attempts
) -> AppliedMigration | None:
    """A migration with ``OnlineIndex`` steps, on PostgreSQL.

    Under the session-level migration lock (same key as the transaction-level
    one, taken on this connection, so it lives exactly as long as the
    connection that builds): 1. the transactional items in a transaction of
    their own, no version row yet; 2. each index with ``CREATE INDEX
    CONCURRENTLY``, after dropping an INVALID index of that name that an
    interrupted build left; 3. the version row, only once every index is
    valid. A build that fails or is interrupted records nothing; the next
    upgrade reruns 1 (idempotent), drops the INVALID index and builds again.
    """
    with attempts.session_lock(migration.label):
        result = attempts.run(migration.label, lambda: _apply_one(conn, migration, record=False))
        if result is None:
            return None
        notes = list(result.notes)
        started = time.perf_counter()
        for index in migration.online_indexes("postgresql"):
            note = _build_online(conn, migration, index, attempts)
            if note:
                notes.append(note)
        duration_ms = result.duration_ms + round((time.perf_counter() - started) * 1000)
        attempts.run(migration.label, lambda: _record(conn, migration, notes, duration_ms))
    return AppliedMigration(migration.version, migration.name, duration_ms, tuple(notes))


def _build_online(
    conn: Connection, migration: Migration, index: OnlineIndex, attempts: _Attempts
) -> str | None:
    """Build ``index`` concurrently (dropping an INVALID leftover first); a note or None.

    Its waits (for the table's ``SHARE UPDATE EXCLUSIVE`` lock and, inside the
    build, for older transactions to end) stop no reader or writer, so they are
    bounded by what is left of the upgrade's total (``--lock-timeout``) rather
    than by the per-statement lock wait.
    """
    waits = attempts.waits
    remaining = max(attempts.deadline - time.monotonic(), MIN_TIMEOUT)
    note = None
    statement = index.statement("postgresql")
    try:
        with _autocommit(conn):
            with conn.begin():
                conn.execute(
                    text(
                        "SELECT set_config('lock_timeout', :lock_timeout, false), "
                        "set_config('statement_timeout', :statement_timeout, false)"
                    ),
                    {
                        "lock_timeout": str(max(1, round(remaining * 1000))),
                        "statement_timeout": str(round(waits.statement * 1000)),
                    },
                )
                validity = index_validity(conn, index.name)
            if validity is True:
                return None
            if validity is False:
                statement = f"DROP INDEX CONCURRENTLY IF EXISTS {index.name}"
                with conn.begin():
                    conn.execute(text(statement))
                note = (
                    f"dropped the INVALID index {index.name} an interrupted build had left, "
                    "and built it again"
                )
                logger.warning("migration %s: %s", migration.label, note)
            statement = index.statement("postgresql")
            with conn.begin():
                conn.execute(text(statement))
                validity = index_validity(conn, index.name)
            if validity is not True:
                raise MigrationError(
                    f"{migration.label}: {index.name} is not valid after its build; "
                    "nothing of it is recorded. Rerun upgrade: it drops and rebuilds it."
                )
            with conn.begin():
                conn.execute(text("RESET lock_timeout"))
                conn.execute(text("RESET statement_timeout"))
    except DBAPIError as exc:
        if _connection_lost(exc):
            raise MigrationConnectionLostError(migration.label, exc) from exc
        detail = str(_database_error(exc) or exc).strip().splitlines()[0]
        raise MigrationError(
            f"{migration.label}: the online step failed at statement:\n  {statement}\n"
            f"  error: {detail}\n  Nothing of {migration.label} is recorded. An INVALID index "
            f"{index.name} it may have left is dropped and built again by the next upgrade: "
            "rerun upgrade."
        ) from exc
    return note


def _accept_or_refuse_changes(
    conn: Connection, migrations: Sequence[Migration], allow_changed: bool
) -> None:
    dialect = conn.dialect.name
    states = _statuses(dialect, _recorded(conn), migrations)
    old_format = [
        state
        for state in states
        if state.state == "applied"
        and state.recorded is not None
        and state.recorded.checksum != state.checksum
    ]
    for state in old_format:
        conn.execute(
            text("UPDATE schema_migrations SET checksum = :checksum WHERE version = :version"),
            {"checksum": state.checksum, "version": state.version},
        )
    if old_format:
        logger.info("recorded the SQL-only checksums of %d migrations", len(old_format))
    changed = [state for state in states if state.state == "changed"]
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
# Exclusive access for one upgrade, with bounded waits


@dataclass(frozen=True)
class Waits:
    """How long an upgrade may wait, in seconds.

    ``total`` (``--lock-timeout``): everything the upgrade waits for in all,
    the migration lock and the locks its statements need. PostgreSQL only:
    ``statement_lock`` (``--statement-lock-timeout``) is the ``lock_timeout``
    of every statement, so a statement queued behind a long transaction
    holds up the readers and writers queued behind *it* for at most that
    long before its migration is rolled back and retried (with backoff) until
    ``total`` is spent; ``statement`` (``--statement-timeout``) bounds each
    statement's run time, ``0`` for none.
    """

    total: float
    statement_lock: float
    statement: float

    def __post_init__(self) -> None:
        for name, value, zero_allowed in (
            ("lock_timeout", self.total, False),
            ("statement_lock_timeout", self.statement_lock, False),
            ("statement_timeout", self.statement, True),
        ):
            if not positive_seconds(value, zero_allowed=zero_allowed):
                raise ValueError(
                    f"{name} must be a finite number of seconds "
                    f"{timeout_range(zero_allowed=zero_allowed)}, got {value!r}"
                )


def positive_seconds(
    value: float,
    *,
    zero_allowed: bool = False,
    low: float = MIN_TIMEOUT,
    high: float = MAX_TIMEOUT,
) -> bool:
    """Whether ``value`` is a usable timeout: finite, from ``low`` to ``high`` (by
    default what the databases take, in whole milliseconds), or zero if allowed."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and (low <= value <= high or (zero_allowed and value == 0))


def timeout_range(
    *, zero_allowed: bool = False, low: float = MIN_TIMEOUT, high: float = MAX_TIMEOUT
) -> str:
    """``positive_seconds``'s range in words: ``from 0.001 to 2147483.647``."""
    words = f"from {low:.15g} to {high:.15g}"
    return f"{words}, or 0 for no limit" if zero_allowed else words


@contextmanager
def _upgrade_connection(engine: Engine, waits: Waits) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        direct = direct_url(engine) if is_pooled(engine) else None
        if direct is None:
            with engine.connect() as conn:
                yield conn
            return
        # Behind a transaction pooler: one connection straight to the server (module docstring).
        direct_engine = create_db_engine(direct, pooled=False, poolclass=NullPool)
        try:
            with direct_engine.connect() as conn:
                yield conn
        finally:
            direct_engine.dispose()
        return
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        foreign_keys = driver.execute("PRAGMA foreign_keys").fetchone()[0]
        # Outside a transaction, where SQLite honours it: a table rebuild must
        # not cascade its DROP into child tables (SQLite's documented recipe).
        driver.execute("PRAGMA foreign_keys = OFF")
        # The PRAGMA and what the engine's BEGIN IMMEDIATE waits, together.
        busy_timeout = set_sqlite_busy_timeout(conn.connection, int(waits.total * 1000))
        try:
            yield conn
        finally:
            driver.execute(f"PRAGMA foreign_keys = {int(foreign_keys)}")
            set_sqlite_busy_timeout(conn.connection, busy_timeout)


@contextmanager
def _write_transaction(conn: Connection, waits: Waits) -> Iterator[None]:
    """A transaction; on SQLite, a busy timeout at BEGIN IMMEDIATE becomes a lock timeout."""
    try:
        transaction = conn.begin()
    except OperationalError as exc:
        if "locked" not in str(exc.orig):
            raise
        raise MigrationLockTimeoutError(
            f"another process held the SQLite write lock for more than {waits.total:g} s; "
            "is an upgrade or a long transaction stuck? Retry, or raise the timeout."
        ) from exc
    with transaction:
        yield


def _advisory_key(conn: Connection) -> int:
    """A signed 64-bit key for this database and schema (one lock per schema, not per server)."""
    database, schema = conn.execute(text("SELECT current_database(), current_schema()")).one()
    digest = hashlib.sha256(f"run-data-layer migrations {database} {schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _LockBusy(Exception):
    """Another upgrade held the migration lock for this attempt's whole lock wait."""


_TRY_XACT_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")
_TRY_SESSION_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_LOCK_POLL = 0.05
_LOCK_NOT_AVAILABLE = "55P03"
_QUERY_CANCELED = "57014"  # statement_timeout (or a cancel request)
_FIRST_RETRY_DELAY = 0.25
_MAX_RETRY_DELAY = 5.0
_SET_TIMEOUTS = text(
    "SELECT set_config('lock_timeout', :lock_timeout, true), "
    "set_config('statement_timeout', :statement_timeout, true)"
)
# Backends other than this one holding a lock on a table of this schema, or the
# migration lock: whoever an upgrade's statement may be waiting for.
_HOLDERS = text(
    """SELECT a.pid, a.state, EXTRACT(EPOCH FROM now() - a.xact_start) AS open_seconds,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 60) AS query,
       string_agg(DISTINCT COALESCE(c.relname, 'the migration lock'), ', ') AS holds
FROM pg_locks AS l
JOIN pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN pg_class AS c ON c.oid = l.relation
WHERE l.granted AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.locktype = 'relation' AND c.relkind IN ('r', 'p')
        AND c.relnamespace = to_regnamespace(current_schema()))
       OR (l.locktype = 'advisory' AND l.classid::bigint = :key_high
           AND l.objid::bigint = :key_low AND l.objsubid = 1))
GROUP BY a.pid, a.state, a.xact_start, a.query
ORDER BY a.xact_start NULLS LAST
LIMIT 5"""
)


def _database_error(exc: BaseException) -> BaseException | None:
    """The driver's exception behind ``exc`` (a ``DBAPIError`` or a wrapper of one)."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, DBAPIError):
            return current.orig
        current = current.__cause__
    return None


def _connection_lost(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, DBAPIError):
            return bool(current.connection_invalidated)
        current = current.__cause__
    return False


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(_database_error(exc), "sqlstate", None)


def _lock_not_available(exc: BaseException) -> bool:
    return _sqlstate(exc) == _LOCK_NOT_AVAILABLE


class _Attempts:
    """Runs each unit of an upgrade in a transaction of its own, under the migration lock.

    PostgreSQL: the lock is ``pg_advisory_xact_lock`` taken first in the very
    transaction that applies the migration and writes its version row. It
    cannot outlive, or be lost apart from, the work it protects: if the
    connection dies, the transaction, its changes and the lock end together,
    and the next runner re-reads the version table under the lock. A wait
    that hits ``lock_timeout`` rolls the unit back and retries it with
    backoff until ``Waits.total`` is spent.
    """

    def __init__(self, conn: Connection, waits: Waits) -> None:
        self.conn = conn
        self.waits = waits
        self.deadline = time.monotonic() + waits.total
        self.postgresql = conn.dialect.name == "postgresql"
        self.key: int | None = None

    def run(self, what: str, work: Callable[[], T]) -> T:
        delay = _FIRST_RETRY_DELAY
        attempts = 0
        while True:
            attempts += 1
            try:
                with _write_transaction(self.conn, self.waits):
                    if self.postgresql:
                        self._lock()
                    return work()
            except _LockBusy:
                waited_for = "the migration lock (another upgrade is running)"
            except (DBAPIError, MigrationError) as exc:
                if _connection_lost(exc):
                    raise MigrationConnectionLostError(what, exc) from exc
                if self.postgresql and _sqlstate(exc) == _QUERY_CANCELED:
                    raise MigrationError(
                        f"{what} was stopped and rolled back, nothing of it kept: "
                        f"{_waited_for(exc, 'statement')} ran longer than the statement "
                        f"timeout ({self.waits.statement:g} s). Rerun upgrade with a larger "
                        "--statement-timeout (0 for none), at a quiet time if it rewrites "
                        "a big table."
                    ) from exc
                if not self.postgresql or not _lock_not_available(exc):
                    raise
                waited_for = _waited_for(exc)
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationLockTimeoutError(self._gave_up(what, waited_for, attempts))
            pause = min(delay, remaining)
            wait_logger.warning(
                "%s: waited %g s for %s; rolled back, retrying in %.2g s (%.0f s left of %g s)",
                what,
                self.waits.statement_lock,
                waited_for,
                pause,
                remaining,
                self.waits.total,
            )
            time.sleep(pause)
            delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _lock(self) -> None:
        remaining = max(self.deadline - time.monotonic(), 0.001)
        lock_ms = max(1, round(min(self.waits.statement_lock, remaining) * 1000))
        self.conn.execute(
            _SET_TIMEOUTS,
            {
                "lock_timeout": str(lock_ms),
                "statement_timeout": str(round(self.waits.statement * 1000)),
            },
        )
        if self.key is None:
            self.key = _advisory_key(self.conn)
        # Polled, not waited for in one statement: a waiting statement holds a snapshot,
        # and an online index build (CONCURRENTLY) under the lock would wait for that
        # snapshot while the waiter waits for the lock: a deadlock. Between polls this
        # transaction holds no snapshot, which a concurrent build does not wait for.
        give_up = time.monotonic() + lock_ms / 1000
        while not self.conn.execute(_TRY_XACT_LOCK, {"key": self.key}).scalar():
            if time.monotonic() >= give_up:
                raise _LockBusy()
            time.sleep(_LOCK_POLL)

    @contextmanager
    def session_lock(self, what: str) -> Iterator[None]:
        """The migration lock at session level on this connection, outside transactions
        (for online steps); released at the end, or with the connection if it dies."""
        attempts = 0
        with _autocommit(self.conn):
            while True:
                attempts += 1
                with self.conn.begin():
                    if self.key is None:
                        self.key = _advisory_key(self.conn)
                    if self.conn.execute(_TRY_SESSION_LOCK, {"key": self.key}).scalar():
                        break
                if time.monotonic() >= self.deadline:
                    raise MigrationLockTimeoutError(
                        self._gave_up(
                            what, "the migration lock (another upgrade is running)", attempts
                        )
                    )
                time.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            if not self.conn.invalidated:
                try:
                    with _autocommit(self.conn), self.conn.begin():
                        self.conn.execute(
                            text("SELECT pg_advisory_unlock(:key)"), {"key": self.key}
                        )
                except DBAPIError:  # the connection died: the lock went with it
                    pass

    def _gave_up(self, what: str, waited_for: str, attempts: int) -> str:
        key = self.key or 0
        with self.conn.begin():
            holders = self.conn.execute(
                _HOLDERS, {"key_high": (key >> 32) & 0xFFFFFFFF, "key_low": key & 0xFFFFFFFF}
            ).all()
        blocking = (
            "; ".join(
                f"pid {row.pid} ({row.state}, transaction open "
                f"{float(row.open_seconds or 0):.0f} s, query {row.query!r}) holds {row.holds}"
                for row in holders
            )
            or "no other backend holds a lock now (it was released meanwhile)"
        )
        return (
            f"gave up on {what} after {self.waits.total:g} s ({attempts} attempts of at most "
            f"{self.waits.statement_lock:g} s each) waiting for {waited_for}; nothing of {what} "
            f"was applied. Blocking: {blocking}. End that transaction (or run "
            "SELECT pg_terminate_backend(pid)), then rerun upgrade; or raise --lock-timeout."
        )


def _waited_for(exc: BaseException, what: str = "a lock for") -> str:
    statement = getattr(exc, "statement", None) or ""
    if "pg_advisory_xact_lock" in statement:
        return "the migration lock (another upgrade is running)"
    first_line = " ".join(statement.split())
    return f"{what}: {first_line[:80]}" if first_line else what
