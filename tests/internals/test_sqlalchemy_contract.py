"""The SQLAlchemy behaviour the layer's fast paths rely on, checked loudly.

pyproject pins SQLAlchemy to the minor version these pass on. A new
SQLAlchemy release that renames or changes one of these fails here, with the
module that depends on it, rather than as a slow or subtly wrong data layer.

* ``app._dialects``: the transaction rules are methods of the engine's
  dialect (``Dialect.do_begin`` / ``do_commit``, public hooks), which SQLAlchemy
  calls with a pool-proxied connection (``.dbapi_connection``, public); the
  engine carries no connection-event listener, because any listener makes
  SQLAlchemy check for event dispatch at every execute (``Engine._has_events``,
  private: the reason for the gain, asserted here).
* ``app.repositories._driver``: statements replayed on the driver connection
  from what SQLAlchemy compiled (``SQLCompiler.positiontup``, ``bind_names``,
  ``escaped_bind_names``, ``has_out_parameters``: public attributes), taken only
  when nothing observes execution (``Connection._echo``, ``_has_events``,
  ``_execution_options``, ``Dialect._has_events``: private), and a driver error
  handed to ``Connection._handle_dbapi_exception`` (private).
* ``app.repositories._rows``: ORM internals with no public equivalent, as the
  ORM's loader and flush use them (``IdentityMap._add_unpresent``,
  ``Session.hash_key`` / ``_autobegin_t``, ``SessionTransaction._new``,
  ``InstanceState.session_id``; ``Session._register_persistent`` and ``_save_impl``
  when session listeners are present; the instance state's ``load`` / ``refresh``
  dispatch; ``ClassManager.new_instance``).
* ``app.repositories.reads``: ``Connection._handle_dbapi_exception_noconnection``,
  ``_ConnectionFairy._close_special``, ``Engine._should_log_info`` besides the
  driver path's (``tests/repositories/test_read_path.py`` checks what they do).
* ``app.repositories._pool_loan``: ``Pool._do_get``, ``_pre_ping``, ``_should_log_debug``,
  ``_ConnectionRecord.get_connection`` / ``_checkin_failed`` / ``checkin(_fairy_was_created)``
  / ``fairy_ref``, and ``_ConnectionFairy(pool, connection, record, echo)`` with its
  ``_counter`` (``tests/repositories/test_read_path_pool.py`` checks what they do).
* ``app.types.TrackedJSONDict``: ``MutableBase._parents`` replaced by a lighter
  registry (``tests/internals/test_types.py`` checks how ``sqlalchemy.ext.mutable`` uses it).
* ``tests/internals/test_db.py`` reads ``QueuePool._max_overflow``: the pool has no
  public getter for the setting it checks.

Each use outside the tests is marked ``# noqa: SLF001`` (ruff); the list with reasons
is in docs/design.md.
"""

from __future__ import annotations

import inspect
import weakref

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import class_mapper
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.pool import QueuePool

from app.db import create_db_engine, read_only
from app.models import SessionRun

CONNECTION_EVENTS = (
    "begin",
    "commit",
    "rollback",
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
    "engine_connect",
)


def test_a_new_engine_has_no_connection_event_listeners(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        assert type(engine.dialect).__name__.startswith("RunLayer")
        for name in CONNECTION_EVENTS:
            assert not getattr(engine.dispatch, name), f"a {name} listener on the engine"
        assert engine._has_events is False, (
            "SQLAlchemy's Engine._has_events (private) changed: app._dialects keeps "
            "the engine free of connection events so that executes skip event dispatch"
        )
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert engine._has_events is False
    finally:
        engine.dispose()


def test_the_dialect_hooks_keep_their_signatures(engine: Engine) -> None:
    dialect = engine.dialect
    for name in ("do_begin", "do_commit"):
        assert list(inspect.signature(getattr(dialect, name)).parameters) == ["dbapi_connection"]
    for name in ("set_engine_execution_options", "set_connection_execution_options"):
        assert len(inspect.signature(getattr(dialect, name)).parameters) == 2
    with engine.connect() as conn:
        fairy = conn.connection
        assert fairy.dbapi_connection is fairy.driver_connection


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_transactions_begin_in_the_mode_asked_for(engine: Engine) -> None:
    """IMMEDIATE by default (the write lock at once), DEFERRED for readers."""
    with engine.connect() as writer, read_only(engine).connect() as reader:
        reader.execute(text("SELECT 1"))
        assert reader.connection.dbapi_connection.in_transaction
        writer.execute(text("SELECT 1"))  # takes the write lock: the reader holds none
        assert writer.connection.dbapi_connection.in_transaction
        with engine.connect() as other:
            driver = other.connection.dbapi_connection  # checked out, no transaction yet
            driver.execute("PRAGMA busy_timeout = 0")
            try:
                with pytest.raises(OperationalError, match="locked"):
                    other.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: the writer holds it
            finally:
                driver.execute("PRAGMA busy_timeout = 5000")


def test_the_orm_internals_of_rows_are_there() -> None:
    assert callable(getattr(OrmSession, "_register_persistent", None)), (
        "Session._register_persistent (private) is gone: app.repositories._rows.inserted"
    )
    assert callable(getattr(OrmSession, "_save_impl", None)), (
        "Session._save_impl (private) is gone: app.repositories._rows.inserted"
    )
    assert callable(getattr(OrmSession, "_autobegin_t", None)), (
        "Session._autobegin_t (private) is gone: app.repositories._rows._register_inserted"
    )
    session = OrmSession()
    assert isinstance(session.hash_key, int)
    transaction = session._autobegin_t()
    assert isinstance(transaction._new, weakref.WeakKeyDictionary), (
        "SessionTransaction._new (private) changed: app.repositories._rows._register_inserted"
    )
    assert callable(getattr(session.identity_map, "_add_unpresent", None)), (
        "IdentityMap._add_unpresent (private) is gone: app.repositories._rows"
    )
    manager = class_mapper(SessionRun).class_manager
    instance = manager.new_instance()
    state = instance_state(instance)
    assert state.session_id is None and state.key is None
    assert callable(state.manager.dispatch.load)
    assert callable(state.manager.dispatch.refresh)


def test_what_the_driver_path_reads_of_sqlalchemy_is_there(engine: Engine) -> None:
    """``app.repositories._driver``: the attributes it reads to decide, and the error
    handler it calls (tests/internals/test_driver_path.py checks what it sends and reads)."""
    from app.repositories._sql import RUN_EXISTS

    parameters = list(inspect.signature(Connection._handle_dbapi_exception).parameters)
    assert parameters[:6] == ["self", "e", "statement", "parameters", "cursor", "context"], (
        "Connection._handle_dbapi_exception (private) changed: app.repositories._driver"
    )
    with engine.connect() as conn:
        for name in ("_echo", "_has_events", "_execution_options"):
            assert hasattr(conn, name), (
                f"Connection.{name} (private) is gone: app.repositories._driver"
            )
        assert conn.engine._has_events is False
        assert conn.dialect._has_events is False
        result = conn.execute(RUN_EXISTS, {"run_id": "nope"})
        compiled = result.context.compiled
        assert isinstance(compiled.bind_names, dict)
        assert isinstance(compiled.escaped_bind_names, dict)
        assert compiled.has_out_parameters is False
        assert compiled.positional == (engine.dialect.paramstyle == "qmark")
        if compiled.positional:
            assert list(compiled.positiontup) == ["run_id"]


def test_what_the_read_path_reads_of_sqlalchemy_is_there(engine: Engine) -> None:
    """``app.repositories.reads``, beyond what the driver path uses."""
    assert callable(getattr(Connection, "_handle_dbapi_exception_noconnection", None)), (
        "Connection._handle_dbapi_exception_noconnection (private) is gone: reads"
    )
    assert engine._should_log_info() is False, "Engine._should_log_info (private) changed: reads"
    fairy = engine.raw_connection()
    try:
        close_special = getattr(fairy, "_close_special", None)
        assert callable(close_special), "_ConnectionFairy._close_special (private) is gone: reads"
        assert "transaction_reset" in inspect.signature(close_special).parameters
    finally:
        fairy.close()


def test_the_pool_keeps_its_max_overflow_where_the_tests_read_it() -> None:
    pool = QueuePool(lambda: None, pool_size=1, max_overflow=7)
    assert pool._max_overflow == 7, "QueuePool._max_overflow (private) changed: test_db.py"


def test_what_the_pool_loan_uses_of_the_pool_is_there(engine: Engine) -> None:
    """``app.repositories._pool_loan``: a record taken and given back as it does, and a
    proxy made around a record as ``_ConnectionRecord.checkout`` makes one."""
    from sqlalchemy.pool import base as pool_base

    pool = engine.pool
    assert pool._pre_ping is False, "Pool._pre_ping (private) changed: _pool_loan"
    assert pool._should_log_debug() is False, "Pool._should_log_debug (private): _pool_loan"
    before = pool.checkedout()  # type: ignore[attr-defined]
    record = pool._do_get()
    try:
        assert record.get_connection() is record.dbapi_connection
        assert record.fairy_ref is None
        for name in ("_checkin_failed", "checkin"):
            method = getattr(record, name, None)
            assert callable(method), f"_ConnectionRecord.{name} is gone: _pool_loan"
            assert "_fairy_was_created" in inspect.signature(method).parameters
        assert pool.checkedout() == before + 1  # type: ignore[attr-defined]
    finally:
        record.checkin(_fairy_was_created=False)
    assert pool.checkedout() == before  # type: ignore[attr-defined]
    record = pool._do_get()
    record.get_connection()
    proxy = pool_base._ConnectionFairy(pool, record.dbapi_connection, record, False)
    proxy._counter = 1
    record.fairy_ref = weakref.ref(proxy, lambda _ref: None)
    assert proxy.is_valid and proxy.dbapi_connection is record.dbapi_connection
    proxy.close()
    assert record.fairy_ref is None, "closing the proxy no longer checks the record in"
    assert pool.checkedout() == before  # type: ignore[attr-defined]
