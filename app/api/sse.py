"""Server-Sent Events for the Run API's streams: the framing and the stream itself.

One message per event, written once for every follower it goes to::

    id: <seq>
    event: <type>
    data: <EventResponse JSON>

and then one of two last messages, ``event: end`` (the followed run is over) or
``event: error`` (data: the one error shape). A browser's ``EventSource``
listens by type: ``source.addEventListener("tool_result", ...)``. A type that
could not be a listener name, or would be taken for one of the two last
messages (``end``, ``error``), goes without the ``event:`` line: the browser
hands it to ``onmessage`` and ``data.type`` still says what it is
(``sse_event_name``). docs/events.md says what a client listens for.

Any router can stream a chat session's log, or one run's share of it, with
``event_stream``; ``LastEventIdHeader`` and ``stream_position`` read where
the client resumes. The framing is written here rather than with FastAPI's
``EventSourceResponse``: one write per batch of events (docs/events.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.orm.attributes import instance_state

from app._params import MAX_SEQ, described
from app.api.errors import error_response_for
from app.errors import BadParameterError
from app.feed import get_feed
from app.models import SessionEvent
from app.schemas import EventResponse

SSE_PING_SECONDS = 15.0
"""A ``: ping`` comment after this long without events keeps proxies from closing the stream."""

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"

END_EVENT = "end"
ERROR_EVENT = "error"
RESERVED_EVENT_NAMES = frozenset({END_EVENT, ERROR_EVENT})
"""The names of the stream's own last messages; an event of such a type is sent unnamed."""

_SSE_BYTES = "sse_message"

LastEventIdHeader = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description="the id (seq) of the last event seen; an EventSource that reconnects "
        "sends it, and it wins over since_seq",
    ),
]


def last_event_id(value: str) -> int:
    """The seq in a ``Last-Event-ID`` header; a bad one is described, never quoted."""
    digits = value.strip()
    seq = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 10 else -1
    if not 0 <= seq <= MAX_SEQ:
        raise BadParameterError(
            "Last-Event-ID",
            f"expected an event seq from 0 to {MAX_SEQ}, got {described(value)}",
        )
    return seq


def stream_position(since_seq: int, last_event_id_header: str | None) -> int:
    """Where a stream starts: after ``Last-Event-ID`` when the client sent one, else
    after ``since_seq`` (raises ``BadParameterError`` for a malformed header)."""
    if last_event_id_header is None:
        return since_seq
    return last_event_id(last_event_id_header)


def sse_event_name(event_type: str) -> str | None:
    """The ``event:`` name for an event type, or ``None`` to send the message unnamed.

    A name is the type itself when it is one token of visible ASCII characters
    (so no line break can end the field early and no space is trimmed) and not
    ``end`` or ``error``, the names of the stream's own last messages."""
    if event_type in RESERVED_EVENT_NAMES:
        return None
    if event_type.isascii() and event_type.isprintable() and " " not in event_type:
        return event_type
    return None


def sse_event(event: SessionEvent) -> bytes:
    """The SSE message of one event, made once for all the followers it goes to
    (``app.feed`` hands the same event objects to every follower of a session)."""
    info = instance_state(event).info
    message = info.get(_SSE_BYTES)
    if message is None:
        data = EventResponse.model_validate(event).model_dump_json().encode()
        name = sse_event_name(event.type)
        if name is None:
            message = b"id: %d\ndata: %s\n\n" % (event.seq, data)
        else:
            message = b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, name.encode(), data)
        info[_SSE_BYTES] = message
    return message


def sse_end(data: dict[str, Any]) -> bytes:
    """``event: end`` with ``data`` as JSON: the stream is over, do not reconnect."""
    return b"event: end\ndata: %s\n\n" % json.dumps(data).encode()


def sse_error(request: Request, exc: Exception) -> bytes:
    """``event: error`` whose data is the body a request failing with ``exc`` gets: the
    one error shape (``app.api.errors.error_response_for``, which logs what it logs)."""
    return b"event: error\ndata: %s\n\n" % bytes(error_response_for(request, exc).body)


SSE_PING = b": ping\n\n"


async def sse_messages(
    request: Request,
    engine: Engine,
    session_id: str,
    *,
    since_seq: int,
    run_id: str | None = None,
) -> AsyncIterator[bytes]:
    """The SSE bytes of a session's events after ``since_seq`` as they commit
    (only ``run_id``'s with one), one chunk per batch, ``: ping`` when idle.

    With ``run_id`` it ends with ``event: end`` (data ``{"run_id", "last_seq"}``)
    after the run's terminal event; without, it follows until the client leaves
    (an ``end`` would say ``{"session_id", "last_seq"}``). A failure once the
    stream has begun goes out as ``event: error`` and ends it."""
    last_seq = since_seq
    follow = get_feed(engine).follow(
        session_id, since_seq=since_seq, run_id=run_id, heartbeat=SSE_PING_SECONDS
    )
    try:
        async for batch in follow:
            if not batch:
                yield SSE_PING
                continue
            yield b"".join(sse_event(event) for event in batch)
            last_seq = batch[-1].seq
    except Exception as exc:  # the stream has begun: the error goes out as an event
        yield sse_error(request, exc)
        return
    scope = {"run_id": run_id} if run_id is not None else {"session_id": session_id}
    yield sse_end(scope | {"last_seq": last_seq})


def event_stream(
    request: Request,
    engine: Engine,
    session_id: str,
    *,
    since_seq: int,
    run_id: str | None = None,
) -> StreamingResponse:
    """The ``text/event-stream`` response of ``sse_messages``. Check what can fail
    before the stream opens (unknown run or session, bad ``Last-Event-ID``) first:
    those are plain error answers, not ``event: error``."""
    messages = sse_messages(request, engine, session_id, since_seq=since_seq, run_id=run_id)
    return StreamingResponse(messages, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


def stream_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``200`` entry of an SSE route."""
    return {
        200: {
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": description,
        }
    }


__all__ = [
    "END_EVENT",
    "ERROR_EVENT",
    "RESERVED_EVENT_NAMES",
    "SSE_HEADERS",
    "SSE_MEDIA_TYPE",
    "SSE_PING_SECONDS",
    "LastEventIdHeader",
    "event_stream",
    "last_event_id",
    "sse_end",
    "sse_error",
    "sse_event",
    "sse_event_name",
    "sse_messages",
    "stream_position",
    "stream_responses",
]
