"""FastAPI dependencies for a host's ``async def`` routes: the async unit of work.

    from app.api.async_deps import AsyncRunRepositoryDep

    @app.post("/chats/{chat_id}/runs")
    async def start(chat_id: str, runs: AsyncRunRepositoryDep) -> dict[str, str]:
        run = await runs.create({"session_id": chat_id, "message": "hi"})
        return {"run_id": run.id}

The same contract as ``app.api.deps`` (docs/unit-of-work.md): a request gets one
unit of work (``app.aio.async_unit_of_work``), committed when the handler
returns and **before the response is sent** (``scope="function"``), rolled back
when it raises; a failed commit is an error answer. The request first waits for
one of the engine's slots (the Run API's own, shared), in the event loop and
holding nothing; then one worker thread holds its Session and runs every call of
the request, commit included, so the event loop never waits for the database.
Several repositories of one request share its unit of work. Reads that need no
transaction: ``AsyncRunReadsDep`` / ``AsyncEventReadsDep`` (the read path outside
the ORM Session, one slot per call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends

from app.aio import (
    AsyncEventReads,
    AsyncEventRepository,
    AsyncRunReads,
    AsyncRunRepository,
    AsyncUnitOfWork,
    async_unit_of_work,
)
from app.api.deps import EngineDep


async def get_async_db(engine: EngineDep) -> AsyncIterator[AsyncUnitOfWork]:
    """The request's read-write async unit of work (see the module docstring)."""
    async with async_unit_of_work(engine) as db:
        yield db


async def get_async_read_db(engine: EngineDep) -> AsyncIterator[AsyncUnitOfWork]:
    """An async unit of work for requests that only read: on SQLite it never waits
    for a writer (its transaction begins DEFERRED)."""
    async with async_unit_of_work(engine, readonly=True) as db:
        yield db


# scope="function": the exit code (commit) runs before the response is sent.
AsyncDbDep = Annotated[AsyncUnitOfWork, Depends(get_async_db, scope="function")]
AsyncReadDbDep = Annotated[AsyncUnitOfWork, Depends(get_async_read_db, scope="function")]


async def get_async_run_repository(db: AsyncDbDep) -> AsyncRunRepository:
    return db.runs


async def get_async_event_repository(db: AsyncDbDep) -> AsyncEventRepository:
    return db.events


async def get_async_run_reader(db: AsyncReadDbDep) -> AsyncRunRepository:
    """An ``AsyncRunRepository`` for handlers that only read runs."""
    return db.runs


async def get_async_event_reader(db: AsyncReadDbDep) -> AsyncEventRepository:
    """An ``AsyncEventRepository`` for handlers that only read events."""
    return db.events


async def get_async_run_reads(engine: EngineDep) -> AsyncRunReads:
    return AsyncRunReads.of(engine)


async def get_async_event_reads(engine: EngineDep) -> AsyncEventReads:
    return AsyncEventReads.of(engine)


AsyncRunRepositoryDep = Annotated[AsyncRunRepository, Depends(get_async_run_repository)]
AsyncEventRepositoryDep = Annotated[AsyncEventRepository, Depends(get_async_event_repository)]
AsyncRunReaderDep = Annotated[AsyncRunRepository, Depends(get_async_run_reader)]
AsyncEventReaderDep = Annotated[AsyncEventRepository, Depends(get_async_event_reader)]
AsyncRunReadsDep = Annotated[AsyncRunReads, Depends(get_async_run_reads)]
AsyncEventReadsDep = Annotated[AsyncEventReads, Depends(get_async_event_reads)]

__all__ = [
    "AsyncDbDep",
    "AsyncEventReaderDep",
    "AsyncEventReadsDep",
    "AsyncEventRepositoryDep",
    "AsyncReadDbDep",
    "AsyncRunReaderDep",
    "AsyncRunReadsDep",
    "AsyncRunRepositoryDep",
    "get_async_db",
    "get_async_event_reader",
    "get_async_event_reads",
    "get_async_event_repository",
    "get_async_read_db",
    "get_async_run_reader",
    "get_async_run_reads",
    "get_async_run_repository",
]
