"""Following a session's or a run's events as they commit: ``EventFeed``.

    feed = EventFeed(engine)                    # one per engine and process: get_feed(engine)
    async for batch in feed.follow(session_id, since_seq=0, run_id=run_id):
        ...                                     # lists of SessionEvent, in seq order
    events = feed.wait(session_id, since_seq=12, timeout=30)   # blocking, for sync callers

How a follower learns that something committed (docs/events.md):

* **PostgreSQL**: every writer of events calls ``pg_notify('session_events',
  <session id>)`` inside its transaction (``append``, ``append_many``, so also
  every run transition), and PostgreSQL delivers the notice when the
  transaction commits. One thread per ``EventFeed`` holds **one** listening
  connection (not from the pool) for every follower of the process. If that
  connection drops, the thread reconnects with backoff and then wakes every
  follower, which reads from the last seq it delivered: notices lost while
  disconnected cost nothing, and nothing is delivered twice.
* **SQLite**: one thread asks ``PRAGMA data_version`` on a connection of its
  own every few milliseconds. The number changes when another connection
  commits; then one read of the followed sessions' counter rows says which
  sessions moved, and only their followers wake. Neither takes a lock that a
  writer waits for (WAL).

A woken follower reads the new events in a short read-only unit of work in a
thread (``unit_of_work(engine, readonly=True)``: no transaction is open while
it waits, and on SQLite it never takes the write lock). Followers of one
session in one event loop share their reads: the first one reads, the others
take the same page. At most ``readers`` reads run at once, so the followers of
a process hold at most ``readers`` pooled connections, and only while reading.

Why reads catch everything: writers of one session queue on the session's
counter row and commit in seq order, so once a read sees seq ``n`` every
event below ``n`` is visible too; a follower never needs to look back.
A follower of a run stops after delivering the run's terminal lifecycle event
(``run_completed``, ``run_failed``, ``run_cancelled``), or at once when the
run is already terminal and nothing after ``since_seq`` is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import sql
from sqlalchemy import Engine

from app.db import unit_of_work
from app.errors import RunNotFoundError
from app.models import SessionEvent
from app.repositories import EventRepository, RunRepository
from app.repositories._params import page_size, since_seq_param, text_param
from app.repositories._sql import EVENTS_CHANNEL, POSTGRESQL
from app.state_machine import TERMINAL_STATUSES, TRANSITIONS

log = logging.getLogger("app.feed")
T = TypeVar("T")

TERMINAL_EVENT_TYPES = frozenset(
    str(t.event_type) for t in TRANSITIONS if t.target in TERMINAL_STATUSES
)
DEFAULT_PAGE = 500
RECHECK_SECONDS = 5.0
"""A follower with no wake-up reads anyway after this long (a safety net, not the mechanism)."""
SQLITE_POLL_SECONDS = 0.005
SQLITE_IDLE_POLL_SECONDS = 0.1
LISTEN_TIMEOUT_SECONDS = 0.5
RECONNECT_BACKOFF = (0.05, 2.0)


# --------------------------------------------------------------------------
# Wake-ups: generations per followed session


@dataclass(eq=False)
class _Watch:
    """One followed session: a generation bumped on each commit notice."""

    generation: int = 0
    users: int = 0
    waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)


class _Signals:
    """Commit notices from the listener thread to followers in threads and event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watches: dict[str, _Watch] = {}

    @property
    def followed(self) -> int:
        return len(self._watches)

    def followed_sessions(self) -> list[str]:
        with self._lock:
            return list(self._watches)

    @contextlib.contextmanager
    def watch(self, session_id: str) -> Iterator[_Watch]:
        with self._lock:
            watch = self._watches.setdefault(session_id, _Watch())
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
            waiters = []
            for watch in watches:
                watch.generation += 1
                waiters.extend(watch.waiters)
            if watches:
                self._changed.notify_all()
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    async def wait_async(self, watch: _Watch, seen: int, timeout: float) -> bool:
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

    def wait_sync(self, watch: _Watch, seen: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: watch.generation != seen, timeout)


# --------------------------------------------------------------------------
# Listener threads


class _Listener(threading.Thread):
    def __init__(self, signals: _Signals, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.signals = signals
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


class _PostgresListener(_Listener):
    """``LISTEN session_events`` on one dedicated connection; reconnects when it drops."""

    def __init__(self, signals: _Signals, conninfo: str) -> None:
        super().__init__(signals, "event-feed-listen")
        self._conninfo = conninfo
        self.backend_pid: int | None = None
        self.connections = 0
        """How many times the listening connection was opened (1 + reconnects)."""

    def run(self) -> None:
        backoff = RECONNECT_BACKOFF[0]
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(EVENTS_CHANNEL)))
                    self.backend_pid = conn.info.backend_pid
                    self.connections += 1
                    backoff = RECONNECT_BACKOFF[0]
                    # Notices sent while no connection listened are lost: everyone re-reads.
                    self.signals.bump(None)
                    self.ready.set()
                    while not self.stopping.is_set():
                        for notice in conn.notifies(timeout=LISTEN_TIMEOUT_SECONDS):
                            self.signals.bump(notice.payload)
            except psycopg.Error as exc:
                self.ready.clear()
                log.warning("event feed: listening connection lost (%s); reconnecting", exc)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF[1])


class _SqlitePoller(_Listener):
    """``PRAGMA data_version`` on a connection of its own: changes when others commit.

    Then one read of the followed sessions' counter rows (``next_seq`` moves
    with every append) tells which sessions to wake, so a commit wakes the
    followers of its session only. Both are reads outside any write
    transaction: in WAL mode they never wait for a writer nor hold one up.
    """

    def __init__(self, signals: _Signals, path: str) -> None:
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
        rows = conn.execute(_FOLLOWED_COUNTERS, (json.dumps(followed),)).fetchall()
        counters = dict(rows)
        for session_id in followed:
            if counters.get(session_id) != self._counters.get(session_id):
                self.signals.bump(session_id)
        self._counters = counters


_FOLLOWED_COUNTERS = (
    "SELECT session_id, next_seq FROM session_event_sequences "
    "WHERE session_id IN (SELECT value FROM json_each(?))"
)
"""The counter rows of the followed sessions (one JSON array parameter)."""


# --------------------------------------------------------------------------
# Shared reads


@dataclass(eq=False)
class _Tail:
    """The last page read for one session in one event loop, for the followers to share."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    since: int = -1
    generation: int = -1
    events: list[SessionEvent] = field(default_factory=list)
    full: bool = False
    users: int = 0

    def after(self, position: int, generation: int) -> list[SessionEvent] | None:
        """The events after ``position`` if the last read answers for it, else None."""
        if self.generation != generation or not self.since <= position:
            return None
        if self.full and (not self.events or self.events[-1].seq <= position):
            return None
        return [event for event in self.events if event.seq > position]


class EventFeed:
    """Followers of the event log that wake on commit (see the module docstring).

    ``readers``: reads running at once (pooled connections the followers may
    hold). ``recheck``: seconds after which an idle follower reads anyway.
    """

    def __init__(self, engine: Engine, *, readers: int = 2, recheck: float = RECHECK_SECONDS):
        self._engine = engine
        self._readers = readers
        self._recheck = recheck
        self._signals = _Signals()
        self._listener: _Listener | None = None
        self._start_lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[anyio.CapacityLimiter, dict[str, _Tail]]
        ] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Start the listener thread (followers do it on first use); wait until it listens."""
        with self._start_lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = self._new_listener()
                self._listener.start()
        self._listener.ready.wait(timeout)

    def close(self) -> None:
        with self._start_lock:
            if self._listener is not None:
                self._listener.stop()
                self._listener = None

    @property
    def listener_backend_pid(self) -> int | None:
        """PostgreSQL: the pid of the listening connection's backend (None on SQLite)."""
        listener = self._listener
        return listener.backend_pid if isinstance(listener, _PostgresListener) else None

    @property
    def listener_connections(self) -> int:
        """PostgreSQL: how often the listening connection was opened (1 + reconnects)."""
        listener = self._listener
        return listener.connections if isinstance(listener, _PostgresListener) else 0

    def _new_listener(self) -> _Listener:
        url = self._engine.url
        if self._engine.dialect.name == POSTGRESQL:
            conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
            return _PostgresListener(self._signals, conninfo)
        if url.database in (None, "", ":memory:"):
            raise ValueError("EventFeed needs a SQLite database file, not an in-memory database")
        return _SqlitePoller(self._signals, url.database)

    # ------------------------------------------------------------ following

    async def follow(
        self,
        session_id: str,
        *,
        since_seq: int,
        run_id: str | None = None,
        limit: int = DEFAULT_PAGE,
        heartbeat: float | None = None,
    ) -> AsyncIterator[list[SessionEvent]]:
        """Yield each batch of newly committed events with ``seq > since_seq``, in seq order.

        With ``heartbeat``, an empty batch comes after that many seconds without
        one (for a stream's keep-alive).

        With ``run_id``, only that run's events (session seqs), and the
        iterator ends after the run's terminal event. Raises
        ``RunNotFoundError`` when the run is not in the session.
        """
        session_id = text_param(session_id, "session_id")
        position, limit = since_seq_param(since_seq), page_size(limit)
        await anyio.to_thread.run_sync(self.start)
        terminal = False
        if run_id is not None:
            terminal = await self._in_thread(self._run_is_terminal, session_id, run_id)
        limiter, tails = self._loop_state()
        tail = tails.setdefault(session_id, _Tail())
        tail.users += 1
        try:
            with self._signals.watch(session_id) as watch:
                forced = False
                last_yield = time.monotonic()
                while True:
                    seen = watch.generation
                    events = None if forced else tail.after(position, seen)
                    if events is None:
                        async with tail.lock:
                            seen = watch.generation
                            events = None if forced else tail.after(position, seen)
                            if events is None:
                                page = await self._in_thread(
                                    self._read, session_id, position, limit, limiter=limiter
                                )
                                tail.since, tail.generation = position, seen
                                tail.events, tail.full = page, len(page) == limit
                                events = page
                    forced = False
                    if events:
                        position = events[-1].seq
                        mine = [e for e in events if run_id is None or e.run_id == run_id]
                        if mine:
                            yield mine
                            last_yield = time.monotonic()
                            if run_id is not None and any(
                                e.type in TERMINAL_EVENT_TYPES for e in mine
                            ):
                                return
                        continue
                    if terminal:
                        return
                    timeout = self._recheck
                    if heartbeat is not None:
                        timeout = min(timeout, heartbeat - (time.monotonic() - last_yield))
                    if not await self._signals.wait_async(watch, seen, max(timeout, 0.0)):
                        forced = True
                        if heartbeat is not None and time.monotonic() - last_yield >= heartbeat:
                            yield []
                            last_yield = time.monotonic()
        finally:
            tail.users -= 1
            if tail.users == 0 and tails.get(session_id) is tail:
                del tails[session_id]

    def wait(
        self,
        session_id: str,
        *,
        since_seq: int,
        run_id: str | None = None,
        timeout: float = 30.0,
        limit: int = DEFAULT_PAGE,
    ) -> list[SessionEvent]:
        """Block until events with ``seq > since_seq`` (of ``run_id``, if given) are
        committed and return them (at most ``limit``); ``[]`` after ``timeout`` seconds."""
        session_id = text_param(session_id, "session_id")
        position, limit = since_seq_param(since_seq), page_size(limit)
        self.start()
        deadline = time.monotonic() + timeout
        with self._signals.watch(session_id) as watch:
            while True:
                seen = watch.generation
                page = self._read(session_id, position, limit)
                mine = [e for e in page if run_id is None or e.run_id == run_id]
                if mine:
                    return mine
                if page:
                    position = page[-1].seq
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._signals.wait_sync(watch, seen, min(remaining, self._recheck))

    # ------------------------------------------------------------ reads

    def _read(self, session_id: str, since_seq: int, limit: int) -> list[SessionEvent]:
        with unit_of_work(self._engine, readonly=True) as db:
            return EventRepository(db).list_for_session(
                session_id, since_seq=since_seq, limit=limit
            )

    def _run_is_terminal(self, session_id: str, run_id: str) -> bool:
        with unit_of_work(self._engine, readonly=True) as db:
            run = RunRepository(db).get(run_id)
            if run.session_id != session_id:
                raise RunNotFoundError(run_id, session_id=session_id)
            return run.status in TERMINAL_STATUSES

    async def read(self, call: Callable[..., T], *args: Any) -> T:
        """Run ``call(*args)`` in a thread among the feed's ``readers`` (a short read that
        opens its own unit of work): the reads of a stream's start count against the
        same few connections as the followers' reads."""
        return await self._in_thread(call, *args)

    async def _in_thread(
        self, call: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
    ) -> T:
        return await anyio.to_thread.run_sync(call, *args, limiter=limiter or self._loop_state()[0])

    def _loop_state(self) -> tuple[anyio.CapacityLimiter, dict[str, _Tail]]:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = (anyio.CapacityLimiter(self._readers), {})
        return state


_feeds: dict[int, tuple[Engine, EventFeed]] = {}
_feeds_lock = threading.Lock()


def get_feed(engine: Engine) -> EventFeed:
    """The process's ``EventFeed`` for ``engine`` (one listener per engine and process)."""
    with _feeds_lock:
        known = _feeds.get(id(engine))
        if known is None or known[0] is not engine:
            known = _feeds[id(engine)] = (engine, EventFeed(engine))
        return known[1]


def close_feed(engine: Engine) -> None:
    """Stop and forget ``engine``'s feed (before disposing of an engine other than the app's)."""
    with _feeds_lock:
        known = _feeds.pop(id(engine), None)
    if known is not None:
        known[1].close()


__all__ = ["TERMINAL_EVENT_TYPES", "EventFeed", "close_feed", "get_feed"]
