"""The OpenAPI of the Run API's routers: readable operationIds, and per endpoint the
errors it can answer, typed.

A router passes ``generate_unique_id_function=operation_id`` (``create_run`` becomes
``createRun``) and ``route_class=ErrorShapeRoute``; an endpoint says which domain
errors it raises with ``@raises(RunNotFoundError, ...)``. From that and the one error
table of ``app.api.errors`` each route documents exactly the statuses it can answer:
the errors it raises, a 400 ``bad_parameter`` when one of its parameters can fail
validation, a 422 ``validation_failed`` (413 ``too_large``) when it reads a body, and
the 503s and the 500 every route can answer. Each error status refers to one model
per endpoint, ``<OperationId>Error``, whose ``code`` is an enum of that endpoint's
codes (``GetRunErrorCode``). Nothing here lists a code: codes and statuses are the
domain errors' own (``app.errors``).

FastAPI would document a ``422 HTTPValidationError`` for every route with
parameters; these routes never answer it (``ErrorShapeRoute`` answers in the one
shape), so they document ``default`` (any other status: the same error shape)
instead, which keeps FastAPI from adding it.

A route whose body is read by a dependency of its own (the resume body, whose
errors are 400s) takes a parameter typed ``documented_body(Model)``, so the
schema documents the body as that model (a component), and names the
dependency with ``@raises(..., body_reader=...)``: a body that FastAPI cannot
parse is handed to it, and it says what is wrong in the route's words.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Annotated, Any, TypeVar

from fastapi import Body, Request
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute
from pydantic import BaseModel, PlainValidator, create_model

from app.errors import (
    BadParameterError,
    DataLayerError,
    PayloadTooLargeError,
    ValidationFailedError,
)

F = TypeVar("F", bound=Callable[..., Any])

_ERRORS = "__run_api_errors__"
_BODY_READER = "__run_api_body_reader__"

RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}


def operation_id(route: APIRoute) -> str:
    """``create_run`` -> ``createRun``: the route's name in lower camel case."""
    first, *rest = route.name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def raises(
    *errors: type[DataLayerError], body_reader: Callable[[Request], Awaitable[Any]] | None = None
) -> Callable[[F], F]:
    """Mark an endpoint with the domain errors it raises; ``body_reader``: the
    dependency that reads and validates its body (its parameter for the schema is a
    ``documented_body``)."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, _ERRORS, errors)
        if body_reader is not None:
            setattr(endpoint, _BODY_READER, body_reader)
        return endpoint

    return mark


def documented_body(model: type[BaseModel]) -> Any:
    """The type of a body parameter that documents ``model`` (a component) and accepts
    anything: the route's ``body_reader`` validates the body (``raises``)."""
    return Annotated[Any, PlainValidator(lambda value: value, json_schema_input_type=model), Body()]


def body_reader(route: APIRoute) -> Callable[..., Any] | None:
    return getattr(route.endpoint, _BODY_READER, None)


def _can_fail(field: Any) -> bool:
    """Whether a parameter's validation can fail: anything but a plain string."""
    info = field.field_info
    return info.annotation not in (str, str | None) or bool(info.metadata)


def answered_errors(route: APIRoute) -> list[type[DataLayerError]]:
    """Every domain error ``route`` can answer, from its ``raises`` and the error table."""
    from app.api.errors import ALWAYS_ANSWERED, answers_of

    found: list[type[DataLayerError]] = list(getattr(route.endpoint, _ERRORS, ()))
    parameters = get_flat_params(route.dependant)
    validation = answers_of("RequestValidationError")
    if any(_can_fail(field) for field in parameters):
        found += [kind for kind in validation if issubclass(kind, BadParameterError)]
    if route.body_field is not None:
        if body_reader(route) is None:
            found += [kind for kind in validation if issubclass(kind, ValidationFailedError)]
        found += [kind for kind in answers_of("HTTPException") if kind is PayloadTooLargeError]
    found += ALWAYS_ANSWERED
    unique: list[type[DataLayerError]] = []
    for kind in found:
        if kind not in unique:
            unique.append(kind)
    return unique


def _pascal(name: str) -> str:
    return name[:1].upper() + name[1:]


_models: dict[tuple[str, tuple[str, ...]], type[BaseModel]] = {}


def error_model(operation: str, codes: Sequence[str]) -> type[BaseModel]:
    """``<Operation>Error``: ``{"error": {"code": <one of codes>, "message": str}}``."""
    key = (operation, tuple(codes))
    model = _models.get(key)
    if model is None:
        name = f"{_pascal(operation)}Error"
        code = Enum(f"{name}Code", {value: value for value in codes}, type=str)  # type: ignore[misc]
        detail = create_model(f"{name}Detail", code=(code, ...), message=(str, ...))
        model = _models[key] = create_model(
            name, __doc__=f"An error of {operation}: the one error shape.", error=(detail, ...)
        )
    return model


def error_responses(route: APIRoute) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI error responses of ``route``: one per status it can answer, and
    ``default``, all with the route's error model."""
    errors = answered_errors(route)
    codes = sorted({kind.code for kind in errors})
    model = error_model(route.unique_id, codes)
    by_status: dict[int, list[str]] = {}
    for kind in errors:
        by_status.setdefault(kind.status_code, [])
        if kind.code not in by_status[kind.status_code]:
            by_status[kind.status_code].append(kind.code)
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(by_status):
        entry: dict[str, Any] = {"model": model, "description": ", ".join(by_status[status])}
        if status == 503:
            entry["headers"] = RETRY_AFTER_HEADER
        responses[status] = entry
    responses["default"] = {
        "model": model,
        "description": "no other status is answered by this route; listed in place of "
        "the 422 FastAPI would list, which it never answers",
    }
    return responses


def is_error_status(status: int | str) -> bool:
    return status == "default" or (str(status).isdigit() and int(status) >= 400)


__all__ = [
    "RETRY_AFTER_HEADER",
    "answered_errors",
    "documented_body",
    "error_model",
    "error_responses",
    "operation_id",
    "raises",
]
