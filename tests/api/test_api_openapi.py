"""The Run API's OpenAPI: typed, and listing exactly what each endpoint answers.

Fast checks of ``/openapi.json`` against the error table (``app.api.errors``) and
the domain errors (``app.errors``), and of real answers against the schema: each
error a request gets has its status listed and its code in that endpoint's enum.
``test_api_generated_client.py`` builds a client from the schema and type-checks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.api.deps import get_db_engine
from app.api.errors import ALWAYS_ANSWERED, error_table
from app.api.health import health_router
from app.api.openapi import answered_errors
from app.api.routes import router
from app.errors import DataLayerError
from app.models import RunStatus
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory

OPERATIONS = {
    ("POST", "/api/runs"): "createRun",
    ("GET", "/api/runs/{run_id}"): "getRun",
    ("POST", "/api/runs/{run_id}/resume"): "resumeRun",
    ("POST", "/api/runs/{run_id}/cancel"): "cancelRun",
    ("GET", "/api/runs/{run_id}/events"): "listRunEvents",
    ("GET", "/api/runs/{run_id}/events/stream"): "streamRunEvents",
    ("GET", "/api/health"): "getHealth",
}
SUCCESS = {"200", "201", "202"}


def _host() -> FastAPI:
    host = FastAPI()

    @host.get("/items/{item_id}")
    def read_item(item_id: int) -> dict[str, int]:
        if item_id == 418:
            raise HTTPException(418, detail={"why": "teapot"})
        return {"item_id": item_id}

    return host


def _app(engine: Engine | None = None) -> FastAPI:
    """A host app with its own route, the runs router and the health router."""
    host = _host()
    host.include_router(router)
    host.include_router(health_router)
    if engine is not None:
        host.dependency_overrides[get_db_engine] = lambda: engine
    return host


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return _app().openapi()


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            if (method.upper(), path) in OPERATIONS:
                yield method.upper(), path, operation


def _routes() -> dict[tuple[str, str], APIRoute]:
    found = {}
    for route in [*router.routes, *health_router.routes]:
        assert isinstance(route, APIRoute)
        for method in route.methods:
            found[(method, route.path)] = route
    return found


def _error_schema(schema: dict[str, Any], operation: dict[str, Any], status: str) -> dict:
    ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
    model = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    detail_ref = model["properties"]["error"]["$ref"]
    return schema["components"]["schemas"][detail_ref.rsplit("/", 1)[-1]]


def _codes(schema: dict[str, Any], operation: dict[str, Any], status: str) -> list[str]:
    code = _error_schema(schema, operation, status)["properties"]["code"]
    return schema["components"]["schemas"][code["$ref"].rsplit("/", 1)[-1]]["enum"]


def test_operation_ids_are_readable(schema: dict[str, Any]) -> None:
    found = {(method, path): op["operationId"] for method, path, op in _operations(schema)}
    assert found == OPERATIONS


def test_the_host_apps_own_operation_ids_do_not_change() -> None:
    alone = _host().openapi()["paths"]["/items/{item_id}"]["get"]
    mounted = _app().openapi()["paths"]["/items/{item_id}"]["get"]
    assert alone["operationId"] == mounted["operationId"] == "read_item_items__item_id__get"
    assert alone["responses"] == mounted["responses"]  # its 422 HTTPValidationError stays


def test_no_operation_lists_a_422_validation_error_it_never_answers(
    schema: dict[str, Any],
) -> None:
    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        assert "HTTPValidationError" not in repr(responses), (method, path)
        name = OPERATIONS[(method, path)]
        if name not in ("createRun", "resumeRun"):
            assert "422" not in responses, (method, path)
        if name in ("getRun", "cancelRun", "getHealth"):  # no parameter that can fail
            assert "400" not in responses, (method, path)


def _all_domain_errors() -> set[type[DataLayerError]]:
    found, todo = set(), [DataLayerError]
    while todo:
        kind = todo.pop()
        found.add(kind)
        todo.extend(kind.__subclasses__())
    return found


def test_each_operation_lists_exactly_the_statuses_and_codes_of_the_error_table(
    schema: dict[str, Any],
) -> None:
    """Statuses listed = the statuses of the errors the route can answer (its raises,
    its parameters and body, and the table's rows that apply to any route); each
    status's code enum holds exactly the route's codes, every one a domain error's."""
    routes = _routes()
    table_answers = {answer for row in error_table() for answer in row.answers}
    known = {(kind.status_code, kind.code) for kind in _all_domain_errors()}
    for method, path, operation in _operations(schema):
        errors = answered_errors(routes[(method, path)])
        assert set(ALWAYS_ANSWERED) <= set(errors)
        assert set(ALWAYS_ANSWERED) <= table_answers
        expected = {str(kind.status_code) for kind in errors}
        listed = set(operation["responses"]) - SUCCESS - {"default"}
        assert listed == expected, (method, path)
        codes = sorted({kind.code for kind in errors})
        for status in listed | {"default"}:
            assert sorted(_codes(schema, operation, status)) == codes, (method, path, status)
        for kind in errors:
            assert (kind.status_code, kind.code) in known


def test_the_statuses_of_each_operation(schema: dict[str, Any]) -> None:
    """Spelled out once, so that a change to the table shows here."""
    found = {
        OPERATIONS[(method, path)]: sorted(set(op["responses"]) - {"default"})
        for method, path, op in _operations(schema)
    }
    always = ["500", "503"]
    assert found == {
        "createRun": sorted(["201", "400", "404", "409", "413", "422", *always]),
        "getRun": sorted(["200", "404", *always]),
        "resumeRun": sorted(["202", "400", "404", "409", "413", "422", *always]),
        "cancelRun": sorted(["200", "202", "404", "409", *always]),
        "listRunEvents": sorted(["200", "400", "404", *always]),
        "streamRunEvents": sorted(["200", "400", "404", *always]),
        "getHealth": sorted(["200", *always]),
    }
    ops = {OPERATIONS[(m, p)]: op for m, p, op in _operations(schema)}
    assert sorted(_codes(schema, ops["getRun"], "404")) == [
        "database_busy",
        "database_unavailable",
        "internal_error",
        "run_not_found",
    ]
    assert "schema_not_current" in _codes(schema, ops["getHealth"], "503")
    assert {"idempotency_key_reused", "validation_failed", "session_not_found"} <= set(
        _codes(schema, ops["createRun"], "422")
    )


def test_bodies_headers_and_required_fields_are_documented(schema: dict[str, Any]) -> None:
    ops = {OPERATIONS[(m, p)]: op for m, p, op in _operations(schema)}
    components = schema["components"]["schemas"]
    resume_body = ops["resumeRun"]["requestBody"]
    assert resume_body["required"] is True
    assert resume_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunResumeRequest"
    }
    assert components["RunResumeRequest"]["required"] == ["resume"]
    run = components["RunResponse"]
    assert set(run["required"]) == set(run["properties"])
    assert {"status", "run_id", "created_at", "attempt"} <= set(run["required"])
    event = components["EventResponse"]
    assert set(event["required"]) == set(event["properties"])
    assert set(components["EventPage"]["required"]) == {"items", "next_since_seq"}

    def params(name: str) -> dict[str, str]:
        return {p["name"]: p["in"] for p in ops[name].get("parameters", [])}

    assert params("createRun")["Idempotency-Key"] == "header"
    assert params("resumeRun")["Idempotency-Key"] == "header"
    assert params("streamRunEvents")["Last-Event-ID"] == "header"
    assert set(ops["createRun"]["responses"]["201"]["headers"]) == {
        "Location",
        "Idempotent-Replayed",
    }
    assert set(ops["resumeRun"]["responses"]["202"]["headers"]) == {"Idempotent-Replayed"}
    for name, operation in ops.items():
        assert set(operation["responses"]["503"]["headers"]) == {"Retry-After"}, name


def _listed(schema: dict[str, Any], operation_id: str, status: int, code: str) -> bool:
    operation = next(op for m, p, op in _operations(schema) if op["operationId"] == operation_id)
    key = str(status)
    return key in operation["responses"] and code in _codes(schema, operation, key)


def test_real_error_answers_are_listed_for_their_operation(engine: Engine) -> None:
    """Each error a real request gets: its status is listed for the operation, and its
    code is in the operation's enum."""
    host = _app(engine)
    schema = host.openapi()
    session_id = seed(engine, lambda db: SessionFactory().id)
    waiting = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    queued = seed(engine, lambda db: SessionRunFactory(status=RunStatus.QUEUED).id)
    json_type = {"Content-Type": "application/json"}
    key = {"Idempotency-Key": "k-1"}
    new_run = {"session_id": session_id, "message": "m"}
    requests: list[tuple[str, str, str, dict[str, Any]]] = [
        ("getRun", "GET", "/api/runs/nope", {}),
        ("listRunEvents", "GET", "/api/runs/nope/events", {}),
        ("listRunEvents", "GET", f"/api/runs/{queued}/events?limit=0", {}),
        ("streamRunEvents", "GET", "/api/runs/nope/events/stream", {}),
        (
            "streamRunEvents",
            "GET",
            f"/api/runs/{queued}/events/stream",
            {"headers": {"Last-Event-ID": "x"}},
        ),
        ("cancelRun", "POST", "/api/runs/nope/cancel", {}),
        ("createRun", "POST", "/api/runs", {"content": b"{", "headers": json_type}),
        ("createRun", "POST", "/api/runs", {"json": {"session_id": "nope", "message": "m"}}),
        ("createRun", "POST", "/api/runs", {"json": new_run, "headers": {"Idempotency-Key": ""}}),
        ("createRun", "POST", "/api/runs", {"json": new_run, "headers": key}),
        ("createRun", "POST", "/api/runs", {"json": new_run | {"message": "n"}, "headers": key}),
        (
            "createRun",
            "POST",
            "/api/runs",
            {"json": new_run | {"multitask_strategy": "reject"}},
        ),
        (
            "resumeRun",
            "POST",
            f"/api/runs/{waiting}/resume",
            {"content": b"{", "headers": json_type},
        ),
        ("resumeRun", "POST", "/api/runs/nope/resume", {"json": {"resume": {}}}),
        ("resumeRun", "POST", f"/api/runs/{queued}/resume", {"json": {"resume": {}}}),
    ]
    answered = set()
    with TestClient(host, raise_server_exceptions=False) as client:
        for operation_id, method, url, kwargs in requests:
            response = client.request(method, url, **kwargs)
            if response.status_code < 400:
                continue
            code = response.json()["error"]["code"]
            answered.add((operation_id, response.status_code, code))
            assert _listed(schema, operation_id, response.status_code, code), (
                operation_id,
                response.status_code,
                code,
            )
    assert {
        ("getRun", 404, "run_not_found"),
        ("listRunEvents", 400, "bad_parameter"),
        ("streamRunEvents", 400, "bad_parameter"),
        ("createRun", 422, "validation_failed"),
        ("createRun", 404, "session_not_found"),
        ("createRun", 400, "bad_parameter"),
        ("createRun", 422, "idempotency_key_reused"),
        ("createRun", 409, "active_run_exists"),
        ("resumeRun", 400, "bad_parameter"),
        ("resumeRun", 404, "run_not_found"),
        ("resumeRun", 409, "invalid_transition"),
    } <= answered
