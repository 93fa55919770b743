"""GET /api/runs/{run_id}/events/stream under a real uvicorn on 127.0.0.1, on both backends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

import app.api.sse
from app.db import unit_of_work
from app.repositories import EventRepository, RunRepository
from tests.concurrency import seed
from tests.factories import SessionFactory
from tests.servers import run_api_in_thread

pytestmark = pytest.mark.slow  # each test starts uvicorn


@pytest.fixture
def base_url(engine: Engine) -> Iterator[str]:
    with run_api_in_thread(engine) as url:
        yield url


def running_run(engine: Engine) -> tuple[str, str]:
    session_id = seed(engine, lambda db: SessionFactory().id)
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.create({"session_id": session_id, "message": "stream me"})
        runs.start(run.id)
    return session_id, run.id


def read_stream(response: httpx.Response, until: str = "end") -> list[dict[str, Any]]:
    """The SSE messages of ``response`` as dicts (comments under ``comment``), up to ``until``."""
    messages: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in response.iter_lines():
        if line == "":
            if current:
                messages.append(current)
                if current.get("event") == until or until in current.get("comment", ""):
                    return messages
            current = {}
        elif line.startswith(":"):
            current["comment"] = line[1:].strip()
        else:
            name, _, value = line.partition(": ")
            current[name] = json.loads(value) if name == "data" else value
    return messages


def later(seconds: float, work: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), work()))
    thread.start()
    return thread


def test_streams_events_as_they_commit_and_ends_with_the_run(engine: Engine, base_url: str) -> None:
    session_id, run_id = running_run(engine)

    def work() -> None:
        with unit_of_work(engine) as db:
            EventRepository(db).append(session_id, "tool_call", {"n": 1}, run_id=run_id)
        with unit_of_work(engine) as db:
            RunRepository(db).complete(run_id, {"tokens": 3})

    writer = later(0.5, work)
    with httpx.stream("GET", f"{base_url}/api/runs/{run_id}/events/stream", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = read_stream(response)
    writer.join()
    events = [m for m in messages if "id" in m]
    assert [m["id"] for m in events] == ["1", "2", "3", "4"]
    assert [m["data"]["type"] for m in events] == [
        "run_created",
        "run_started",
        "tool_call",
        "run_completed",
    ]
    assert [m["event"] for m in events] == [m["data"]["type"] for m in events]
    assert events[2]["data"]["payload"] == {"n": 1} and events[2]["data"]["seq"] == 3
    assert messages[-1] == {"event": "end", "data": {"run_id": run_id, "last_seq": 4}}


def test_event_names_are_the_types_and_never_break_the_framing(
    engine: Engine, base_url: str
) -> None:
    """``event: <type>`` for a type that is one token of visible ASCII; the names of the
    stream's last messages (``end``, ``error``) and types a line could not carry go
    unnamed (a browser's ``onmessage``), and every message still parses."""
    session_id, run_id = running_run(engine)
    odd = ["end", "error", "two words", "line\nbreak", "cr\rbreak", "naïve", "message", "x.y:z"]
    with unit_of_work(engine) as db:
        for type_ in odd:
            EventRepository(db).append(session_id, type_, {"t": type_}, run_id=run_id)
        RunRepository(db).complete(run_id, {})
    url = f"{base_url}/api/runs/{run_id}/events/stream"
    with httpx.stream("GET", url, timeout=30) as response:
        messages = read_stream(response)
    events = [m for m in messages if "id" in m]
    assert [m["data"]["type"] for m in events] == [
        "run_created",
        "run_started",
        *odd,
        "run_completed",
    ]
    assert [m["data"]["payload"] for m in events[2:-1]] == [{"t": t} for t in odd]
    names = [m.get("event") for m in events]
    unnamed = [None] * 6
    assert names == ["run_created", "run_started", *unnamed, "message", "x.y:z", "run_completed"]
    assert messages[-1] == {"event": "end", "data": {"run_id": run_id, "last_seq": 11}}
    assert [m.get("event") for m in messages].count("end") == 1


def test_last_event_id_resumes_after_that_seq(engine: Engine, base_url: str) -> None:
    session_id, run_id = running_run(engine)
    with unit_of_work(engine) as db:
        EventRepository(db).append(session_id, "step", run_id=run_id)
        RunRepository(db).fail(run_id, {"code": "x"})
    url = f"{base_url}/api/runs/{run_id}/events/stream"
    with httpx.stream("GET", url, headers={"Last-Event-ID": "2"}, timeout=30) as response:
        ids = [m.get("id") for m in read_stream(response)]
    assert ids == ["3", "4", None]
    with httpx.stream("GET", url, params={"since_seq": 3}, timeout=30) as response:
        assert [m.get("id") for m in read_stream(response)] == ["4", None]


def test_sends_heartbeats_while_idle(
    engine: Engine, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.api.sse, "SSE_PING_SECONDS", 0.2)
    _session_id, run_id = running_run(engine)
    url = f"{base_url}/api/runs/{run_id}/events/stream"
    with httpx.stream("GET", url, params={"since_seq": 2}, timeout=30) as response:
        messages = read_stream(response, until="ping")
    assert messages == [{"comment": "ping"}]


def test_unknown_run_and_bad_last_event_id_answer_before_the_stream(
    engine: Engine, base_url: str
) -> None:
    _session_id, run_id = running_run(engine)
    missing = httpx.get(f"{base_url}/api/runs/nope/events/stream", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
    for bad in ("x", "-1", str(2**31)):
        answer = httpx.get(
            f"{base_url}/api/runs/{run_id}/events/stream",
            headers={"Last-Event-ID": bad},
            timeout=30,
        )
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["code"] == "bad_parameter"
