"""The run queue with real worker processes, on both backends.

* Many worker processes, released at one moment, drain a queue of runs spread
  over interleaved sessions with ``claim_next`` + ``complete``: every run is
  claimed exactly once, by the worker the database names, never two runs of a
  session at once, and each session's runs start in creation order.
* A worker that is SIGKILLed loses its run once its lease expires
  (``fail_stale``); a worker paused with SIGSTOP past its lease finds, when it
  comes back, that its ``complete`` is refused; only the lease holder can
  extend a lease.

One transaction per operation, as workers do (``app.db.unit_of_work``). The
same rules inside one transaction: ``tests/repositories/test_run_queue.py``.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session as DbSession

from app.db import unit_of_work
from app.errors import InvalidTransitionError, LeaseNotHeldError
from app.models import ChatSession, RunStatus, SessionEvent, SessionRun
from app.repositories import RunRepository
from app.state_machine import RunEventType
from tests.concurrency import run_scripts_together

pytestmark = pytest.mark.slow  # every test starts Python processes

ROOT = Path(__file__).resolve().parents[2]

# (worker processes, sessions, runs per session): the full size would be 8 processes
# and 2,000 runs over 200 sessions; these keep each backend at roughly 10 s on 2 cores.
QUEUE_SIZES = {"postgresql": (6, 60, 10), "sqlite": (4, 20, 10)}
QUEUE_SEED = 20260101
CLAIM_HOLD_S = 0.004
"""A claim's transaction stays open up to this long (uniformly drawn) before its commit."""
WORKER_DEADLINE_S = 60.0
"""A worker still claiming after this long exits non-zero: the test fails, never hangs."""

LIFECYCLE = sorted(set(RunEventType) - {RunEventType.RUN_CREATED})
"""The events of a run's execution: in the drain, only run_started and run_completed."""


def _seed_queue(
    engine: Engine, sessions: int, runs_per_session: int, *, shuffle_seed: int | None = None
) -> dict[str, list[str]]:
    """Queued runs, ``runs_per_session`` per session, created one by one in one transaction:
    round-robin over the sessions, or in an order shuffled with ``shuffle_seed`` (sessions
    still interleave, and now and then a session's runs come back to back). Returns each
    session's run ids in creation order."""
    order = [n for _ in range(runs_per_session) for n in range(sessions)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    created: dict[str, list[str]] = {}
    with unit_of_work(engine) as db:
        chats = [ChatSession(title=f"queue {n}") for n in range(sessions)]
        db.add_all(chats)
        db.flush()
        runs = RunRepository(db)
        for n in order:
            run_ids = created.setdefault(chats[n].id, [])
            run = runs.create({"session_id": chats[n].id, "message": f"turn {len(run_ids)}"})
            run_ids.append(run.id)
    return created


# --------------------------------------------------------------------------
# Many workers drain one queue

DRAIN = textwrap.dedent(
    """
    import os, random, sys, time
    from app.db import create_db_engine, unit_of_work
    from app.models import RunStatus
    from app.repositories import RunRepository

    url, deadline_s, hold_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    engine = create_db_engine(url)
    worker_id = f"worker-{os.getpid()}"
    print("ready", flush=True)
    sys.stdin.readline()  # released together with the other workers
    print(f"worker {worker_id}", flush=True)
    deadline = time.monotonic() + deadline_s
    for _ in range(1_000_000):
        if time.monotonic() > deadline:
            sys.exit(f"{worker_id}: still claiming after {deadline_s} s")
        with unit_of_work(engine) as db:
            run = RunRepository(db).claim_next(worker_id)
            if run is not None:
                # Hold the claim a moment before committing, as a worker that records
                # something with it would: the other claimers then meet locked heads.
                time.sleep(random.uniform(0, hold_s))
        if run is None:
            # Nothing runnable: every head of line is taken, or the queue is empty.
            with unit_of_work(engine, readonly=True) as db:
                left = RunRepository(db).list_by_status(RunStatus.QUEUED, limit=1)
            if not left:
                break
            time.sleep(0.01)
            continue
        with unit_of_work(engine) as db:
            RunRepository(db).complete(run.id, {"completed_by": worker_id})
        print(f"claimed {run.id} {run.session_id}", flush=True)
    else:
        sys.exit(f"{worker_id}: too many iterations")
    print("done", flush=True)
    """
)


def _parse_drain(output: str) -> tuple[str, list[tuple[str, str]]]:
    lines = output.splitlines()
    assert lines and lines[0].startswith("worker "), output[:500]
    assert lines[-1] == "done", output[-500:]
    worker_id = lines[0].split()[1]
    claims = []
    for line in lines[1:-1]:
        word, run_id, session_id = line.split()
        assert word == "claimed", line
        claims.append((run_id, session_id))
    return worker_id, claims


def _lifecycle_by_session(db: DbSession) -> dict[str, list[SessionEvent]]:
    events = db.execute(
        select(SessionEvent)
        .where(SessionEvent.type.in_(LIFECYCLE))
        .order_by(SessionEvent.session_id, SessionEvent.seq)
    ).scalars()
    by_session: dict[str, list[SessionEvent]] = defaultdict(list)
    for event in events:
        by_session[event.session_id].append(event)
    return by_session


def test_concurrent_worker_processes_claim_every_run_exactly_once_in_fifo_order(
    backend: str, engine: Engine, database_url: str
) -> None:
    workers, sessions, runs_per_session = QUEUE_SIZES[backend]
    created = _seed_queue(engine, sessions, runs_per_session, shuffle_seed=QUEUE_SEED)
    run_session = {run_id: sid for sid, run_ids in created.items() for run_id in run_ids}
    assert len(run_session) == sessions * runs_per_session

    with DbSession(engine) as db:
        stored = {run.id: run for run in db.execute(select(SessionRun)).scalars()}
    # The premise of the FIFO check: created_at orders each session's runs as created.
    for run_ids in created.values():
        stamps = [stored[run_id].created_at for run_id in run_ids]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)

    outputs = run_scripts_together(
        DRAIN,
        [database_url, str(WORKER_DEADLINE_S), str(CLAIM_HOLD_S)],
        count=workers,
        timeout=90,
    )

    # ---- what the workers say
    claimed_by: dict[str, list[str]] = defaultdict(list)
    per_worker: Counter[str] = Counter()
    for output in outputs:
        worker_id, claims = _parse_drain(output)
        assert worker_id not in per_worker, "two processes with one worker id"
        per_worker[worker_id] = len(claims)
        for run_id, session_id in claims:
            assert run_session.get(run_id) == session_id, (run_id, session_id)
            claimed_by[run_id].append(worker_id)
    twice = {run_id: by for run_id, by in claimed_by.items() if len(by) > 1}
    assert not twice, f"runs claimed more than once: {dict(list(twice.items())[:5])}"
    assert set(claimed_by) == set(run_session), (
        f"{len(set(run_session) - set(claimed_by))} runs never claimed"
    )
    # The workers really competed: the queue was not drained by one of them alone.
    assert sum(1 for n in per_worker.values() if n > 0) >= 2, per_worker

    # ---- what the database says
    with DbSession(engine) as db:
        stored = {run.id: run for run in db.execute(select(SessionRun)).scalars()}
        by_session = _lifecycle_by_session(db)
    assert set(stored) == set(run_session)
    not_completed = {rid: r.status for rid, r in stored.items() if r.status != RunStatus.COMPLETED}
    assert not not_completed, f"{len(not_completed)} runs not completed: {not_completed}"
    for run_id, run in stored.items():
        (printer,) = claimed_by[run_id]
        assert run.worker_id == printer, (run_id, run.worker_id, printer)
        assert run.metrics == {"completed_by": printer}, (run_id, run.metrics)
        assert run.lease_expires_at is None, run_id  # completing ends the lease

    assert set(by_session) == set(created)
    for session_id, events in by_session.items():
        running: str | None = None
        started: list[str] = []
        for event in events:
            if event.type == "run_started":
                assert running is None, (
                    f"session {session_id}: run {event.run_id} started (seq {event.seq}) "
                    f"while run {running} was running"
                )
                assert event.payload == {"worker_id": stored[event.run_id].worker_id}
                running = event.run_id
                started.append(event.run_id)
            else:
                assert event.type == "run_completed", (session_id, event.seq, event.type)
                assert event.run_id == running, (
                    f"session {session_id}: seq {event.seq} completed run {event.run_id} "
                    f"while run {running} was the one running"
                )
                running = None
        assert running is None, f"session {session_id}: run {running} never completed"
        # Exactly once in the log too, and per-session FIFO.
        assert started == created[session_id], f"session {session_id}: started out of order"


# --------------------------------------------------------------------------
# A killed worker, a paused worker

HOLDER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from app.db import create_db_engine, unit_of_work
    from app.errors import InvalidTransitionError
    from app.repositories import RunRepository

    url, worker_id, lease_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    engine = create_db_engine(url)
    print("ready", flush=True)
    sys.stdin.readline()
    with unit_of_work(engine) as db:
        run = RunRepository(db).claim_next(worker_id, lease=timedelta(seconds=lease_s))
    if run is None:
        sys.exit("nothing to claim")
    print(f"claimed {run.id} {run.lease_expires_at.isoformat()}", flush=True)
    # Outside any transaction from here on: idle until told what to do next.
    for _ in range(10):
        command = sys.stdin.readline().split()
        if not command:
            sys.exit("stdin closed")
        if command[0] == "heartbeat":
            with unit_of_work(engine) as db:
                beat = RunRepository(db).heartbeat(
                    run.id, worker_id=worker_id, lease=timedelta(seconds=float(command[1]))
                )
            print(f"heartbeat {beat.lease_expires_at.isoformat()}", flush=True)
        elif command[0] == "complete":
            try:
                with unit_of_work(engine) as db:
                    RunRepository(db).complete(run.id, {"completed_by": worker_id})
            except InvalidTransitionError as exc:
                print(f"refused {exc.current} {type(exc).__name__}", flush=True)
            else:
                print("completed", flush=True)
            break
    """
)


class Holder:
    """A worker process running ``HOLDER``; its stdout read by a thread, so every wait
    for a line has a timeout."""

    def __init__(self, database_url: str, worker_id: str, lease: timedelta) -> None:
        self.worker_id = worker_id
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, database_url, worker_id, str(lease.total_seconds())],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, word: str, timeout: float = 30) -> list[str]:
        """The next line's words after ``word``, which it must start with."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.worker_id}: no line within {timeout} s (expected {word!r})")
        if line is None:
            self.process.wait(timeout=10)
            pytest.fail(
                f"{self.worker_id} exited {self.process.returncode} instead of saying "
                f"{word!r}: {self.process.stderr.read()}"
            )
        words = line.split()
        assert words[0] == word, f"{self.worker_id}: {line!r} (expected {word!r})"
        return words[1:]

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def state(self) -> str:
        """The process state letter of /proc/<pid>/stat (``T``: stopped)."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]

    def wait_for_state(self, letter: str, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.state() != letter:
            assert time.monotonic() < deadline, f"{self.worker_id}: state {self.state()!r}"
            time.sleep(0.01)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except (OSError, ValueError):  # a pipe already broken by the kill
                pass


def _fail_stale(engine: Engine) -> list[str]:
    with unit_of_work(engine) as db:
        # An hour: the heartbeat rule (runs without a lease) cannot apply, only the leases.
        return RunRepository(db).fail_stale(timedelta(hours=1))


def _run(engine: Engine, run_id: str) -> SessionRun:
    with unit_of_work(engine, readonly=True) as db:
        return RunRepository(db).get(run_id)


def _run_events(engine: Engine, run_id: str) -> list[tuple[str, dict[str, Any] | None]]:
    with DbSession(engine) as db:
        rows = db.execute(
            select(SessionEvent.type, SessionEvent.payload)
            .where(SessionEvent.run_id == run_id)
            .order_by(SessionEvent.seq)
        ).all()
    return [(row.type, row.payload) for row in rows]


def _sleep_until(moment: datetime, margin: float = 0.3) -> None:
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds() + margin))


def test_a_killed_workers_run_is_failed_after_its_lease_and_a_paused_workers_late_complete_is_refused(  # noqa: E501
    engine: Engine, database_url: str
) -> None:
    created = _seed_queue(engine, sessions=2, runs_per_session=2)
    (session_a, (a1, a2)), (session_b, (b1, b2)) = created.items()
    lease = timedelta(seconds=1)
    killed = Holder(database_url, f"killed-{os.getpid()}", lease)
    paused = Holder(database_url, f"paused-{os.getpid()}", lease)
    try:
        for holder in (killed, paused):
            holder.expect("ready")

        # Claims: the killed worker takes session A's head; A is then busy, so the paused
        # worker takes session B's head, not the run behind A's.
        killed.send("go")
        run_k, expiry_k = killed.expect("claimed")
        paused.send("go")
        run_p, expiry_p = paused.expect("claimed")
        assert (run_k, run_p) == (a1, b1)
        claimed_k, claimed_p = _run(engine, run_k), _run(engine, run_p)
        assert claimed_k.worker_id == killed.worker_id
        assert claimed_k.lease_expires_at == datetime.fromisoformat(expiry_k)
        assert claimed_p.worker_id == paused.worker_id
        assert claimed_p.lease_expires_at == datetime.fromisoformat(expiry_p)

        # Only the holder extends a lease: another worker's heartbeat is refused and
        # changes nothing; the holder's own pushes the expiry out.
        with pytest.raises(LeaseNotHeldError) as refused, unit_of_work(engine) as db:
            RunRepository(db).heartbeat(run_k, worker_id="intruder", lease=timedelta(hours=1))
        assert (refused.value.holder, refused.value.caller) == (killed.worker_id, "intruder")
        assert _run(engine, run_k).lease_expires_at == claimed_k.lease_expires_at
        paused.send("heartbeat 3")
        (extended,) = paused.expect("heartbeat")
        expiry_p = datetime.fromisoformat(extended)
        assert _run(engine, run_p).lease_expires_at == expiry_p
        assert expiry_p >= claimed_p.lease_expires_at + timedelta(seconds=1.5)

        # Kill one worker, pause the other (both idle outside any transaction).
        killed.process.send_signal(signal.SIGKILL)
        assert killed.process.wait(timeout=10) == -signal.SIGKILL
        paused.process.send_signal(signal.SIGSTOP)
        paused.wait_for_state("T")

        # Past the killed worker's lease, within the paused worker's extended one.
        _sleep_until(claimed_k.lease_expires_at)
        assert datetime.now(UTC) < expiry_p - timedelta(seconds=0.3), "machine too slow"
        assert _fail_stale(engine) == [run_k]
        assert _run(engine, run_p).status == RunStatus.RUNNING
        # The failed run freed its session: the run behind it is claimable now.
        with unit_of_work(engine) as db:
            next_run = RunRepository(db).claim_next("recovery")
        assert next_run is not None and next_run.id == a2

        # Past the paused worker's lease too.
        _sleep_until(expiry_p)
        assert _fail_stale(engine) == [run_p]
        assert _fail_stale(engine) == []  # each stale run is failed once
        paused.wait_for_state("T")  # it slept through all of it

        # It wakes up and finishes its work: too late.
        paused.process.send_signal(signal.SIGCONT)
        paused.send("complete")
        assert paused.expect("refused") == ["failed", "InvalidTransitionError"]
        assert paused.process.wait(timeout=30) == 0, paused.process.stderr.read()
        # Nor can its lease be revived: the run is no longer running.
        with pytest.raises(InvalidTransitionError), unit_of_work(engine) as db:
            RunRepository(db).heartbeat(run_p, worker_id=paused.worker_id)
    finally:
        killed.close()
        paused.close()

    for run_id, holder in ((run_k, killed), (run_p, paused)):
        run = _run(engine, run_id)
        assert run.status == RunStatus.FAILED, run_id
        assert run.latest_error is not None and run.latest_error["code"] == "stale_run"
        assert run.worker_id == holder.worker_id
        assert run.lease_expires_at is None
        assert run.finished_at is not None
        assert not run.metrics  # the late complete wrote nothing
        events = _run_events(engine, run_id)
        assert [event_type for event_type, _ in events] == [
            "run_created",
            "run_started",
            "run_failed",
        ]
        assert events[1][1] == {"worker_id": holder.worker_id}
        assert events[2][1]["error"]["code"] == "stale_run"
    assert _run(engine, a2).status == RunStatus.RUNNING
    assert _run(engine, b2).status == RunStatus.QUEUED
    assert session_a != session_b
