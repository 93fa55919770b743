"""The Run API router (``app.api.routes``) on the repositories, both backends.

TestClient drives the real app here; ``tests/load/test_api_load.py`` drives it
under uvicorn over real HTTP.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import RunReaderDep, RunRepositoryDep, get_db_engine
from app.api.routes import router
from app.models import RunStatus
from app.repositories import RunRepository
from app.state_machine import TERMINAL_STATUSES
from tests.concurrency import in_own_transaction, seed
from tests.factories import SessionFactory, SessionRunFactory
from tests.servers import app_on


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(app_on(engine), raise_server_exceptions=False) as test_client:
        yield test_client


def run_in(engine: Engine, status: RunStatus) -> str:
    extra = {"waiting_reason": "pick one"} if status is RunStatus.WAITING_INPUT else {}
    return seed(engine, lambda db: SessionRunFactory(status=status, **extra).id)


def count_runs(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM session_runs")).scalar_one()


def test_create_then_get(client: TestClient, engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    created = client.post(
        "/api/runs", json={"session_id": session_id, "message": "slides", "target_pages": ["a"]}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["session_id"], body["status"]) == (session_id, "queued")
    assert body["checkpoint_thread"] == f"{session_id}:{body['run_id']}"
    assert (body["input_message"], body["trigger_source"], body["parent_run_id"]) == (
        "slides",
        "chat",
        None,
    )
    assert body["options"]["target_pages"] == ["a"]
    assert body["created_at"].endswith("Z") and body["updated_at"] >= body["created_at"]
    assert created.headers["location"] == f"/api/runs/{body['run_id']}"

    fetched = client.get(created.headers["location"])
    assert fetched.status_code == 200 and fetched.json() == body


def test_the_location_of_a_created_run_follows_the_mount_prefix(engine: Engine) -> None:
    api = FastAPI()
    api.include_router(router, prefix="/v2")
    api.dependency_overrides[get_db_engine] = lambda: engine
    session_id = seed(engine, lambda db: SessionFactory().id)
    with TestClient(api) as client:
        created = client.post("/v2/api/runs", json={"session_id": session_id, "message": "m"})
        assert created.status_code == 201, created.text
        assert created.headers["location"] == f"/v2/api/runs/{created.json()['run_id']}"
        assert client.get(created.headers["location"]).json() == created.json()


class CheckStoredBeforeAnswer:
    """ASGI middleware: when the response body leaves, look the run up from
    another connection. It must already be committed."""

    def __init__(self, app: ASGIApp, engine: Engine) -> None:
        self.app, self.engine = app, engine
        self.seen: list[bool] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def checking_send(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                run_id = json.loads(message["body"]).get("run_id")
                if run_id:
                    with self.engine.connect() as conn:
                        found = conn.execute(
                            text("SELECT COUNT(*) FROM session_runs WHERE id = :id"),
                            {"id": run_id},
                        ).scalar_one()
                    self.seen.append(found == 1)
            await send(message)

        await self.app(scope, receive, checking_send)


def test_the_run_is_committed_before_the_answer_leaves(engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    checker = CheckStoredBeforeAnswer(app_on(engine), engine)
    with TestClient(checker) as client:  # type: ignore[arg-type]
        for _ in range(5):
            response = client.post("/api/runs", json={"session_id": session_id, "message": "m"})
            assert response.status_code == 201
    assert checker.seen == [True] * 5


def test_a_failing_commit_is_an_error_answer_and_stores_nothing(engine: Engine) -> None:
    """A deferred foreign key fails at COMMIT, on both backends: the client must not
    get a 201 for a run that was rolled back."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE commit_fault (run_id VARCHAR(64) REFERENCES session_runs(id) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    session_id = seed(engine, lambda db: SessionFactory().id)
    api = app_on(engine)

    @api.post("/faulty-runs", status_code=201)
    def create_then_break(runs: RunRepositoryDep) -> dict[str, str]:
        run = runs.create({"session_id": session_id, "message": "m"})
        runs._session.execute(text("INSERT INTO commit_fault VALUES ('no such run')"))  # noqa: SLF001 a write in the request's transaction
        return {"run_id": run.id}

    with TestClient(api, raise_server_exceptions=False) as client:
        response = client.post("/faulty-runs")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert count_runs(engine) == 0


def test_create_errors(client: TestClient, engine: Engine) -> None:
    unknown = client.post("/api/runs", json={"session_id": "nope", "message": "x"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "session_not_found"
    for body in ({"session_id": "s", "message": ""}, {"session_id": "s"}, [1], "x"):
        invalid = client.post("/api/runs", json=body)
        assert invalid.status_code == 422, invalid.text
        assert invalid.json()["error"]["code"] == "validation_failed"
    malformed = client.post(
        "/api/runs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422
    assert malformed.json()["error"]["code"] == "validation_failed"
    assert count_runs(engine) == 0


def test_create_with_reject_on_a_busy_session_is_a_409(client: TestClient, engine: Engine) -> None:
    active = run_in(engine, RunStatus.RUNNING)
    with engine.connect() as conn:
        session_id = conn.execute(
            text("SELECT session_id FROM session_runs WHERE id = :id"), {"id": active}
        ).scalar_one()
    body = {"session_id": session_id, "message": "x", "multitask_strategy": "reject"}
    refused = client.post("/api/runs", json=body)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "active_run_exists"
    assert active in refused.json()["error"]["message"]
    unknown = client.post("/api/runs", json={**body, "multitask_strategy": "rollback"})
    assert unknown.status_code == 422 and "multitask_strategy" in unknown.text
    interrupted = client.post("/api/runs", json={**body, "multitask_strategy": "interrupt"})
    assert interrupted.status_code == 201, interrupted.text
    assert client.get(f"/api/runs/{active}").json()["status"] == "cancelled"
    assert count_runs(engine) == 2


def test_idempotency_key_on_create(client: TestClient, engine: Engine) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    body = {"session_id": session_id, "message": "slides"}
    first = client.post("/api/runs", json=body, headers={"Idempotency-Key": "order-1"})
    again = client.post("/api/runs", json=body, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == again.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["run_id"] == first.json()["run_id"]
    reused = client.post(
        "/api/runs", json={**body, "message": "other"}, headers={"Idempotency-Key": "order-1"}
    )
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    too_long = client.post("/api/runs", json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "bad_parameter"
    assert count_runs(engine) == 1


def test_idempotency_key_on_resume(client: TestClient, engine: Engine) -> None:
    run_id = run_in(engine, RunStatus.WAITING_INPUT)
    body, headers = {"resume": {"user_feedback": "ok"}}, {"Idempotency-Key": "answer-1"}
    first = client.post(f"/api/runs/{run_id}/resume", json=body, headers=headers)
    again = client.post(f"/api/runs/{run_id}/resume", json=body, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    unkeyed = client.post(f"/api/runs/{run_id}/resume", json=body)
    assert unkeyed.status_code == 409
    with engine.connect() as conn:
        resumed = conn.execute(
            text("SELECT COUNT(*) FROM session_events WHERE run_id = :id AND type = 'run_resumed'"),
            {"id": run_id},
        ).scalar_one()
    assert resumed == 1


def test_get_an_unknown_run_is_a_404_with_the_error_body(client: TestClient) -> None:
    response = client.get("/api/runs/missing")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "run_not_found", "message": "run 'missing' not found"}
    }


def test_unknown_paths_and_methods_answer_in_the_error_shape(client: TestClient) -> None:
    assert client.get("/api/nothing").json()["error"]["code"] == "not_found"
    wrong_method = client.delete("/api/runs/x")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


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
    "body",
    [
        {"resume": "yes"},
        {"resume": [1]},
        {},
        {"resume": {}, "extra": 1},
        [1],
        b"{not json",
        b"",
        {"resume": {"x": float("nan")}},
    ],
)
def test_a_bad_resume_body_is_a_400_and_changes_nothing(
    client: TestClient, engine: Engine, body: Any
) -> None:
    run_id = run_in(engine, RunStatus.WAITING_INPUT)
    if isinstance(body, bytes):
        response = client.post(
            f"/api/runs/{run_id}/resume", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = client.post(
            f"/api/runs/{run_id}/resume",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
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


def test_cancel_an_unknown_run_is_a_404(client: TestClient) -> None:
    response = client.post("/api/runs/missing/cancel")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "run_not_found"


def test_run_events_page(client: TestClient, engine: Engine) -> None:
    run_id = run_in(engine, RunStatus.QUEUED)
    for step in ("start", "complete"):
        in_own_transaction(engine, lambda db, step=step: getattr(RunRepository(db), step)(run_id))

    response = client.get(f"/api/runs/{run_id}/events", params={"since_seq": 0, "limit": 10})
    assert response.status_code == 200
    page = response.json()
    assert [(e["seq"], e["type"]) for e in page["items"]] == [
        (1, "run_started"),
        (2, "run_completed"),
    ]
    assert page["next_since_seq"] == 2
    assert all(e["run_id"] == run_id and isinstance(e["payload"], dict) for e in page["items"])
    assert all(
        datetime.fromisoformat(e["timestamp"]).utcoffset() is not None for e in page["items"]
    )

    after = client.get(f"/api/runs/{run_id}/events", params={"since_seq": 1, "limit": 1})
    assert [e["seq"] for e in after.json()["items"]] == [2]
    empty = client.get(f"/api/runs/{run_id}/events", params={"since_seq": 2}).json()
    assert empty == {"items": [], "next_since_seq": 2}


@pytest.mark.parametrize(
    "query",
    [
        {"limit": 0},
        {"limit": 1001},
        {"since_seq": -1},
        {"since_seq": "abc"},
        {"limit": "1.5"},
        {"since_seq": 2**31},
    ],
)
def test_run_events_bad_parameters_are_a_400(
    client: TestClient, engine: Engine, query: dict[str, Any]
) -> None:
    run_id = run_in(engine, RunStatus.QUEUED)
    response = client.get(f"/api/runs/{run_id}/events", params=query)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_parameter"
    assert next(iter(query)) in error["message"]


def test_events_of_an_unknown_run_is_a_404(client: TestClient) -> None:
    assert client.get("/api/runs/missing/events").status_code == 404


def test_openapi_documents_bodies_and_error_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    resume = paths["/api/runs/{run_id}/resume"]["post"]
    resume_schema = resume["requestBody"]["content"]["application/json"]["schema"]
    assert resume_schema == {"$ref": "#/components/schemas/RunResumeRequest"}
    assert {"202", "400", "404", "409"} <= set(resume["responses"])
    create = paths["/api/runs"]["post"]
    assert {"201", "404", "422"} <= set(create["responses"])
    error_ref = create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/CreateRunError")  # tests/api/test_api_openapi.py: the rest
    events = paths["/api/runs/{run_id}/events"]["get"]
    assert {"200", "400", "404"} <= set(events["responses"])
    assert set(paths["/api/runs/{run_id}/cancel"]["post"]["responses"]) >= {"200", "202", "404"}
    assert schema["components"]["schemas"]["RunStatus"]["enum"] == [s.value for s in RunStatus]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_reads_do_not_wait_for_a_writer(engine: Engine, client: TestClient) -> None:
    """A writer holds SQLite's write lock; GETs and event pages answer at once
    (their transactions begin DEFERRED), a write waits and then goes through."""
    run_id = run_in(engine, RunStatus.QUEUED)
    writer = engine.connect()
    try:
        writer.execute(text("INSERT INTO sessions (id, title) VALUES ('w', 't')"))  # locked now
        started = time.monotonic()
        assert client.get(f"/api/runs/{run_id}").status_code == 200
        assert client.get(f"/api/runs/{run_id}/events").status_code == 200
        assert time.monotonic() - started < 1.0  # the busy timeout is 5 s
    finally:
        writer.rollback()
        writer.close()
    assert client.post(f"/api/runs/{run_id}/cancel").status_code == 202


def test_a_request_that_gets_no_database_slot_in_time_is_a_503(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests wait for a slot in the event loop, not on the pool in a thread;
    one that waits past DB_POOL_TIMEOUT answers 503 with Retry-After. (Two reads:
    on SQLite, writers have a slot of their own.)"""
    monkeypatch.setenv("DB_REQUEST_SLOTS", "1")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "0.3")
    run_id = run_in(engine, RunStatus.QUEUED)
    api = app_on(engine)

    @api.get("/slow")
    def slow(runs: RunReaderDep) -> dict[str, str]:
        time.sleep(1.5)
        return {"status": runs.get(run_id).status}

    with TestClient(api, raise_server_exceptions=False) as client:
        holder = threading.Thread(target=lambda: client.get("/slow"))
        holder.start()
        time.sleep(0.3)
        busy = client.get(f"/api/runs/{run_id}")
        holder.join(10)
        after = client.get(f"/api/runs/{run_id}")
    assert busy.status_code == 503, busy.text
    assert busy.json()["error"]["code"] == "database_busy"
    assert busy.headers["retry-after"] == "1"
    assert after.status_code == 200
