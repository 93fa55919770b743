"""Workers that drive the repositories the way the Run Service will, in threads or processes.

``drive`` is the load: random run lifecycles and event appends on a few shared
sessions, one unit of work per operation, so that workers keep colliding on
the same runs and the same event counters. The refusals the layer owes them
(``InvalidTransitionError``, ``ActiveRunExistsError``) are counted; anything
else escapes and fails the test.

Run as a module, this file is the child process of the load test (``load``) and
the victim of the SIGKILL tests (``transitions``, ``appends``): those children
journal what they committed, one JSON line written after each commit, so
that the parent can check after the kill that nothing committed was lost.

    python -m tests.reliability.workers load URL SESSIONS OPERATIONS SEED
    python -m tests.reliability.workers transitions|appends URL SESSIONS JOURNAL SEED
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from app.db import create_db_engine
from app.errors import ActiveRunExistsError, InvalidTransitionError
from app.models import RunStatus, SessionRun
from app.repositories import EventRepository, RunRepository

REFUSALS = (InvalidTransitionError, ActiveRunExistsError)
STALE_AFTER = timedelta(milliseconds=300)
"""Short enough that ``fail_stale`` races the workers' own completions."""

EVENT_ID_POOL = 25
"""Few distinct ``event_id``s, so that appends with the same one collide often."""


@dataclass
class Tally:
    """What one worker did; the database, not this, is the judge of correctness."""

    operations: int = 0
    conflicts: int = 0

    def add(self, other: Tally) -> None:
        self.operations += other.operations
        self.conflicts += other.conflicts


Operation = Callable[[DbSession, str, random.Random], None]


def _a_run(db: DbSession, session_id: str, rng: random.Random) -> SessionRun | None:
    runs = RunRepository(db).list_for_session(session_id, limit=8)
    return rng.choice(runs) if runs else None


def _create(db: DbSession, session_id: str, rng: random.Random) -> None:
    RunRepository(db).create({"session_id": session_id, "message": f"load {rng.random()}"})


def _move(db: DbSession, session_id: str, rng: random.Random) -> None:
    """The transition a worker would make on what it read, or a random one now and then.

    What it read may be stale by the time it writes: that is the collision."""
    run = _a_run(db, session_id, rng)
    if run is None:
        return _create(db, session_id, rng)
    runs = RunRepository(db)
    by_status: dict[RunStatus, list[Callable[[], Any]]] = {
        RunStatus.QUEUED: [lambda: runs.start(run.id), lambda: runs.cancel(run.id)],
        RunStatus.RUNNING: [
            lambda: runs.wait_for_input(run.id, f"question {rng.randrange(99)}"),
            lambda: runs.complete(run.id, {"tokens": rng.randrange(1000)}),
            lambda: runs.fail(run.id, {"code": "load", "n": rng.randrange(9)}),
            lambda: runs.heartbeat(run.id),
            lambda: runs.cancel(run.id),
        ],
        RunStatus.WAITING_INPUT: [
            lambda: runs.resume(run.id, {"user_feedback": "go on"}),
            lambda: runs.cancel(run.id),
        ],
        RunStatus.COMPLETED: [lambda: runs.cancel(run.id)],
        RunStatus.FAILED: [lambda: runs.retry(run.id)],
        RunStatus.CANCELLED: [lambda: runs.retry(run.id)],
    }
    if rng.random() < 0.15:
        choices = [action for actions in by_status.values() for action in actions]
    else:
        choices = by_status[RunStatus(run.status)]
    rng.choice(choices)()
    return None


def _append(db: DbSession, session_id: str, rng: random.Random) -> None:
    run = _a_run(db, session_id, rng) if rng.random() < 0.6 else None
    event_id = f"evt-{rng.randrange(EVENT_ID_POOL)}" if rng.random() < 0.4 else None
    EventRepository(db).append(
        session_id,
        "verify_pass" if run else "message",
        {"n": rng.randrange(10**6)},
        run_id=run.id if run else None,
        event_id=event_id,
    )


def _sweep(db: DbSession, _session_id: str, _rng: random.Random) -> None:
    RunRepository(db).fail_stale(STALE_AFTER)


OPERATIONS: tuple[tuple[Operation, int], ...] = (
    (_create, 2),
    (_move, 10),
    (_append, 5),
    (_sweep, 1),
)


def drive(engine: Engine, session_ids: list[str], operations: int, seed: int) -> Tally:
    """``operations`` units of work, each in its own session and committed on its own."""
    rng = random.Random(seed)
    kinds, weights = zip(*OPERATIONS, strict=True)
    tally = Tally()
    for _ in range(operations):
        operation = rng.choices(kinds, weights)[0]
        with DbSession(engine, expire_on_commit=False) as db:
            try:
                operation(db, rng.choice(session_ids), rng)
                db.commit()
            except REFUSALS:
                db.rollback()
                tally.conflicts += 1
        tally.operations += 1
    return tally


# --------------------------------------------------------------------------
# Victims of the SIGKILL tests


class Journal:
    """Append-only record of what was committed, written after each commit.

    ``os.write`` on an ``O_APPEND`` descriptor: each line reaches the kernel
    whole before the next operation starts, so a SIGKILL loses at most the
    line of the last commit, never reports something that was not committed.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record) + "\n").encode())


def read_journal(path: str) -> list[dict[str, Any]]:
    """The complete lines of a journal (a line cut by the kill is not a commit report)."""
    with open(path) as journal:
        lines = journal.read().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n")]


def _hold_open(rng: random.Random) -> None:
    """Keep the transaction open a moment before committing, where a crash hurts most."""
    time.sleep(rng.uniform(0, 0.004))


NEXT_STEP: dict[RunStatus, tuple[str, ...]] = {
    RunStatus.QUEUED: ("start",),
    RunStatus.RUNNING: ("wait_for_input", "wait_for_input", "complete", "fail"),
    RunStatus.WAITING_INPUT: ("resume", "resume", "cancel"),
}


def _step(runs: RunRepository, run: SessionRun, name: str) -> SessionRun:
    arguments: dict[str, tuple[Any, ...]] = {
        "wait_for_input": ("need input",),
        "resume": ({"user_feedback": "ok"},),
        "complete": ({"tokens": 1},),
        "fail": ({"code": "boom"},),
    }
    moved = getattr(runs, name)(run.id, *arguments.get(name, ()))
    return moved[0] if isinstance(moved, tuple) else moved


def move_until_killed(engine: Engine, session_ids: list[str], journal: Journal, seed: int) -> None:
    """Take runs through their lifecycles, one transition per transaction, forever."""
    rng = random.Random(seed)
    current: dict[str, SessionRun | None] = dict.fromkeys(session_ids)
    while True:
        session_id = rng.choice(session_ids)
        with DbSession(engine, expire_on_commit=False) as db:
            runs = RunRepository(db)
            run = current[session_id]
            if run is None or run.status not in NEXT_STEP:
                run = runs.create({"session_id": session_id, "message": "crash me"})
            else:
                run = _step(runs, run, rng.choice(NEXT_STEP[RunStatus(run.status)]))
            seq = EventRepository(db).list_for_run(run.id, limit=1000)[-1].seq
            _hold_open(rng)
            db.commit()
        current[session_id] = run
        journal.write({"run_id": run.id, "status": str(run.status), "seq": seq})


def append_until_killed(
    engine: Engine, session_ids: list[str], journal: Journal, seed: int
) -> None:
    """Bursts of appends, one burst per transaction, forever."""
    rng = random.Random(seed)
    burst_number = 0
    while True:
        burst_number += 1
        session_id = rng.choice(session_ids)
        with DbSession(engine, expire_on_commit=False) as db:
            events = EventRepository(db)
            appended = [
                events.append(
                    session_id,
                    "message",
                    {"burst": burst_number, "i": i},
                    event_id=f"{seed}-{burst_number}-{i}",
                )
                for i in range(rng.randint(1, 12))
            ]
            _hold_open(rng)
            db.commit()
        for event in appended:
            journal.write({"session_id": session_id, "seq": event.seq, "event_id": event.event_id})


def main(argv: list[str]) -> None:
    mode, url, sessions = argv[:3]
    session_ids = sessions.split(",")
    engine = create_db_engine(url)
    if mode == "load":
        operations, seed = int(argv[3]), int(argv[4])
        print("ready", flush=True)
        sys.stdin.readline()  # the parent's go: start together with its threads
        print(json.dumps(asdict(drive(engine, session_ids, operations, seed))), flush=True)
        return
    journal, seed = Journal(argv[3]), int(argv[4])
    {"transitions": move_until_killed, "appends": append_until_killed}[mode](
        engine, session_ids, journal, seed
    )


if __name__ == "__main__":
    main(sys.argv[1:])
