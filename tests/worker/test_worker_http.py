"""The README's flow over real HTTP: create a run, a worker runs the LangGraph example
to its interrupt, resume over HTTP, the run completes, every event streamed over SSE.
uvicorn and ``python -m app.worker`` are real processes on 127.0.0.1; both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import Engine

from app.db import unit_of_work
from app.models import ChatSession
from tests.servers import HOST, ROOT, free_port, start_uvicorn, stop, wait_until_ready

pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
pytestmark = pytest.mark.slow  # uvicorn and a worker process per backend


@pytest.fixture
def processes(engine: Engine, database_url: str) -> Iterator[str]:
    """The Run API under uvicorn and one run worker, both on ``database_url``."""
    port = free_port()
    server = start_uvicorn(database_url, port)
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "app.worker", "examples.langgraph_agent:target", "--poll", "0.05"],
        cwd=ROOT,
        env=env,
    )
    base_url = f"http://{HOST}:{port}"
    try:
        wait_until_ready(server, base_url)
        assert worker.poll() is None, f"the worker exited with {worker.returncode}"
        yield base_url
    finally:
        for process in (worker, server):
            stop(process)


def _status_becomes(base_url: str, run_id: str, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{base_url}/api/runs/{run_id}", timeout=5).json()
        if run["status"] == status:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run not {status} within {timeout} s")


def test_create_worker_interrupt_resume_complete_streamed_over_sse(
    engine: Engine, processes: str
) -> None:
    with unit_of_work(engine) as db:
        chat = ChatSession(title="weather")
        db.add(chat)
        db.flush()
        session_id = chat.id
    created = httpx.post(
        f"{processes}/api/runs",
        json={"session_id": session_id, "message": "Weather in Paris?"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]

    streamed: list[str] = []

    def follow() -> None:
        url = f"{processes}/api/runs/{run_id}/events/stream"
        with httpx.stream("GET", url, timeout=httpx.Timeout(60, read=60)) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and streamed[-1:] != ["end"]:
                    event = json.loads(line[6:])
                    streamed.append(event.get("type", "?"))
                if line == "event: end":
                    streamed.append("end")
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    waiting = _status_becomes(processes, run_id, "waiting_input")
    assert json.loads(waiting["waiting_reason"])["question"] == "send this answer?"
    resumed = httpx.post(
        f"{processes}/api/runs/{run_id}/resume", json={"resume": {"approved": True}}, timeout=10
    )
    assert resumed.status_code == 202, resumed.text
    done = _status_becomes(processes, run_id, "completed")
    assert done["metrics"] == {"graph_steps": 1} and done["attempt"] == 1
    reader.join(timeout=30)
    assert not reader.is_alive(), streamed
    assert streamed == [
        "run_created",
        "run_started",
        "graph_update",
        "graph_update",
        "graph_update",
        "run_waiting_input",
        "run_resumed",
        "graph_update",
        "run_completed",
        "end",
    ]
