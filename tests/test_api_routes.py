"""The Run API routes of spec section 8 on the repositories, dependencies and error handlers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from fastapi import FastAPI, Response
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import SQLModel

from app.api.deps import EventRepositoryDep, ResumeRequestDep, RunRepositoryDep
from app.api.errors import install_error_handlers
from app.db import get_session, session_dependency
from app.models import RunStatus, SessionRun
from app.repositories import RunRepository
from app.schemas import RunCreate, RunResponse
from app.state_machine import TERMINAL_STATUSES
from tests.concurrency import in_own_transaction, seed
from tests.factories import SessionFactory, SessionRunFactory


class EventOut(SQLModel):
    session_id: str
    seq: int
    type: str
    source: str
    run_id: str | None
    event_id: str | None
    payload: dict[str, Any]
    timestamp: datetime


class EventPage(SQLModel):
    run_id: str
    events: list[EventOut]


def build_app() -> FastAPI:
    api = FastAPI()
    install_error_handlers(api)

    @api.post("/api/runs", response_model=RunResponse, status_code=201)
    def create_run(body: RunCreate, runs: RunRepositoryDep) -> SessionRun:
        return runs.create(body)

    @api.get("/api/runs/{run_id}", response_model=RunResponse)
    def get_run(run_id: str, runs: RunRepositoryDep) -> SessionRun:
        return runs.get(run_id)

    @api.post("/api/runs/{run_id}/resume", response_model=RunResponse, status_code=202)
    def resume_run(run_id: str, body: ResumeRequestDep, runs: RunRepositoryDep) -> SessionRun:
        return runs.resume(run_id, body)

    @api.post("/api/runs/{run_id}/cancel", response_model=RunResponse, status_code=202)
    def cancel_run(run_id: str, response: Response, runs: RunRepositoryDep) -> SessionRun:
        run, changed = runs.cancel(run_id)
        if not changed:
            response.status_code = 200
        return run

    @api.get("/api/runs/{run_id}/events", response_model=EventPage)
    def run_events(
        run_id: str, events: EventRepositoryDep, since_seq: int = 0, limit: int = 100
    ) -> EventPage:
        page = events.list_for_run(run_id, since_seq=since_seq, limit=limit)
        return EventPage(
            run_id=run_id,
            events=[
                EventOut.model_validate(event, update={"timestamp": event.created_at})
                for event in page
            ],
        )

    return api


@pytest.fixture
def client(engine: Engine) -> TestClient:
    api = build_app()

    api.dependency_overrides[get_session] = session_dependency(engine)
    return TestClient(api)


def run_in(engine: Engine, status: RunStatus) -> str:
    extra = {"waiting_reason": "pick one"} if status is RunStatus.WAITING_INPUT else {}
    return seed(engine, lambda db: SessionRunFactory(status=status, **extra).id)


def test_create_then_get(client: TestClient, engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    created = client.post(
        "/api/runs", json={"session_id": session_id, "message": "slides", "target_pages": ["a"]}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["session_id"], body["status"]) == (session_id, "queued")
    assert body["checkpoint_thread"] == f"{session_id}:{body['run_id']}"

    fetched = client.get(f"/api/runs/{body['run_id']}")
    assert fetched.status_code == 200 and fetched.json() == body


def test_create_errors(client: TestClient) -> None:
    unknown = client.post("/api/runs", json={"session_id": "nope", "message": "x"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "session_not_found"
    assert client.post("/api/runs", json={"session_id": "s", "message": ""}).status_code == 422


def test_get_an_unknown_run_is_a_404_with_the_error_body(client: TestClient) -> None:
    response = client.get("/api/runs/missing")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "run_not_found", "message": "run 'missing' not found"}
    }


def test_resume_a_waiting_run(client: TestClient, engine: Engine) -> None:
    run_id = run_in(engine, RunStatus.WAITING_INPUT)
    response = client.post(f"/api/runs/{run_id}/resume", json={"resume": {"user_feedback": "ok"}})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "running" and response.json()["waiting_reason"] is None


def test_resume_when_not_waiting_is_a_409(client: TestClient, engine: Engine) -> None:
    run_id = run_in(engine, RunStatus.RUNNING)
    response = client.post(f"/api/runs/{run_id}/resume", json={"resume": {"a": 1}})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "invalid_transition"
    assert "is running" in error["message"] and "waiting_input" in error["message"]


@pytest.mark.parametrize(
    "body", [{"resume": "yes"}, {"resume": [1]}, {}, {"resume": {}, "extra": 1}, [1]]
)
def test_a_bad_resume_body_is_a_400_and_changes_nothing(
    client: TestClient, engine: Engine, body: Any
) -> None:
    run_id = run_in(engine, RunStatus.WAITING_INPUT)
    response = client.post(f"/api/runs/{run_id}/resume", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_parameter"
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "waiting_input"


@pytest.mark.parametrize("status", list(RunStatus))
def test_cancel_is_202_when_accepted_and_200_when_already_terminal(
    client: TestClient, engine: Engine, status: RunStatus
) -> None:
    run_id = run_in(engine, status)
    response = client.post(f"/api/runs/{run_id}/cancel")
    expected_status = status.value if status in TERMINAL_STATUSES else "cancelled"
    assert response.status_code == (200 if status in TERMINAL_STATUSES else 202)
    assert response.json()["status"] == expected_status


def test_run_events_page(client: TestClient, engine: Engine) -> None:
    run_id = run_in(engine, RunStatus.QUEUED)
    for step in ("start", "complete"):
        in_own_transaction(engine, lambda db, step=step: getattr(RunRepository(db), step)(run_id))

    response = client.get(f"/api/runs/{run_id}/events", params={"since_seq": 0, "limit": 10})
    assert response.status_code == 200
    events = response.json()["events"]
    assert [(e["seq"], e["type"]) for e in events] == [(1, "run_started"), (2, "run_completed")]
    assert all(e["run_id"] == run_id for e in events)
    assert all(datetime.fromisoformat(e["timestamp"]).utcoffset() is not None for e in events)

    after = client.get(f"/api/runs/{run_id}/events", params={"since_seq": 1})
    assert [e["seq"] for e in after.json()["events"]] == [2]


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 1001}, {"since_seq": -1}])
def test_run_events_out_of_range_is_a_400(
    client: TestClient, engine: Engine, query: dict[str, int]
) -> None:
    run_id = run_in(engine, RunStatus.QUEUED)
    response = client.get(f"/api/runs/{run_id}/events", params=query)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_parameter"


def test_events_of_an_unknown_run_is_a_404(client: TestClient) -> None:
    assert client.get("/api/runs/missing/events").status_code == 404
