"""The layer's transaction rules as dialect methods, not engine events.

Any ``ConnectionEvents`` listener on an engine (``begin``, ``commit``, ...)
makes SQLAlchemy check for event dispatch at every execute, begin and commit
of every connection of that engine; with the listeners that ``app.db`` used
to install, that cost 12-28 % of each SQLite operation (docs/benchmarks.md).
The same rules are now methods of the engine's dialect, which SQLAlchemy
calls anyway (``Dialect.do_begin`` / ``Dialect.do_commit``, its documented
hooks for "provide an implementation of connection.begin() / commit()"):

* SQLite: ``do_begin`` emits ``BEGIN IMMEDIATE`` (``app.db`` turns the
  driver's own transaction handling off), retried at short intervals instead of
  SQLite's busy handler (``begin_immediate``). A connection or engine that asks
  for another mode with the execution option ``sqlite_begin`` gets a
  ``begin`` listener of its own (only it pays for events), which emits
  ``BEGIN <mode>`` first; ``do_begin`` then finds the transaction open.
* Both: ``do_commit`` refuses with ``TransactionAbortedError`` when the
  database already rolled the transaction back (SQLite after SQLITE_FULL,
  SQLITE_IOERR, ...; PostgreSQL after a failed statement, where COMMIT would
  answer ROLLBACK and psycopg would raise nothing). On PostgreSQL it first
  rolls the aborted transaction back on the driver's connection: SQLAlchemy
  takes a transaction whose commit raised as ended, so closing the session
  afterwards neither rolls back nor lets the pool reset the connection, and
  the next unit of work on it would fail with ``InFailedSqlTransaction``.

* SQLite, for engines made with ``existing_file_only`` (the server's): ``connect``
  opens the file as the URI ``file:PATH?mode=rw``, so a missing file is an
  error ("unable to open database file") instead of a new, empty database.

``install(engine)`` gives the engine's dialect these methods by making it an
instance of a subclass of its own class (made once per dialect class), so the
URL, the driver and everything else about the dialect stay as they were.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any
from urllib.parse import quote

from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, event
from sqlalchemy.engine.interfaces import Dialect

from app._cache import cache
from app.errors import TransactionAbortedError

SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
SQLITE_BEGIN = "sqlite_begin"


def _sqlite_begin_mode(options: Any) -> str:
    mode = str(options.get(SQLITE_BEGIN, "IMMEDIATE")).upper()
    if mode not in SQLITE_BEGIN_MODES:
        raise ValueError(f"sqlite_begin must be one of {sorted(SQLITE_BEGIN_MODES)}, got {mode!r}")
    return mode


def _begin_in_requested_mode(connection: Any) -> None:
    """``begin`` listener of a connection or engine with the ``sqlite_begin`` option."""
    mode = _sqlite_begin_mode(connection.get_execution_options())
    connection.exec_driver_sql(f"BEGIN {mode}")


SQLITE_BUSY_TIMEOUT_MS = "run_layer_sqlite_busy_timeout_ms"
"""Key of a pooled SQLite connection's ``info``: the busy timeout ``app.db`` gave it."""
_FIRST_RETRY_S, _LONGEST_RETRY_S = 0.0002, 0.002


def begin_immediate(driver: sqlite3.Connection, busy_timeout_ms: int | None) -> None:
    """``BEGIN IMMEDIATE`` that takes the write lock as soon as it is free.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25, ... 100 ms between
    tries: with writers in several processes, the lock was mostly free while the
    one waiter of each process slept (the HTTP benchmark's SQLite writes ran at a
    third of the raw driver's rate, its workers a quarter busy). So the handler is
    off for the BEGIN, and it is retried here every 0.2-2 ms until the connection's
    busy timeout has passed; then the last "database is locked" error is raised, as
    the busy handler would have. Statements inside the transaction keep the busy
    timeout. Without a known timeout (a connection ``app.db`` did not configure),
    SQLite's own handler waits.
    """
    if busy_timeout_ms is None or busy_timeout_ms <= 0:
        driver.execute("BEGIN IMMEDIATE")
        return
    driver.execute("PRAGMA busy_timeout = 0")
    try:
        deadline, pause = None, _FIRST_RETRY_S
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                # Any kind of busy: the extended codes (SQLITE_BUSY_RECOVERY while
                # another connection recovers the WAL of a new or crashed file) too.
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + busy_timeout_ms / 1000
                if now >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, _LONGEST_RETRY_S)
    finally:
        driver.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")


def _sqlite_rules(base: type[Any]) -> type[Any]:
    class RunLayerSQLiteDialect(base):
        """The pysqlite dialect with the layer's rules (see module docstring)."""

        supports_statement_cache = True

        def do_begin(self, dbapi_connection: Any) -> None:
            driver = dbapi_connection.dbapi_connection
            if not driver.in_transaction:  # else a ``sqlite_begin`` listener has begun it
                begin_immediate(driver, dbapi_connection.info.get(SQLITE_BUSY_TIMEOUT_MS))

        def connect(self, *cargs: Any, **cparams: Any) -> Any:
            if getattr(self, _EXISTING_FILE_ONLY, False) and cargs and not cparams.get("uri"):
                filename = str(cargs[0])
                if filename != ":memory:" and not filename.startswith("file:"):
                    cargs = (f"file:{quote(filename)}?mode=rw", *cargs[1:])
                    cparams = {**cparams, "uri": True}
            return super().connect(*cargs, **cparams)

        def do_commit(self, dbapi_connection: Any) -> None:
            # SQLite rolls a transaction back by itself after some errors (SQLITE_FULL,
            # SQLITE_IOERR, SQLITE_BUSY, ...); COMMIT would then succeed on nothing.
            if not dbapi_connection.dbapi_connection.in_transaction:
                raise TransactionAbortedError("SQLite rolled it back after an error")
            super().do_commit(dbapi_connection)

        def set_engine_execution_options(self, engine: Any, opts: Any) -> None:
            super().set_engine_execution_options(engine, opts)
            _listen_for_begin_mode(engine, opts)

        def set_connection_execution_options(self, connection: Any, opts: Any) -> None:
            super().set_connection_execution_options(connection, opts)
            _listen_for_begin_mode(connection, opts)

    return RunLayerSQLiteDialect


def _listen_for_begin_mode(target: Any, opts: Any) -> None:
    if SQLITE_BEGIN in opts and not event.contains(target, "begin", _begin_in_requested_mode):
        event.listen(target, "begin", _begin_in_requested_mode)


def _postgresql_rules(base: type[Any]) -> type[Any]:
    class RunLayerPostgreSQLDialect(base):
        """The psycopg dialect with the layer's COMMIT guard (see module docstring)."""

        supports_statement_cache = True

        def do_commit(self, dbapi_connection: Any) -> None:
            driver = dbapi_connection.dbapi_connection
            if driver.info.transaction_status == TransactionStatus.INERROR:
                # End it here: after a commit that raised, neither Session.close()
                # nor the pool's reset-on-return rolls back (see module docstring).
                driver.rollback()
                raise TransactionAbortedError("a statement in it failed")
            super().do_commit(dbapi_connection)

    return RunLayerPostgreSQLDialect


_RULES = "_run_layer_rules"
_EXISTING_FILE_ONLY = "_run_layer_existing_file_only"


@cache
def _with_rules(dialect_class: type[Dialect]) -> type[Dialect]:
    """A direct subclass (same instance layout, so ``__class__`` may be assigned)."""
    subclass = (_sqlite_rules if dialect_class.name == "sqlite" else _postgresql_rules)(
        dialect_class
    )
    setattr(subclass, _RULES, True)
    return subclass


def install(engine: Engine, *, existing_file_only: bool = False) -> None:
    """Give ``engine``'s dialect the layer's ``do_begin`` / ``do_commit`` (module docstring).

    ``existing_file_only``: a SQLite engine opens its file only if it exists.
    """
    dialect = engine.dialect
    if not getattr(dialect, _RULES, False):
        dialect.__class__ = _with_rules(type(dialect))
    if existing_file_only and dialect.name == "sqlite":
        setattr(dialect, _EXISTING_FILE_ONLY, True)
