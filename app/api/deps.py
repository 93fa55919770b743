"""FastAPI dependencies: the request's unit of work and the repositories on it.

The contract (docs/unit-of-work.md): a request gets one ``sqlmodel.Session``;
it commits when the handler returns, **before the response is sent**, and
rolls back when the handler raises. A failed commit is an error response and
nothing of the request is stored.

Why the session dependency is async. A sync handler runs in Starlette's
threadpool (about 40 threads), and so does the validation of its response.
If every thread waited for a pooled connection while the requests that hold
the connections waited for a thread to finish their response, the app would
stall until ``pool_timeout`` and answer 500. So a request first waits, in the
event loop and holding nothing, for one of the engine's *slots* (as many as
the pool keeps connections; on SQLite one for writers, see ``app.aio.slot_limiter``); only
then does it take a thread and a connection. Commit and rollback run in a
thread of their own, outside the shared threadpool, so a request that holds a
connection never waits for a thread. Every dependency here that does no I/O is
``async def``: FastAPI runs a plain ``def`` dependency in the threadpool, one
thread hop per dependency per request.

The Run API's own routes take the shorter way, ``run_in_slot``: the slot, then
one thread that does the whole unit of work (or one read of
``app.repositories.reads``) and builds the answer, so a request crosses into a
thread once, not once per dependency, handler, response validation and commit
(docs/benchmarks.md has the measurements).

Tests and apps that serve another database override ``get_db_engine``:
``app.dependency_overrides[get_db_engine] = lambda: engine``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from app.aio import slot_limiter, slot_threads, take_slot
from app.api.errors import problem_in_words, unreadable_body
from app.db import get_engine, unit_of_work
from app.errors import BadParameterError
from app.replicas import configure_from_env, note_write, router_of
from app.repositories import EventRepository, RunRepository
from app.schemas import RunResumeRequest

T = TypeVar("T")

async def get_db_engine() -> Engine:
    """The engine requests use: the process-wide one for ``DATABASE_URL`` (async: no
    thread hop; an override may be a plain function). ``DATABASE_READ_URL``, when set,
    is attached to it as its read replica (``app.replicas``)."""
    return configure_from_env(get_engine())


EngineDep = Annotated[Engine, Depends(get_db_engine)]


async def run_in_slot(engine: Engine, readonly: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in a thread, once the request holds one of ``engine``'s slots.

    ``work`` does all of the request's database work there: one read of
    ``app.repositories.reads``, or a whole ``unit_of_work`` that has committed when
    ``work`` returns (so the answer is durable before it is sent). No slot within
    ``DB_POOL_TIMEOUT`` is a ``DatabaseBusyError``; once ``work`` runs, it runs to the
    end (a client that goes away does not cut a unit of work in half).
    """
    limiter, borrower = slot_limiter(engine, readonly=readonly), object()
    await take_slot(limiter, borrower)
    if not readonly and router_of(engine) is not None:
        work = partial(_then_note_write, engine, work)  # the answer's consistency token
    try:
        return await anyio.to_thread.run_sync(
            work, *args, limiter=slot_threads(engine, readonly=readonly)
        )
    finally:
        limiter.release_on_behalf_of(borrower)


def _then_note_write(engine: Engine, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, then the primary's WAL position for the answer's
    ``Consistency-Token`` (``app.replicas``); a failed write notes nothing."""
    result = work(*args)
    note_write(engine)
    return result


async def _request_session(engine: Engine, *, readonly: bool) -> AsyncIterator[DbSession]:
    limiter, borrower = (
        slot_limiter(engine, readonly=readonly),
        object(),
    )  # a route may hold two sessions
    await take_slot(limiter, borrower)
    try:
        work = unit_of_work(engine, readonly=readonly)
        session = work.__enter__()  # creates the Session; no I/O yet
        # Commit or rollback in a thread of its own (see the module docstring).
        own_thread = anyio.CapacityLimiter(1)
        try:
            yield session
        except BaseException as exc:
            await anyio.to_thread.run_sync(
                work.__exit__, type(exc), exc, exc.__traceback__, limiter=own_thread
            )
            raise
        await anyio.to_thread.run_sync(work.__exit__, None, None, None, limiter=own_thread)
        if not readonly and router_of(engine) is not None:
            await anyio.to_thread.run_sync(note_write, engine, limiter=own_thread)
    finally:
        limiter.release_on_behalf_of(borrower)


async def get_session(engine: EngineDep) -> AsyncIterator[DbSession]:
    """The request's read-write session (see the module docstring)."""
    async for session in _request_session(engine, readonly=False):
        yield session


async def get_read_session(engine: EngineDep) -> AsyncIterator[DbSession]:
    """A session for requests that only read: on SQLite it never waits for a writer."""
    async for session in _request_session(engine, readonly=True):
        yield session


# scope="function": the exit code (commit) runs before the response is sent.
SessionDep = Annotated[DbSession, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[DbSession, Depends(get_read_session, scope="function")]


async def get_run_repository(session: SessionDep) -> RunRepository:
    return RunRepository(session)


async def get_event_repository(session: SessionDep) -> EventRepository:
    return EventRepository(session)


async def get_run_reader(session: ReadSessionDep) -> RunRepository:
    """A ``RunRepository`` for handlers that only read runs."""
    return RunRepository(session)


async def get_event_reader(session: ReadSessionDep) -> EventRepository:
    """An ``EventRepository`` for handlers that only read events."""
    return EventRepository(session)


async def get_resume_request(request: Request) -> RunResumeRequest:
    """The resume body, validated; anything wrong with it is a 400 ``bad_parameter``
    (spec 8: "bad resume payload"), malformed JSON and JSON nested deeper than the
    parser goes included."""
    raw = await request.body()
    if not raw:
        raise BadParameterError("resume", 'the body is empty; expected {"resume": {...}}')
    try:
        body: Any = json.loads(raw)
    except (RecursionError, ValueError) as exc:
        problem = unreadable_body(exc)
        raise BadParameterError("resume", f'{problem}; expected {{"resume": {{...}}}}') from None
    try:
        return RunResumeRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False)
        raise BadParameterError("resume", _resume_problems(errors)) from None


def _resume_problems(errors: list[Any]) -> str:
    """The problems of a resume body in words, each place named once (the error names
    ``resume`` already); the expected shape when the shape is wrong."""
    problems, shape_wrong = [], False
    for error in errors:
        where = ".".join(str(part) for part in error["loc"])
        inside = where.startswith("resume.")  # a problem within the resume object
        shape_wrong = shape_wrong or not inside
        problems.append(problem_in_words(error, "" if where == "resume" else where))
    described = "; ".join(problems)
    return f'{described}; expected {{"resume": {{...}}}}' if shape_wrong else described


RunRepositoryDep = Annotated[RunRepository, Depends(get_run_repository)]
EventRepositoryDep = Annotated[EventRepository, Depends(get_event_repository)]
RunReaderDep = Annotated[RunRepository, Depends(get_run_reader)]
EventReaderDep = Annotated[EventRepository, Depends(get_event_reader)]
ResumeRequestDep = Annotated[RunResumeRequest, Depends(get_resume_request)]

__all__ = [
    "EngineDep",
    "EventReaderDep",
    "EventRepositoryDep",
    "ReadSessionDep",
    "ResumeRequestDep",
    "RunReaderDep",
    "RunRepositoryDep",
    "SessionDep",
    "get_db_engine",
    "get_event_reader",
    "get_event_repository",
    "get_read_session",
    "get_resume_request",
    "get_run_reader",
    "get_run_repository",
    "get_session",
    "run_in_slot",
]
