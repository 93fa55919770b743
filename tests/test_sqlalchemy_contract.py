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
* ``app.repositories._rows._execute``: a statement's compiled form kept and
  executed with ``Connection._execute_context`` (private), as SQLAlchemy does
  after a cache hit.
* ``app.repositories._rows``: ORM internals with no public equivalent
  (``Session._register_persistent``, ``_save_impl``, ``_update_impl``; the instance
  state's ``load`` / ``refresh`` dispatch; ``ClassManager.new_instance``).
"""

from __future__ import annotations

import inspect

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import class_mapper
from sqlalchemy.orm.attributes import instance_state

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
    assert callable(getattr(OrmSession, "_update_impl", None)), (
        "Session._update_impl (private) is gone: app.repositories._rows.in_session"
    )
    manager = class_mapper(SessionRun).class_manager
    instance = manager.new_instance()
    state = instance_state(instance)
    assert callable(state.manager.dispatch.load)
    assert callable(state.manager.dispatch.refresh)


def test_precompiled_execution_matches_connection_execute(engine: Engine) -> None:
    """``app.repositories._rows._execute``: the second execution of a statement goes
    through ``Connection._execute_context`` with the first one's compiled form
    (private: ``_execute_context``, ``execution_ctx_cls._init_compiled``,
    ``Dialect.CACHE_HIT``, ``_generate_cache_key``, ``CursorResult.context.compiled``)."""
    from app.repositories import _rows
    from app.repositories._sql import RUN_EXISTS

    assert callable(getattr(Connection, "_execute_context", None))
    assert callable(getattr(engine.dialect.execution_ctx_cls, "_init_compiled", None))
    _key, _extracted, _param_dict = RUN_EXISTS._generate_cache_key()
    with engine.connect() as conn:
        first = _rows._execute(conn, RUN_EXISTS, {"run_id": "nope"}).scalar()
        plans = _rows.plans_of(engine.dialect)
        assert any(plan[0] is RUN_EXISTS for plan in plans.values())
        again = _rows._execute(conn, RUN_EXISTS, {"run_id": "nope"})
        assert again.context.compiled is next(
            plan[1] for plan in plans.values() if plan[0] is RUN_EXISTS
        )
        assert first is again.scalar() is False
