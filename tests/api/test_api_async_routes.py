"""A host's ``async def`` routes on the async dependencies (``app.api.async_deps``),
as ``examples/async_route.py`` serves them: committed before the answer, rolled
back on an error, errors in the one shape, slots shared with the Run API."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.api.deps import get_db_engine, run_in_slot
from app.db import read_only
from examples.async_route import create_app
from tests.concurrency import seed
from tests.factories import SessionFactory


def client_for(engine: Engine) -> TestClient:
    app = create_app()
    app.dependency_overrides[get_db_engine] = lambda: engine
    return TestClient(app, raise_server_exceptions=False)


def stored(engine: Engine, sql: str) -> list[tuple[object, ...]]:
    with read_only(engine).connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def test_an_async_route_commits_before_it_answers(engine: Engine) -> None:
    chat_id = seed(engine, lambda db: SessionFactory().id)
    with client_for(engine) as client:
        created = client.post(f"/chats/{chat_id}/runs", json={"message": "hi"})
        assert created.status_code == 201, created.text
        run_id = created.json()["run_id"]
        # Read at once through another connection: the answer came after the commit.
        assert stored(engine, "SELECT id, status FROM session_runs") == [(run_id, "queued")]
        types = stored(engine, "SELECT type FROM session_events ORDER BY seq")
        assert types == [("run_created",), ("note",)]
        for path in (f"/runs/{run_id}", f"/runs/{run_id}/orm", f"/api/runs/{run_id}"):
            answer = client.get(path)
            assert answer.status_code == 200 and answer.json()["run_id"] == run_id, path


def test_an_error_in_an_async_route_rolls_back_and_answers_in_the_one_shape(
    engine: Engine,
) -> None:
    with client_for(engine) as client:
        missing = client.post("/chats/no-such-chat/runs", json={"message": "hi"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "session_not_found"
        unknown = client.get("/runs/no-such-run")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "run_not_found"
        assert client.get("/runs/no-such-run/orm").status_code == 404
    assert stored(engine, "SELECT id FROM session_runs") == []


def test_the_async_units_share_the_run_apis_slots(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every write slot taken through ``app.aio``, a Run API request finds none."""
    from app.aio import slot_limiter
    from app.errors import DatabaseBusyError

    monkeypatch.setenv("DB_POOL_TIMEOUT", "0.2")

    async def request_while_the_slots_are_held() -> None:
        limiter = slot_limiter(engine, readonly=False)
        holders = [object() for _ in range(int(limiter.total_tokens))]
        for holder in holders:
            await limiter.acquire_on_behalf_of(holder)
        try:
            with pytest.raises(DatabaseBusyError):
                await run_in_slot(engine, False, lambda: None)
        finally:
            for holder in holders:
                limiter.release_on_behalf_of(holder)
        assert await run_in_slot(engine, False, lambda: "served") == "served"

    asyncio.run(request_while_the_slots_are_held())


def test_the_run_api_written_on_the_async_dependencies_answers_as_the_run_api(
    engine: Engine,
) -> None:
    from app.models import RunStatus
    from examples.async_route import create_run_api
    from tests.api.test_api_routes import run_in

    chat_id = seed(engine, lambda db: SessionFactory().id)
    waiting = run_in(engine, RunStatus.WAITING_INPUT)
    app = create_run_api()
    app.dependency_overrides[get_db_engine] = lambda: engine
    with TestClient(app, raise_server_exceptions=False) as client:
        created = client.post("/api/runs", json={"session_id": chat_id, "message": "hi"})
        assert created.status_code == 201, created.text
        run_id = created.json()["run_id"]
        assert created.headers["location"] == f"/api/runs/{run_id}"
        assert client.get(f"/api/runs/{run_id}").json()["status"] == "queued"
        page = client.get(f"/api/runs/{run_id}/events", params={"limit": 10}).json()
        assert [item["type"] for item in page["items"]] == ["run_created"]
        resumed = client.post(f"/api/runs/{waiting}/resume", json={"resume": {"a": 1}})
        assert (resumed.status_code, resumed.json()["status"]) == (202, "running")
        assert client.post(f"/api/runs/{run_id}/cancel").status_code == 202
        assert client.post(f"/api/runs/{run_id}/cancel").status_code == 200  # already over
        missing = client.get("/api/runs/no-such-run/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
        bad = client.get(f"/api/runs/{run_id}/events", params={"limit": 0})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_parameter"
