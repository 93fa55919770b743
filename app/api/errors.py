"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Database errors: a database that cannot be reached (refused or lost
connection, a server shutting down, a database that no longer exists, a SQLite
file that cannot be opened) is a 503 ``database_unavailable`` with
``Retry-After``; a pool timeout or SQLite's write lock past its busy timeout a
503 ``database_busy``; any other a 500 ``internal_error``. The log names the
cause without data (``database_cause``): the driver's error class and code, its
message only where it cannot quote values, and for a 500 the stack frames;
never ``str()`` of SQLAlchemy's error, which carries the statement's parameters.

Status rule (docs/run-api.md): anything wrong with a query or path parameter
is 400 ``bad_parameter``; a request body that does not validate is 422
``validation_failed`` (the resume body is the exception: its dependency
answers 400, spec 8 "bad resume payload"), also when it cannot be parsed at
all (malformed, or nested deeper than the parser goes). Domain errors carry
their own status (``app.errors``). Anything else is a 500 ``internal_error``
whose body says nothing about the cause; the exception is logged.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NamedTuple

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.utils import create_model_field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from app.api.openapi import body_reader, error_responses, is_error_status
from app.errors import (
    BadParameterError,
    DatabaseBusyError,
    DatabaseUnavailableError,
    DataLayerError,
    PayloadTooLargeError,
    ValidationFailedError,
)
from app.input_limits import MAX_JSON_DEPTH

log = logging.getLogger("app.api")

PARAMETER_LOCATIONS = frozenset({"query", "path", "header", "cookie"})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_response(status_code: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"code": code, "message": message}},
        headers=headers or None,
    )


BUSY_RETRY_AFTER = "1"
UNAVAILABLE_RETRY_AFTER = "5"
"""``Retry-After`` seconds of the two 503s: a lock or a slot frees up soon; a
database that is down takes longer to come back."""


def _data_layer_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DataLayerError)
    headers = {}
    if isinstance(exc, DatabaseBusyError):
        headers["Retry-After"] = BUSY_RETRY_AFTER
    elif exc.status_code == 503:  # the database unavailable, or not at the schema's version
        headers["Retry-After"] = UNAVAILABLE_RETRY_AFTER
    return error_response(exc.status_code, exc.code, exc.message, **headers)


_VALUE_ERROR = "Value error, "
"""pydantic's prefix for a validator's ``ValueError``: noise in an answer."""
BODY_PARSE_FAILED = "There was an error parsing the body"
"""FastAPI's 400 for a body it could not parse (its cause is chained)."""
TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels"


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "true or false"}


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words, without quoting it."""
    if value is None:
        return "null"
    for kind, words in _JSON_KINDS.items():
        if isinstance(value, kind):
            return words
    return "a number" if isinstance(value, int | float) else type(value).__name__


def in_words(error: Any) -> str:
    """pydantic's problem as a short predicate ("must be at least 1"); its own words
    for the kinds not listed, "Input should be" made "must be"."""
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a field of this body"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "greater_than":
        return f"must be more than {ctx['gt']}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("string_type", "string_sub_type"):
        return "must be a string"
    if kind in ("dict_type", "model_attributes_type", "model_type"):
        return "must be a JSON object"
    if kind == "list_type":
        return "must be an array"
    message = str(error.get("msg", ""))
    if message.startswith(_VALUE_ERROR):
        return message[len(_VALUE_ERROR) :]
    if message.startswith("Input should be "):
        return "must be " + message[len("Input should be ") :]
    return message[:1].lower() + message[1:]


def json_syntax_problem(doc: str, position: int, reason: str) -> str:
    """Where and why a body is not JSON: "Expecting value at line 1 column 1"."""
    located = json.JSONDecodeError(reason, doc, position)
    return f"{reason} at line {located.lineno} column {located.colno}"


def _where(error: Any) -> str:
    return ".".join(str(part) for part in error["loc"][1:])


def problem_in_words(error: Any, where: str) -> str:
    """One problem with its place named once: ``session_id: is required``."""
    words = in_words(error)
    if where and words.startswith(where) and words[len(where) : len(where) + 1] in " .[":
        return words  # the JSON rule's messages name their own path
    return f"{where}: {words}" if where else words


def _problem(error: Any) -> str:
    return problem_in_words(error, _where(error))


def _describe_body(errors: Sequence[Any], body: Any) -> str:
    """A body's problems in words, each place named once."""
    first = errors[0]
    if first.get("type") == "json_invalid":  # loc: ("body", position), ctx: the reason
        reason = str((first.get("ctx") or {}).get("error", "invalid JSON"))
        if isinstance(body, str):
            return (
                f"the body is not valid JSON: {json_syntax_problem(body, first['loc'][-1], reason)}"
            )
        return f"the body is not valid JSON: {reason}"
    whole = [error for error in errors if len(error["loc"]) == 1]
    if whole:  # the body itself: absent, or not an object
        if whole[0].get("type") == "missing":
            return "the body is empty; expected a JSON object"
        return f"the body must be a JSON object, got {_json_kind(whole[0].get('input'))}"
    return "invalid body: " + "; ".join(_problem(error) for error in errors)


def validation_error(errors: Sequence[Any], body: Any = None) -> DataLayerError:
    """The domain error for FastAPI's validation ``errors`` (see the status rule above);
    ``body``: the request body FastAPI read (the text of one that is not JSON)."""
    if all(error["loc"][0] in PARAMETER_LOCATIONS for error in errors):
        first = errors[0]
        name = _where(first) or str(first["loc"][0])
        problems = [in_words(first)] + [_problem(error) for error in errors[1:]]
        return BadParameterError(name, "; ".join(problems))
    body_errors = [error for error in errors if error["loc"][0] not in PARAMETER_LOCATIONS]
    return ValidationFailedError(_describe_body(body_errors, body))


def unreadable_body(cause: BaseException | None) -> str:
    """What was wrong with a body that could not be parsed as JSON, in words."""
    if isinstance(cause, RecursionError):
        return f"the JSON is {TOO_DEEP}"
    if isinstance(cause, UnicodeError):
        return "the body is not UTF-8 text"
    if isinstance(cause, json.JSONDecodeError):
        return (
            f"the body is not valid JSON: {cause.msg} at line {cause.lineno} column {cause.colno}"
        )
    return "the body is not valid JSON"


def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _data_layer_error(request, validation_error(exc.errors(), exc.body))


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and exc.detail == BODY_PARSE_FAILED:
        # A body FastAPI could not parse (nested past the parser, not UTF-8): the
        # status rule's 422, saying what was wrong instead of FastAPI's words.
        problem = unreadable_body(exc.__cause__)
        said = problem if problem.startswith("the body") else f"invalid body: {problem}"
        failed = ValidationFailedError(said)
        return _data_layer_error(request, failed)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), **(exc.headers or {}))


_UNREACHABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "3D000", "53300"})
"""PostgreSQL: admin or crash shutdown, cannot connect now, no such database, too
many connections; with the classes ``_UNREACHABLE_CLASSES``."""
_UNREACHABLE_CLASSES = ("08", "28")  # connection exception, authorization refused
_SQLITE_UNREACHABLE = ("SQLITE_CANTOPEN", "SQLITE_IOERR")
_DATA_EXCEPTIONS = "22"
"""PostgreSQL's class of errors whose message may quote a value (``invalid input
syntax for type integer: "..."``): only their code is logged."""


def _driver_error(exc: BaseException) -> BaseException:
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return exc.orig
    return exc


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (SQLAlchemy's or the driver's) says the database cannot be
    reached, rather than that a statement failed."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    driver = _driver_error(exc)
    if isinstance(driver, sqlite3.Error):
        return str(getattr(driver, "sqlite_errorname", "")).startswith(_SQLITE_UNREACHABLE)
    if isinstance(driver, psycopg.Error):
        state = driver.sqlstate
        if state is None:  # raised by the client: connecting failed, connection lost
            return isinstance(driver, psycopg.OperationalError | psycopg.InterfaceError)
        return state in _UNREACHABLE_SQLSTATES or state.startswith(_UNREACHABLE_CLASSES)
    return False


def _database_locked(exc: BaseException) -> bool:
    driver = _driver_error(exc)
    return isinstance(driver, sqlite3.OperationalError) and (
        getattr(driver, "sqlite_errorname", "") == "SQLITE_BUSY"
        or "database is locked" in str(driver)
    )


def database_cause(exc: BaseException) -> str:
    """The cause of a database error for the log, without data: the driver's error
    class, its code, and its message where that cannot quote values (module docstring)."""
    driver = _driver_error(exc)
    kind = f"{type(driver).__module__}.{type(driver).__qualname__}"
    message = ""
    if isinstance(driver, sqlite3.Error):  # SQLite's messages name objects, never values
        code = getattr(driver, "sqlite_errorname", None)
        message = str(driver)
    elif isinstance(driver, psycopg.Error):
        code = driver.sqlstate
        if code is None:  # the client's words: host, port, database, user names
            message = str(driver)
        elif not code.startswith(_DATA_EXCEPTIONS):
            message = driver.diag.message_primary or ""
    else:
        code = None
    described = f"{kind} [{code}]" if code else kind
    first_line = message.strip().splitlines()[0].strip() if message.strip() else ""
    return f"{described}: {first_line}" if first_line else described


def _busy(_request: Request, exc: Exception) -> JSONResponse:
    """A pool timeout, or SQLite's write lock not free within its busy timeout."""
    log.warning("database busy: %s", type(exc).__name__)
    return error_response(
        503,
        "database_busy",
        "the database is busy; retry later",
        **{"Retry-After": BUSY_RETRY_AFTER},
    )


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A database error no repository turned into a domain error (module docstring)."""
    if _database_locked(exc):
        return _busy(request, exc)
    where = f"{request.method} {request.url.path}"
    if database_unreachable(exc):
        log.warning("database unavailable in %s: %s", where, database_cause(exc))
        return _data_layer_error(request, DatabaseUnavailableError())
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error(
        "unhandled %s in %s: %s\nTraceback (most recent call last):\n%s",
        type(exc).__name__,
        where,
        database_cause(exc),
        frames.rstrip(),
    )
    return error_response(500, "internal_error", "internal error")


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s in %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(500, "internal_error", "internal error")


class Handling(NamedTuple):
    """One row of the error table: what is caught, who answers it, and the domain
    errors whose status and code the answer can have (none: the caught error's own)."""

    kind: type[Exception]
    handler: Callable[[Request, Exception], JSONResponse]
    answers: tuple[type[DataLayerError], ...] = ()


_DATABASE_ANSWERS = (DatabaseBusyError, DatabaseUnavailableError, DataLayerError)
_HANDLERS: tuple[Handling, ...] = (
    Handling(DataLayerError, _data_layer_error),
    Handling(
        RequestValidationError,
        _request_validation_error,
        (BadParameterError, ValidationFailedError),
    ),
    Handling(HTTPException, _http_error, (PayloadTooLargeError, ValidationFailedError)),
    Handling(PoolTimeoutError, _busy, (DatabaseBusyError,)),
    Handling(DBAPIError, _database_error, _DATABASE_ANSWERS),
    Handling(sqlite3.Error, _database_error, _DATABASE_ANSWERS),  # raw, from the driver
    Handling(psycopg.Error, _database_error, _DATABASE_ANSWERS),
    Handling(Exception, _internal_error, (DataLayerError,)),
)
"""Every failure this layer answers, most specific first: the one table both the
router's own routes (``ErrorShapeRoute``) and ``install_error_handlers`` use, and
from which each route's OpenAPI lists its error statuses and codes
(``app.api.openapi``). ``DataLayerError`` as an answer is the 500 ``internal_error``."""


def error_table() -> tuple[Handling, ...]:
    """The error table, most specific row first (read-only: a tuple of rows)."""
    return _HANDLERS


def answers_of(kind_name: str) -> tuple[type[DataLayerError], ...]:
    """The answers of the table's row for the exception class named ``kind_name``."""
    return next(row.answers for row in _HANDLERS if row.kind.__name__ == kind_name)


ALWAYS_ANSWERED: tuple[type[DataLayerError], ...] = tuple(
    dict.fromkeys(
        answer
        for row in _HANDLERS
        if row.kind not in (DataLayerError, RequestValidationError, HTTPException)
        for answer in row.answers
    )
)
"""What any route can answer whatever it does: the database's 503s and the 500."""


def error_response_for(request: Request, exc: Exception) -> JSONResponse:
    """The answer, in the one error shape, for a request that failed with ``exc``
    (what it logs, it logs here)."""
    for kind, handler, _answers in _HANDLERS:
        if isinstance(exc, kind):
            return handler(request, exc)
    raise AssertionError("unreachable: Exception is the last entry")  # pragma: no cover


def _unparsed_body(exc: Exception) -> bool:
    """Whether ``exc`` is FastAPI's failure to parse a request body as JSON."""
    if isinstance(exc, RequestValidationError):
        return all(error["loc"][0] == "body" for error in exc.errors())
    return isinstance(exc, HTTPException) and exc.detail == BODY_PARSE_FAILED


class ErrorShapeRoute(APIRoute):
    """A route that answers its own failures in the one error shape, and documents them.

    The Run API's routers use it (``route_class``), so mounting them changes no
    response of the host application's own routes: nothing is installed on the
    app. Everything raised while the route solves its parameters or runs its
    handler (a bad parameter, a body that does not parse or validate, a domain
    error, a database error) is answered here; 404 and 405 for paths the router
    does not have stay the host's. Its OpenAPI lists exactly the error statuses
    and codes it can answer (``app.api.openapi``).
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        declared = hasattr(endpoint, "__run_api_errors__")
        responses = {
            status: response
            for status, response in self.responses.items()
            if not (declared and is_error_status(status))
        }
        for status, response in error_responses(self).items():
            responses.setdefault(status, response)
        self.responses = responses
        self.response_fields = {
            status: create_model_field(
                name=f"Response_{status}_{self.unique_id}",
                type_=response["model"],
                mode="serialization",
            )
            for status, response in responses.items()
            if response.get("model")
        }

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        read_body = body_reader(self)

        async def answer_in_the_error_shape(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                if read_body is not None and _unparsed_body(exc):
                    try:  # the route's own reader says what is wrong, in its words
                        await read_body(request)
                    except Exception as own:
                        return error_response_for(request, own)
                return error_response_for(request, exc)

        return answer_in_the_error_shape


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure of every route of ``app`` in the one error shape (see the
    module docstring): for an app that wants the shape on its own routes too. The Run
    API's routers need none of it (``ErrorShapeRoute``)."""
    for kind, handler, _answers in _HANDLERS:
        app.add_exception_handler(kind, handler)


__all__ = [
    "ALWAYS_ANSWERED",
    "ErrorShapeRoute",
    "Handling",
    "answers_of",
    "database_cause",
    "database_unreachable",
    "error_response",
    "error_response_for",
    "error_table",
    "install_error_handlers",
    "validation_error",
]
