"""Error messages of the Run API: what was wrong, once, in words.

Each place (a query or path parameter, a header, a body field) is named once,
pydantic's "Input should be" becomes "must be", and a body that is not JSON
says why and where ("Expecting value at line 1 column 1"). Both backends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.api.deps import get_db_engine
from app.api.routes import router
from app.models import RunStatus
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    """The router alone in a host app: its messages do not depend on any global handler."""
    host = FastAPI()
    host.include_router(router)
    host.dependency_overrides[get_db_engine] = lambda: engine
    with TestClient(host, raise_server_exceptions=False) as test_client:
        yield test_client


def _error(response: object, status: int) -> tuple[str, str]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    return error["code"], error["message"]


def _post(client: TestClient, path: str, body: bytes) -> object:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: must be at least 1"),
        ("limit=1001", "limit: must be at most 1000"),
        ("limit=ten", "limit: must be a whole number"),
        ("since_seq=-1", "since_seq: must be at least 0"),
        (
            "since_seq=-1&limit=x",
            "since_seq: must be at least 0; limit: must be a whole number",
        ),
    ],
)
def test_a_bad_query_parameter_is_named_once(
    client: TestClient, engine: Engine, query: str, message: str
) -> None:
    run_id = seed(engine, lambda db: SessionRunFactory().id)
    response = client.get(f"/api/runs/{run_id}/events?{query}")
    assert _error(response, 400) == ("bad_parameter", message)


def test_a_bad_header_is_named_once_by_its_header_name(client: TestClient, engine: Engine) -> None:
    run_id = seed(engine, lambda db: SessionRunFactory().id)
    response = client.get(f"/api/runs/{run_id}/events/stream", headers={"Last-Event-ID": "abc"})
    code, message = _error(response, 400)
    assert code == "bad_parameter"
    assert message.startswith("Last-Event-ID: expected an event seq from 0 to ")
    assert message.count("Last-Event-ID") == 1 and "abc" not in message


def test_an_unknown_path_value_is_a_404_naming_the_run_once(client: TestClient) -> None:
    code, message = _error(client.get("/api/runs/no-such-run"), 404)
    assert (code, message) == ("run_not_found", "run 'no-such-run' not found")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the body is empty; expected a JSON object"),
        (
            b"{",
            "the body is not valid JSON: Expecting property name enclosed in double quotes "
            "at line 1 column 2",
        ),
        (b"nope", "the body is not valid JSON: Expecting value at line 1 column 1"),
        (
            b'{\n  "session_id": "s",\n  "message": }',
            "the body is not valid JSON: Expecting value at line 3 column 14",
        ),
        (b"[1, 2]", "the body must be a JSON object, got an array"),
        (b'"text"', "the body must be a JSON object, got a string"),
        (b'{"message": "m"}', "invalid body: session_id: is required"),
        (
            b'{"session_id": "s", "message": 1, "colour": "red"}',
            "invalid body: message: must be a string; colour: is not a field of this body",
        ),
        (
            b'{"session_id": "s", "message": "m", "multitask_strategy": "later"}',
            "invalid body: multitask_strategy: must be 'enqueue', 'reject' or 'interrupt'",
        ),
        (b'\xff{"x": 1}', "the body is not UTF-8 text"),
    ],
)
def test_a_bad_create_body_says_what_was_wrong_once(
    client: TestClient, body: bytes, message: str
) -> None:
    assert _error(_post(client, "/api/runs", body), 422) == ("validation_failed", message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", 'resume: the body is empty; expected {"resume": {...}}'),
        (
            b"{",
            "resume: the body is not valid JSON: Expecting property name enclosed in double "
            'quotes at line 1 column 2; expected {"resume": {...}}',
        ),
        (b'{"resume": 1}', 'resume: must be a JSON object; expected {"resume": {...}}'),
        (b"{}", 'resume: is required; expected {"resume": {...}}'),
        (
            b'{"resume": {}, "more": 1}',
            'resume: more: is not a field of this body; expected {"resume": {...}}',
        ),
    ],
)
def test_a_bad_resume_body_says_what_was_wrong_once(
    client: TestClient, engine: Engine, body: bytes, message: str
) -> None:
    run_id = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    response = _post(client, f"/api/runs/{run_id}/resume", body)
    assert _error(response, 400) == ("bad_parameter", message)


def test_a_valid_create_after_the_bad_ones_still_works(client: TestClient, engine: Engine) -> None:
    """The messages change nothing about what is accepted."""
    session_id = seed(engine, lambda db: SessionFactory().id)
    created = client.post("/api/runs", json={"session_id": session_id, "message": "m"})
    assert created.status_code == 201, created.text
