"""The LangGraph example (``examples/langgraph_agent.py``) under ``RunWorker``, on both
backends: a tool step, an interrupt mapped to ``waiting_input``, and a resume by a
second worker whose graph and checkpointer connection are new, so the state it
continues from can only come from the checkpointer's tables."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session as DbSession
from sqlmodel import select

from app.db import unit_of_work
from app.feed import close_feed
from app.models import ChatSession, RunStatus, SessionEvent, SessionRun
from app.repositories import RunRepository
from app.worker import RunWorker

pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
pytestmark = pytest.mark.slow  # two workers and a graph per backend: about 10 s

from examples.langgraph_agent import build, checkpointer, make_target  # noqa: E402


def _until(check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


def _run(engine: Engine, run_id: str) -> SessionRun:
    with DbSession(engine) as db:
        return db.get(SessionRun, run_id)


def _work_until(engine: Engine, target: Any, done: Callable[[], bool]) -> None:
    worker = RunWorker(engine, target, poll=0.02, grace=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        _until(done)
    finally:
        worker.stop()
        thread.join(timeout=10)
        close_feed(engine)
    assert not thread.is_alive()


def test_the_example_graph_interrupts_and_resumes_from_its_checkpoint(
    engine: Engine, database_url: str
) -> None:
    with unit_of_work(engine) as db:
        chat = ChatSession(title="weather")
        db.add(chat)
        db.flush()
        run_id = (
            RunRepository(db).create({"session_id": chat.id, "message": "Weather in Paris?"}).id
        )

    _work_until(
        engine,
        make_target(database_url),
        lambda: _run(engine, run_id).status is RunStatus.WAITING_INPUT,
    )
    run = _run(engine, run_id)
    reason = json.loads(run.waiting_reason)
    assert reason == {
        "question": "send this answer?",
        "draft": "Draft: the weather is sunny, 21 C in Paris.",
    }

    # The graph's state lives in the checkpointer: a new connection reads it back.
    graph = build(checkpointer(database_url))
    state = graph.get_state({"configurable": {"thread_id": run.checkpoint_thread}})
    assert state.next == ("review",) and state.interrupts
    assert [m.type for m in state.values["messages"]] == ["human", "ai", "tool", "ai"]

    with unit_of_work(engine) as db:
        RunRepository(db).resume(run_id, {"approved": True})
    _work_until(
        engine,
        make_target(database_url),  # another graph, another checkpointer connection
        lambda: _run(engine, run_id).status is RunStatus.COMPLETED,
    )
    state = graph.get_state({"configurable": {"thread_id": run.checkpoint_thread}})
    assert (
        state.values["messages"][-1].content == "sent: Draft: the weather is sunny, 21 C in Paris."
    )
    with DbSession(engine) as db:
        rows = db.exec(
            select(SessionEvent.type, SessionEvent.payload)
            .where(SessionEvent.run_id == run_id)
            .order_by(SessionEvent.seq)
        ).all()
    kinds = [kind if kind != "graph_update" else payload["node"] for kind, payload in rows]
    assert kinds == [
        "run_created",
        "run_started",
        "agent",
        "tools",
        "agent",
        "run_waiting_input",
        "run_resumed",
        "review",
        "run_completed",
    ]
    assert _run(engine, run_id).metrics == {"graph_steps": 1}
