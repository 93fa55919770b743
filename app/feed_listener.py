"""Wake-ups for ``app.feed``: which followed sessions moved, learned without reading events.

``Signals`` keeps one generation per followed session; a commit notice bumps it and wakes
that session's followers (threads and event loops). One thread per ``EventFeed`` feeds it:

* **PostgreSQL** (``PostgresListener``): ``LISTEN session_events`` on one dedicated
  connection (not from the pool). When that connection drops or cannot be opened, the
  thread says so once in the log, wakes every follower, and until it listens again a
  ``PoolPoller`` reads the followed sessions' counter rows through the pool every
  ``FALLBACK_POLL_SECONDS`` and wakes the followers of the sessions that moved. Back to
  listening, it wakes everyone once more (notices sent meanwhile are lost) and the
  poller stops. It listens on ``app.db.direct_url(engine)``: behind a transaction
  pooler (``DATABASE_POOLER=transaction``), where LISTEN cannot work, that is
  ``DATABASE_DIRECT_URL``; without one the thread says so once in the log and polls
  through the pool every ``POOLED_POLL_SECONDS`` for good.
* **SQLite** (``SqlitePoller``): ``PRAGMA data_version`` on a connection of its own; when
  it changes, one read of the followed sessions' counter rows says which ones moved.

Followers never wait for any of this to deliver what is already committed: they read
from the pool first (``app.feed``); only live wake-ups come from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, text

from app.db import direct_url, is_pooled
from app.repositories import EVENTS_CHANNEL

log = logging.getLogger("app.feed")

SQLITE_POLL_SECONDS = 0.005
SQLITE_IDLE_POLL_SECONDS = 0.1
LISTEN_TIMEOUT_SECONDS = 0.5
LISTEN_CONNECT_TIMEOUT_SECONDS = 10
"""For opening the listening connection, unless its URL sets ``connect_timeout``."""
RECONNECT_BACKOFF = (0.05, 2.0)
FALLBACK_POLL_SECONDS = 0.5
"""While the listening connection is down: how often the counters are read through the pool."""
POOLED_POLL_SECONDS = 0.1
"""Behind a transaction pooler without ``DATABASE_DIRECT_URL``: the same, for good."""
_said_pooled = threading.Event()
"""Set once this process logged that its feed polls behind a pooler."""


# --------------------------------------------------------------------------
# Generations per followed session


@dataclass(eq=False)
class Watch:
    """One followed session: a generation bumped on each commit notice."""

    generation: int = 0
    users: int = 0
    waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)


class Signals:
    """Commit notices from the listener thread to followers in threads and event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watches: dict[str, Watch] = {}

    @property
    def followed(self) -> int:
        return len(self._watches)

    def followed_sessions(self) -> list[str]:
        with self._lock:
            return list(self._watches)

    @contextlib.contextmanager
    def watch(self, session_id: str) -> Iterator[Watch]:
        with self._lock:
            watch = self._watches.setdefault(session_id, Watch())
            watch.users += 1
        try:
            yield watch
        finally:
            with self._lock:
                watch.users -= 1
                if watch.users == 0:
                    del self._watches[session_id]

    def bump(self, session_id: str | None) -> None:
        """A commit in ``session_id``; ``None``: anything may have changed (wake everyone)."""
        with self._lock:
            if session_id is None:
                watches = list(self._watches.values())
            else:
                watch = self._watches.get(session_id)
                watches = [] if watch is None else [watch]
            waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
            for watch in watches:
                watch.generation += 1
                waiters.extend(watch.waiters)
            if watches:
                self._changed.notify_all()
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    async def wait_async(self, watch: Watch, seen: int, timeout: float) -> bool:
        """Until ``watch`` moves past ``seen`` (True) or ``timeout`` seconds pass (False)."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if watch.generation != seen:
                return True
            watch.waiters.add(waiter)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                watch.waiters.discard(waiter)

    def wait_sync(self, watch: Watch, seen: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: watch.generation != seen, timeout)


def _counter_changes(
    signals: Signals, before: dict[str, int], now: dict[str, int], followed: list[str]
) -> None:
    """Wake the followers of each followed session whose counter row moved since ``before``
    (also when it appeared, or went with its session)."""
    for session_id in followed:
        if now.get(session_id) != before.get(session_id):
            signals.bump(session_id)


def _first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --------------------------------------------------------------------------
# Threads


class Listener(threading.Thread):
    def __init__(self, signals: Signals, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.signals = signals
        self.stopping = threading.Event()
        self.ready = threading.Event()
        """Set while live wake-ups arrive as they should (PostgreSQL: while it listens)."""
        self.backend_pid: int | None = None
        """PostgreSQL: the pid of the listening connection's backend."""
        self.connections = 0
        """PostgreSQL: how many times the listening connection was opened (1 + reconnects)."""

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


class PoolPoller(threading.Thread):
    """Live wake-ups while PostgreSQL's listening connection is down: every
    ``interval`` seconds, one read of the followed sessions' counter rows through
    ``engine``'s pool (a pooled connection for a moment, outside the feed's readers)."""

    def __init__(self, signals: Signals, engine: Engine, interval: float) -> None:
        super().__init__(name="event-feed-fallback-poll", daemon=True)
        self.signals = signals
        self._engine = engine
        self._interval = interval
        self.stopping = threading.Event()
        self.polls = 0

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        counters: dict[str, int] = {}
        while not self.stopping.wait(self._interval):
            followed = self.signals.followed_sessions()
            if not followed:
                counters = {}
                continue
            try:
                with self._engine.connect() as conn:
                    rows = conn.execute(_PG_FOLLOWED_COUNTERS, {"ids": followed}).all()
            except (
                Exception
            ) as exc:  # the pool cannot read either: followers re-check on their timer
                log.debug("event feed: polling through the pool failed (%s)", _first_line(exc))
                continue
            self.polls += 1
            now: dict[str, int] = {session_id: next_seq for session_id, next_seq in rows}
            _counter_changes(self.signals, counters, now, followed)
            counters = now


class PostgresListener(Listener):
    """``LISTEN session_events`` on one dedicated connection; reconnects when it drops,
    and polls through the pool meanwhile (see the module docstring).

    ``conninfo``: where to listen; for an engine behind a transaction pooler it is
    replaced by the engine's direct URL, or by none (then it only polls).
    """

    def __init__(self, signals: Signals, conninfo: str | None, engine: Engine) -> None:
        super().__init__(signals, "event-feed-listen")
        if is_pooled(engine):
            direct = direct_url(engine)
            conninfo = (
                None
                if direct is None
                else direct.set(drivername="postgresql").render_as_string(hide_password=False)
            )
        self._conninfo = conninfo
        self._engine = engine
        self._connect_options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in engine.url.query:
            self._connect_options["connect_timeout"] = LISTEN_CONNECT_TIMEOUT_SECONDS
        self._poller: PoolPoller | None = None

    def run(self) -> None:
        if self._conninfo is None:
            self._poll_for_good()
            return
        backoff = RECONNECT_BACKOFF[0]
        down_since: float | None = None
        try:
            while not self.stopping.is_set():
                try:
                    with psycopg.connect(self._conninfo, **self._connect_options) as conn:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL)))
                        self.backend_pid = conn.info.backend_pid
                        self.connections += 1
                        backoff = RECONNECT_BACKOFF[0]
                        self.ready.set()
                        self._stop_polling()
                        if down_since is not None:
                            log.info(
                                "event feed: listening again after %.1f s; polling stopped",
                                time.monotonic() - down_since,
                            )
                            down_since = None
                        # Notices sent while no connection listened are lost: everyone re-reads.
                        self.signals.bump(None)
                        while not self.stopping.is_set():
                            for notice in conn.notifies(timeout=LISTEN_TIMEOUT_SECONDS):
                                self.signals.bump(notice.payload)
                except psycopg.Error as exc:
                    self.ready.clear()
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning(
                            "event feed: no listening connection (%s); live wake-ups poll "
                            "through the pool every %.1f s until it is back",
                            _first_line(exc),
                            FALLBACK_POLL_SECONDS,
                        )
                        self._start_polling()
                        self.signals.bump(None)  # waiting followers re-read, then poll
                    else:
                        log.debug("event feed: reconnecting failed (%s)", _first_line(exc))
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, RECONNECT_BACKOFF[1])
        finally:
            self._stop_polling()

    def _poll_for_good(self) -> None:
        """Behind a transaction pooler with no direct URL: LISTEN would never hear
        a notice there, so the counters are polled through the pool instead."""
        if not _said_pooled.is_set():
            _said_pooled.set()
            log.warning(
                "event feed: no direct connection to LISTEN on (DATABASE_POOLER=transaction "
                "and no DATABASE_DIRECT_URL); live wake-ups poll through the pool every %.1f s",
                POOLED_POLL_SECONDS,
            )
        self._start_polling(POOLED_POLL_SECONDS)
        self.ready.set()
        try:
            self.stopping.wait()
        finally:
            self._stop_polling()

    @property
    def polling(self) -> bool:
        return self._poller is not None

    def _start_polling(self, interval: float = FALLBACK_POLL_SECONDS) -> None:
        if self._poller is None:
            self._poller = PoolPoller(self.signals, self._engine, interval)
            self._poller.start()

    def _stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None


class SqlitePoller(Listener):
    """``PRAGMA data_version`` on a connection of its own: changes when others commit.

    Then one read of the followed sessions' counter rows (``next_seq`` moves
    with every append) tells which sessions to wake, so a commit wakes the
    followers of its session only. Both are reads outside any write
    transaction: in WAL mode they never wait for a writer nor hold one up.
    """

    def __init__(self, signals: Signals, path: str) -> None:
        super().__init__(signals, "event-feed-poll")
        self._path = path
        self._counters: dict[str, int] = {}

    def run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            self.ready.set()
            while not self.stopping.is_set():
                busy = self.signals.followed > 0
                self.stopping.wait(SQLITE_POLL_SECONDS if busy else SQLITE_IDLE_POLL_SECONDS)
                try:
                    current = conn.execute("PRAGMA data_version").fetchone()[0]
                    if current != version:
                        version = current
                        self._wake_changed(conn)
                except sqlite3.Error as exc:
                    log.warning("event feed: polling SQLite failed (%s); waking everyone", exc)
                    self.signals.bump(None)
        finally:
            conn.close()

    def _wake_changed(self, conn: sqlite3.Connection) -> None:
        followed = self.signals.followed_sessions()
        rows = conn.execute(_SQLITE_FOLLOWED_COUNTERS, (json.dumps(followed),)).fetchall()
        counters = dict(rows)
        _counter_changes(self.signals, self._counters, counters, followed)
        self._counters = counters


_SQLITE_FOLLOWED_COUNTERS = (
    "SELECT session_id, next_seq FROM session_event_sequences "
    "WHERE session_id IN (SELECT value FROM json_each(?))"
)
"""The counter rows of the followed sessions (one JSON array parameter)."""

_PG_FOLLOWED_COUNTERS = text(
    "SELECT session_id, next_seq FROM session_event_sequences WHERE session_id = ANY(:ids)"
)
"""The same on PostgreSQL (one array parameter)."""


def listener_for(engine: Engine, signals: Signals) -> Listener:
    """The listener thread for ``engine``'s database (not started): ``PostgresListener``
    or ``SqlitePoller``, which needs a database file."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return PostgresListener(signals, conninfo, engine)
    if url.database in (None, "", ":memory:"):
        raise ValueError("EventFeed needs a SQLite database file, not an in-memory database")
    return SqlitePoller(signals, url.database)


__all__ = [
    "FALLBACK_POLL_SECONDS",
    "POOLED_POLL_SECONDS",
    "Listener",
    "PoolPoller",
    "PostgresListener",
    "Signals",
    "SqlitePoller",
    "Watch",
    "listener_for",
]
