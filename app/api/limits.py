"""Request bodies over a size limit are refused before they are read: 413 ``too_large``.

``BodyLimit`` is a pure ASGI middleware (no ``BaseHTTPMiddleware``, whose
per-request tasks and streams cost more than the check). A request that
declares a ``Content-Length`` over the limit is answered at once, from its
headers, before any of the body is read, parsed, or waits for a database slot.
A chunked request (no ``Content-Length``) is counted as it arrives; the chunk
that takes it over the limit ends the read with the same answer, so no more
than the limit is ever held. Every other request passes through untouched:
the check is one look at the headers.

The limit is ``RUN_API_MAX_BODY_BYTES``, else the JSON limit
(``RUN_DATA_MAX_JSON_BYTES``, ``app.types``) plus ``BODY_ENVELOPE_BYTES`` for
the body around it (field names, ids, whitespace, escapes). It is read when
the app is made (``app.api.main.create_app``). docs/input-limits.md.
"""

from __future__ import annotations

import os

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.errors import PayloadTooLargeError
from app.input_limits import max_json_bytes

MAX_BODY_BYTES_ENV = "RUN_API_MAX_BODY_BYTES"
BODY_ENVELOPE_BYTES = 64 * 1024
"""Room around the largest JSON value in the default limit."""


def max_body_bytes() -> int:
    """``RUN_API_MAX_BODY_BYTES``, else ``max_json_bytes() + BODY_ENVELOPE_BYTES``.

    Raises ``ValueError`` naming the variable when it is not a positive whole number.
    """
    raw = os.environ.get(MAX_BODY_BYTES_ENV, "").strip()
    if not raw:
        return max_json_bytes() + BODY_ENVELOPE_BYTES
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{MAX_BODY_BYTES_ENV} must be a positive whole number of bytes")
    return int(raw)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a chunked body passes the limit. An
    ``HTTPException``, so that FastAPI's body reading passes it on unchanged and
    the error handlers answer it in the one shape (413 ``too_large``)."""

    def __init__(self, error: PayloadTooLargeError) -> None:
        super().__init__(status_code=error.status_code, detail=error.message)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` before reading them (module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None:
            size = int(declared) if declared.isdigit() else 0  # the server checked it
            if size > self.max_bytes:
                error = PayloadTooLargeError(self.max_bytes, size, setting=MAX_BODY_BYTES_ENV)
                response = error_response(error.status_code, error.code, error.message)
                await response(scope, receive, send)
                return
        elif chunked:
            receive = self._counting(receive)
        await self.app(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        limit, received = self.max_bytes, 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(PayloadTooLargeError(limit, setting=MAX_BODY_BYTES_ENV))
            return message

        return counted


__all__ = [
    "BODY_ENVELOPE_BYTES",
    "MAX_BODY_BYTES_ENV",
    "BodyLimit",
    "BodyTooLarge",
    "max_body_bytes",
]
