"""The HTTP benchmark compares like with like: its raw-driver and template-style servers
answer what the project answers, on both backends (``benchmarks/http.py``).

The servers are driven in-process here (TestClient), not under uvicorn and wrk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.api.deps import get_db_engine
from app.api.main import create_app
from benchmarks.http import ENDPOINTS, Workload, lua_script, reset_pool, seed
from benchmarks.http_servers import raw, template

RUN_IDS = ("run_id", "session_id", "checkpoint_thread")


@pytest.fixture
def seeded(engine: Engine) -> Workload:
    return seed(engine, runs=3, event_runs=2, events=7, pool=8)


@pytest.fixture
def clients(engine: Engine, database_url: str) -> Iterator[dict[str, TestClient]]:
    project = create_app()
    project.dependency_overrides[get_db_engine] = lambda: engine
    apps = {
        "project": project,
        "raw": raw.create_app(database_url),
        "template": template.create_app(database_url),
    }
    with (
        TestClient(apps["project"]) as p,
        TestClient(apps["raw"]) as r,
        TestClient(apps["template"]) as t,
    ):
        yield {"project": p, "raw": r, "template": t}


def _answer(client: TestClient, method: str, path: str, status: int, **kw: Any) -> Any:
    response = client.request(method, path, **kw)
    assert response.status_code == status, response.text
    return response.json()


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


def test_reads_answer_the_same_json(clients: dict[str, TestClient], seeded: Workload) -> None:
    project, raw_client = clients["project"], clients["raw"]
    for run_id in (*seeded.runs, seeded.pool_run(0)):
        path = f"/api/runs/{run_id}"
        expected = _answer(project, "GET", path, 200)
        assert _answer(raw_client, "GET", path, 200) == expected
        assert list(_answer(raw_client, "GET", path, 200)) == list(expected)  # key order too
    for run_id in seeded.event_runs:
        path = f"/api/runs/{run_id}/events?limit=100"
        page = _answer(project, "GET", path, 200)
        assert len(page["items"]) == 7
        assert _answer(raw_client, "GET", path, 200) == page
        since = f"/api/runs/{run_id}/events?since_seq=3&limit=2"
        assert _answer(raw_client, "GET", since, 200) == _answer(project, "GET", since, 200)
    for client in (project, raw_client):
        missing = client.get("/api/runs/no-such-run")
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "run_not_found")


def test_template_answers_the_same_run(clients: dict[str, TestClient], seeded: Workload) -> None:
    """The template's own response model may lag a field the project adds (it maps the
    table with ``benchmarks.peers.NaiveRun``): the fields it has are the project's, with
    the same values, and all but at most one of them."""
    for run_id in seeded.runs:  # queued: no timestamps, which SQLite gives the template naive
        path = f"/api/runs/{run_id}"
        expected = _answer(clients["project"], "GET", path, 200)
        answer = _answer(clients["template"], "GET", path, 200)
        assert answer == {key: expected[key] for key in answer}
        assert len(answer) >= len(expected) - 1
    assert clients["template"].get("/api/runs/no-such-run").status_code == 404


TIMES = ("created_at", "updated_at")
"""Written by the database's clock at each write: the two servers' differ."""


def test_writes_do_the_same_work(clients: dict[str, TestClient], seeded: Workload) -> None:
    """Each write of the raw server leaves the run and its lifecycle event as the
    project's does (read back through the project)."""
    project, raw_client = clients["project"], clients["raw"]
    body = {"session_id": seeded.sessions[0], "message": "same work"}
    made = {
        name: _answer(c, "POST", "/api/runs", 201, json=body)
        for name, c in clients.items()
        if name != "template"
    }
    assert _without(made["raw"], "run_id", "checkpoint_thread", *TIMES) == _without(
        made["project"], "run_id", "checkpoint_thread", *TIMES
    )
    assert made["raw"]["checkpoint_thread"] == f"{body['session_id']}:{made['raw']['run_id']}"
    stored = _answer(project, "GET", f"/api/runs/{made['raw']['run_id']}", 200)
    assert stored == made["raw"]

    resume = {"resume": {"user_feedback": "ocean blues"}}
    answers, events = {}, {}
    for n, (name, client) in enumerate((("project", project), ("raw", raw_client))):
        run_id = seeded.pool_run(n)
        answers[name] = _answer(client, "POST", f"/api/runs/{run_id}/resume", 202, json=resume)
        assert _answer(project, "GET", f"/api/runs/{run_id}", 200) == answers[name]
        last = _answer(project, "GET", f"/api/runs/{run_id}/events", 200)["items"][-1]
        events[name] = _without(last, *RUN_IDS, "timestamp")
    assert _without(answers["raw"], *RUN_IDS, *TIMES) == _without(
        answers["project"], *RUN_IDS, *TIMES
    )
    assert events["raw"] == events["project"]
    assert events["raw"]["type"] == "run_resumed"
    again = raw_client.post(f"/api/runs/{seeded.pool_run(1)}/resume", json=resume)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "invalid_transition")

    for n, (name, client) in enumerate((("project", project), ("raw", raw_client)), start=2):
        run_id = seeded.pool_run(n)
        answers[name] = _answer(client, "POST", f"/api/runs/{run_id}/cancel", 202)
        assert _answer(project, "GET", f"/api/runs/{run_id}", 200) == answers[name]
        last = _answer(project, "GET", f"/api/runs/{run_id}/events", 200)["items"][-1]
        events[name] = _without(last, *RUN_IDS, "timestamp")
        assert _answer(client, "POST", f"/api/runs/{run_id}/cancel", 200) == answers[name]
    keep = (*RUN_IDS, *TIMES, "finished_at")
    assert _without(answers["raw"], *keep) == _without(answers["project"], *keep)
    assert events["raw"] == events["project"] == {**events["raw"], "type": "run_cancelled"}


def test_the_pool_resets_to_waiting(
    clients: dict[str, TestClient], seeded: Workload, database_url: str
) -> None:
    for n in range(3):
        _answer(clients["raw"], "POST", f"/api/runs/{seeded.pool_run(n)}/cancel", 202)
    assert reset_pool(database_url) == 3
    for n in range(3):
        run = _answer(clients["project"], "GET", f"/api/runs/{seeded.pool_run(n)}", 200)
        assert (run["status"], run["finished_at"]) == ("waiting_input", None)
    _answer(
        clients["project"],
        "POST",
        f"/api/runs/{seeded.pool_run(0)}/resume",
        202,
        json={"resume": {"again": True}},
    )


def test_wrk_scripts_aim_at_the_seeded_targets(seeded: Workload) -> None:
    get = lua_script(ENDPOINTS["get"], seeded, threads=2)
    assert all(f'"{run_id}"' in get for run_id in seeded.runs)
    assert "local thread_count = 2" in get
    resume = lua_script(ENDPOINTS["resume"], seeded, threads=2)
    assert "i % 8" in resume and '"POST"' in resume
    assert seeded.pool_run(7) == "1" + "7".zfill(31)
