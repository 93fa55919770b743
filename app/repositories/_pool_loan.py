"""A pooled connection lent to one read, without SQLAlchemy's proxy around it.

``engine.raw_connection()`` wraps every checkout in a ``_ConnectionFairy`` (with a
``weakref.finalize`` and a weak reference) and unwraps it at checkin: about 5 µs
of a 20 µs SQLite read, measured in docs/benchmarks.md. A read that holds the
connection for one statement inside one ``try`` needs none of that. ``borrow``
takes the pool's own record, so reconnecting, recycling and invalidation happen as
the pool does them (``_ConnectionRecord.get_connection``), runs the pool's checkout
listeners, and ``give_back`` checks the record in as the pool does (its finalizers,
the checkin listeners, back into the queue).

No loan when the difference could be seen: a pool with pre-ping, debug logging,
``reset`` listeners, checkout or checkin listeners other than the layer's own
(``app.db.is_layer_pool_listener``), or a pool class with its own ``connect``. The
read then takes ``engine.raw_connection()`` as before. A driver error on a loan
goes through a proxy made for the record at that moment (``adopt``), so its
wrapping and invalidation are SQLAlchemy's own.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import NullPool, Pool, QueuePool
from sqlalchemy.pool import base as pool_base

from app.db import is_layer_pool_listener

_LENDING_POOLS = (QueuePool, NullPool)


def lender(engine: Engine) -> Pool | None:
    """The engine's pool if a loan from it would go unnoticed (module docstring), else None."""
    pool = engine.pool
    if type(pool) not in _LENDING_POOLS or pool._pre_ping:  # noqa: SLF001 SQLAlchemy private, docs/design.md
        return None
    dispatch = pool.dispatch
    if dispatch.reset or pool._should_log_debug():  # noqa: SLF001 SQLAlchemy private, docs/design.md
        return None
    for listeners in (dispatch.checkout, dispatch.checkin):
        if listeners and not all(is_layer_pool_listener(fn) for fn in listeners):
            return None
    return pool


def borrow(pool: Pool) -> Any:
    """A record checked out of ``pool`` with a live connection, or None when a checkout
    listener refused it (a failed idle ping): the record is then invalidated and back in
    the pool, and the caller takes ``engine.raw_connection()``, which reconnects."""
    record: Any = pool._do_get()  # noqa: SLF001 SQLAlchemy private, docs/design.md
    try:
        connection = record.get_connection()
    except BaseException as exc:
        record._checkin_failed(exc, _fairy_was_created=False)  # noqa: SLF001 SQLAlchemy private, docs/design.md
        raise
    if pool.dispatch.checkout:
        try:
            # The layer's listeners take no proxy (lender checked they are the layer's).
            pool.dispatch.checkout(connection, record, None)
        except DisconnectionError as exc:
            record._checkin_failed(exc, _fairy_was_created=False)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            return None
        except BaseException as exc:
            record._checkin_failed(exc, _fairy_was_created=False)  # noqa: SLF001 SQLAlchemy private, docs/design.md
            raise
    return record


def give_back(record: Any) -> None:
    """Check a borrowed record in, as the pool checks in a proxy's record."""
    record.checkin(_fairy_was_created=False)


def adopt(pool: Pool, record: Any) -> Any:
    """The borrowed record as the proxy ``pool.connect()`` would have made for it
    (``_ConnectionRecord.checkout``), for SQLAlchemy's error handling; closing the proxy
    checks the record in."""
    proxy = pool_base._ConnectionFairy  # noqa: SLF001 SQLAlchemy private, docs/design.md
    fairy = proxy(pool, record.dbapi_connection, record, pool._should_log_debug())  # noqa: SLF001 SQLAlchemy private, docs/design.md
    fairy._counter = 1  # noqa: SLF001 SQLAlchemy private, docs/design.md
    record.fairy_ref = weakref.ref(fairy, _no_callback)
    return fairy


def _no_callback(_ref: Any) -> None:
    """As SQLAlchemy's own weak reference to a proxy (a callback keeps CPython from
    clearing it before the proxy's finalizer runs)."""
