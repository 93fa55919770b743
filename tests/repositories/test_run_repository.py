"""RunRepository on both backends: the state machine, lifecycle events, races, listing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlmodel import Session as DbSession

from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    InvalidTransitionError,
    ReadOnlyFieldError,
    RunNotFoundError,
    SessionNotFoundError,
    ValidationFailedError,
)
from app.models import RunStatus, SessionEvent, SessionRun, TriggerSource
from app.repositories import EventRepository, RunRepository
from app.schemas import RunResumeRequest
from app.state_machine import TRANSITIONS, Transition
from tests.concurrency import in_own_transaction, race, seed
from tests.factories import SessionFactory, SessionRunFactory

# How each transition is called, with arguments that are valid for it.
CALLS: dict[str, Callable[[RunRepository, str], Any]] = {
    "start": lambda repo, run_id: repo.start(run_id),
    "wait_for_input": lambda repo, run_id: repo.wait_for_input(run_id, "pick a style"),
    "resume": lambda repo, run_id: repo.resume(run_id, {"user_feedback": "blue"}),
    "complete": lambda repo, run_id: repo.complete(run_id, {"tokens": 10}),
    "fail": lambda repo, run_id: repo.fail(run_id, {"code": "boom"}),
    "cancel": lambda repo, run_id: repo.cancel(run_id)[0],
}
CASES = [(t, status) for t in TRANSITIONS for status in RunStatus]


def lifecycle(db: DbSession, run_id: str) -> list[str]:
    rows = db.execute(
        select(SessionEvent.type).where(SessionEvent.run_id == run_id).order_by(SessionEvent.seq)
    )
    return list(rows.scalars())


def make_run(status: RunStatus, **fields: Any) -> SessionRun:
    if status is RunStatus.WAITING_INPUT:
        fields.setdefault("waiting_reason", "why")
    return SessionRunFactory(status=status, **fields)


@pytest.fixture
def runs(db: DbSession) -> RunRepository:
    return RunRepository(db)


# ------------------------------------------------------------------ create


def test_create_persists_input_options_and_defaults(db: DbSession, runs: RunRepository) -> None:
    chat = SessionFactory()
    run = runs.create(
        {
            "session_id": chat.id,
            "message": "make slides",
            "generate_now": True,
            "style_reference": {"palette": "blue"},
            "target_pages": ["p1", "p2"],
        },
        checkpoint_ns="ns",
    )
    db.commit()
    db.expire_all()

    stored = db.get(SessionRun, run.id)
    assert len(run.id) == 32 and int(run.id, 16) >= 0
    assert stored.status is RunStatus.QUEUED
    assert stored.trigger_source is TriggerSource.CHAT
    assert stored.input_message == "make slides"
    assert stored.options == {
        "generate_now": True,
        "style_reference": {"palette": "blue"},
        "target_pages": ["p1", "p2"],
    }
    assert stored.checkpoint_thread == f"{chat.id}:{run.id}"
    assert stored.checkpoint_ns == "ns"
    assert stored.created_at.tzinfo is UTC and stored.started_at is None
    assert lifecycle(db, run.id) == ["run_created"]


@pytest.mark.parametrize(
    "body",
    [
        {"session_id": "s", "message": ""},
        {"session_id": "s", "message": "hi", "unknown": 1},
        {"session_id": "s", "message": "hi", "style_reference": "not an object"},
        {"message": "hi"},
    ],
)
def test_create_validates_a_dict_through_the_schema(
    db: DbSession, runs: RunRepository, body: dict[str, Any]
) -> None:
    SessionFactory(id="s")
    with pytest.raises(ValidationFailedError) as caught:
        runs.create(body)
    assert caught.value.status_code == 422
    assert db.scalar(select(func.count()).select_from(SessionRun)) == 0
    assert db.scalar(select(func.count()).select_from(SessionEvent)) == 0


def test_create_in_an_unknown_session_raises_and_writes_nothing(
    db: DbSession, runs: RunRepository
) -> None:
    with pytest.raises(SessionNotFoundError, match="'nope'"):
        runs.create({"session_id": "nope", "message": "hi"})
    assert db.scalar(select(func.count()).select_from(SessionRun)) == 0


def test_create_refuses_a_parent_from_another_session(runs: RunRepository) -> None:
    chat = SessionFactory()
    foreign_parent = SessionRunFactory()
    with pytest.raises(RunNotFoundError, match=foreign_parent.id):
        runs.create({"session_id": chat.id, "message": "x"}, parent_run_id=foreign_parent.id)


def test_create_refuses_an_unknown_trigger_source(runs: RunRepository) -> None:
    chat = SessionFactory()
    with pytest.raises(BadParameterError, match="trigger_source"):
        runs.create({"session_id": chat.id, "message": "x"}, trigger_source="cron")


# -------------------------------------------------------------- transitions


@pytest.mark.parametrize(
    ("transition", "status"), CASES, ids=[f"{t.name}-from-{s.value}" for t, s in CASES]
)
def test_every_transition_from_every_status(
    db: DbSession, runs: RunRepository, transition: Transition, status: RunStatus
) -> None:
    run = make_run(status)
    db.commit()
    allowed = status in transition.sources

    if allowed:
        moved = CALLS[transition.name](runs, run.id)
        assert moved is run  # the session's object, refreshed
        assert moved.status is transition.target
        assert lifecycle(db, run.id) == [transition.event_type.value]
    elif transition.name == "cancel":
        unchanged, changed = runs.cancel(run.id)
        assert (unchanged.status, changed) == (status, False)
        assert lifecycle(db, run.id) == []
    else:
        with pytest.raises(InvalidTransitionError) as caught:
            CALLS[transition.name](runs, run.id)
        error = caught.value
        assert (error.current, error.target) == (status.value, transition.target.value)
        assert set(error.allowed_from) == {s.value for s in transition.sources}
        assert error.status_code == 409
        assert f"run {run.id} is {status.value}" in str(error)
        db.expire_all()
        assert db.get(SessionRun, run.id).status is status
        assert lifecycle(db, run.id) == []


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_transition_of_an_unknown_run_raises_not_found(runs: RunRepository, name: str) -> None:
    with pytest.raises(RunNotFoundError, match="'missing'"):
        CALLS[name](runs, "missing")


def test_timestamps_and_fields_along_a_run_life(db: DbSession, runs: RunRepository) -> None:
    run = runs.create({"session_id": SessionFactory().id, "message": "hi"})
    created = run.updated_at

    runs.start(run.id)
    started = run.started_at
    assert started is not None and started >= created and run.updated_at >= started

    runs.wait_for_input(run.id, "choose a layout")
    assert (run.status, run.waiting_reason) == (RunStatus.WAITING_INPUT, "choose a layout")

    runs.resume(run.id, RunResumeRequest(resume={"user_feedback": "grid"}))
    assert run.started_at == started  # kept on resume
    assert run.waiting_reason is None
    assert run.resume_payload == {"user_feedback": "grid"}
    assert run.finished_at is None

    runs.complete(run.id, {"tokens": 5})
    assert run.finished_at is not None and run.finished_at >= started
    assert run.updated_at == run.finished_at
    db.commit()
    db.expire_all()
    stored = db.get(SessionRun, run.id)
    assert stored.finished_at.tzinfo is UTC and stored.metrics == {"tokens": 5}
    assert lifecycle(db, run.id) == [
        "run_created",
        "run_started",
        "run_waiting_input",
        "run_resumed",
        "run_completed",
    ]


def test_cancel_clears_the_waiting_reason_and_sets_finished_at(
    db: DbSession, runs: RunRepository
) -> None:
    run = make_run(RunStatus.WAITING_INPUT)
    cancelled, changed = runs.cancel(run.id)
    assert changed and cancelled.status is RunStatus.CANCELLED
    assert cancelled.waiting_reason is None and cancelled.finished_at is not None


def test_fail_stores_the_error(runs: RunRepository) -> None:
    run = make_run(RunStatus.RUNNING)
    runs.fail(run.id, {"code": "tool_crash", "detail": {"tool": "render"}})
    assert run.latest_error == {"code": "tool_crash", "detail": {"tool": "render"}}
    assert run.status is RunStatus.FAILED and run.finished_at is not None


def test_complete_merges_metrics_key_by_key_on_both_backends(
    db: DbSession, runs: RunRepository
) -> None:
    run = make_run(
        RunStatus.RUNNING,
        metrics={"tokens": 1, "cost": {"usd": 0.1}, "flag": True, "note": 'a.b "q"'},
    )
    db.commit()
    runs.complete(run.id, {"tokens": 7, "cost": {"eur": 0.2}, "gone": None, "ok": False})
    db.commit()
    db.expire_all()
    assert db.get(SessionRun, run.id).metrics == {
        "tokens": 7,
        "cost": {"eur": 0.2},  # replaced, not merged recursively
        "flag": True,
        "note": 'a.b "q"',
        "gone": None,  # kept as null, not deleted
        "ok": False,
    }


def test_complete_without_metrics_keeps_the_stored_ones(db: DbSession, runs: RunRepository) -> None:
    run = make_run(RunStatus.RUNNING, metrics={"tokens": 3})
    assert runs.complete(run.id).metrics == {"tokens": 3}
    other = make_run(RunStatus.RUNNING, session=SessionFactory())
    assert runs.complete(other.id).metrics == {}


def test_cancel_is_idempotent(db: DbSession, runs: RunRepository) -> None:
    run = make_run(RunStatus.QUEUED)
    first, changed = runs.cancel(run.id)
    finished = first.finished_at
    again, changed_again = runs.cancel(run.id)
    assert (changed, changed_again) == (True, False)
    assert again.status is RunStatus.CANCELLED and again.finished_at == finished
    assert lifecycle(db, run.id) == ["run_cancelled"]


@pytest.mark.parametrize(
    "payload", [None, "text", ["list"], {"bad": float("nan")}, {"nul": "a\x00b"}]
)
def test_a_bad_resume_payload_is_a_400_and_changes_nothing(
    db: DbSession, runs: RunRepository, payload: Any
) -> None:
    run = make_run(RunStatus.WAITING_INPUT)
    db.commit()
    with pytest.raises(BadParameterError) as caught:
        runs.resume(run.id, payload)
    assert caught.value.status_code == 400
    db.expire_all()
    assert db.get(SessionRun, run.id).status is RunStatus.WAITING_INPUT
    assert lifecycle(db, run.id) == []


def test_lifecycle_event_shares_the_transaction_of_the_change(
    db: DbSession, runs: RunRepository
) -> None:
    run = make_run(RunStatus.QUEUED)
    db.commit()
    runs.start(run.id)
    db.rollback()
    db.expire_all()
    assert db.get(SessionRun, run.id).status is RunStatus.QUEUED
    assert lifecycle(db, run.id) == []


# ------------------------------------------------------ one running per session


def test_starting_while_another_run_runs_raises_and_keeps_the_transaction(
    db: DbSession, runs: RunRepository
) -> None:
    chat = SessionFactory()
    running = make_run(RunStatus.RUNNING, session=chat)
    queued = make_run(RunStatus.QUEUED, session=chat)
    waiting = make_run(RunStatus.WAITING_INPUT, session=chat)
    db.commit()

    with pytest.raises(ActiveRunExistsError) as caught:
        runs.start(queued.id)
    assert (caught.value.session_id, caught.value.run_id) == (chat.id, queued.id)
    assert caught.value.active_run_id == running.id
    with pytest.raises(ActiveRunExistsError):
        runs.resume(waiting.id, {"answer": 1})

    # The transaction survived: more work commits.
    runs.complete(running.id)
    runs.start(queued.id)
    db.commit()
    db.expire_all()
    assert db.get(SessionRun, queued.id).status is RunStatus.RUNNING
    assert lifecycle(db, queued.id) == ["run_started"]


def test_concurrent_starts_in_one_session_let_exactly_one_win(engine: Engine) -> None:
    for _round in range(5):

        def setup(db: DbSession) -> list[str]:
            chat = SessionFactory()
            return [make_run(RunStatus.QUEUED, session=chat).id for _ in range(3)]

        ids = seed(engine, setup)
        results = race(
            engine, [lambda db, run_id=run_id: RunRepository(db).start(run_id) for run_id in ids]
        )
        winners = [r for r in results if isinstance(r, SessionRun)]
        losers = [r for r in results if isinstance(r, ActiveRunExistsError)]
        assert len(winners) == 1 and len(losers) == 2, results
        assert {loser.active_run_id for loser in losers} <= {winners[0].id, None}


def test_a_start_that_loses_a_race_gets_active_run_exists(engine: Engine, backend: str) -> None:
    """The second start waits for the first's uncommitted one and then loses, every time.

    PostgreSQL: both pass the UPDATE's NOT EXISTS guard; the unique index makes the
    second wait and then refuses it, which aborts its transaction. SQLite: the second
    waits at BEGIN IMMEDIATE, then the guard sees the committed run.
    """
    first_id, second_id = seed(
        engine,
        lambda db: [
            make_run(RunStatus.QUEUED, session=chat).id
            for chat in [SessionFactory()]
            for _ in range(2)
        ],
    )
    first_started = threading.Event()
    outcome: list[BaseException | SessionRun] = []

    def second() -> None:
        first_started.wait(5)
        with DbSession(engine) as db:
            try:
                outcome.append(RunRepository(db).start(second_id))
            except ActiveRunExistsError as exc:
                outcome.append(exc)
                db.rollback()

    with DbSession(engine) as db:
        RunRepository(db).start(first_id)
        thread = threading.Thread(target=second)
        thread.start()
        first_started.set()
        time.sleep(0.3)  # the second is now waiting on the first
        assert thread.is_alive()
        db.commit()
    thread.join(10)

    assert len(outcome) == 1 and isinstance(outcome[0], ActiveRunExistsError), outcome
    assert outcome[0].run_id == second_id
    # PostgreSQL: refused by the index (nothing more readable); SQLite: by the guard.
    assert (outcome[0].session_id is None) is (backend == "postgresql")
    with DbSession(engine) as db:
        statuses = dict(db.execute(select(SessionRun.id, SessionRun.status)).all())
        assert statuses == {first_id: RunStatus.RUNNING, second_id: RunStatus.QUEUED}
        assert lifecycle(db, second_id) == []  # no run_started for the loser


def test_concurrent_resumes_of_one_run_let_exactly_one_win(engine: Engine) -> None:
    run_id = seed(engine, lambda db: make_run(RunStatus.WAITING_INPUT).id)
    for round_number in range(10):
        results = race(
            engine,
            [
                lambda db, n=n, r=round_number: RunRepository(db).resume(
                    run_id, {"round": r, "n": n}
                )
                for n in range(4)
            ],
        )
        winners = [r for r in results if isinstance(r, SessionRun)]
        refused = [r for r in results if isinstance(r, InvalidTransitionError)]
        assert len(winners) == 1 and len(refused) == 3, results
        assert {error.current for error in refused} == {"running"}
        in_own_transaction(engine, lambda db: RunRepository(db).wait_for_input(run_id, "again"))
    with DbSession(engine) as db:
        assert lifecycle(db, run_id).count("run_resumed") == 10


def test_resume_and_cancel_racing_leave_one_winner_every_round(engine: Engine) -> None:
    for _round in range(10):
        run_id = seed(engine, lambda db: make_run(RunStatus.WAITING_INPUT).id)
        results = race(engine, [_resumer(run_id), _canceller(run_id)] * 2)

        resumed = [r for r in results if isinstance(r, SessionRun)]
        cancels = [r for r in results if isinstance(r, tuple)]
        assert all(
            not isinstance(r, Exception) or isinstance(r, InvalidTransitionError) for r in results
        )
        # Exactly one operation moves the run out of waiting_input: one resume,
        # or a cancel when no resume got there first.
        assert len(resumed) <= 1
        assert [changed for _, changed in cancels].count(True) == 1
        with DbSession(engine) as db:
            events = lifecycle(db, run_id)
            assert db.get(SessionRun, run_id).status is RunStatus.CANCELLED
        expected = ["run_resumed", "run_cancelled"] if resumed else ["run_cancelled"]
        assert events == expected


def _resumer(run_id: str) -> Callable[[DbSession], SessionRun]:
    return lambda db: RunRepository(db).resume(run_id, {"ok": True})


def _canceller(run_id: str) -> Callable[[DbSession], tuple[SessionRun, bool]]:
    return lambda db: RunRepository(db).cancel(run_id)


# ------------------------------------------------------------- stale runs


def _age(db: DbSession, run_id: str, by: timedelta) -> None:
    db.execute(
        update(SessionRun).where(SessionRun.id == run_id).values(updated_at=datetime.now(UTC) - by)
    )
    db.commit()


def test_fail_stale_fails_silent_runs_and_a_late_complete_is_refused(
    db: DbSession, runs: RunRepository
) -> None:
    stale = make_run(RunStatus.RUNNING)
    alive = make_run(RunStatus.RUNNING)
    waiting = make_run(RunStatus.WAITING_INPUT)
    db.commit()
    for run_id in (stale.id, alive.id, waiting.id):
        _age(db, run_id, timedelta(minutes=30))
    runs.heartbeat(alive.id)

    assert runs.fail_stale(timedelta(minutes=10)) == [stale.id]
    db.commit()
    assert stale.status is RunStatus.FAILED and stale.finished_at is not None
    assert stale.latest_error["code"] == "stale_run"
    assert lifecycle(db, stale.id) == ["run_failed"]
    assert alive.status is RunStatus.RUNNING and waiting.status is RunStatus.WAITING_INPUT

    with pytest.raises(InvalidTransitionError, match="is failed; cannot move to completed"):
        runs.complete(stale.id, {"tokens": 1})
    with pytest.raises(InvalidTransitionError):
        runs.heartbeat(stale.id)


def test_fail_stale_refuses_a_non_positive_age(runs: RunRepository) -> None:
    with pytest.raises(BadParameterError, match="older_than"):
        runs.fail_stale(timedelta(0))


# ----------------------------------------------------------- reads, retry


def test_get_refreshes_and_raises_for_unknown(db: DbSession, runs: RunRepository) -> None:
    run = make_run(RunStatus.QUEUED)
    db.commit()
    db.execute(update(SessionRun).where(SessionRun.id == run.id).values(checkpoint_ns="elsewhere"))
    assert runs.get(run.id).checkpoint_ns == "elsewhere"
    assert runs.get_or_none("missing") is None
    with pytest.raises(RunNotFoundError):
        runs.get("missing")


def test_list_for_session_pages_newest_first_with_ties(db: DbSession, runs: RunRepository) -> None:
    chat = SessionFactory()
    same_time = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    created = [make_run(RunStatus.QUEUED, session=chat, created_at=same_time) for _ in range(4)]
    created += [
        make_run(RunStatus.FAILED, session=chat, created_at=same_time + timedelta(seconds=n))
        for n in (1, 2, 3)
    ]
    make_run(RunStatus.QUEUED)  # another db
    db.commit()
    expected = [r.id for r in sorted(created, key=lambda r: (r.created_at, r.id), reverse=True)]

    pages: list[list[str]] = []
    before = None
    while True:
        page = runs.list_for_session(chat.id, limit=2, before=before)
        if not page:
            break
        pages.append([r.id for r in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert [run_id for page in pages for run_id in page] == expected

    failed = runs.list_for_session(chat.id, status="failed", limit=50)
    assert [r.id for r in failed] == expected[:3]
    queued_after = runs.list_for_session(
        chat.id, status=RunStatus.QUEUED, limit=2, before=expected[3]
    )
    assert [r.id for r in queued_after] == expected[4:6]
    with pytest.raises(RunNotFoundError):
        runs.list_for_session(chat.id, before="missing")
    with pytest.raises(BadParameterError, match="limit"):
        runs.list_for_session(chat.id, limit=0)
    with pytest.raises(BadParameterError, match="status"):
        runs.list_for_session(chat.id, status="paused")


def test_list_by_status_children_and_latest_waiting(db: DbSession, runs: RunRepository) -> None:
    chat = SessionFactory()
    base = datetime(2026, 5, 1, tzinfo=UTC)
    old_wait = make_run(RunStatus.WAITING_INPUT, session=chat, created_at=base)
    new_wait = make_run(RunStatus.WAITING_INPUT, session=chat, created_at=base + timedelta(1))
    make_run(RunStatus.COMPLETED, session=chat, created_at=base + timedelta(2))
    db.commit()

    assert [r.id for r in runs.list_by_status(RunStatus.WAITING_INPUT, limit=10)] == [
        old_wait.id,
        new_wait.id,
    ]
    assert [r.id for r in runs.list_by_status("waiting_input", limit=1)] == [old_wait.id]
    assert runs.latest_waiting(chat.id).id == new_wait.id
    assert runs.latest_waiting(SessionFactory().id) is None
    assert runs.children(old_wait.id) == []
    with pytest.raises(RunNotFoundError):
        runs.children("missing")


def test_retry_copies_input_and_options_of_a_failed_run(db: DbSession, runs: RunRepository) -> None:
    failed = make_run(
        RunStatus.FAILED,
        input_message="draw it",
        options={"generate_now": True, "style_reference": None, "target_pages": ["x"]},
    )
    retried = runs.retry(failed.id)
    assert retried.status is RunStatus.QUEUED and retried.id != failed.id
    assert (retried.trigger_source, retried.parent_run_id) == (TriggerSource.RETRY, failed.id)
    assert (retried.input_message, retried.options) == (failed.input_message, failed.options)
    assert retried.checkpoint_thread == f"{failed.session_id}:{retried.id}"
    assert [r.id for r in runs.children(failed.id)] == [retried.id]
    assert lifecycle(db, retried.id) == ["run_created"]

    done = make_run(RunStatus.COMPLETED)
    with pytest.raises(InvalidTransitionError, match="allowed from: cancelled, failed"):
        runs.retry(done.id)


def test_delete_removes_the_run_and_its_events(db: DbSession, runs: RunRepository) -> None:
    run = runs.create({"session_id": SessionFactory().id, "message": "x"})
    db.commit()
    runs.delete(run.id)
    db.commit()
    assert runs.get_or_none(run.id) is None
    assert lifecycle(db, run.id) == []
    with pytest.raises(RunNotFoundError):
        runs.delete(run.id)


def test_lifecycle_events_use_the_session_seq(db: DbSession, runs: RunRepository) -> None:
    chat = SessionFactory()
    EventRepository(db).append(chat.id, "message", {"text": "hi"})
    run = runs.create({"session_id": chat.id, "message": "hi"})
    runs.start(run.id)
    events = EventRepository(db).list_for_run(run.id)
    assert [(e.seq, e.type) for e in events] == [(2, "run_created"), (3, "run_started")]


def test_runs_returned_by_the_repository_track_json_changes(
    engine: Engine, session: DbSession
) -> None:
    """Objects built from Core rows (``app.repositories._rows``) behave like ORM-loaded ones:
    a top-level change to a writable JSON column is saved on commit, in the session's
    identity map, and so is a value assigned and then changed in place."""
    runs = RunRepository(session)
    run = make_run(RunStatus.QUEUED, options={"pages": 1})
    session.commit()

    fetched = runs.get(run.id)
    assert fetched is run  # the session's own instance, refreshed
    fetched.options["pages"] = 2
    session.commit()

    started = runs.start(run.id)
    started.options = {"pages": 2, "style": "a"}  # SQLModel used to untrack this value
    session.commit()
    started.options["style"] = "b"
    session.commit()

    fresh = in_own_transaction(engine, lambda db: RunRepository(db).get(run.id))
    assert fresh.options == {"pages": 2, "style": "b"}

    with DbSession(engine) as db:
        loaded = RunRepository(db).get(run.id)
        loaded.checkpoint_ns = "ns"
        loaded.options["late"] = True
        db.commit()
    fresh = in_own_transaction(engine, lambda db: RunRepository(db).get(run.id))
    assert (fresh.checkpoint_ns, fresh.options["late"]) == ("ns", True)


def test_a_stale_copy_cannot_write_over_a_transition(engine: Engine) -> None:
    """A run loaded before another request completed it: changing the stale copy's
    metrics (in place or by assignment) or status is refused, and what complete()
    merged stays."""
    run_id = seed(engine, lambda db: make_run(RunStatus.RUNNING, metrics={"tokens": 1}).id)
    with DbSession(engine, expire_on_commit=False) as stale_db:
        stale = RunRepository(stale_db).get(run_id)
        stale_db.commit()
        in_own_transaction(engine, lambda db: RunRepository(db).complete(run_id, {"cost": 2}))

        with pytest.raises(ReadOnlyFieldError, match="metrics cannot be changed"):
            stale.metrics = {"tokens": 5}
        with pytest.raises(ReadOnlyFieldError, match="status cannot be changed"):
            stale.status = RunStatus.RUNNING
        stale.metrics["tokens"] = 5  # in place: refused at flush
        with pytest.raises(ReadOnlyFieldError, match="use RunRepository"):
            stale_db.commit()
        stale_db.rollback()

    fresh = in_own_transaction(engine, lambda db: RunRepository(db).get(run_id))
    assert (fresh.status, fresh.metrics) == (RunStatus.COMPLETED, {"tokens": 1, "cost": 2})


def test_update_metrics_merges_in_any_status_and_never_loses_keys(engine: Engine) -> None:
    run_id = seed(engine, lambda db: make_run(RunStatus.RUNNING, metrics={"tokens": 1}).id)
    results = race(
        engine,
        [lambda db, n=n: RunRepository(db).update_metrics(run_id, {f"k{n}": n}) for n in range(4)],
    )
    assert all(isinstance(result, SessionRun) for result in results), results
    in_own_transaction(engine, lambda db: RunRepository(db).complete(run_id, {"cost": 3}))
    final = in_own_transaction(
        engine, lambda db: RunRepository(db).update_metrics(run_id, {"tokens": 9})
    )
    assert final.metrics == {"tokens": 9, "k0": 0, "k1": 1, "k2": 2, "k3": 3, "cost": 3}
    with pytest.raises(RunNotFoundError):
        in_own_transaction(engine, lambda db: RunRepository(db).update_metrics("nope", {}))
    with pytest.raises(BadParameterError, match="metrics"):
        in_own_transaction(
            engine, lambda db: RunRepository(db).update_metrics(run_id, {"x": float("nan")})
        )
