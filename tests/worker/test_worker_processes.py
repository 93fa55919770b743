"""``python -m app.worker`` as real processes, on both backends (docs/worker.md).

Every wait is bounded (``_until``), every process is killed in ``finally``: a test
fails, it never hangs. Figures (drain time, cancel latency) are printed (``-s``).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session as DbSession
from sqlmodel import select

from app.db import unit_of_work
from app.models import ChatSession, RunStatus, SessionEvent, SessionRun
from app.repositories import RunRepository

pytestmark = pytest.mark.slow  # every test starts worker processes; twins: test_run_worker.py

ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.worker.targets:behave"


@contextmanager
def workers(
    url: str, count: int = 1, *args: str, env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` worker processes; killed at the end whatever happened."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    log = tempfile.TemporaryFile("w+")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "app.worker", TARGET, "--url", url, "--poll", "0.05", *args],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        log.seek(0)
        sys.stderr.write(log.read()[-4000:])
        log.close()


def _until(check: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
    """Poll ``check`` until true; fail after ``timeout`` s saying ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")


def _runs(engine: Engine, ids: list[str]) -> list[SessionRun]:
    with DbSession(engine) as db:
        rows = db.exec(select(SessionRun).where(SessionRun.id.in_(ids))).all()
        return [row for row in rows]


def _status(engine: Engine, run_id: str) -> RunStatus:
    with DbSession(engine) as db:
        return db.get(SessionRun, run_id).status


def _events(engine: Engine, run_id: str) -> list[str]:
    with DbSession(engine) as db:
        rows = db.exec(
            select(SessionEvent.type)
            .where(SessionEvent.run_id == run_id)
            .order_by(SessionEvent.seq)
        ).all()
        return list(rows)


def _create(engine: Engine, messages: list[str], sessions: int = 1) -> list[str]:
    """Runs created round-robin over ``sessions`` new chats; ids in creation order."""
    with unit_of_work(engine) as db:
        chats = [ChatSession(title=f"worker {n}") for n in range(sessions)]
        db.add_all(chats)
        db.flush()
        runs = RunRepository(db)
        return [
            runs.create({"session_id": chats[n % sessions].id, "message": message}).id
            for n, message in enumerate(messages)
        ]


def test_four_worker_processes_drain_200_runs_over_20_sessions(
    engine: Engine, database_url: str
) -> None:
    ids = _create(engine, ["quick"] * 200, sessions=20)
    started = time.monotonic()
    with workers(database_url, 4, "--concurrency", "2") as processes:
        _until(
            lambda: all(r.status is RunStatus.COMPLETED for r in _runs(engine, ids)),
            90,
            "every run completed",
        )
        drained = time.monotonic() - started
        assert all(p.poll() is None for p in processes)
    print(
        f"\n[{engine.dialect.name}] 200 runs / 20 sessions / 4 workers: drained in {drained:.2f} s"
    )
    with DbSession(engine) as db:
        rows = db.exec(
            select(SessionEvent.session_id, SessionEvent.run_id, SessionEvent.type)
            .where(SessionEvent.type.in_(["run_started", "run_completed"]))
            .order_by(SessionEvent.seq)
        ).all()
    by_session: dict[str, list[str]] = {}
    for session_id, run_id, kind in rows:
        if kind == "run_started":
            by_session.setdefault(session_id, []).append(run_id)
    started_order = [run_id for order in by_session.values() for run_id in order]
    assert sorted(started_order) == sorted(ids)  # each run started exactly once
    for order in by_session.values():  # FIFO within each session: creation order
        assert order == [i for i in ids if i in set(order)]
    workers_seen = {r.metrics["worker"] for r in _runs(engine, ids)}
    assert len(workers_seen) >= 2, workers_seen
    assert {r.attempt for r in _runs(engine, ids)} == {1}


def test_a_resumed_run_is_picked_up_and_a_failure_is_recorded(
    engine: Engine, database_url: str
) -> None:
    run_id, failing = _create(engine, ["interrupt:which palette", "fail"], sessions=2)
    with workers(database_url, 1, "--concurrency", "2"):
        _until(lambda: _status(engine, run_id) is RunStatus.WAITING_INPUT, 30, "waiting")
        _until(lambda: _status(engine, failing) is RunStatus.FAILED, 30, "failed")
        with unit_of_work(engine) as db:
            RunRepository(db).resume(run_id, {"palette": "blue"})
        _until(lambda: _status(engine, run_id) is RunStatus.COMPLETED, 30, "resumed run done")
    (run, failed) = sorted(_runs(engine, [run_id, failing]), key=lambda r: r.id != run_id)
    assert run.metrics["resumed"] == {"palette": "blue"}
    assert failed.latest_error == {
        "code": "worker_error",
        "type": "ValueError",
        "message": "boom in the target",
    }
    assert _events(engine, run_id) == [
        "run_created",
        "run_started",
        "run_waiting_input",
        "run_resumed",
        "run_completed",
    ]


def test_a_cancel_reaches_the_running_callable_within_a_second(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    latencies = []
    with workers(database_url, 1, env={"WORKER_TEST_DIR": str(tmp_path)}):
        for _ in range(5):
            (run_id,) = _create(engine, ["hang"])
            _until(lambda: _status(engine, run_id) is RunStatus.RUNNING, 30, "running")  # noqa: B023
            time.sleep(0.1)  # the worker's cancel watcher is following by now
            with unit_of_work(engine) as db:
                RunRepository(db).cancel(run_id)
                sent = time.time()  # just before the commit: includes it
            seen_file = tmp_path / f"{run_id}.cancelled"
            _until(seen_file.exists, 5, "the callable saw the cancel")
            latencies.append(float(seen_file.read_text()) - sent)
    median = statistics.median(latencies)
    print(
        f"\n[{engine.dialect.name}] cancel -> callable: median {median * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms over {len(latencies)}"
    )
    assert max(latencies) < 1.0, latencies
    assert _status(engine, run_id) is RunStatus.CANCELLED


def test_sigterm_gives_the_leases_back_and_another_worker_completes_them(
    engine: Engine, database_url: str
) -> None:
    ids = _create(engine, ["hang", "hang"], sessions=2)
    with workers(database_url, 1, "--concurrency", "2", "--grace", "0.5") as (first,):
        _until(
            lambda: all(r.status is RunStatus.RUNNING for r in _runs(engine, ids)), 30, "running"
        )
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
    runs = _runs(engine, ids)
    assert {r.status for r in runs} == {RunStatus.QUEUED}
    assert {r.worker_id for r in runs} == {None} and {r.attempt for r in runs} == {0}
    for run_id in ids:
        assert _events(engine, run_id)[-1] == "run_requeued"
        assert "run_failed" not in _events(engine, run_id)
    with workers(database_url, 1, "--concurrency", "2", env={"WORKER_HANG": "complete"}):
        _until(lambda: all(r.status is RunStatus.COMPLETED for r in _runs(engine, ids)), 30, "done")


def test_a_sigkilled_workers_run_is_retried_and_completed_by_another(
    engine: Engine, database_url: str
) -> None:
    (run_id,) = _create(engine, ["hang"])
    with workers(database_url, 1, "--lease", "2", "--max-attempts", "5") as (doomed,):
        _until(lambda: _status(engine, run_id) is RunStatus.RUNNING, 30, "running")
        doomed.kill()
        doomed.wait(timeout=10)
    (held,) = _runs(engine, [run_id])
    assert held.status is RunStatus.RUNNING and held.worker_id is not None
    env = {"WORKER_HANG": "complete"}
    with workers(database_url, 1, "--lease", "2", "--max-attempts", "5", env=env):
        _until(
            lambda: _status(engine, run_id) is RunStatus.COMPLETED,
            30,
            lambda: f"completed (events: {_events(engine, run_id)})",
        )
    (run,) = _runs(engine, [run_id])
    # Usually attempt 2; a worker starved of CPU past its lease may have retried it once more.
    assert run.attempt == held.attempt + 1 and run.metrics["attempt"] == run.attempt
    assert run.worker_id != held.worker_id
    events = _events(engine, run_id)
    assert events[-3:] == ["run_retried", "run_started", "run_completed"]
    assert events.count("run_retried") == run.attempt - 1 and "run_failed" not in events
