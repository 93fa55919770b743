"""The models and the request session (``app.api.deps.SessionDep``) in a FastAPI app."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session as DbSession
from sqlmodel import func, select

from app.api.deps import SessionDep, get_db_engine
from app.models import ChatSession, RunStatus, SessionRun, TriggerSource
from app.schemas import RunCreate, RunResponse


def build_app() -> FastAPI:
    api = FastAPI()

    @api.post("/runs", response_model=RunResponse, status_code=201)
    def create(body: RunCreate, db: SessionDep) -> SessionRun:
        run = SessionRun(
            session_id=body.session_id,
            trigger_source=TriggerSource.CHAT,
            input_message=body.message,
            options=body.model_dump(include={"generate_now", "style_reference", "target_pages"}),
        )
        db.add(run)
        db.flush()
        return run

    @api.get("/runs/{run_id}", response_model=RunResponse)
    def read(run_id: str, db: SessionDep) -> SessionRun:
        return db.get(SessionRun, run_id)

    return api


@pytest.fixture
def client(engine: Engine) -> TestClient:
    api = build_app()

    api.dependency_overrides[get_db_engine] = lambda: engine
    with DbSession(engine) as db:
        db.add(ChatSession(id="s1", title="chat"))
        db.commit()
    return TestClient(api)


def test_response_model_body_has_run_id_and_persisted_state(client: TestClient) -> None:
    created = client.post(
        "/runs", json={"session_id": "s1", "message": "hi", "target_pages": ["p1"]}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "queued"
    assert body["session_id"] == "s1"
    assert "id" not in body

    fetched = client.get(f"/runs/{body['run_id']}")
    assert fetched.status_code == 200
    assert fetched.json() == body


def test_invalid_body_is_a_422_and_writes_nothing(client: TestClient, engine: Engine) -> None:
    response = client.post("/runs", json={"session_id": "s1", "message": "", "extra": 1})
    assert response.status_code == 422
    with DbSession(engine) as db:
        assert db.exec(select(func.count()).select_from(SessionRun)).one() == 0


def test_openapi_lists_the_status_values(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    status_schema = schema["components"]["schemas"]["RunStatus"]
    assert status_schema["enum"] == [status.value for status in RunStatus]
    response_props = schema["components"]["schemas"]["RunResponse"]["properties"]
    assert "run_id" in response_props
