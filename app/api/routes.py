"""The Run API of spec section 8, ready to mount: ``app.include_router(router)``.

Every endpoint is one unit of work (``app.api.deps``): it has committed before
its answer leaves. Reads use read-only sessions. Errors come in the one shape
of ``app.api.errors``, which ``install_error_handlers`` (or ``create_app``)
installs; the statuses each endpoint can answer are listed in its OpenAPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import Engine

from app._params import MAX_PAGE_SIZE, MAX_SEQ
from app.api.deps import EngineDep, ResumeRequestDep, get_resume_request, run_in_slot
from app.api.errors import ErrorShapeRoute
from app.api.openapi import documented_body, operation_id, raises
from app.api.sessions import CursorQuery, MetadataQuery, RunLimit, StatusQuery, metadata_query
from app.api.sse import LastEventIdHeader, event_stream, stream_position, stream_responses
from app.db import unit_of_work
from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    IdempotencyKeyReusedError,
    InvalidTransitionError,
    RunNotFoundError,
    SessionNotFoundError,
    TransactionAbortedError,
)
from app.feed import get_feed
from app.repositories import RunRepository
from app.repositories.reads import EventReads, RunReads
from app.schemas import (
    EventPage,
    RunCreate,
    RunPage,
    RunResponse,
    RunResumeRequest,
)

router = APIRouter(
    prefix="/api/runs",
    tags=["runs"],
    route_class=ErrorShapeRoute,
    generate_unique_id_function=operation_id,
)
"""Each route documents the errors it can answer (``app.api.openapi``): the domain
errors of its ``@raises`` and what the error table adds."""

SinceSeq = Annotated[int, Query(ge=0, le=MAX_SEQ, description="exclusive; 0 = from the start")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
if TYPE_CHECKING:  # a body type FastAPI documents; the route reads the body itself
    ResumeBody = Any
else:
    ResumeBody = documented_body(RunResumeRequest)


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="1-255 printable ASCII characters; the same request with the same key "
        "within 24 h returns the first answer (Idempotent-Replayed: true), another request "
        "with it is a 422",
    ),
]
REPLAYED_HEADER = "Idempotent-Replayed"
_REPLAYED = {
    REPLAYED_HEADER: {
        "description": "true when this is the stored answer to an earlier request with "
        "the same Idempotency-Key; absent otherwise",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_LOCATION = {
    "Location": {
        "description": "the run's URL path (GET it for the run)",
        "schema": {"type": "string"},
    }
}
_WRITE_ERRORS = (TransactionAbortedError,)
"""A write's commit that the database aborted (``app.errors``)."""


def _json(
    model: BaseModel, status_code: int = 200, replayed: bool = False, location: str | None = None
) -> Response:
    """The answer for ``model``, serialized once by its own pydantic serializer.

    A handler that returned the model would have FastAPI validate it again against
    the response model and serialize it in the threadpool; the routes declare
    ``response_model`` for the OpenAPI schema and return this instead."""
    headers = {REPLAYED_HEADER: "true"} if replayed else {}
    if location is not None:
        headers["Location"] = location
    return Response(
        model.__pydantic_serializer__.to_json(model),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def _create(engine: Engine, body: RunCreate, key: str | None) -> tuple[RunResponse, bool]:
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.create(body, idempotency_key=key)
        return RunResponse.model_validate(run), runs.was_replayed(run)


@router.post(
    "",
    status_code=201,
    response_model=RunResponse,
    responses={201: {"headers": _LOCATION | _REPLAYED}},
    response_description="Created; Location: the run's URL",
)
@raises(
    BadParameterError,
    SessionNotFoundError,
    ActiveRunExistsError,
    IdempotencyKeyReusedError,
    *_WRITE_ERRORS,
)
async def create_run(
    body: RunCreate,
    engine: EngineDep,
    request: Request,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a queued run in an existing chat session.

    ``multitask_strategy`` says what happens when the session already has an
    active run: ``enqueue`` (default) queues behind it, ``reject`` answers 409,
    ``interrupt`` cancels the active runs first.
    """
    run, replayed = await run_in_slot(engine, False, _create, engine, body, idempotency_key)
    location = request.url_for("get_run", run_id=run.run_id).path  # under any mount prefix
    return _json(run, 201, replayed, location)


@router.get("", response_model=RunPage)
@raises(BadParameterError)
async def list_runs(
    engine: EngineDep,
    status: StatusQuery = None,
    created_after: Annotated[
        datetime | None, Query(description="only runs created after this time (exclusive)")
    ] = None,
    created_before: Annotated[
        datetime | None, Query(description="only runs created before this time (exclusive)")
    ] = None,
    metadata: MetadataQuery = None,
    cursor: CursorQuery = None,
    limit: RunLimit = 50,
) -> Response:
    """Runs of every session, newest first, one keyset page at a time (operators'
    dashboards): follow ``next_cursor`` until it is null. A time without a zone is UTC."""
    read = partial(
        RunReads.of(engine).page,
        status=status,
        metadata=metadata_query(metadata),
        created_after=created_after,
        created_before=created_before,
        cursor=cursor,
        limit=limit,
    )
    return _json(await run_in_slot(engine, True, read))


@router.get("/{run_id}", response_model=RunResponse)
@raises(RunNotFoundError)
async def get_run(run_id: str, engine: EngineDep) -> Response:
    """The run (read outside the ORM Session: ``app.repositories.reads``)."""
    return _json(await run_in_slot(engine, True, RunReads.of(engine).get, run_id))


def _resume(
    engine: Engine, run_id: str, body: RunResumeRequest, key: str | None
) -> tuple[RunResponse, bool]:
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.resume(run_id, body, idempotency_key=key)
        return RunResponse.model_validate(run), runs.was_replayed(run)


@router.post(
    "/{run_id}/resume",
    status_code=202,
    response_model=RunResponse,
    responses={202: {"headers": _REPLAYED}},
)
@raises(
    BadParameterError,
    RunNotFoundError,
    InvalidTransitionError,
    ActiveRunExistsError,
    IdempotencyKeyReusedError,
    *_WRITE_ERRORS,
    body_reader=get_resume_request,
)
async def resume_run(
    run_id: str,
    body: ResumeRequestDep,
    engine: EngineDep,
    documented: ResumeBody,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Resume a run that waits for input; the same run goes back to running.

    Anything wrong with the body is a 400 ``bad_parameter`` (``get_resume_request``);
    ``documented`` only gives the body its schema."""
    run, replayed = await run_in_slot(engine, False, _resume, engine, run_id, body, idempotency_key)
    return _json(run, 202, replayed)


def _cancel(engine: Engine, run_id: str) -> tuple[RunResponse, bool]:
    with unit_of_work(engine) as db:
        run, changed = RunRepository(db).cancel(run_id)
        return RunResponse.model_validate(run), changed


@router.post(
    "/{run_id}/cancel",
    status_code=202,
    response_model=RunResponse,
    responses={200: {"model": RunResponse, "description": "Already finished; unchanged"}},
)
@raises(RunNotFoundError, InvalidTransitionError, *_WRITE_ERRORS)
async def cancel_run(run_id: str, engine: EngineDep) -> Response:
    """Cancel, idempotently: 202 when accepted, 200 when the run had already finished."""
    run, changed = await run_in_slot(engine, False, _cancel, engine, run_id)
    return _json(run, 202 if changed else 200)


@router.get("/{run_id}/events", response_model=EventPage)
@raises(RunNotFoundError)
async def list_run_events(
    run_id: str, engine: EngineDep, since_seq: SinceSeq = 0, limit: Limit = 100
) -> Response:
    """The run's events with ``seq > since_seq``, in seq order (session seqs)."""
    read = partial(EventReads.of(engine).page_for_run, run_id, since_seq=since_seq, limit=limit)
    return _json(await run_in_slot(engine, True, read))


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Where a run's event stream starts: its session, and the last seq the client saw."""

    session_id: str
    run_id: str
    since_seq: int


def _session_of_run(engine: Engine, run_id: str) -> str:
    return RunReads.of(engine).get(run_id).session_id


async def get_stream_start(
    run_id: str,
    engine: EngineDep,
    since_seq: SinceSeq = 0,
    last_event_id: LastEventIdHeader = None,
) -> StreamStart:
    """Checked before the stream opens, so an unknown run is a plain 404. ``Last-Event-ID``
    (sent by an ``EventSource`` that reconnects) wins over ``since_seq``."""
    since_seq = stream_position(since_seq, last_event_id)
    session_id = await get_feed(engine).read(_session_of_run, engine, run_id)
    return StreamStart(session_id, run_id, since_seq)


@router.get(
    "/{run_id}/events/stream",
    response_class=StreamingResponse,
    responses=stream_responses(
        "id: <seq>, event: <type>, data: EventResponse JSON; : ping; then event: end, "
        "or event: error (data: the error shape) when the run is gone"
    ),
)
@raises(BadParameterError, RunNotFoundError)
async def stream_run_events(
    start: Annotated[StreamStart, Depends(get_stream_start)],
    engine: EngineDep,
    request: Request,
) -> StreamingResponse:
    """The run's events as Server-Sent Events, as they commit (docs/events.md).

    Each event is ``id: <seq>``, ``event: <type>`` and ``data: <EventResponse
    JSON>`` (``app.api.sse``); a ``: ping`` comment goes out after
    ``SSE_PING_SECONDS`` without events. The stream ends with ``event: end``
    once the run is over: after its terminal event, or at once when it is
    terminal and the client's cursor is past that event. When the run is gone
    meanwhile (deleted, or its chat session was), or the stream fails, it ends
    with ``event: error`` whose data is the one error shape
    (``{"error": {"code": "run_not_found", ...}}``), then closes. It holds no
    database session while it waits (``app.feed``).
    """
    return event_stream(
        request, engine, start.session_id, since_seq=start.since_seq, run_id=start.run_id
    )


__all__ = ["router"]
