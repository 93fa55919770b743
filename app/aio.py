"""The layer for ``async def`` code: the sync repositories, run on worker threads.

    async with async_unit_of_work(engine) as db:
        run = await db.runs.create({"session_id": chat_id, "message": "hi"})
        await db.events.append(chat_id, "note", {"k": 1}, run_id=run.id)
    # committed here, before the block's caller goes on

There is one implementation of the repositories, the sync one
(``app.repositories``); this module gives ``async def`` code the same names, the
same errors and the same transaction rules without blocking the event loop:

* ``async_unit_of_work(engine, readonly=False)``: one transaction, as
  ``app.db.unit_of_work``: committed when the block ends (the commit has run and
  succeeded when ``__aexit__`` returns), rolled back when it raises or the
  awaiting task is cancelled. Before anything else it waits, in the event loop and
  holding nothing, for one of the engine's *slots* (the Run API's, shared:
  ``slot_limiter``); no slot within ``DB_POOL_TIMEOUT`` seconds is a
  ``DatabaseBusyError``. Then it takes one worker thread for the whole unit of
  work: the ``Session`` is made, used, committed and closed on that thread only,
  so nothing in the event loop's thread ever holds or touches it, and calls of
  one unit run one at a time in the order they were made.
* ``db.runs`` / ``db.events`` (or ``AsyncRunRepository(db)``,
  ``AsyncEventRepository(db)``): every public method of ``RunRepository`` /
  ``EventRepository`` as a coroutine of the same name, signature and errors.
* ``AsyncRunReads.of(engine)`` / ``AsyncEventReads.of(engine)``: the read path
  outside the ORM Session (``app.repositories.reads``), each call one read on a
  slot for readers and a worker thread.
* ``db.run_sync(fn, *args)``: any sync code on the unit's thread, e.g.
  ``db.run_sync(lambda session: session.get(Session, chat_id))``... with the
  session passed by ``db.session`` (touch it only inside ``run_sync``).
* ``adopt(session)``: an async view of a sync ``Session`` that the caller owns
  (it neither commits nor closes it; no slot is taken).

The twins are made from the sync classes when this module is imported
(``twin``): a public method added to a sync repository is there at once, and
nothing is written twice. Why threads and not native async drivers, with the
measurements: docs/design.md (Async access) and docs/async.md.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import anyio
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool
from sqlmodel import Session as DbSession

from app.db import unit_of_work
from app.errors import DatabaseBusyError
from app.repositories import EventReads, EventRepository, RunReads, RunRepository

T = TypeVar("T")
S = TypeVar("S")

# --------------------------------------------------------------------------
# Slots: how many units of work may hold a connection of an engine at once


_slots: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[int, bool, str], anyio.CapacityLimiter]
] = weakref.WeakKeyDictionary()


def request_slots(engine: Engine) -> int:
    """How many requests may hold a session of ``engine`` at once.

    ``DB_REQUEST_SLOTS``, else the pool's size (``pool_size``). Not its overflow: an
    overflow connection is closed when it comes back, so requests that used it would
    open a new connection each (under load, hundreds a second on PostgreSQL); the
    overflow stays for the host's other work.
    """
    configured = os.environ.get("DB_REQUEST_SLOTS", "").strip()
    if configured:
        try:
            slots = int(configured)
        except ValueError:
            raise ValueError(f"DB_REQUEST_SLOTS must be an integer, got {configured!r}") from None
        if slots < 1:
            raise ValueError(f"DB_REQUEST_SLOTS must be at least 1, got {slots}")
        return slots
    pool = engine.pool
    if isinstance(pool, QueuePool):
        return pool.size()
    return 1


def slot_limiter(engine: Engine, *, readonly: bool) -> anyio.CapacityLimiter:
    """The slots a unit of work waits for: one set per engine and event loop, the same
    ones the Run API's requests take (``app.api.deps``): its routes and
    ``async_unit_of_work`` queue for the same connections.

    On SQLite one writer at a time holds the write lock whatever the pool size,
    so writers get a slot of their own and queue for it here, in order and at
    no cost, instead of polling the lock on SQLite's busy timeout; readers
    share the rest of the pool. On PostgreSQL every unit shares the slots.
    """
    per_loop = _slots.setdefault(asyncio.get_running_loop(), {})
    key = (id(engine), readonly and engine.dialect.name == "sqlite", "slots")
    limiter = per_loop.get(key)
    if limiter is None:
        total = request_slots(engine)
        if engine.dialect.name != "sqlite":
            slots = total
        else:
            slots = max(total - 1, 1) if readonly else 1
        limiter = per_loop[key] = anyio.CapacityLimiter(slots)
    return limiter


def slot_threads(engine: Engine, *, readonly: bool) -> anyio.CapacityLimiter:
    """Threads for the Run API's requests that already hold one of ``slot_limiter``'s
    slots: as many as there are slots (one set per engine and event loop, beside them),
    so such a request never waits for a thread behind the host's own sync work."""
    per_loop = _slots.setdefault(asyncio.get_running_loop(), {})
    key = (id(engine), readonly and engine.dialect.name == "sqlite", "threads")
    threads = per_loop.get(key)
    if threads is None:
        total = slot_limiter(engine, readonly=readonly).total_tokens
        threads = per_loop[key] = anyio.CapacityLimiter(total)
    return threads


def slot_timeout() -> float:
    """``DB_POOL_TIMEOUT`` (seconds, default 30): the longest wait for a slot."""
    raw = os.environ.get("DB_POOL_TIMEOUT", "").strip()
    return float(raw) if raw else 30.0


async def take_slot(limiter: anyio.CapacityLimiter, borrower: object) -> None:
    """One of ``limiter``'s slots for ``borrower``; ``DatabaseBusyError`` after
    ``slot_timeout()`` seconds."""
    try:
        with anyio.fail_after(slot_timeout()):
            await limiter.acquire_on_behalf_of(borrower)
    except TimeoutError:
        raise DatabaseBusyError(
            f"no database connection free within {slot_timeout():g} s; retry later"
        ) from None


# --------------------------------------------------------------------------
# Worker threads: each serves one unit of work at a time, all its calls


_STOP = object()
_names = itertools.count(1)


class _Starter:
    """Starts the worker threads, so that the event loop never waits for one to start.

    ``Thread.start`` returns only once the new thread runs, which on a busy machine
    can take a scheduler's time slice or several (100 ms and more were measured):
    made in the event loop, a worker would block it that long. A new worker takes
    calls at once (its queue exists); they run when its thread has started. One
    starter thread per process (a forked child makes its own).
    """

    def __init__(self) -> None:
        self._threads: queue.SimpleQueue[threading.Thread] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def start(self, thread: threading.Thread) -> None:
        self._threads.put(thread)
        if self._thread is None or self._pid != os.getpid():
            with self._lock:
                if self._thread is None or self._pid != os.getpid():
                    self._thread = threading.Thread(
                        target=self._serve, name="run-layer-aio-starter", daemon=True
                    )
                    self._pid = os.getpid()
                    self._thread.start()  # once per process

    def _serve(self) -> None:
        while True:
            self._threads.get().start()


_starter = _Starter()


class _Worker:
    """A thread that runs the calls queued to it, one at a time, in order."""

    __slots__ = ("_jobs", "thread")

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._serve, name=f"run-layer-aio-{next(_names)}", daemon=True
        )
        _starter.start(self.thread)

    def submit(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)`` on this thread; an ``asyncio.Future`` of its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((fn, args, kwargs, loop, future))
        return future

    def stop(self) -> None:
        self._jobs.put(_STOP)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, kwargs, loop, future = job
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the awaiting task, whatever it is
                outcome: tuple[Callable[..., None], Any] = (_set_exception, exc)
            else:
                outcome = (_set_result, result)
            del job, fn, args, kwargs
            try:
                loop.call_soon_threadsafe(outcome[0], future, outcome[1])
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del outcome, future, loop


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # cancelled meanwhile
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class _Workers:
    """Idle worker threads, kept for the next unit of work (at most ``keep``)."""

    def __init__(self, keep: int = 64) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._keep = keep

    def take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def give_back(self, worker: _Worker) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(worker)
                return
        worker.stop()


_workers = _Workers()


async def _wait(future: asyncio.Future[T]) -> T:
    """The worker's result. A cancelled task stops waiting at once; the call itself
    runs to its end on the worker (a thread cannot be interrupted)."""
    return await future


async def _finish(future: asyncio.Future[T]) -> T:
    """The worker's result, waited for to the end even when the awaiting task is
    cancelled meanwhile (anyio's cancellation or a plain ``Task.cancel``); the
    cancellation is raised afterwards."""
    cancelled = False
    with anyio.CancelScope(shield=True):
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                if future.cancelled():
                    raise
                cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


# --------------------------------------------------------------------------
# The unit of work


class _Lease:
    """The worker thread of one unit of work; ``active`` until the unit ends.

    Pinned (``async_unit_of_work``): one thread for the unit's whole life. On demand
    (``adopt``, whose Session lives in its caller's thread anyway): a thread is taken
    for a call when none of the unit's calls is pending and given back when the last
    pending one has run, so an adopted Session holds no thread between calls. Either
    way the unit's calls run one at a time, in order, on one thread.
    """

    __slots__ = ("_lock", "_pending", "active", "pinned", "worker")

    def __init__(self, worker: _Worker | None) -> None:
        self.worker = worker
        self.pinned = worker is not None
        self.active = True
        self._lock = threading.Lock()
        self._pending = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            raise RuntimeError("this unit of work has ended; start another one")
        if self.pinned:
            assert self.worker is not None
            return self.worker.submit(fn, args, kwargs)
        with self._lock:
            if self._pending == 0:
                self.worker = _workers.take()
            self._pending += 1
            worker = self.worker
        assert worker is not None
        return worker.submit(self._then_release, (fn, args, kwargs), {})

    def _then_release(self, fn: Callable[..., T], args: Any, kwargs: Any) -> T:
        """On the worker: the call, then the thread back if no other call is pending."""
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    worker, self.worker = self.worker, None
                    assert worker is not None
                    _workers.give_back(worker)  # it takes new calls after this one

    async def end(self) -> None:
        """After the calls still queued (one a cancelled task left), the thread goes
        back to the idle ones; no call is accepted any more."""
        try:
            await _finish(self.submit(_nothing))
        finally:
            self.active = False
            if self.pinned:
                assert self.worker is not None
                _workers.give_back(self.worker)


def _nothing() -> None:
    """A call queued behind others: done once they are."""


class AsyncUnitOfWork:
    """One sync ``Session`` on one worker thread, for ``async def`` code.

    Made by ``async_unit_of_work`` (which owns the transaction) or ``adopt`` (the
    caller owns it). ``runs`` / ``events`` are its repositories; ``run_sync`` runs
    any sync code on its thread; ``commit`` / ``rollback`` end the transaction
    early, as ``Session.commit`` / ``rollback`` do. Calls after the unit has ended
    raise ``RuntimeError``.
    """

    def __init__(self, lease: _Lease, session: DbSession) -> None:
        self._lease = lease
        self._session = session
        self._runs: AsyncRunRepository | None = None
        self._events: AsyncEventRepository | None = None

    @property
    def session(self) -> DbSession:
        """The sync Session: pass it to code run by ``run_sync``, never use it in the loop."""
        return self._session

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread every call of this unit runs on (``adopt``: the thread of
        the calls pending now, None between calls)."""
        worker = self._lease.worker
        return None if worker is None else worker.thread

    async def run_sync(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on this unit's thread (after its earlier calls)."""
        return await _wait(self._lease.submit(fn, *args, **kwargs))

    @property
    def runs(self) -> AsyncRunRepository:
        if self._runs is None:
            self._runs = AsyncRunRepository(self)
        return self._runs

    @property
    def events(self) -> AsyncEventRepository:
        if self._events is None:
            self._events = AsyncEventRepository(self)
        return self._events

    async def commit(self) -> None:
        await self.run_sync(self._session.commit)

    async def rollback(self) -> None:
        await self.run_sync(self._session.rollback)

    async def flush(self) -> None:
        await self.run_sync(self._session.flush)


class async_unit_of_work:
    """``async with async_unit_of_work(engine) as db:``: one transaction (module docstring).

    ``readonly=True``: as ``unit_of_work(engine, readonly=True)`` (on SQLite it begins
    DEFERRED and never waits for the write lock) and it waits for a reader's slot.
    The block's end commits on the unit's thread; ``__aexit__`` returns once the
    commit has succeeded (its error raised otherwise). An exception or the
    cancellation of the awaiting task rolls back instead; the rollback and the
    session's close run to their end (shielded from cancellation), then the thread
    and the slot are released.
    """

    def __init__(self, engine: Engine, *, readonly: bool = False) -> None:
        self.engine = engine
        self.readonly = readonly
        self._limiter: anyio.CapacityLimiter | None = None
        self._lease: _Lease | None = None
        self._work: Any = None

    async def __aenter__(self) -> AsyncUnitOfWork:
        limiter = slot_limiter(self.engine, readonly=self.readonly)
        await take_slot(limiter, self)
        lease = None
        try:
            lease = _Lease(_workers.take())
            work = unit_of_work(self.engine, readonly=self.readonly)
            session = await _finish(lease.submit(work.__enter__))  # no I/O yet
        except BaseException:
            if lease is not None:
                lease.active = False
                if lease.worker is not None:  # none taken yet: nothing to give back
                    _workers.give_back(lease.worker)
            limiter.release_on_behalf_of(self)
            raise
        self._limiter, self._lease, self._work = limiter, lease, work
        return AsyncUnitOfWork(lease, session)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, limiter, work = self._lease, self._limiter, self._work
        assert lease is not None and limiter is not None, "__aexit__ without __aenter__"
        self._lease = self._limiter = self._work = None
        try:
            # Commit, or roll back; after the calls still queued on the thread.
            await _finish(lease.submit(work.__exit__, exc_type, exc, tb))
        finally:
            try:
                await lease.end()
            finally:
                limiter.release_on_behalf_of(self)


class adopt:
    """``async with adopt(session) as db:``: an async view of a sync ``Session`` the
    caller owns. Its calls run one at a time on a worker thread (taken for the calls
    pending, none held between them); it takes no slot and neither commits, rolls back
    nor closes the session (use ``db.commit()`` or let the owner do it). The session
    must not be used elsewhere while a call runs."""

    def __init__(self, session: DbSession) -> None:
        self.session = session
        self._lease: _Lease | None = None

    async def __aenter__(self) -> AsyncUnitOfWork:
        self._lease = _Lease(None)  # a thread per call, none held between calls
        return AsyncUnitOfWork(self._lease, self.session)

    async def __aexit__(self, *_exc: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.end()


# --------------------------------------------------------------------------
# The twins


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    """The public plain methods of ``cls`` and its bases (not ``object``'s): what
    gets an async twin. Properties, class and static methods are left out."""
    methods: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__[:-1]):  # bases first, so subclasses win
        for name, member in vars(klass).items():
            if name.startswith("_"):
                continue
            if inspect.isfunction(member):
                methods[name] = member
            else:
                methods.pop(name, None)
    return dict(sorted(methods.items()))


def _twin_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    async def twin(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        return await self._call(getattr(self._sync, name), args, kwargs)

    functools.update_wrapper(twin, method)  # name, doc, signature (__wrapped__)
    twin.__doc__ = f"Async twin of ``{method.__qualname__}``.\n\n{method.__doc__ or ''}".rstrip()
    return twin


def twin(sync_cls: type, name: str, base: type) -> type:
    """A subclass of ``base`` with an ``async def`` twin of every public method of
    ``sync_cls``: each calls the same method of the wrapped sync object through
    ``base._call``. Made at import time, so the twins follow the sync class."""
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"``{sync_cls.__name__}``'s async twin: {base.__doc__}",
        "sync_class": sync_cls,
    }
    for method_name, method in public_methods(sync_cls).items():
        method_twin = _twin_method(method_name, method)
        method_twin.__qualname__ = f"{name}.{method_name}"
        namespace[method_name] = method_twin
    return type(name, (base,), namespace)


class _RepositoryTwin(Generic[S]):
    """every public method, as a coroutine running the sync one on the unit of
    work's thread (same arguments, result and errors)."""

    sync_class: ClassVar[type]

    def __init__(self, db: AsyncUnitOfWork, /, **options: Any) -> None:
        """``db``: an ``AsyncUnitOfWork``; ``options`` go to the sync class (e.g.
        ``idempotency_window``). Making the sync repository does no I/O."""
        self._db = db
        self._sync: S = self.sync_class(db.session, **options)

    @property
    def unit_of_work(self) -> AsyncUnitOfWork:
        return self._db

    async def _call(self, method: Callable[..., T], args: Any, kwargs: Any) -> T:
        return await self._db.run_sync(method, *args, **kwargs)


class _ReadsTwin(Generic[S]):
    """every public method, as a coroutine: one read on a slot for readers and a
    worker thread (same arguments, result and errors)."""

    sync_class: ClassVar[type]
    _of: ClassVar[str]

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sync: S = self.sync_class.of(engine)  # type: ignore[attr-defined]

    @classmethod
    def of(cls, engine: Engine) -> Any:
        """The engine's instance (made on first use, then shared)."""
        key = f"_run_layer_async_{cls.__name__}"
        reads = engine.__dict__.get(key)
        if reads is None:
            reads = engine.__dict__[key] = cls(engine)
        return reads

    async def _call(self, method: Callable[..., T], args: Any, kwargs: Any) -> T:
        return await run_in_thread(self.engine, True, method, *args, **kwargs)


async def run_in_thread(
    engine: Engine, readonly: bool, fn: Callable[..., T], /, *args: Any, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)`` on a worker thread, once the caller holds one of
    ``engine``'s slots (``readonly``: a reader's). For one self-contained piece of
    database work: a read of ``app.repositories.reads``, or a whole sync
    ``unit_of_work`` that has committed when ``fn`` returns. If the awaiting task
    is cancelled, ``fn`` still runs to its end before the slot is released."""
    limiter, borrower = slot_limiter(engine, readonly=readonly), object()
    await take_slot(limiter, borrower)
    worker = _workers.take()
    try:
        future = worker.submit(fn, args, kwargs)
        try:
            return await _wait(future)
        except asyncio.CancelledError:
            if future.cancelled():  # the call may still run: release when it has ended
                await _finish(worker.submit(_nothing, (), {}))
            raise
    finally:
        _workers.give_back(worker)
        limiter.release_on_behalf_of(borrower)


if TYPE_CHECKING:  # each method typed as the sync one (generated: app/_async_twins.pyi)
    from app._async_twins import (
        AsyncEventReads,
        AsyncEventRepository,
        AsyncRunReads,
        AsyncRunRepository,
    )
else:
    AsyncRunRepository = twin(RunRepository, "AsyncRunRepository", _RepositoryTwin)
    AsyncEventRepository = twin(EventRepository, "AsyncEventRepository", _RepositoryTwin)
    AsyncRunReads = twin(RunReads, "AsyncRunReads", _ReadsTwin)
    AsyncEventReads = twin(EventReads, "AsyncEventReads", _ReadsTwin)

TWINS: dict[type, type] = {
    RunRepository: AsyncRunRepository,
    EventRepository: AsyncEventRepository,
    RunReads: AsyncRunReads,
    EventReads: AsyncEventReads,
}
"""Each sync class and its async twin."""

__all__ = [
    "TWINS",
    "AsyncEventReads",
    "AsyncEventRepository",
    "AsyncRunReads",
    "AsyncRunRepository",
    "AsyncUnitOfWork",
    "adopt",
    "async_unit_of_work",
    "public_methods",
    "request_slots",
    "run_in_thread",
    "slot_limiter",
    "slot_threads",
    "slot_timeout",
    "take_slot",
    "twin",
]
