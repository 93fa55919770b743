"""``RunWorker`` in this process (a thread), on both backends: the fast twins of
``test_worker_processes.py``. Every wait is bounded; the worker is stopped in
``finally``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session as DbSession
from sqlmodel import select

from app.db import unit_of_work
from app.feed import close_feed
from app.models import ChatSession, RunStatus, SessionEvent, SessionRun
from app.repositories import RunRepository
from app.worker import RunContext, RunWorker, WaitForInput, load_target
from tests.worker.targets import behave


@contextmanager
def running(
    engine: Engine, target: Callable[[RunContext], Any], **options: Any
) -> Iterator[RunWorker]:
    options = {"lease": timedelta(seconds=5), "poll": 0.02, "grace": 0.2, **options}
    worker = RunWorker(engine, target, **options)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=10)
        close_feed(engine)
        assert not thread.is_alive(), "the worker did not stop"


def _until(check: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout} s")


def _run(engine: Engine, run_id: str) -> SessionRun:
    with DbSession(engine) as db:
        return db.get(SessionRun, run_id)


def _create(engine: Engine, *messages: str) -> list[str]:
    with unit_of_work(engine) as db:
        chats = [ChatSession(title="w") for _ in messages]
        db.add_all(chats)
        db.flush()
        runs = RunRepository(db)
        return [
            runs.create({"session_id": c.id, "message": m}).id
            for c, m in zip(chats, messages, strict=True)
        ]


def _events(engine: Engine, run_id: str) -> list[str]:
    with DbSession(engine) as db:
        query = (
            select(SessionEvent.type)
            .where(SessionEvent.run_id == run_id)
            .order_by(SessionEvent.seq)
        )
        return list(db.exec(query).all())


def test_outcomes_map_to_complete_fail_and_wait_for_input_then_resume(engine: Engine) -> None:
    quick, failing, asking = _create(engine, "quick", "fail", "interrupt:pick one")
    with running(engine, behave, concurrency=2):
        _until(lambda: _run(engine, asking).status is RunStatus.WAITING_INPUT)
        _until(lambda: _run(engine, failing).status is RunStatus.FAILED)
        _until(lambda: _run(engine, quick).status is RunStatus.COMPLETED)
        assert _run(engine, asking).waiting_reason == "pick one"
        with unit_of_work(engine) as db:
            RunRepository(db).resume(asking, {"pick": 2})
        _until(lambda: _run(engine, asking).status is RunStatus.COMPLETED)
    assert _run(engine, asking).metrics["resumed"] == {"pick": 2}
    assert _run(engine, failing).latest_error["type"] == "ValueError"
    assert _run(engine, quick).metrics["attempt"] == 1


def test_a_raised_wait_for_input_and_emitted_events(engine: Engine) -> None:
    def target(context: RunContext) -> None:
        context.emit([{"type": "step", "payload": {"n": 1}}])
        raise WaitForInput("confirm")

    (run_id,) = _create(engine, "x")
    with running(engine, target):
        _until(lambda: _run(engine, run_id).status is RunStatus.WAITING_INPUT)
    assert _events(engine, run_id) == ["run_created", "run_started", "step", "run_waiting_input"]


def test_a_cancel_sets_the_token_of_a_sync_target(engine: Engine) -> None:
    seen: list[str] = []

    def target(context: RunContext) -> None:
        if context.cancelled.wait(10):
            seen.append(context.cancel_reason or "")
            context.check()

    (run_id,) = _create(engine, "x")
    with running(engine, target):
        _until(lambda: _run(engine, run_id).status is RunStatus.RUNNING)
        with unit_of_work(engine) as db:
            RunRepository(db).cancel(run_id)
        _until(lambda: seen, 2)
    assert seen == ["run_cancelled"]
    assert _events(engine, run_id)[-1] == "run_cancelled"  # nothing written after it


def test_a_cancel_raises_cancelled_error_at_an_async_targets_next_await(engine: Engine) -> None:
    seen: list[str] = []

    async def target(context: RunContext) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    (run_id,) = _create(engine, "x")
    with running(engine, target):
        _until(lambda: _run(engine, run_id).status is RunStatus.RUNNING)
        with unit_of_work(engine) as db:
            RunRepository(db).cancel(run_id)
        _until(lambda: seen, 2)
    assert _run(engine, run_id).status is RunStatus.CANCELLED


def test_stop_gives_unfinished_leases_back_after_the_grace_period(engine: Engine) -> None:
    release = threading.Event()

    def target(context: RunContext) -> dict[str, Any]:
        release.wait(5)
        return {}

    slow, fast = _create(engine, "slow", "fast")
    worker = RunWorker(engine, target, concurrency=2, poll=0.02, grace=0.3)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        _until(
            lambda: (
                _run(engine, slow).status is RunStatus.RUNNING
                and _run(engine, fast).status is RunStatus.RUNNING
            )
        )
        worker.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        release.set()
        worker.stop()
        close_feed(engine)
    for run_id in (slow, fast):
        run = _run(engine, run_id)
        assert (run.status, run.worker_id, run.attempt) == (RunStatus.QUEUED, None, 0)
        assert _events(engine, run_id)[-1] == "run_requeued"
    time.sleep(0.1)  # the abandoned targets return now: they must write nothing
    assert _run(engine, slow).status is RunStatus.QUEUED


@pytest.mark.parametrize(
    "spec", ["nocolon", "tests.worker.targets:", ":behave", "tests.worker.targets:missing"]
)
def test_a_bad_target_is_refused(spec: str) -> None:
    with pytest.raises((ValueError, AttributeError)):
        load_target(spec)
