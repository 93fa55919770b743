"""The Run API mounted into a host application changes nothing of the host's own answers.

The router's routes translate their own failures (``app.api.errors.ErrorShapeRoute``),
so a host that only calls ``include_router`` keeps FastAPI's 422s, its own
``HTTPException`` details and its own exception handlers, while the router still
answers 404 / 400 / 422 / 409 in the one error shape.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.api.deps import get_db_engine
from app.api.routes import router
from app.models import RunStatus
from tests.api.test_api_routes import run_in


class TeapotError(Exception):
    pass


def host_app() -> FastAPI:
    """A host application with routes, errors and a handler of its own."""
    host = FastAPI()

    @host.get("/items/{item_id}")
    def item(item_id: int, q: int = 0) -> dict[str, int]:
        return {"item_id": item_id, "q": q}

    @host.post("/items")
    def add_item(body: dict[str, int]) -> dict[str, int]:
        return body

    @host.get("/teapot")
    def teapot() -> None:
        raise HTTPException(418, detail={"why": "teapot"}, headers={"X-Tea": "earl grey"})

    @host.get("/custom")
    def custom() -> None:
        raise TeapotError("short and stout")

    @host.exception_handler(TeapotError)
    def on_teapot(_request: Request, exc: TeapotError) -> JSONResponse:
        return JSONResponse({"teapot": str(exc)}, status_code=418)

    return host


HOST_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/items/3?q=4", {}),
    ("GET", "/items/abc", {}),  # FastAPI's 422 for an int path parameter
    ("GET", "/items/3?q=x", {}),  # ... and for a query parameter
    ("POST", "/items", {"json": {"a": "not an int"}}),  # a body that does not validate
    ("POST", "/items", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("GET", "/teapot", {}),
    ("GET", "/custom", {}),
    ("GET", "/nowhere", {}),  # the host's 404
    ("DELETE", "/items/3", {}),  # the host's 405
]


def answers(app: FastAPI) -> list[tuple[int, bytes, str | None, str | None]]:
    with TestClient(app, raise_server_exceptions=False) as client:
        out = []
        for method, path, options in HOST_REQUESTS:
            response = client.request(method, path, **options)
            out.append(
                (
                    response.status_code,
                    response.content,
                    response.headers.get("content-type"),
                    response.headers.get("x-tea"),
                )
            )
        return out


def with_router(engine: Engine) -> FastAPI:
    host = host_app()
    host.include_router(router)
    host.dependency_overrides[get_db_engine] = lambda: engine
    return host


def test_mounting_the_router_changes_no_answer_of_the_host(engine: Engine) -> None:
    alone = answers(host_app())
    assert [status for status, *_ in alone] == [200, 422, 422, 422, 422, 418, 418, 404, 405]
    assert b'"why":"teapot"' in alone[5][1] and alone[5][3] == "earl grey"
    assert alone[6][1] == b'{"teapot":"short and stout"}'
    assert answers(with_router(engine)) == alone


ErrorCase = tuple[str, str, dict[str, Any], int, str]


def router_errors(run_id: str, waiting_id: str) -> list[ErrorCase]:
    return [
        ("GET", "/api/runs/no-such-run", {}, 404, "run_not_found"),
        ("GET", f"/api/runs/{run_id}/events?limit=0", {}, 400, "bad_parameter"),
        ("GET", f"/api/runs/{run_id}/events?since_seq=x", {}, 400, "bad_parameter"),
        ("POST", "/api/runs", {"json": {"session_id": 5}}, 422, "validation_failed"),
        (
            "POST",
            "/api/runs",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "validation_failed",
        ),
        ("POST", f"/api/runs/{waiting_id}/resume", {"json": {"nope": 1}}, 400, "bad_parameter"),
        ("POST", f"/api/runs/{run_id}/resume", {"json": {"resume": {}}}, 409, "invalid_transition"),
        ("POST", "/api/runs/no-such-run/cancel", {}, 404, "run_not_found"),
        ("GET", "/api/runs/no-such-run/events/stream", {}, 404, "run_not_found"),
    ]


def test_the_router_answers_its_own_errors_in_the_one_shape_without_global_handlers(
    engine: Engine,
) -> None:
    queued, waiting = run_in(engine, RunStatus.QUEUED), run_in(engine, RunStatus.WAITING_INPUT)
    host = with_router(engine)
    before = set(host_app().exception_handlers)
    assert set(host.exception_handlers) == before  # nothing installed on the host
    with TestClient(host, raise_server_exceptions=False) as client:
        for method, path, options, status, code in router_errors(queued, waiting):
            response = client.request(method, path, **options)
            assert (response.status_code, method, path) == (status, method, path), response.text
            body = response.json()
            assert set(body) == {"error"} and body["error"]["code"] == code, (path, body)
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert client.get(f"/api/runs/{queued}").json()["status"] == "queued"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_failure_outside_the_domain_is_a_500_in_the_one_shape_on_the_router_only(
    engine: Engine,
) -> None:
    """A database error no repository translates (here: the table is gone) is the
    router's 500 ``internal_error`` in the one shape; the host's own 500 stays plain."""
    run_id = run_in(engine, RunStatus.QUEUED)
    host = with_router(engine)

    @host.get("/boom")
    def boom() -> None:
        raise RuntimeError("host bug")

    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE session_runs RENAME TO session_runs_gone")
    try:
        with TestClient(host, raise_server_exceptions=False) as client:
            ours = client.get(f"/api/runs/{run_id}")
            theirs = client.get("/boom")
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE session_runs_gone RENAME TO session_runs")
    assert ours.status_code == 500
    assert ours.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert theirs.status_code == 500 and theirs.text == "Internal Server Error"
