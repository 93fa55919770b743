"""Multitask strategies and Idempotency-Keys under real concurrent transactions, on both backends.

Every race runs workers with their own sessions and commits (``tests.concurrency.race``:
threads released by one barrier; ``run_scripts_together``: processes). What the tests
pin down:

* ``reject``: of racing creates on an empty session exactly one makes a run; the
  others get ``ActiveRunExistsError`` (409) and write nothing.
* ``interrupt``: racing creates serialize on the session row; at the end exactly one
  run is active (the last to commit), every other one is cancelled with exactly one
  ``run_cancelled`` event, and the session's seqs are 1..n.
* ``enqueue``: racing creates all queue.
* keyed ``create`` and ``resume``: duplicates racing (threads and processes) settle on
  one run and one lifecycle event, the others are replays; a key with another body is
  ``IdempotencyKeyReusedError``; keys are scoped; expired keys count as unused and
  ``purge_idempotency_keys`` deletes exactly those; a failed keyed request leaves a key
  that the next request takes over (or none, when rolled back).

The process race is marked ``slow`` (8 interpreters importing the layer: 5-8 s on two
CPUs); the rest takes a few seconds per backend.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, func, select, text
from sqlmodel import Session as DbSession

from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    IdempotencyKeyReusedError,
    InvalidTransitionError,
)
from app.models import (
    IdempotencyKey,
    IdempotencyScope,
    MultitaskStrategy,
    RunStatus,
    SessionEvent,
    SessionRun,
)
from app.repositories import RunRepository
from app.types import UTCDateTime, utc_now
from tests.concurrency import in_own_transaction, race, run_scripts_together, seed
from tests.factories import SessionFactory

WORKERS = 8
ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING_INPUT})
EXPIRE_KEY = text(
    "UPDATE run_idempotency_keys SET expires_at = :past "
    "WHERE scope = :scope AND scope_id = :scope_id AND key = :key"
).bindparams(bindparam("past", type_=UTCDateTime()))


# ------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class Outcome:
    """What one keyed caller got back, read before its session closed."""

    run_id: str
    status: RunStatus
    replayed: bool


def new_session(engine: Engine, session_id: str | None = None) -> str:
    fields = {} if session_id is None else {"id": session_id}
    return seed(engine, lambda db: SessionFactory(**fields).id)


def body(session_id: str, message: str = "make a deck", **extra: Any) -> dict[str, Any]:
    return {"session_id": session_id, "message": message, **extra}


def creator(
    session_id: str,
    message: str = "make a deck",
    *,
    strategy: str = "enqueue",
    key: str | None = None,
    repository: Callable[[DbSession], RunRepository] = RunRepository,
) -> Callable[[DbSession], Outcome]:
    def work(db: DbSession) -> Outcome:
        runs = repository(db)
        run = runs.create(
            body(session_id, message), multitask_strategy=strategy, idempotency_key=key
        )
        return Outcome(run.id, run.status, runs.was_replayed(run))

    return work


def resumer(
    run_id: str, payload: dict[str, Any], key: str | None
) -> Callable[[DbSession], Outcome]:
    def work(db: DbSession) -> Outcome:
        runs = RunRepository(db)
        run = runs.resume(run_id, payload, idempotency_key=key)
        return Outcome(run.id, run.status, runs.was_replayed(run))

    return work


def waiting_run(engine: Engine, session_id: str | None = None) -> str:
    """A run moved through the repository to waiting_input (events 1..3 of its session)."""
    session_id = session_id or new_session(engine)

    def setup(db: DbSession) -> str:
        runs = RunRepository(db)
        run = runs.create(body(session_id))
        runs.start(run.id)
        runs.wait_for_input(run.id, "pick a palette")
        return run.id

    return in_own_transaction(engine, setup)


def events_of(engine: Engine, session_id: str) -> list[SessionEvent]:
    with DbSession(engine) as db:
        statement = (
            select(SessionEvent)
            .where(SessionEvent.session_id == session_id)
            .order_by(SessionEvent.seq)
        )
        return list(db.execute(statement).scalars())


def runs_of(engine: Engine, session_id: str) -> dict[str, SessionRun]:
    with DbSession(engine) as db:
        statement = select(SessionRun).where(SessionRun.session_id == session_id)
        return {run.id: run for run in db.execute(statement).scalars()}


def run_of(engine: Engine, run_id: str) -> SessionRun:
    with DbSession(engine) as db:
        run = db.get(SessionRun, run_id)
        assert run is not None, run_id
        return run


def lifecycle(engine: Engine, run_id: str) -> list[str]:
    with DbSession(engine) as db:
        statement = (
            select(SessionEvent.type)
            .where(SessionEvent.run_id == run_id)
            .order_by(SessionEvent.seq)
        )
        return list(db.execute(statement).scalars())


def keys_in(engine: Engine) -> dict[tuple[str, str, str], IdempotencyKey]:
    with DbSession(engine) as db:
        rows = db.execute(select(IdempotencyKey)).scalars()
        return {(row.scope.value, row.scope_id, row.key): row for row in rows}


def totals(engine: Engine) -> tuple[int, int, int]:
    """Rows in the whole test database: runs, events, idempotency keys."""
    with DbSession(engine) as db:
        return tuple(
            db.scalar(select(func.count()).select_from(model))
            for model in (SessionRun, SessionEvent, IdempotencyKey)
        )


def expire(engine: Engine, scope: IdempotencyScope, scope_id: str, key: str) -> None:
    """Move a key's window into the past with a plain UPDATE, as time passing would."""

    def work(db: DbSession) -> None:
        params = {
            "past": utc_now() - timedelta(seconds=1),
            "scope": scope.value,
            "scope_id": scope_id,
            "key": key,
        }
        assert db.execute(EXPIRE_KEY, params).rowcount == 1

    in_own_transaction(engine, work)


def assert_gapless(events: list[SessionEvent]) -> None:
    assert [event.seq for event in events] == list(range(1, len(events) + 1))


def with_status(runs: dict[str, SessionRun], status: RunStatus) -> set[str]:
    return {run_id for run_id, run in runs.items() if run.status is status}


def the_one(values: Iterable[str]) -> str:
    """The value every caller got: one and the same."""
    distinct = set(values)
    assert len(distinct) == 1, distinct
    return distinct.pop()


def only(results: list[Any], kind: type) -> list[Any]:
    return [result for result in results if isinstance(result, kind)]


# --------------------------------------------------------- multitask strategies


def test_reject_racing_creates_on_an_empty_session_make_exactly_one_run(engine: Engine) -> None:
    session_id = new_session(engine)
    results = race(
        engine, [creator(session_id, f"message {n}", strategy="reject") for n in range(WORKERS)]
    )

    winners = only(results, Outcome)
    refused = only(results, ActiveRunExistsError)
    assert len(winners) == 1 and len(refused) == WORKERS - 1, results
    winner = winners[0].run_id
    assert all(error.status_code == 409 for error in refused)
    assert all((error.session_id, error.run_id) == (session_id, None) for error in refused)
    assert {error.active_run_id for error in refused} == {winner}

    runs = runs_of(engine, session_id)
    assert list(runs) == [winner] and runs[winner].status is RunStatus.QUEUED
    events = events_of(engine, session_id)
    assert [(e.seq, e.type, e.run_id) for e in events] == [(1, "run_created", winner)]
    assert totals(engine) == (1, 1, 0)


def test_interrupt_racing_creates_leave_only_the_last_committed_run_active(
    engine: Engine,
) -> None:
    session_id = new_session(engine)

    def setup(db: DbSession) -> tuple[str, str]:
        runs = RunRepository(db)
        running = runs.create(body(session_id, "first"))
        runs.start(running.id)
        return running.id, runs.create(body(session_id, "second")).id

    running_id, queued_id = in_own_transaction(engine, setup)
    results = race(
        engine, [creator(session_id, f"new {n}", strategy="interrupt") for n in range(WORKERS)]
    )
    assert all(isinstance(result, Outcome) for result in results), results
    created = {result.run_id for result in results}
    assert len(created) == WORKERS

    events = events_of(engine, session_id)
    assert_gapless(events)
    # 3 from the setup, one run_created per new run, one run_cancelled per cancelled run.
    assert len(events) == 3 + WORKERS + (WORKERS + 1)
    order = [e.run_id for e in events[3:] if e.type == "run_created"]  # commit order
    assert set(order) == created

    runs = runs_of(engine, session_id)
    assert [run_id for run_id, run in runs.items() if run.status in ACTIVE] == [order[-1]]
    assert runs[order[-1]].status is RunStatus.QUEUED
    cancelled = {running_id, queued_id, *order[:-1]}
    assert with_status(runs, RunStatus.CANCELLED) == cancelled
    assert all(runs[run_id].finished_at is not None for run_id in cancelled)
    cancellations = Counter(e.run_id for e in events if e.type == "run_cancelled")
    assert cancellations == dict.fromkeys(cancelled, 1)

    # Serialized: each new run cancelled exactly what was active when it committed.
    tail = [(e.type, e.run_id, (e.payload or {}).get("interrupted_by")) for e in events[3:]]
    assert set(tail[:2]) == {
        ("run_cancelled", running_id, order[0]),
        ("run_cancelled", queued_id, order[0]),
    }
    expected = [("run_created", order[0], None)]
    for previous, run_id in pairwise(order):
        expected += [("run_cancelled", previous, run_id), ("run_created", run_id, None)]
    assert tail[2:] == expected
    assert {e.payload["multitask_strategy"] for e in events if e.type == "run_cancelled"} == {
        "interrupt"
    }


def test_enqueue_racing_creates_all_queue_behind_the_running_run(engine: Engine) -> None:
    session_id = new_session(engine)

    def setup(db: DbSession) -> str:
        runs = RunRepository(db)
        running = runs.create(body(session_id, "first"))
        return runs.start(running.id).id

    running_id = in_own_transaction(engine, setup)
    results = race(
        engine, [creator(session_id, f"next {n}", strategy="enqueue") for n in range(WORKERS)]
    )
    assert all(isinstance(result, Outcome) for result in results), results
    created = {result.run_id for result in results}
    assert len(created) == WORKERS

    runs = runs_of(engine, session_id)
    assert set(runs) == created | {running_id}
    assert runs.pop(running_id).status is RunStatus.RUNNING
    assert {run.status for run in runs.values()} == {RunStatus.QUEUED}
    events = events_of(engine, session_id)
    assert_gapless(events)
    assert Counter(e.type for e in events[2:]) == {"run_created": WORKERS}
    assert {e.run_id for e in events[2:]} == created


@pytest.mark.parametrize("seeded", ["empty", "running"])
def test_reject_and_interrupt_racing_leave_one_active_run(engine: Engine, seeded: str) -> None:
    """Interrupts always get through; a reject only when it is the session's first run."""
    session_id = new_session(engine)
    seeded_ids: list[str] = []
    if seeded == "running":

        def setup(db: DbSession) -> str:
            runs = RunRepository(db)
            return runs.start(runs.create(body(session_id, "first")).id).id

        seeded_ids.append(in_own_transaction(engine, setup))
    setup_events = len(events_of(engine, session_id))

    strategies = ["reject", "interrupt"] * (WORKERS // 2)
    results = race(
        engine,
        [creator(session_id, f"{s} {n}", strategy=s) for n, s in enumerate(strategies)],
    )
    by_strategy: dict[str, list[Any]] = {"reject": [], "interrupt": []}
    for strategy, result in zip(strategies, results, strict=True):
        by_strategy[strategy].append(result)
    assert all(isinstance(r, Outcome) for r in by_strategy["interrupt"]), results
    accepted = only(by_strategy["reject"], Outcome)
    refused = only(by_strategy["reject"], ActiveRunExistsError)
    assert len(accepted) + len(refused) == WORKERS // 2, results
    assert len(accepted) <= (1 if seeded == "empty" else 0)

    runs = runs_of(engine, session_id)
    events = events_of(engine, session_id)
    assert_gapless(events)
    order = [e.run_id for e in events[setup_events:] if e.type == "run_created"]
    new_ids = {r.run_id for r in by_strategy["interrupt"]} | {r.run_id for r in accepted}
    assert set(order) == new_ids and len(order) == len(new_ids)
    assert set(runs) == new_ids | set(seeded_ids)
    if accepted:  # a reject succeeds only before any other run exists
        assert order[0] == accepted[0].run_id
    assert {error.active_run_id for error in refused} <= set(runs)

    # The last run to commit is an interrupt's and the only active one.
    assert order[-1] in {r.run_id for r in by_strategy["interrupt"]}
    assert [run_id for run_id, run in runs.items() if run.status in ACTIVE] == [order[-1]]
    cancelled = set(runs) - {order[-1]}
    assert with_status(runs, RunStatus.CANCELLED) == cancelled
    assert Counter(e.run_id for e in events if e.type == "run_cancelled") == dict.fromkeys(
        cancelled, 1
    )
    assert len(events) == setup_events + len(new_ids) + len(cancelled)


# ------------------------------------------------------- keyed create, racing


@pytest.mark.parametrize("strategy", [s.value for s in MultitaskStrategy])
def test_keyed_create_racing_duplicates_settle_on_one_run(engine: Engine, strategy: str) -> None:
    """Replays come back before the strategy runs: no 409 for reject, nothing
    cancelled for interrupt."""
    for round_number in range(3):
        session_id = new_session(engine)
        key = f"create-{round_number}"
        results = race(
            engine, [creator(session_id, strategy=strategy, key=key) for _ in range(WORKERS)]
        )
        assert all(isinstance(result, Outcome) for result in results), results
        run_id = the_one(result.run_id for result in results)
        assert sorted(result.replayed for result in results) == [False] + [True] * (WORKERS - 1)
        assert {result.status for result in results} == {RunStatus.QUEUED}

        assert list(runs_of(engine, session_id)) == [run_id]
        assert run_of(engine, run_id).status is RunStatus.QUEUED
        events = events_of(engine, session_id)
        assert [(e.seq, e.type, e.run_id) for e in events] == [(1, "run_created", run_id)]
        assert keys_in(engine)[("create", session_id, key)].run_id == run_id
    assert totals(engine) == (3, 3, 3)


KEYED_CREATE_PROCESS = textwrap.dedent(
    """
    import json
    import sys

    from app.db import create_db_engine, unit_of_work
    from app.repositories import RunRepository

    url, session_id, key, strategy = sys.argv[1:5]
    engine = create_db_engine(url)
    with engine.connect():  # connected (SQLite: in WAL mode) before the start
        pass
    print("ready", flush=True)
    sys.stdin.readline()
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.create(
            {"session_id": session_id, "message": "make a deck"},
            multitask_strategy=strategy,
            idempotency_key=key,
        )
        replayed = runs.was_replayed(run)
    print(json.dumps({"run_id": run.id, "replayed": replayed}), flush=True)
    engine.dispose()
    """
)


@pytest.mark.slow  # each process spends about a second importing the layer
def test_keyed_create_racing_across_processes_settles_on_one_run(
    engine: Engine, database_url: str
) -> None:
    """The key's primary key decides between processes too (interrupt: a second
    execution would cancel the first run)."""
    session_id = new_session(engine)
    outputs = run_scripts_together(
        KEYED_CREATE_PROCESS,
        [database_url, session_id, "process-key", "interrupt"],
        count=WORKERS,
        timeout=60,
    )
    answers = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    run_id = the_one(answer["run_id"] for answer in answers)
    assert sorted(answer["replayed"] for answer in answers) == [False] + [True] * (WORKERS - 1)

    runs = runs_of(engine, session_id)
    assert list(runs) == [run_id] and runs[run_id].status is RunStatus.QUEUED
    events = events_of(engine, session_id)
    assert [(e.seq, e.type, e.run_id) for e in events] == [(1, "run_created", run_id)]
    assert keys_in(engine)[("create", session_id, "process-key")].run_id == run_id


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_keyed_create_waits_for_the_open_request_with_its_key(
    engine: Engine, outcome: str
) -> None:
    """The second request with a key waits while the first is open; it replays the
    first's run if that commits, and executes itself if that rolls back."""
    session_id = new_session(engine)
    first_open = threading.Event()
    second: list[Outcome | BaseException] = []

    def second_request() -> None:
        first_open.wait(5)
        try:
            second.append(in_own_transaction(engine, creator(session_id, key="k")))
        except BaseException as exc:  # reported by the assertion below
            second.append(exc)

    thread = threading.Thread(target=second_request)
    with DbSession(engine, expire_on_commit=False) as db:
        first = creator(session_id, key="k")(db)
        assert not first.replayed
        thread.start()
        first_open.set()
        time.sleep(0.3)
        assert thread.is_alive(), second  # waiting for the first request's transaction
        if outcome == "commit":
            db.commit()
        else:
            db.rollback()
    thread.join(10)

    assert len(second) == 1 and isinstance(second[0], Outcome), second
    runs = runs_of(engine, session_id)
    if outcome == "commit":
        assert (second[0].run_id, second[0].replayed) == (first.run_id, True)
    else:
        assert second[0].run_id != first.run_id and not second[0].replayed
    assert list(runs) == [second[0].run_id]
    assert [e.type for e in events_of(engine, session_id)] == ["run_created"]
    assert keys_in(engine)[("create", session_id, "k")].run_id == second[0].run_id


# ------------------------------------------------------- keyed resume, racing


def test_keyed_resume_racing_duplicates_resume_once(engine: Engine) -> None:
    run_id = waiting_run(engine)
    session_id = run_of(engine, run_id).session_id
    for round_number in range(3):
        key = f"resume-{round_number}"
        payload = {"user_feedback": "ocean blues", "round": round_number}
        results = race(engine, [resumer(run_id, payload, key) for _ in range(WORKERS)])

        assert all(isinstance(result, Outcome) for result in results), results
        assert {(result.run_id, result.status) for result in results} == {
            (run_id, RunStatus.RUNNING)
        }
        assert sorted(result.replayed for result in results) == [False] + [True] * (WORKERS - 1)
        run = run_of(engine, run_id)
        assert run.status is RunStatus.RUNNING and run.resume_payload == payload
        assert lifecycle(engine, run_id).count("run_resumed") == round_number + 1
        assert keys_in(engine)[("resume", run_id, key)].run_id == run_id
        in_own_transaction(engine, lambda db: RunRepository(db).wait_for_input(run_id, "again"))

    events = events_of(engine, session_id)
    assert_gapless(events)
    assert [e.type for e in events[3:]] == ["run_resumed", "run_waiting_input"] * 3


# --------------------------------------------- one key, different bodies at once


def test_one_create_key_with_different_bodies_at_once_lets_one_win(engine: Engine) -> None:
    session_id = new_session(engine)
    results = race(
        engine, [creator(session_id, f"message {n}", key="shared") for n in range(WORKERS)]
    )
    winners = only(results, Outcome)
    reused = only(results, IdempotencyKeyReusedError)
    assert len(winners) == 1 and len(reused) == WORKERS - 1, results
    assert not winners[0].replayed
    assert {(e.status_code, e.scope, e.scope_id) for e in reused} == {(422, "create", session_id)}

    runs = runs_of(engine, session_id)
    assert list(runs) == [winners[0].run_id]
    winner_message = f"message {results.index(winners[0])}"
    assert runs[winners[0].run_id].input_message == winner_message
    assert [e.type for e in events_of(engine, session_id)] == ["run_created"]
    assert totals(engine) == (1, 1, 1)


def test_one_resume_key_with_different_answers_at_once_lets_one_win(engine: Engine) -> None:
    run_id = waiting_run(engine)
    payloads = [{"answer": n} for n in range(WORKERS)]
    results = race(engine, [resumer(run_id, payload, "shared") for payload in payloads])
    winners = only(results, Outcome)
    reused = only(results, IdempotencyKeyReusedError)
    assert len(winners) == 1 and len(reused) == WORKERS - 1, results
    assert {(e.scope, e.scope_id) for e in reused} == {("resume", run_id)}

    run = run_of(engine, run_id)
    assert run.status is RunStatus.RUNNING
    assert run.resume_payload == payloads[results.index(winners[0])]
    assert lifecycle(engine, run_id).count("run_resumed") == 1


# ------------------------------------------------------ sequential reuse, scoping


def test_a_create_key_reused_for_another_request_writes_nothing(engine: Engine) -> None:
    session_id = new_session(engine)
    first = in_own_transaction(engine, creator(session_id, "original", key="k"))
    before = totals(engine)
    stored = keys_in(engine)[("create", session_id, "k")]

    others: list[Callable[[RunRepository], Any]] = [
        lambda runs: runs.create(body(session_id, "another message"), idempotency_key="k"),
        lambda runs: runs.create(
            body(session_id, "original"), multitask_strategy="reject", idempotency_key="k"
        ),
        lambda runs: runs.create(
            body(session_id, "original", target_pages=["p1"]), idempotency_key="k"
        ),
        lambda runs: runs.create(
            body(session_id, "original"), checkpoint_ns="ns", idempotency_key="k"
        ),
    ]
    for call in others:

        def refused(db: DbSession, call: Callable[[RunRepository], Any] = call) -> None:
            with pytest.raises(IdempotencyKeyReusedError):
                call(RunRepository(db))  # then committed: the refusal wrote nothing

        in_own_transaction(engine, refused)

    assert totals(engine) == before
    after = keys_in(engine)[("create", session_id, "k")]
    assert (after.request_hash, after.run_id, after.created_at, after.expires_at) == (
        stored.request_hash,
        first.run_id,
        stored.created_at,
        stored.expires_at,
    )
    # The original request still replays.
    again = in_own_transaction(engine, creator(session_id, "original", key="k"))
    assert (again.run_id, again.replayed) == (first.run_id, True)
    assert totals(engine) == before


def test_a_resume_key_reused_for_another_answer_writes_nothing(engine: Engine) -> None:
    run_id = waiting_run(engine)
    in_own_transaction(engine, resumer(run_id, {"answer": "blue"}, "k"))
    in_own_transaction(engine, lambda db: RunRepository(db).wait_for_input(run_id, "again"))
    before = totals(engine)

    with pytest.raises(IdempotencyKeyReusedError):
        in_own_transaction(engine, resumer(run_id, {"answer": "red"}, "k"))
    # The same answer with the same key is a replay: the run is returned as it is.
    replay = in_own_transaction(engine, resumer(run_id, {"answer": "blue"}, "k"))
    assert (replay.status, replay.replayed) == (RunStatus.WAITING_INPUT, True)

    assert totals(engine) == before
    run = run_of(engine, run_id)
    assert (run.status, run.resume_payload) == (RunStatus.WAITING_INPUT, {"answer": "blue"})
    assert lifecycle(engine, run_id).count("run_resumed") == 1


def test_keys_are_scoped_to_their_session_run_and_kind(engine: Engine) -> None:
    one, two = new_session(engine), new_session(engine)
    in_one = in_own_transaction(engine, creator(one, key="k"))
    in_two = in_own_transaction(engine, creator(two, key="k"))
    assert in_one.run_id != in_two.run_id and not in_two.replayed

    # The same key on the resumes of two runs: independent.
    first_waiting, second_waiting = waiting_run(engine), waiting_run(engine)
    resumed = [
        in_own_transaction(engine, resumer(run_id, {"answer": 1}, "k"))
        for run_id in (first_waiting, second_waiting)
    ]
    assert [(r.run_id, r.status, r.replayed) for r in resumed] == [
        (first_waiting, RunStatus.RUNNING, False),
        (second_waiting, RunStatus.RUNNING, False),
    ]

    # A create key and a resume key with one scope_id (a session whose id is a run's):
    # the scopes keep them apart.
    third_waiting = waiting_run(engine)
    twin = new_session(engine, session_id=third_waiting)
    created = in_own_transaction(engine, creator(twin, key="k"))
    resumed_third = in_own_transaction(engine, resumer(third_waiting, {"answer": 3}, "k"))
    assert not created.replayed and not resumed_third.replayed
    assert (resumed_third.run_id, resumed_third.status) == (third_waiting, RunStatus.RUNNING)
    assert in_own_transaction(engine, creator(twin, key="k")) == Outcome(
        created.run_id, RunStatus.QUEUED, True
    )
    assert in_own_transaction(engine, resumer(third_waiting, {"answer": 3}, "k")) == Outcome(
        third_waiting, RunStatus.RUNNING, True
    )

    keys = keys_in(engine)
    assert {scope_key: row.run_id for scope_key, row in keys.items()} == {
        ("create", one, "k"): in_one.run_id,
        ("create", two, "k"): in_two.run_id,
        ("resume", first_waiting, "k"): first_waiting,
        ("resume", second_waiting, "k"): second_waiting,
        ("create", third_waiting, "k"): created.run_id,
        ("resume", third_waiting, "k"): third_waiting,
    }


# ---------------------------------------------------------- expiry and purge


def test_an_expired_create_key_makes_a_new_run(engine: Engine) -> None:
    session_id = new_session(engine)
    first = in_own_transaction(engine, creator(session_id, key="k"))
    expire(engine, IdempotencyScope.CREATE, session_id, "k")

    second = in_own_transaction(engine, creator(session_id, key="k"))
    assert second.run_id != first.run_id and not second.replayed
    stored = keys_in(engine)[("create", session_id, "k")]
    assert stored.run_id == second.run_id and stored.expires_at > utc_now()
    again = in_own_transaction(engine, creator(session_id, key="k"))
    assert (again.run_id, again.replayed) == (second.run_id, True)

    # Expired, the key is free for another request too.
    expire(engine, IdempotencyScope.CREATE, session_id, "k")
    third = in_own_transaction(engine, creator(session_id, "something else", key="k"))
    assert third.run_id not in {first.run_id, second.run_id} and not third.replayed
    assert set(runs_of(engine, session_id)) == {first.run_id, second.run_id, third.run_id}
    assert [e.type for e in events_of(engine, session_id)] == ["run_created"] * 3


def test_an_expired_resume_key_resumes_again(engine: Engine) -> None:
    run_id = waiting_run(engine)
    in_own_transaction(engine, resumer(run_id, {"answer": "blue"}, "k"))
    in_own_transaction(engine, lambda db: RunRepository(db).wait_for_input(run_id, "again"))
    expire(engine, IdempotencyScope.RESUME, run_id, "k")

    again = in_own_transaction(engine, resumer(run_id, {"answer": "blue"}, "k"))
    assert (again.status, again.replayed) == (RunStatus.RUNNING, False)
    assert lifecycle(engine, run_id).count("run_resumed") == 2


def test_an_expired_key_raced_by_duplicates_makes_exactly_one_new_run(engine: Engine) -> None:
    session_id = new_session(engine)
    old = in_own_transaction(engine, creator(session_id, strategy="interrupt", key="k"))
    expire(engine, IdempotencyScope.CREATE, session_id, "k")

    results = race(
        engine, [creator(session_id, strategy="interrupt", key="k") for _ in range(WORKERS)]
    )
    assert all(isinstance(result, Outcome) for result in results), results
    new_id = the_one(result.run_id for result in results)
    assert new_id != old.run_id
    assert sorted(result.replayed for result in results) == [False] + [True] * (WORKERS - 1)
    runs = runs_of(engine, session_id)
    assert {run_id: run.status for run_id, run in runs.items()} == {
        old.run_id: RunStatus.CANCELLED,
        new_id: RunStatus.QUEUED,
    }
    assert [(e.type, e.run_id) for e in events_of(engine, session_id)] == [
        ("run_created", old.run_id),
        ("run_cancelled", old.run_id),
        ("run_created", new_id),
    ]


def test_purge_deletes_exactly_the_expired_keys(engine: Engine) -> None:
    session_id = new_session(engine)
    for n in range(5):
        in_own_transaction(engine, creator(session_id, f"message {n}", key=f"k{n}"))
    run_id = waiting_run(engine)
    in_own_transaction(engine, resumer(run_id, {"answer": 1}, "r"))
    for key in ("k1", "k3"):
        expire(engine, IdempotencyScope.CREATE, session_id, key)
    expire(engine, IdempotencyScope.RESUME, run_id, "r")
    runs_before, events_before, _ = totals(engine)

    assert in_own_transaction(engine, lambda db: RunRepository(db).purge_idempotency_keys()) == 3
    assert set(keys_in(engine)) == {("create", session_id, key) for key in ("k0", "k2", "k4")}
    assert totals(engine) == (runs_before, events_before, 3)  # the runs stay
    assert in_own_transaction(engine, lambda db: RunRepository(db).purge_idempotency_keys()) == 0
    assert len(keys_in(engine)) == 3


def test_the_window_sets_expires_at(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def window_of(scope: str, scope_id: str, key: str) -> timedelta:
        row = keys_in(engine)[(scope, scope_id, key)]
        assert abs(row.created_at - utc_now()) < timedelta(minutes=1)
        return row.expires_at - row.created_at

    session_id = new_session(engine)
    seven_minutes = lambda db: RunRepository(db, idempotency_window=timedelta(minutes=7))  # noqa: E731
    in_own_transaction(engine, creator(session_id, key="seven", repository=seven_minutes))
    assert window_of("create", session_id, "seven") == timedelta(minutes=7)

    run_id = waiting_run(engine)

    def resume_with_window(db: DbSession) -> None:
        repository = RunRepository(db, idempotency_window=timedelta(seconds=90))
        repository.resume(run_id, {"answer": 1}, idempotency_key="ninety")

    in_own_transaction(engine, resume_with_window)
    assert window_of("resume", run_id, "ninety") == timedelta(seconds=90)

    monkeypatch.delenv("RUN_IDEMPOTENCY_WINDOW_SECONDS", raising=False)
    in_own_transaction(engine, creator(session_id, key="default"))
    assert window_of("create", session_id, "default") == timedelta(hours=24)
    monkeypatch.setenv("RUN_IDEMPOTENCY_WINDOW_SECONDS", "120")
    in_own_transaction(engine, creator(session_id, key="environment"))
    assert window_of("create", session_id, "environment") == timedelta(seconds=120)

    with DbSession(engine) as db:
        for window in (timedelta(0), timedelta(seconds=-1)):
            with pytest.raises(BadParameterError):
                RunRepository(db, idempotency_window=window)


# ------------------------------------------------------- failed keyed requests


def test_a_failed_keyed_request_rolled_back_leaves_no_key(engine: Engine) -> None:
    # resume of a run that is not waiting for input
    session_id = new_session(engine)
    queued = in_own_transaction(engine, creator(session_id))
    with pytest.raises(InvalidTransitionError):
        in_own_transaction(engine, resumer(queued.run_id, {"answer": 1}, "resume-key"))
    assert keys_in(engine) == {}

    def to_waiting(db: DbSession) -> None:
        RunRepository(db).start(queued.run_id)
        RunRepository(db).wait_for_input(queued.run_id, "now")

    in_own_transaction(engine, to_waiting)
    retry = in_own_transaction(engine, resumer(queued.run_id, {"answer": 1}, "resume-key"))
    assert (retry.status, retry.replayed) == (RunStatus.RUNNING, False)
    assert lifecycle(engine, queued.run_id).count("run_resumed") == 1

    # create with reject while the session has an active run
    before = totals(engine)
    with pytest.raises(ActiveRunExistsError):
        in_own_transaction(engine, creator(session_id, strategy="reject", key="create-key"))
    assert totals(engine) == before
    assert ("create", session_id, "create-key") not in keys_in(engine)
    in_own_transaction(engine, lambda db: RunRepository(db).complete(queued.run_id))
    created = in_own_transaction(engine, creator(session_id, strategy="reject", key="create-key"))
    assert (created.status, created.replayed) == (RunStatus.QUEUED, False)
    assert keys_in(engine)[("create", session_id, "create-key")].run_id == created.run_id


def test_a_failed_keyed_request_committed_anyway_leaves_a_key_the_next_one_takes_over(
    engine: Engine,
) -> None:
    session_id = new_session(engine)
    queued = in_own_transaction(engine, creator(session_id))

    def failing_resume(db: DbSession) -> None:
        with pytest.raises(InvalidTransitionError):
            resumer(queued.run_id, {"answer": "old"}, "resume-key")(db)

    in_own_transaction(engine, failing_resume)  # the caller commits after the error
    left = keys_in(engine)[("resume", queued.run_id, "resume-key")]
    assert left.run_id is None

    def to_waiting(db: DbSession) -> None:
        RunRepository(db).start(queued.run_id)
        RunRepository(db).wait_for_input(queued.run_id, "now")

    in_own_transaction(engine, to_waiting)
    # Taken over, also by a request with another body.
    resumed = in_own_transaction(engine, resumer(queued.run_id, {"answer": "new"}, "resume-key"))
    assert (resumed.status, resumed.replayed) == (RunStatus.RUNNING, False)
    taken = keys_in(engine)[("resume", queued.run_id, "resume-key")]
    assert taken.run_id == queued.run_id and taken.request_hash != left.request_hash
    assert run_of(engine, queued.run_id).resume_payload == {"answer": "new"}
    assert lifecycle(engine, queued.run_id).count("run_resumed") == 1
    replay = in_own_transaction(engine, resumer(queued.run_id, {"answer": "new"}, "resume-key"))
    assert replay.replayed
    with pytest.raises(IdempotencyKeyReusedError):
        in_own_transaction(engine, resumer(queued.run_id, {"answer": "old"}, "resume-key"))

    # create with reject, refused, committed anyway
    def failing_create(db: DbSession) -> None:
        with pytest.raises(ActiveRunExistsError):
            creator(session_id, strategy="reject", key="create-key")(db)

    runs_before = len(runs_of(engine, session_id))
    in_own_transaction(engine, failing_create)
    assert keys_in(engine)[("create", session_id, "create-key")].run_id is None
    assert len(runs_of(engine, session_id)) == runs_before
    in_own_transaction(engine, lambda db: RunRepository(db).complete(queued.run_id))
    created = in_own_transaction(engine, creator(session_id, strategy="reject", key="create-key"))
    assert (created.status, created.replayed) == (RunStatus.QUEUED, False)
    assert keys_in(engine)[("create", session_id, "create-key")].run_id == created.run_id
    assert len(runs_of(engine, session_id)) == runs_before + 1
