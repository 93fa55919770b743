"""The Run API of spec section 8, ready to mount: ``app.include_router(router)``.

Every endpoint is one unit of work (``app.api.deps``): it has committed before
its answer leaves. Reads use read-only sessions. Errors come in the one shape
of ``app.api.errors``, which ``install_error_handlers`` (or ``create_app``)
installs; the statuses each endpoint can answer are listed in its OpenAPI.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.orm.attributes import instance_state

from app.api.deps import (
    EngineDep,
    EventReaderDep,
    ResumeRequestDep,
    RunReaderDep,
    RunRepositoryDep,
)
from app.db import unit_of_work
from app.errors import BadParameterError, DataLayerError
from app.feed import get_feed
from app.models import SessionEvent, SessionRun
from app.repositories import RunRepository
from app.repositories._params import MAX_PAGE_SIZE, MAX_SEQ, described
from app.schemas import (
    ErrorResponse,
    EventPage,
    EventResponse,
    RunCreate,
    RunResponse,
    RunResumeRequest,
)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Bad parameter (query, path or resume body)",
        404: "Run or session not found",
        409: "State conflict (also: multitask_strategy=reject and the session is busy)",
        422: "Request body failed validation, or Idempotency-Key reused for another request",
        503: "Database busy; retry after Retry-After seconds",
    }
    return {
        status: {"model": ErrorResponse, "description": described[status]} for status in statuses
    }


router = APIRouter(prefix="/api/runs", tags=["runs"], responses=_errors(503))

SinceSeq = Annotated[int, Query(ge=0, le=MAX_SEQ, description="exclusive; 0 = from the start")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


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


def _answer(runs: RunRepository, run: SessionRun, response: Response) -> RunResponse:
    if runs.was_replayed(run):
        response.headers[REPLAYED_HEADER] = "true"
    return RunResponse.model_validate(run)


@router.post("", status_code=201, responses=_errors(400, 404, 409, 422))
def create_run(
    body: RunCreate,
    runs: RunRepositoryDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> RunResponse:
    """Create a queued run in an existing chat session.

    ``multitask_strategy`` says what happens when the session already has an
    active run: ``enqueue`` (default) queues behind it, ``reject`` answers 409,
    ``interrupt`` cancels the active runs first.
    """
    return _answer(runs, runs.create(body, idempotency_key=idempotency_key), response)


@router.get("/{run_id}", responses=_errors(404))
def get_run(run_id: str, runs: RunReaderDep) -> RunResponse:
    return RunResponse.model_validate(runs.get(run_id))


@router.post(
    "/{run_id}/resume",
    status_code=202,
    responses=_errors(400, 404, 409, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": RunResumeRequest.model_json_schema()}},
        }
    },
)
def resume_run(
    run_id: str,
    body: ResumeRequestDep,
    runs: RunRepositoryDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> RunResponse:
    """Resume a run that waits for input; the same run goes back to running."""
    return _answer(runs, runs.resume(run_id, body, idempotency_key=idempotency_key), response)


@router.post(
    "/{run_id}/cancel",
    status_code=202,
    responses={200: {"model": RunResponse, "description": "Already finished; unchanged"}}
    | _errors(404),
)
def cancel_run(run_id: str, response: Response, runs: RunRepositoryDep) -> RunResponse:
    """Cancel, idempotently: 202 when accepted, 200 when the run had already finished."""
    run, changed = runs.cancel(run_id)
    if not changed:
        response.status_code = 200
    return RunResponse.model_validate(run)


@router.get("/{run_id}/events", responses=_errors(400, 404))
def list_run_events(
    run_id: str, events: EventReaderDep, since_seq: SinceSeq = 0, limit: Limit = 100
) -> EventPage:
    """The run's events with ``seq > since_seq``, in seq order (session seqs)."""
    return EventPage.of(events.list_for_run(run_id, since_seq=since_seq, limit=limit), since_seq)


_SSE_JSON = "sse_json"


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Where a run's event stream starts: its session, and the last seq the client saw."""

    session_id: str
    run_id: str
    since_seq: int


def _session_of_run(engine: Engine, run_id: str) -> str:
    with unit_of_work(engine, readonly=True) as db:
        return RunRepository(db).get(run_id).session_id


def _last_event_id(value: str) -> int:
    """The seq in a ``Last-Event-ID`` header; a bad one is described, never quoted."""
    digits = value.strip()
    seq = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 10 else -1
    if not 0 <= seq <= MAX_SEQ:
        raise BadParameterError(
            "Last-Event-ID",
            f"expected an event seq from 0 to {MAX_SEQ}, got {described(value)}",
        )
    return seq


async def get_stream_start(
    run_id: str,
    engine: EngineDep,
    since_seq: SinceSeq = 0,
    last_event_id: Annotated[
        str | None, Header(description="the id (seq) of the last event seen")
    ] = None,
) -> StreamStart:
    """Checked before the stream opens, so an unknown run is a plain 404. ``Last-Event-ID``
    (sent by an ``EventSource`` that reconnects) wins over ``since_seq``."""
    if last_event_id is not None:
        since_seq = _last_event_id(last_event_id)
    session_id = await get_feed(engine).read(_session_of_run, engine, run_id)
    return StreamStart(session_id, run_id, since_seq)


def _event_json(event: SessionEvent) -> str:
    """The event's ``EventResponse`` JSON, made once for all the followers it goes to
    (``app.feed`` hands the same event objects to the followers of a session)."""
    info = instance_state(event).info
    serialized = info.get(_SSE_JSON)
    if serialized is None:
        serialized = info[_SSE_JSON] = EventResponse.model_validate(event).model_dump_json()
    return serialized


log = logging.getLogger("app.api")
SSE_PING_SECONDS = 15.0
"""A ``: ping`` comment after this long without events keeps proxies from closing the stream."""
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse_message(event: SessionEvent) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event.seq, _event_json(event).encode())


def _sse_end(run_id: str, last_seq: int) -> bytes:
    return (
        b"event: end\ndata: %s\n\n" % json.dumps({"run_id": run_id, "last_seq": last_seq}).encode()
    )


async def _sse_error(request: Request, exc: Exception) -> bytes:
    """``event: error`` whose data is the body a request failing with ``exc`` gets: the one
    error shape, from the app's own handlers (``install_error_handlers``), which also log
    what they log; an app without them gets the domain error's code, or internal_error."""
    handler = None
    for cls in type(exc).__mro__:
        handler = request.app.exception_handlers.get(cls)
        if handler is not None:
            break
    body: bytes | None = None
    if handler is not None:
        response = handler(request, exc)
        if inspect.isawaitable(response):
            response = await response
        if isinstance(response, Response) and response.media_type == "application/json":
            body = bytes(response.body)
    if body is None:
        if isinstance(exc, DataLayerError):
            error = exc.to_dict()
        else:
            log.error("unhandled %s in %s", type(exc).__name__, request.url.path)
            error = {"code": "internal_error", "message": "internal error"}
        body = json.dumps({"error": error}).encode()
    return b"event: error\ndata: %s\n\n" % body


@router.get(
    "/{run_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "id: <seq>, data: EventResponse JSON; : ping; then event: end, "
            "or event: error (data: the error shape) when the run is gone",
        }
    }
    | _errors(400, 404),
)
async def stream_run_events(
    start: Annotated[StreamStart, Depends(get_stream_start)],
    engine: EngineDep,
    request: Request,
) -> StreamingResponse:
    """The run's events as Server-Sent Events, as they commit (docs/events.md).

    Each event is ``id: <seq>`` and ``data: <EventResponse JSON>``; a ``: ping``
    comment goes out after ``SSE_PING_SECONDS`` without events. The stream ends
    with ``event: end`` once the run is over: after its terminal event, or at
    once when it is terminal and the client's cursor is past that event. When
    the run is gone meanwhile (deleted, or its chat session was), or the
    stream fails, it ends with ``event: error`` whose data is the one error
    shape (``{"error": {"code": "run_not_found", ...}}``), then closes. It holds
    no database session while it waits (``app.feed``). The framing is written
    here, one write per batch of events: FastAPI's ``EventSourceResponse``
    passes every message through two memory streams and a keepalive task,
    which costs more than the SSE itself with many followers (docs/events.md).
    """

    async def messages() -> AsyncIterator[bytes]:
        last_seq = start.since_seq
        follow = get_feed(engine).follow(
            start.session_id,
            since_seq=start.since_seq,
            run_id=start.run_id,
            heartbeat=SSE_PING_SECONDS,
        )
        try:
            async for batch in follow:
                if not batch:
                    yield b": ping\n\n"
                    continue
                yield b"".join(_sse_message(event) for event in batch)
                last_seq = batch[-1].seq
        except Exception as exc:  # the stream has begun: the error goes out as an event
            yield await _sse_error(request, exc)
            return
        yield _sse_end(start.run_id, last_seq)

    return StreamingResponse(messages(), media_type="text/event-stream", headers=_SSE_HEADERS)


__all__ = ["router"]
