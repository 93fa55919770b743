"""Load: concurrent workers collide on the same runs and sessions; the database stays lawful.

Threads (each with its own ``sqlmodel.Session`` on one engine) and, on SQLite,
separate processes on the same file, drive a fixed number of operations
(``workers.drive``). Then only the database is consulted
(``invariants.violations``): every run's lifecycle events form a legal path of
the state machine ending in its stored status, seqs are exactly 1..n per
session, no session has two running runs, no event_id is stored twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine

from app.models import ChatSession
from tests.concurrency import seed
from tests.reliability import invariants
from tests.reliability.figures import record
from tests.reliability.workers import Tally, drive

pytestmark = pytest.mark.slow  # seconds of load, and processes on SQLite

ROOT = Path(__file__).resolve().parents[2]
THREADS = {"sqlite": 4, "postgresql": 6}
PROCESSES_ON_SQLITE = 2
OPERATIONS_PER_WORKER = 150
SESSIONS = 3


def _start_processes(database_url: str, session_ids: list[str]) -> list[subprocess.Popen[str]]:
    """Worker processes, started and waiting for the go on stdin (imports take a while)."""
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.workers",
                "load",
                database_url,
                ",".join(session_ids),
                str(OPERATIONS_PER_WORKER),
                str(1000 + number),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for number in range(PROCESSES_ON_SQLITE)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return processes


def _finish_processes(processes: list[subprocess.Popen[str]]) -> Tally:
    total = Tally()
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"load process failed with {process.returncode}"
        total.add(Tally(**json.loads(out.strip().splitlines()[-1])))
    return total


def test_concurrent_lifecycles_leave_no_violation(
    engine: Engine, database_url: str, backend: str
) -> None:
    session_ids = seed(
        engine, lambda db: [db.merge(ChatSession(title=f"load {n}")).id for n in range(SESSIONS)]
    )
    processes = _start_processes(database_url, session_ids) if backend == "sqlite" else []
    threads = THREADS[backend]
    barrier = threading.Barrier(threads)

    def worker(number: int) -> Tally:
        barrier.wait()
        if number == 0:
            for process in processes:
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
        return drive(engine, session_ids, OPERATIONS_PER_WORKER, seed=number)

    total = Tally()
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for tally in pool.map(worker, range(threads)):
                total.add(tally)
    finally:
        total.add(_finish_processes(processes))

    found = invariants.violations(engine)
    record("lifecycle operations", total.operations, backend)
    record("conflicts refused", total.conflicts, backend)
    record("events appended", invariants.count(engine, "session_events"), backend)
    record("violations found", len(found), backend)
    assert found == []
    assert total.operations == OPERATIONS_PER_WORKER * (threads + len(processes))
    # Collisions really happened, and real work got through them.
    assert total.conflicts > 0
    assert invariants.count(engine, "session_runs") > SESSIONS
