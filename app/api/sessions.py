"""The optional sessions router: chat sessions, their runs and their whole event log.

    app.include_router(sessions_router)   # a host with its own sessions leaves it out

``create_app`` includes it. Endpoints (docs/run-api.md):

* ``POST /api/sessions``: a new chat session (201, ``Location``);
* ``GET /api/sessions/{session_id}``: the session;
* ``GET /api/sessions/{session_id}/runs``: its runs, newest first, a keyset page at
  a time (``status``, ``metadata``, ``cursor``, ``limit``);
* ``GET /api/sessions/{session_id}/events``: its event log in seq order, every run's
  events and the legacy ones (``since_seq``, ``limit``; ``next_since_seq``);
* ``GET /api/sessions/{session_id}/events/stream``: the same log as Server-Sent
  Events, live, resumed after ``Last-Event-ID`` (``app.api.sse``).

The listing of runs across sessions, ``GET /api/runs``, is on the runs router
(``app.api.routes``); its ``metadata`` parameter is ``MetadataQuery`` here. Errors
come in the one error shape (``ErrorShapeRoute``), whether or not the host installs
anything. Reads use the read path (``app.repositories.reads``).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import Engine

from app._params import MAX_PAGE_SIZE, MAX_SEQ, described
from app.api.deps import EngineDep, run_in_slot
from app.api.errors import ErrorShapeRoute
from app.api.openapi import operation_id, raises
from app.api.sse import LastEventIdHeader, event_stream, stream_position, stream_responses
from app.db import unit_of_work
from app.errors import BadParameterError, SessionNotFoundError, TransactionAbortedError
from app.feed import get_feed
from app.models import ChatSession, RunStatus
from app.repositories.reads import EventReads, RunReads, SessionReads
from app.schemas import (
    EventPage,
    RunPage,
    SessionCreate,
    SessionResponse,
)

sessions_router = APIRouter(
    prefix="/api/sessions",
    tags=["sessions"],
    route_class=ErrorShapeRoute,
    generate_unique_id_function=operation_id,
)
"""Each route documents the errors it can answer (``app.api.openapi``)."""

_LOCATION = {
    "Location": {
        "description": "the session's URL path (GET it for the session)",
        "schema": {"type": "string"},
    }
}

SinceSeq = Annotated[int, Query(ge=0, le=MAX_SEQ, description="exclusive; 0 = from the start")]
EventLimit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
RunLimit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="runs per page")]
StatusQuery = Annotated[RunStatus | None, Query(description="only runs in this status")]
CursorQuery = Annotated[
    str | None,
    Query(
        max_length=400,
        description="the next_cursor of the previous page (same filters); omit for the first",
    ),
]
MetadataQuery = Annotated[
    str | None,
    Query(
        description='a JSON object, e.g. {"team":"a"}: only runs whose metadata has every '
        "key with that value (strings, numbers, booleans or null)",
    ),
]


def metadata_query(value: str | None) -> dict[str, Any] | None:
    """The ``metadata`` query parameter as a filter object (checked again, in full, by
    ``app.repositories._listings.metadata_filter``); not JSON is a ``BadParameterError``."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise BadParameterError(
            "metadata", f'expected a JSON object such as {{"team":"a"}}, got {described(value)}'
        )
    return parsed


def _json(model: BaseModel, status_code: int = 200, location: str | None = None) -> Response:
    """The answer for ``model``, serialized once by its own serializer (as ``app.api.routes``)."""
    return Response(
        model.__pydantic_serializer__.to_json(model),
        status_code=status_code,
        headers={"Location": location} if location is not None else None,
        media_type="application/json",
    )


def _create(engine: Engine, body: SessionCreate) -> SessionResponse:
    with unit_of_work(engine) as db:
        session = ChatSession(title=body.title)
        db.add(session)
        db.flush()
        return SessionResponse.model_validate(session)


@sessions_router.post(
    "",
    status_code=201,
    response_model=SessionResponse,
    responses={201: {"headers": _LOCATION}},
    response_description="Created; Location: the session's URL",
)
@raises(TransactionAbortedError)
async def create_session(body: SessionCreate, engine: EngineDep, request: Request) -> Response:
    """Create a chat session (``{}`` for one titled ``New chat``); runs go in it with
    ``POST /api/runs``."""
    session = await run_in_slot(engine, False, _create, engine, body)
    location = request.url_for("get_session", session_id=session.session_id).path
    return _json(session, 201, location)


@sessions_router.get("/{session_id}", response_model=SessionResponse)
@raises(SessionNotFoundError)
async def get_session(session_id: str, engine: EngineDep) -> Response:
    """The chat session."""
    return _json(await run_in_slot(engine, True, SessionReads.of(engine).get, session_id))


@sessions_router.get("/{session_id}/runs", response_model=RunPage)
@raises(BadParameterError, SessionNotFoundError)
async def list_session_runs(
    session_id: str,
    engine: EngineDep,
    status: StatusQuery = None,
    metadata: MetadataQuery = None,
    cursor: CursorQuery = None,
    limit: RunLimit = 50,
) -> Response:
    """The session's runs, newest first, one keyset page at a time: follow
    ``next_cursor`` until it is null. Runs created meanwhile do not shift later pages."""
    read = partial(
        RunReads.of(engine).page_for_session,
        session_id,
        status=status,
        metadata=metadata_query(metadata),
        cursor=cursor,
        limit=limit,
    )
    return _json(await run_in_slot(engine, True, read))


def _session_events(engine: Engine, session_id: str, since_seq: int, limit: int) -> EventPage:
    page = EventReads.of(engine).page_for_session(session_id, since_seq=since_seq, limit=limit)
    if not page.items:
        SessionReads.of(engine).get(session_id)  # an unknown session is a 404
    return page


@sessions_router.get("/{session_id}/events", response_model=EventPage)
@raises(BadParameterError, SessionNotFoundError)
async def list_session_events(
    session_id: str, engine: EngineDep, since_seq: SinceSeq = 0, limit: EventLimit = 100
) -> Response:
    """The session's event log with ``seq > since_seq``, in seq order: every run's events
    and the session's own. The next page starts after ``next_since_seq``."""
    read = partial(_session_events, engine, session_id, since_seq, limit)
    return _json(await run_in_slot(engine, True, read))


@sessions_router.get(
    "/{session_id}/events/stream",
    response_class=StreamingResponse,
    responses=stream_responses(
        "id: <seq>, event: <type>, data: EventResponse JSON, for every event of the "
        "session as it commits; : ping when idle; event: error (data: the error shape) "
        "if the stream fails"
    ),
)
@raises(BadParameterError, SessionNotFoundError)
async def stream_session_events(
    session_id: str,
    engine: EngineDep,
    request: Request,
    since_seq: SinceSeq = 0,
    last_event_id: LastEventIdHeader = None,
) -> StreamingResponse:
    """The session's whole event log as Server-Sent Events, live (docs/events.md): the
    events after ``Last-Event-ID`` (else ``since_seq``), then each as it commits, until
    the client leaves. An unknown session is a plain 404 before the stream opens."""
    position = stream_position(since_seq, last_event_id)
    await get_feed(engine).read(SessionReads.of(engine).get, session_id)
    return event_stream(request, engine, session_id, since_seq=position)


__all__ = ["MetadataQuery", "metadata_query", "sessions_router"]
