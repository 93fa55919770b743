"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Status rule (docs/run-api.md): anything wrong with a query or path parameter
is 400 ``bad_parameter``; a request body that does not validate is 422
``validation_failed`` (the resume body is the exception: its dependency
answers 400, spec 8 "bad resume payload"), also when it cannot be parsed at
all (malformed, or nested deeper than the parser goes). Domain errors carry
their own status (``app.errors``). Anything else is a 500 ``internal_error``
whose body says nothing about the cause; the exception is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from app.errors import (
    BadParameterError,
    DatabaseBusyError,
    DataLayerError,
    ValidationFailedError,
)
from app.types import MAX_JSON_DEPTH

log = logging.getLogger("app.api")

PARAMETER_LOCATIONS = frozenset({"query", "path", "header", "cookie"})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_response(status_code: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"code": code, "message": message}},
        headers=headers or None,
    )


def _data_layer_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DataLayerError)
    headers = {"Retry-After": "1"} if isinstance(exc, DatabaseBusyError) else {}
    return error_response(exc.status_code, exc.code, exc.message, **headers)


_VALUE_ERROR = "Value error, "
"""pydantic's prefix for a validator's ``ValueError``: noise in an answer."""
BODY_PARSE_FAILED = "There was an error parsing the body"
"""FastAPI's 400 for a body it could not parse (its cause is chained)."""
TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels"


def describe_problem(where: str, message: str) -> str:
    """One validation problem in words: ``where: message``, or ``message`` alone when
    it already names the place (the JSON rule's messages name their path)."""
    if message.startswith(_VALUE_ERROR):
        message = message[len(_VALUE_ERROR) :]
    if where and message.startswith(where) and message[len(where) : len(where) + 1] in " .[":
        return message
    return f"{where}: {message}" if where else message


def _describe(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":  # loc: ("body", position)
            parts.append(f"the body is not valid JSON (at character {error['loc'][-1]})")
            continue
        where = ".".join(str(part) for part in error["loc"][1:]) or str(error["loc"][0])
        parts.append(describe_problem(where, error["msg"]))
    return "; ".join(parts)


def unreadable_body(cause: BaseException | None) -> str:
    """What was wrong with a body that could not be parsed as JSON, in words."""
    if isinstance(cause, RecursionError):
        return f"the JSON is {TOO_DEEP}"
    if isinstance(cause, UnicodeError):
        return "the body is not UTF-8 text"
    return "the body is not valid JSON"


def validation_error(errors: Sequence[Any]) -> DataLayerError:
    """The domain error for FastAPI's validation ``errors`` (see the status rule above)."""
    if all(error["loc"][0] in PARAMETER_LOCATIONS for error in errors):
        first = errors[0]
        name = ".".join(str(part) for part in first["loc"][1:]) or first["loc"][0]
        return BadParameterError(name, _describe(errors))
    return ValidationFailedError(f"invalid body: {_describe(errors)}")


def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _data_layer_error(request, validation_error(exc.errors()))


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and exc.detail == BODY_PARSE_FAILED:
        # A body FastAPI could not parse (nested past the parser, not UTF-8): the
        # status rule's 422, saying what was wrong instead of FastAPI's words.
        failed = ValidationFailedError(f"invalid body: {unreadable_body(exc.__cause__)}")
        return _data_layer_error(request, failed)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), **(exc.headers or {}))


def _busy(_request: Request, exc: Exception) -> JSONResponse:
    """A pool timeout, or SQLite's write lock not free within its busy timeout."""
    if isinstance(exc, OperationalError) and "database is locked" not in str(exc.orig):
        return _internal_error(_request, exc)
    log.warning("database busy: %s", type(exc).__name__)
    return error_response(
        503, "database_busy", "the database is busy; retry later", **{"Retry-After": "1"}
    )


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s in %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in the one error shape (see the module docstring)."""
    app.add_exception_handler(DataLayerError, _data_layer_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(PoolTimeoutError, _busy)
    app.add_exception_handler(OperationalError, _busy)
    app.add_exception_handler(Exception, _internal_error)


__all__ = ["error_response", "install_error_handlers", "validation_error"]
