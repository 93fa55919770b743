"""Database setup: engines for SQLite and PostgreSQL, and the unit of work.

``create_db_engine(url)`` configures an engine for this layer. PostgreSQL: a
pool sized by ``DB_POOL_SIZE`` / ``DB_MAX_OVERFLOW`` / ``DB_POOL_TIMEOUT``
whose connections are pinged only after ``DB_POOL_PING_AFTER_IDLE`` seconds
idle. SQLite: WAL, ``BEGIN IMMEDIATE`` transactions (a read-only connection
may ask for the execution option ``sqlite_begin="DEFERRED"``), the busy
timeout ``SQLITE_BUSY_TIMEOUT_MS``, and the SQL function ``json_merge_shallow``
(``app.types.merge_json_objects``, what ``RunRepository.complete`` merges
metrics with). Both: ``DB_CONNECT_TIMEOUT``, and a COMMIT refused with
``TransactionAbortedError`` when the database already rolled the transaction
back (both rules are dialect methods, not engine events: ``app._dialects``).
``unit_of_work(engine)``: one transaction, committed when the block ends (the
FastAPI request session is ``app.api.deps.SessionDep``). ``must_exist=True``
(``get_engine``, the server's engine): a SQLite file that does not exist is an
error at connect, never created (only ``python -m migrations upgrade`` creates one).

Settings and defaults: README.md (Configuration). Why: docs/design.md
(SQLite transactions, the idle ping).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlmodel import Session as DbSession
from sqlmodel import create_engine

from app._cache import cache
from app._dialects import SQLITE_BUSY_TIMEOUT_MS
from app._dialects import install as install_transaction_rules
from app.json_codec import dumps, loads
from app.types import merge_json_objects

DEFAULT_DATABASE_URL = "sqlite:///./runs.db"
DEFAULT_PING_AFTER_IDLE = 10.0
DEFAULT_CONNECT_TIMEOUT = 10
_IDLE_SINCE = "run_layer_idle_since"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def resolve_database_url(url: str | URL | None = None) -> URL:
    """The URL to use: the argument, else ``DATABASE_URL``, else the embedded SQLite file.

    Plain ``postgres://`` / ``postgresql://`` URLs are given the psycopg 3 driver.
    """
    raw = url if url is not None else os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    parsed = make_url(raw)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported database {parsed.get_backend_name()!r} in "
            f"{parsed.render_as_string(hide_password=True)}: expected sqlite or postgresql"
        )
    return parsed


def _ensure_wal(cursor: Any, timeout_s: float) -> None:
    """Put the database file in WAL mode, also when several processes open a new file at once.

    The mode is stored in the file, so only the first connection ever switches
    it; the others find ``wal`` and move on. Switching needs an exclusive lock,
    and SQLite may refuse it with "database is locked" at once instead of waiting
    on the busy timeout, so a refused switch is retried until that timeout.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine) -> None:
    busy_timeout_ms = _env_int("SQLITE_BUSY_TIMEOUT_MS", 5000)
    in_memory = engine.url.database in (None, "", ":memory:")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Hand transaction control to SQLAlchemy (see module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if record is not None:  # BEGIN IMMEDIATE waits for the lock by itself
                record.info[SQLITE_BUSY_TIMEOUT_MS] = int(busy_timeout_ms)
            if not in_memory:
                _ensure_wal(cursor, busy_timeout_ms / 1000)
                # WAL + NORMAL: durable against application crashes; a power
                # loss may drop the last transactions but never corrupts.
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()
        dbapi_connection.create_function(
            "json_merge_shallow", 2, merge_json_objects, deterministic=True
        )


def _configure_postgresql(engine: Engine) -> None:
    ping_after_idle = _env_float("DB_POOL_PING_AFTER_IDLE", DEFAULT_PING_AFTER_IDLE)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Naive timestamps in raw SQL and legacy columns mean UTC, whatever the
        # server's TimeZone setting.
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop(_IDLE_SINCE, None)
        if idle_since is None or time.monotonic() - idle_since < ping_after_idle:
            return  # new, or in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and hands out a new one.
            raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


def create_db_engine(
    url: str | URL | None = None, *, must_exist: bool = False, **engine_kwargs: Any
) -> Engine:
    """An engine for ``url`` (see ``resolve_database_url``), configured for this layer.

    ``must_exist``: a SQLite file is opened only if it exists (``mode=rw``);
    connecting to a missing one raises ``OperationalError`` ("unable to open
    database file") instead of creating an empty database. Extra keyword
    arguments go to ``sqlalchemy.create_engine`` and win over the defaults
    chosen here.
    """
    resolved = resolve_database_url(url)
    options: dict[str, Any] = {}
    if resolved.get_backend_name() == "postgresql":
        connect_args = dict(engine_kwargs.pop("connect_args", None) or {})
        if "connect_timeout" not in connect_args and "connect_timeout" not in resolved.query:
            connect_args["connect_timeout"] = _env_int(
                "DB_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT
            )
        options["connect_args"] = connect_args
        if "poolclass" not in engine_kwargs:  # sizes apply to the default queue pool only
            options["pool_size"] = _env_int("DB_POOL_SIZE", 5)
            options["max_overflow"] = _env_int("DB_MAX_OVERFLOW", 5)
            options["pool_timeout"] = _env_int("DB_POOL_TIMEOUT", 30)
    options["json_deserializer"] = loads  # orjson, with json where it reads differently
    options["json_serializer"] = dumps  # orjson for plain flat objects (app.json_codec)
    options.update(engine_kwargs)
    engine = create_engine(resolved, **options)
    # BEGIN IMMEDIATE on SQLite, the COMMIT guard, mode=rw for an existing file only
    install_transaction_rules(engine, existing_file_only=must_exist)
    if resolved.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    else:
        _configure_postgresql(engine)
    return engine


@cache
def get_engine() -> Engine:
    """The process-wide engine for ``DATABASE_URL``, created on first use. It never
    creates a SQLite database: the file must exist (``must_exist``)."""
    return create_db_engine(must_exist=True)


def read_only(engine: Engine) -> Engine:
    """``engine`` for transactions that only read: same pool, but on SQLite they
    begin DEFERRED, so they never take or wait for the write lock (WAL readers
    run beside a writer). On PostgreSQL it is ``engine`` itself."""
    if engine.dialect.name != "sqlite":
        return engine
    # One per engine, kept on it: the option engine carries a begin listener (app._dialects).
    reader: Engine | None = engine.__dict__.get(_READER)
    if reader is None:
        reader = engine.execution_options(sqlite_begin="DEFERRED")
        engine.__dict__[_READER] = reader
    return reader


_READER = "_run_layer_reader"


@contextmanager
def unit_of_work(engine: Engine, *, readonly: bool = False) -> Iterator[DbSession]:
    """One transaction: a ``sqlmodel.Session`` committed when the block ends, rolled
    back if it raises, and closed either way (its connection back in the pool).

    ``expire_on_commit=False``: the objects stay readable after the block. The
    contract (who commits, what to do after a conflict) is in docs/unit-of-work.md.
    """
    session = DbSession(read_only(engine) if readonly else engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


__all__ = [
    "DEFAULT_DATABASE_URL",
    "DbSession",
    "create_db_engine",
    "get_engine",
    "read_only",
    "resolve_database_url",
    "unit_of_work",
]
