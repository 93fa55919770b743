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

Behind a transaction pooler (PgBouncer in ``pool_mode = transaction``), declared
with ``DATABASE_POOLER=transaction`` (``pooler_mode``, read here only), an
engine keeps no state in the server session, which the pooler hands to other
clients between transactions: psycopg prepares no statements
(``prepare_threshold=None``), and the time zone and any ``-c name=value`` of
the URL's ``options`` (which a pooler refuses at connect) are set with
``set_config(..., true)``, i.e. ``SET LOCAL``, first in every transaction.
Under that setting every URL except ``DATABASE_DIRECT_URL`` is taken to go
through the pooler. Work that needs a server session of its own (LISTEN, the
migration runner's online index builds) uses ``direct_url(engine)``: the
engine's own URL when it is direct, else ``DATABASE_DIRECT_URL``, else none
(the event feed then polls). Deployment: docs/deployment.md.

Settings and defaults: README.md (Configuration). Why: docs/design.md
(SQLite transactions, the idle ping).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

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
_LAYER_POOL_LISTENER = "_run_layer_pool_listener"
POOLER_MODES = ("none", "transaction")
"""Values of ``DATABASE_POOLER`` (unset or empty: ``none``)."""
_POOLED = "_run_layer_pooled"
_DIRECT_URL = "_run_layer_direct_url"
_BEGIN_SQL = "_run_layer_begin_sql"


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


def pooler_mode() -> Literal["transaction"] | None:
    """``DATABASE_POOLER``: ``"transaction"`` when PostgreSQL is reached through a
    transaction pooler (PgBouncer ``pool_mode = transaction``), else None."""
    raw = (os.environ.get("DATABASE_POOLER") or "").strip().lower()
    if raw in ("", "none"):
        return None
    if raw == "transaction":
        return "transaction"
    raise ValueError(f"DATABASE_POOLER must be one of {', '.join(POOLER_MODES)}, got {raw!r}")


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


def set_sqlite_busy_timeout(connection: Any, milliseconds: int) -> int:
    """Set a pooled SQLite connection's busy timeout; return the one it had.

    ``connection``: the pool's connection (``Connection.connection``). Both the
    ``PRAGMA busy_timeout`` and the wait of this layer's ``BEGIN IMMEDIATE``, which
    retries by itself for as long as the connection's recorded timeout, change
    together: a PRAGMA alone would leave ``BEGIN IMMEDIATE`` on the old timeout (the
    migration runner waits minutes for another upgrade, a request seconds).
    """
    driver = connection.driver_connection
    previous = int(driver.execute("PRAGMA busy_timeout").fetchone()[0])
    driver.execute(f"PRAGMA busy_timeout = {int(milliseconds)}")
    if SQLITE_BUSY_TIMEOUT_MS in connection.info:
        connection.info[SQLITE_BUSY_TIMEOUT_MS] = int(milliseconds)
    return previous


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


def _configure_postgresql(engine: Engine, *, pooled: bool) -> None:
    ping_after_idle = _env_float("DB_POOL_PING_AFTER_IDLE", DEFAULT_PING_AFTER_IDLE)

    if not pooled:  # behind a pooler: SET LOCAL in every transaction (_pooled_dialect)

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

    for listener in (_on_checkin, _on_checkout):
        setattr(listener, _LAYER_POOL_LISTENER, True)


def is_layer_pool_listener(listener: Any) -> bool:
    """Whether a pool listener is one of this module's: they take no proxy and keep no
    state outside the connection's record (``app.repositories`` lends connections
    without a proxy where every pool listener is the layer's)."""
    return getattr(listener, _LAYER_POOL_LISTENER, False) is True


def _split_options(options: str) -> list[str]:
    """libpq's ``options``: words split at unescaped whitespace (backslash escapes)."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    return words


def _option_settings(options: str) -> dict[str, str]:
    """The ``-c name=value`` / ``--name=value`` settings of a URL's ``options``."""
    settings: dict[str, str] = {}
    words = iter(_split_options(options))
    for word in words:
        if word == "-c":
            pair = next(words, "")
        elif word.startswith("-c") or word.startswith("--"):
            pair = word[2:]
        else:
            pair = ""
        name, equals, value = pair.partition("=")
        if not name or not equals:
            raise ValueError(
                f"DATABASE_POOLER=transaction: the URL option {word!r} is not a "
                "'-c name=value' setting, which is all that can be set per transaction"
            )
        settings[name.replace("-", "_")] = value
    return settings


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _begin_sql(settings: dict[str, str]) -> str:
    """One statement that sets ``settings`` for the current transaction only."""
    return "SELECT " + ", ".join(
        f"set_config({_quoted(name)}, {_quoted(value)}, true)" for name, value in settings.items()
    )


@cache
def _pooled_dialect(dialect_class: type[Any]) -> type[Any]:
    """``dialect_class`` (the layer's psycopg dialect) whose transactions begin with the
    engine's ``SET LOCAL`` statement (a dialect method, not an engine event: see
    ``app._dialects``). Autocommit connections get nothing: there is no transaction."""

    class PooledPostgreSQLDialect(dialect_class):
        supports_statement_cache = True

        def do_begin(self, dbapi_connection: Any) -> None:
            driver = dbapi_connection.dbapi_connection
            if not driver.autocommit:  # psycopg begins the transaction with this statement
                driver.execute(getattr(self, _BEGIN_SQL))
            super().do_begin(dbapi_connection)

    return PooledPostgreSQLDialect


def _without_options(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    """``do_connect``: no ``options`` to a pooler, which refuses them (``create_db_engine``)."""
    cparams.pop("options", None)


def _same_url(a: URL, b: URL | None) -> bool:
    return b is not None and a.render_as_string(hide_password=False) == b.render_as_string(
        hide_password=False
    )


def _direct_setting() -> URL | None:
    raw = os.environ.get("DATABASE_DIRECT_URL")
    return resolve_database_url(raw) if raw else None


def create_db_engine(
    url: str | URL | None = None,
    *,
    must_exist: bool = False,
    pooled: bool | None = None,
    direct_url: str | URL | None = None,
    **engine_kwargs: Any,
) -> Engine:
    """An engine for ``url`` (see ``resolve_database_url``), configured for this layer.

    ``must_exist``: a SQLite file is opened only if it exists (``mode=rw``);
    connecting to a missing one raises ``OperationalError`` ("unable to open
    database file") instead of creating an empty database. ``pooled``: whether
    PostgreSQL is reached through a transaction pooler (module docstring);
    default: ``DATABASE_POOLER=transaction`` and ``url`` is not
    ``DATABASE_DIRECT_URL``. ``direct_url``: the same database without the
    pooler (default ``DATABASE_DIRECT_URL``), for ``direct_url(engine)``.
    Extra keyword arguments go to ``sqlalchemy.create_engine`` and win over
    the defaults chosen here.
    """
    resolved = resolve_database_url(url)
    options: dict[str, Any] = {}
    postgresql = resolved.get_backend_name() == "postgresql"
    direct_setting = _direct_setting() if postgresql else None
    if pooled is None:
        pooled = (
            postgresql
            and pooler_mode() == "transaction"
            and not _same_url(resolved, direct_setting)
        )
    pooled = pooled and postgresql
    begin_settings: dict[str, str] = {}
    if pooled:
        raw_options = resolved.query.get("options")
        if raw_options:
            text_options = raw_options if isinstance(raw_options, str) else " ".join(raw_options)
            begin_settings.update(_option_settings(text_options))
        begin_settings["TimeZone"] = "UTC"  # as the direct engine's connect hook
    if postgresql:
        connect_args = dict(engine_kwargs.pop("connect_args", None) or {})
        if pooled:  # the pooler's server connections do not keep them (docs/deployment.md)
            connect_args.setdefault("prepare_threshold", None)
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
        _configure_postgresql(engine, pooled=pooled)
    if pooled:
        engine.dialect.__class__ = _pooled_dialect(type(engine.dialect))
        setattr(engine.dialect, _BEGIN_SQL, _begin_sql(begin_settings))
        if len(begin_settings) > 1:  # the URL's options, not only the time zone
            # The URL keeps them (engines made from ``engine.url`` get them too); the
            # pooler never sees them. Being a dialect-level listener, this also makes
            # the repositories' fast paths, which send a statement straight to the
            # driver, outside any transaction for a read (app.repositories.reads),
            # step aside for SQLAlchemy's own execution, which begins the transaction
            # the settings are made in. The time zone alone needs no transaction: no
            # read's result depends on it (app.types).
            event.listen(engine, "do_connect", _without_options)
        direct = resolve_database_url(direct_url) if direct_url is not None else direct_setting
    else:
        direct = engine.url if direct_url is None else resolve_database_url(direct_url)
    engine.__dict__[_POOLED] = pooled
    engine.__dict__[_DIRECT_URL] = direct
    return engine


def is_pooled(engine: Engine) -> bool:
    """Whether ``engine`` reaches PostgreSQL through a transaction pooler."""
    return bool(engine.__dict__.get(_POOLED, False))


def direct_url(engine: Engine) -> URL | None:
    """Where a server session of its own goes (LISTEN, online index builds):
    ``engine``'s URL when it is direct; behind a pooler ``DATABASE_DIRECT_URL``
    (or the engine's ``direct_url``), else None. Engines made elsewhere: their URL."""
    if _DIRECT_URL in engine.__dict__:
        direct: URL | None = engine.__dict__[_DIRECT_URL]
        return direct
    return engine.url


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
    "direct_url",
    "get_engine",
    "is_pooled",
    "pooler_mode",
    "read_only",
    "resolve_database_url",
    "set_sqlite_busy_timeout",
    "unit_of_work",
]
