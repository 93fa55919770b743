"""Following a session's or a run's events as they commit: ``EventFeed``.

    feed = EventFeed(engine)                    # one per engine and process: get_feed(engine)
    async for batch in feed.follow(session_id, since_seq=0, run_id=run_id):
        ...                                     # lists of SessionEvent, in seq order
    events = feed.wait(session_id, since_seq=12, timeout=30)   # blocking, for sync callers

What is committed is read from the pool at once; only live wake-ups wait for
the feed's listener thread (``app.feed_listener``, how it listens and polls on each
backend; docs/events.md). On PostgreSQL every writer of events calls
``pg_notify('session_events', <session id>)`` inside its transaction (``append``,
``append_many``, so also every run transition), and the notice arrives when the
transaction commits. A listener that lost its connection wakes every follower,
which reads from the last seq it delivered: nothing is missed or delivered twice.

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
(``run_completed``, ``run_failed``, ``run_cancelled``), or when the run is
terminal and nothing after its position is left (also when the client's
``since_seq`` is past the run's terminal event). It raises
``RunNotFoundError`` when the run is gone (deleted, or its chat session was):
at the start, and at its next re-check (every ``recheck`` seconds) while it
follows. A follower of a whole chat session raises ``SessionNotFoundError`` at
the first re-check after the session was deleted (a deletion sends no notice).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from sqlalchemy import Engine

from app._params import (
    described,
    optional_text_param,
    page_size,
    since_seq_param,
    text_param,
)
from app.db import unit_of_work
from app.errors import BadParameterError, RunNotFoundError, SessionNotFoundError
from app.feed_listener import Listener, Signals, listener_for
from app.models import SessionEvent
from app.replicas import router_of
from app.repositories import EventRepository
from app.repositories.reads import RunReads, SessionReads
from app.state_machine import TERMINAL_EVENT_TYPES, TERMINAL_STATUSES

T = TypeVar("T")

DEFAULT_PAGE = 500
RECHECK_SECONDS = 5.0
"""A follower with no wake-up reads anyway after this long (a safety net, not the
mechanism); a follower of a run also checks that its run still exists this often."""
MIN_INTERVAL_SECONDS = 0.01
"""The shortest ``heartbeat`` and ``recheck``: shorter ones would spin."""


def seconds_param(value: Any, name: str, *, minimum: float) -> float:
    """A finite number of seconds, at least ``minimum``, else ``BadParameterError`` naming
    ``name`` (NaN and infinities never compare as a wait needs them to)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadParameterError(name, f"expected a number of seconds, got {described(value)}")
    if not math.isfinite(value):
        raise BadParameterError(name, f"expected a finite number of seconds, got {value}")
    if value < minimum:
        raise BadParameterError(name, f"expected at least {minimum} seconds, got {value:g}")
    return float(value)


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


@dataclass(eq=False)
class _RunCheck:
    """The last check of one followed run (or, for ``run_id`` None, of one followed chat
    session) in one event loop, for its followers to share."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    began: float = -math.inf
    terminal: bool = False
    missing: RunNotFoundError | SessionNotFoundError | None = None
    users: int = 0


@dataclass(eq=False)
class _LoopState:
    """What the followers in one event loop share: the read limiter, tails and run checks."""

    limiter: anyio.CapacityLimiter
    tails: dict[str, _Tail] = field(default_factory=dict)
    checks: dict[tuple[str, str | None], _RunCheck] = field(default_factory=dict)


class EventFeed:
    """Followers of the event log that wake on commit (see the module docstring).

    ``readers``: reads running at once (pooled connections the followers may
    hold). ``recheck``: seconds after which an idle follower reads anyway, and
    a follower of a run checks that its run still exists.
    """

    def __init__(self, engine: Engine, *, readers: int = 2, recheck: float = RECHECK_SECONDS):
        if isinstance(readers, bool) or not isinstance(readers, int) or readers < 1:
            raise BadParameterError(
                "readers", f"expected an integer from 1, got {described(readers)}"
            )
        self._engine = engine
        self._readers = readers
        self._recheck = seconds_param(recheck, "recheck", minimum=MIN_INTERVAL_SECONDS)
        self._signals = Signals()
        self._listener: Listener | None = None
        self._start_lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Start the listener thread (followers do it on first use, without waiting);
        wait until it listens, at most ``timeout`` seconds."""
        self._start_listener().ready.wait(timeout)

    def _start_listener(self) -> Listener:
        with self._start_lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = listener_for(self._engine, self._signals)
                self._listener.start()
            return self._listener

    def close(self) -> None:
        with self._start_lock:
            if self._listener is not None:
                self._listener.stop()
                self._listener = None

    @property
    def listener_backend_pid(self) -> int | None:
        """PostgreSQL: the pid of the listening connection's backend (None on SQLite)."""
        listener = self._listener
        return None if listener is None else listener.backend_pid

    @property
    def listener_connections(self) -> int:
        """PostgreSQL: how often the listening connection was opened (1 + reconnects)."""
        listener = self._listener
        return 0 if listener is None else listener.connections

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

        With ``heartbeat`` (seconds, at least ``MIN_INTERVAL_SECONDS``), an empty
        batch comes after that many seconds without one (for a stream's keep-alive).

        With ``run_id``, only that run's events (session seqs), and the
        iterator ends after the run's terminal event, or once the run is
        terminal and nothing after the position is left. Raises
        ``RunNotFoundError`` when the run is not in the session, at the start
        or (deleted meanwhile) at a later check. Without ``run_id``,
        ``SessionNotFoundError`` once a re-check finds the session deleted.
        """
        session_id = text_param(session_id, "session_id")
        run_id = optional_text_param(run_id, "run_id")
        position, limit = since_seq_param(since_seq), page_size(limit)
        if heartbeat is not None:
            heartbeat = seconds_param(heartbeat, "heartbeat", minimum=MIN_INTERVAL_SECONDS)
        self._start_listener()  # no waiting for it: what is committed is read from the pool
        state = self._loop_state()
        limiter = state.limiter
        tail = state.tails.setdefault(session_id, _Tail())
        tail.users += 1
        check = state.checks.setdefault((session_id, run_id), _RunCheck())
        check.users += 1
        try:
            terminal = False
            last_check = time.monotonic()
            if run_id is not None:
                terminal = await self._check_run(check, session_id, run_id, last_check)
            with self._signals.watch(session_id) as watch:
                forced = woken = read_any = False
                catching_up = True  # the backlog may come from a read replica
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
                                    self._read,
                                    session_id,
                                    position,
                                    limit,
                                    catching_up,
                                    limiter=limiter,
                                )
                                catching_up = catching_up and len(page) == limit
                                tail.since, tail.generation = position, seen
                                tail.events, tail.full = page, len(page) == limit
                                events = page
                    forced = False
                    if events:
                        position = events[-1].seq
                        read_any, woken = True, False
                        mine = [e for e in events if run_id is None or e.run_id == run_id]
                        if mine:
                            yield mine
                            last_yield = time.monotonic()
                            if run_id is not None and any(
                                e.type in TERMINAL_EVENT_TYPES for e in mine
                            ):
                                return
                        continue
                    # Nothing new after ``position``.
                    now = time.monotonic()
                    if run_id is None and now - last_check >= self._recheck:
                        # A deleted chat session sends no notice either.
                        await self._check_session(check, session_id, now)
                        last_check = now
                    if run_id is not None and not terminal:
                        # A deleted run sends no notice: check it every ``recheck`` seconds.
                        # And while the position is past the log's end (a client's cursor
                        # beyond the last seq), a wake-up that brought nothing may be the
                        # run's end, written below the position.
                        if (woken and not read_any) or now - last_check >= self._recheck:
                            terminal = await self._check_run(check, session_id, run_id, now)
                            last_check = now
                            if terminal:  # read once more: its last events may be new
                                forced = True
                                continue
                    if terminal:
                        return
                    if heartbeat is not None and now - last_yield >= heartbeat:
                        yield []
                        last_yield = now = time.monotonic()
                    timeout = self._recheck
                    if heartbeat is not None:
                        timeout = min(timeout, last_yield + heartbeat - now)
                    timeout = min(timeout, last_check + self._recheck - now)
                    woken = await self._signals.wait_async(watch, seen, max(timeout, 0.0))
                    forced = not woken
        finally:
            tail.users -= 1
            if tail.users == 0 and state.tails.get(session_id) is tail:
                del state.tails[session_id]
            check.users -= 1
            if check.users == 0 and state.checks.get((session_id, run_id)) is check:
                del state.checks[(session_id, run_id)]

    async def _check_run(
        self, check: _RunCheck, session_id: str, run_id: str, asked_at: float
    ) -> bool:
        """Whether the run is terminal, from a check begun at ``asked_at`` or later, which
        the followers of the run in this event loop share; ``RunNotFoundError`` if gone."""
        async with check.lock:
            if check.began < asked_at:
                began = time.monotonic()
                try:
                    check.terminal = await self._in_thread(
                        self._run_is_terminal, session_id, run_id
                    )
                    check.missing = None
                except RunNotFoundError as exc:
                    check.missing = exc
                check.began = began
            if check.missing is not None:
                raise RunNotFoundError(run_id, session_id=check.missing.session_id)
            return check.terminal

    async def _check_session(self, check: _RunCheck, session_id: str, asked_at: float) -> None:
        """``SessionNotFoundError`` if the chat session is gone, from a check begun at
        ``asked_at`` or later, which the followers of the session in this loop share."""
        async with check.lock:
            if check.began < asked_at:
                began = time.monotonic()
                try:
                    await self._in_thread(SessionReads.of(self._engine).get, session_id)
                    check.missing = None
                except SessionNotFoundError as exc:
                    check.missing = exc
                check.began = began
            if check.missing is not None:
                raise SessionNotFoundError(session_id)

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
        committed and return them (at most ``limit``); ``[]`` after ``timeout`` seconds
        (a finite number, 0 or more). Raises ``RunNotFoundError`` as ``follow`` does:
        the run is not in the session, at the start or at a later check."""
        session_id = text_param(session_id, "session_id")
        run_id = optional_text_param(run_id, "run_id")
        position, limit = since_seq_param(since_seq), page_size(limit)
        timeout = seconds_param(timeout, "timeout", minimum=0.0)
        self._start_listener()
        deadline = time.monotonic() + timeout
        with self._signals.watch(session_id) as watch:
            if run_id is not None:
                self._run_is_terminal(session_id, run_id)
            last_check = time.monotonic()
            while True:
                seen = watch.generation
                page = self._read(session_id, position, limit)
                mine = [e for e in page if run_id is None or e.run_id == run_id]
                if mine:
                    return mine
                if page:
                    position = page[-1].seq
                    continue
                now = time.monotonic()
                if run_id is not None and now - last_check >= self._recheck:
                    self._run_is_terminal(session_id, run_id)  # raises if it is gone
                    last_check = now
                remaining = deadline - now
                if remaining <= 0:
                    return []
                wait = min(remaining, self._recheck)
                if run_id is not None:
                    wait = min(wait, last_check + self._recheck - now)
                self._signals.wait_sync(watch, seen, max(wait, 0.0))

    # ------------------------------------------------------------ reads

    def _read(
        self, session_id: str, since_seq: int, limit: int, catch_up: bool = False
    ) -> list[SessionEvent]:
        """The session's events after ``since_seq``. A ``catch_up`` read of an engine with
        a read replica (``app.replicas``) takes what the replica has, then the rest from
        the primary (what the replica has not replayed yet); live reads use the primary."""
        router = router_of(self._engine) if catch_up else None
        page: list[SessionEvent] = []
        if router is not None and router.on_replica():
            began = time.monotonic()
            try:
                page = self._read_on(router.replica, session_id, since_seq, limit)
            except Exception as exc:
                router.failed(exc)  # logged once; the primary reads it all
            else:
                router.answered(began)
            if len(page) == limit:
                return page
            since_seq, limit = (page[-1].seq if page else since_seq), limit - len(page)
        return page + self._read_on(self._engine, session_id, since_seq, limit)

    @staticmethod
    def _read_on(engine: Engine, session_id: str, since_seq: int, limit: int) -> list[SessionEvent]:
        with unit_of_work(engine, readonly=True) as db:
            return EventRepository(db).list_for_session(
                session_id, since_seq=since_seq, limit=limit
            )

    def _run_is_terminal(self, session_id: str, run_id: str) -> bool:
        """Whether the run has finished; ``RunNotFoundError`` if it is not in the session."""
        run = RunReads.of(self._engine).get(run_id)  # outside the ORM Session
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
        return await anyio.to_thread.run_sync(
            call, *args, limiter=limiter or self._loop_state().limiter
        )

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState(anyio.CapacityLimiter(self._readers))
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
