"""The run queue and double texting, in one transaction per test, on both backends.

``claim_next`` (which run is runnable, the lease, the event), leased heartbeats,
``fail_stale`` on expired leases, ``create`` with each ``multitask_strategy``,
and idempotency keys one request at a time. Races between transactions and
processes: ``tests/repositories/test_run_queue_processes.py`` and
``tests/repositories/test_multitask_and_idempotency_races.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlmodel import Session as DbSession

from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    IdempotencyKeyReusedError,
    InvalidTransitionError,
    LeaseNotHeldError,
    SessionNotFoundError,
)
from app.models import IdempotencyKey, MultitaskStrategy, RunStatus, SessionEvent, SessionRun
from app.repositories import RunRepository
from tests.factories import SessionFactory, SessionRunFactory

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def runs(db: DbSession) -> RunRepository:
    return RunRepository(db)


def queued(session: Any, minute: int, **fields: Any) -> SessionRun:
    """A queued run of ``session`` created ``minute`` minutes after T0."""
    created_at = T0 + timedelta(minutes=minute)
    return SessionRunFactory(
        session=session, status=RunStatus.QUEUED, created_at=created_at, **fields
    )


def lifecycle(db: DbSession, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    rows = db.execute(
        select(SessionEvent.type, SessionEvent.payload)
        .where(SessionEvent.run_id == run_id)
        .order_by(SessionEvent.seq)
    )
    return [(row.type, row.payload) for row in rows]


def count(db: DbSession, model: type[Any]) -> int:
    return db.scalar(select(func.count()).select_from(model))


def body(session_id: str, message: str = "three slides", **extra: Any) -> dict[str, Any]:
    return {"session_id": session_id, "message": message, **extra}


# ------------------------------------------------------------------ claim_next


def test_claim_next_takes_the_oldest_runnable_head_across_sessions(
    db: DbSession, runs: RunRepository
) -> None:
    a, b, c = SessionFactory(), SessionFactory(), SessionFactory()
    a1, a2 = queued(a, 1), queued(a, 5)
    b1 = queued(b, 2)
    SessionRunFactory(session=c, status=RunStatus.WAITING_INPUT, waiting_reason="which one")
    queued(c, 0)  # oldest of all, but its session waits for input
    db.commit()

    claimed = [runs.claim_next("w1") for _ in range(2)]
    assert [run.id for run in claimed] == [a1.id, b1.id]
    # a2 is behind a running a1; c's queued run behind a waiting run: nothing runnable.
    assert runs.claim_next("w1") is None
    runs.complete(a1.id)
    assert runs.claim_next("w2").id == a2.id


def test_claim_next_orders_ties_by_id_and_skips_non_queued_runs(
    db: DbSession, runs: RunRepository
) -> None:
    sessions = [SessionFactory() for _ in range(3)]
    same_time = sorted((queued(session, 3) for session in sessions), key=lambda run: run.id)
    SessionRunFactory(status=RunStatus.CANCELLED, created_at=T0)
    SessionRunFactory(status=RunStatus.COMPLETED, created_at=T0)
    db.commit()
    assert [runs.claim_next("w").id for _ in range(3)] == [run.id for run in same_time]
    assert runs.claim_next("w") is None


def test_claim_next_records_the_lease_and_appends_run_started(
    db: DbSession, runs: RunRepository
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    now = datetime.now(UTC)  # the database's clock is this host's; SQLite's counts milliseconds
    before = now.replace(microsecond=now.microsecond // 1000 * 1000)
    claimed = runs.claim_next("worker-7", lease=timedelta(seconds=90))
    assert claimed is run
    assert run.status is RunStatus.RUNNING and run.worker_id == "worker-7"
    assert run.started_at is not None and run.started_at >= before
    assert before + timedelta(seconds=90) <= run.lease_expires_at
    assert run.lease_expires_at <= datetime.now(UTC) + timedelta(seconds=90)
    assert lifecycle(db, run.id) == [("run_started", {"worker_id": "worker-7"})]


def test_claim_next_on_an_empty_queue_writes_nothing(db: DbSession, runs: RunRepository) -> None:
    SessionRunFactory(status=RunStatus.RUNNING)
    db.commit()
    events = count(db, SessionEvent)
    assert runs.claim_next("w") is None
    assert count(db, SessionEvent) == events


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"worker_id": ""}, "worker_id"),
        ({"worker_id": "x" * 256}, "worker_id"),
        ({"worker_id": 5}, "worker_id"),
        ({"worker_id": "w", "lease": timedelta(0)}, "lease"),
        ({"worker_id": "w", "lease": 30}, "lease"),
        ({"worker_id": "w", "lease": timedelta.max}, "lease"),
    ],
)
def test_claim_next_refuses_bad_arguments_and_claims_nothing(
    db: DbSession, runs: RunRepository, kwargs: dict[str, Any], name: str
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    with pytest.raises(BadParameterError, match=name):
        runs.claim_next(**kwargs)
    assert runs.get(run.id).status is RunStatus.QUEUED


def test_list_by_status_queued_is_in_claim_order(db: DbSession, runs: RunRepository) -> None:
    a, b = SessionFactory(), SessionFactory()
    order = [queued(a, 1), queued(b, 2), queued(a, 3)]
    db.commit()
    assert [run.id for run in runs.list_by_status("queued", limit=10)] == [r.id for r in order]


# ----------------------------------------------------------- leases


def test_only_the_lease_holder_extends_the_lease(db: DbSession, runs: RunRepository) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.claim_next("w1", lease=timedelta(seconds=10))
    first_expiry = run.lease_expires_at

    runs.heartbeat(run.id, worker_id="w1", lease=timedelta(minutes=10))
    assert run.lease_expires_at > first_expiry + timedelta(minutes=9)
    extended = run.lease_expires_at
    with pytest.raises(LeaseNotHeldError, match="leased to worker 'w1'; worker 'w2' cannot"):
        runs.heartbeat(run.id, worker_id="w2")
    with pytest.raises(LeaseNotHeldError, match="a caller without a worker_id"):
        runs.heartbeat(run.id)
    assert runs.get(run.id).lease_expires_at == extended


def test_a_run_started_without_a_lease_takes_heartbeats_without_a_worker(
    db: DbSession, runs: RunRepository
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.start(run.id)
    assert run.worker_id is None and run.lease_expires_at is None
    runs.heartbeat(run.id)
    with pytest.raises(LeaseNotHeldError, match="no worker"):
        runs.heartbeat(run.id, worker_id="w1")


def test_waiting_for_input_ends_the_lease_and_resume_starts_without_one(
    db: DbSession, runs: RunRepository
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.claim_next("w1")
    runs.wait_for_input(run.id, "pick a palette")
    assert (run.worker_id, run.lease_expires_at) == (None, None)
    runs.resume(run.id, {"user_feedback": "blue"})
    assert (run.worker_id, run.lease_expires_at) == (None, None)
    runs.complete(run.id)
    assert run.status is RunStatus.COMPLETED and run.lease_expires_at is None


def test_a_terminal_run_keeps_the_worker_that_ended_it(db: DbSession, runs: RunRepository) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.claim_next("w1")
    runs.fail(run.id, {"code": "boom"})
    assert (run.worker_id, run.lease_expires_at) == ("w1", None)


def _expire_lease(db: DbSession, run_id: str) -> None:
    db.execute(
        update(SessionRun)
        .where(SessionRun.id == run_id)
        .values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    db.commit()


def test_fail_stale_fails_expired_leases_whatever_the_heartbeat_age(
    db: DbSession, runs: RunRepository
) -> None:
    expired, alive = queued(SessionFactory(), 1), queued(SessionFactory(), 2)
    unleased = SessionRunFactory(status=RunStatus.RUNNING)
    db.commit()
    runs.claim_next("dead-worker")
    runs.claim_next("live-worker", lease=timedelta(hours=1))
    _expire_lease(db, expired.id)

    assert runs.fail_stale(timedelta(hours=1)) == [expired.id]
    db.commit()
    assert runs.get(expired.id).status is RunStatus.FAILED
    assert expired.latest_error["code"] == "stale_run"
    assert "lease expired" in expired.latest_error["message"]
    assert lifecycle(db, expired.id)[-1][0] == "run_failed"
    assert alive.status is RunStatus.RUNNING and unleased.status is RunStatus.RUNNING
    with pytest.raises(InvalidTransitionError, match="is failed; cannot move to completed"):
        runs.complete(expired.id)
    with pytest.raises(InvalidTransitionError):
        runs.heartbeat(expired.id, worker_id="dead-worker")


def test_fail_stale_leaves_a_leased_run_alone_until_its_lease_expires(
    db: DbSession, runs: RunRepository
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.claim_next("w1", lease=timedelta(hours=1))
    db.execute(
        update(SessionRun)
        .where(SessionRun.id == run.id)
        .values(updated_at=datetime.now(UTC) - timedelta(days=1))
    )
    assert runs.fail_stale(timedelta(minutes=1)) == []
    assert runs.get(run.id).status is RunStatus.RUNNING


# ------------------------------------------------------------- double texting


def active_runs(db: DbSession, session_id: str) -> list[SessionRun]:
    statuses = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING_INPUT)
    return list(
        db.scalars(
            select(SessionRun).where(
                SessionRun.session_id == session_id, SessionRun.status.in_(statuses)
            )
        )
    )


@pytest.mark.parametrize("busy", [RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING_INPUT])
def test_reject_refuses_a_busy_session_and_writes_nothing(
    db: DbSession, runs: RunRepository, busy: RunStatus
) -> None:
    extra = {"waiting_reason": "why"} if busy is RunStatus.WAITING_INPUT else {}
    active = SessionRunFactory(status=busy, **extra)
    db.commit()
    before = (count(db, SessionRun), count(db, SessionEvent))
    with pytest.raises(ActiveRunExistsError, match=f"{active.id} is {busy.value}") as caught:
        runs.create(body(active.session_id), multitask_strategy="reject")
    assert caught.value.status_code == 409 and caught.value.active_run_id == active.id
    assert (count(db, SessionRun), count(db, SessionEvent)) == before


def test_reject_creates_in_an_idle_session(db: DbSession, runs: RunRepository) -> None:
    finished = SessionRunFactory(status=RunStatus.COMPLETED)
    db.commit()
    run = runs.create(body(finished.session_id, multitask_strategy="reject"))
    assert run.status is RunStatus.QUEUED


def test_interrupt_cancels_every_active_run_then_creates(
    db: DbSession, runs: RunRepository
) -> None:
    session = SessionFactory()
    running = SessionRunFactory(session=session, status=RunStatus.RUNNING)
    waiting = SessionRunFactory(session=session, status=RunStatus.WAITING_INPUT, waiting_reason="?")
    waiting_next = SessionRunFactory(session=session, status=RunStatus.QUEUED)
    done = SessionRunFactory(session=session, status=RunStatus.COMPLETED)
    db.commit()

    new = runs.create(body(session.id), multitask_strategy=MultitaskStrategy.INTERRUPT)

    assert [run.id for run in active_runs(db, session.id)] == [new.id]
    for run in (running, waiting, waiting_next):
        assert run.status is RunStatus.CANCELLED and run.finished_at is not None
        payload = {"multitask_strategy": "interrupt", "interrupted_by": new.id}
        assert lifecycle(db, run.id) == [("run_cancelled", payload)]
    assert waiting.waiting_reason is None
    assert done.status is RunStatus.COMPLETED and lifecycle(db, done.id) == []
    seqs = list(
        db.scalars(
            select(SessionEvent.seq)
            .where(SessionEvent.session_id == session.id)
            .order_by(SessionEvent.seq)
        )
    )
    assert seqs == [1, 2, 3, 4]  # three cancellations, then run_created


@pytest.mark.parametrize("strategy", ["reject", "interrupt"])
def test_checking_strategies_in_an_unknown_session_raise_not_found(
    runs: RunRepository, strategy: str
) -> None:
    with pytest.raises(SessionNotFoundError):
        runs.create(body("no-such-session"), multitask_strategy=strategy)


def test_a_strategy_given_twice_must_agree(db: DbSession, runs: RunRepository) -> None:
    session = SessionFactory()
    db.commit()
    with pytest.raises(BadParameterError, match="the body says reject, the argument interrupt"):
        runs.create(body(session.id, multitask_strategy="reject"), multitask_strategy="interrupt")
    with pytest.raises(BadParameterError, match="multitask_strategy: expected one of"):
        runs.create(body(session.id), multitask_strategy="rollback")
    assert count(db, SessionRun) == 0


# ------------------------------------------------------------- idempotency keys


def keys(db: DbSession) -> list[IdempotencyKey]:
    return list(db.scalars(select(IdempotencyKey)))


def test_the_same_keyed_create_returns_the_first_run_and_writes_nothing(
    db: DbSession, runs: RunRepository
) -> None:
    session = SessionFactory()
    db.commit()
    first = runs.create(body(session.id), idempotency_key="k-1")
    assert not runs.was_replayed(first)
    db.commit()
    writes = (count(db, SessionRun), count(db, SessionEvent))

    again = RunRepository(db).create(body(session.id), idempotency_key="k-1")
    replayer = RunRepository(db)
    third = replayer.create(body(session.id), idempotency_key="k-1")
    assert again.id == third.id == first.id and replayer.was_replayed(third)
    assert (count(db, SessionRun), count(db, SessionEvent)) == writes
    (key,) = keys(db)
    assert (key.scope, key.scope_id, key.key, key.run_id) == ("create", session.id, "k-1", first.id)
    assert key.expires_at - key.created_at == timedelta(hours=24)


def test_a_key_reused_for_another_request_is_refused(db: DbSession, runs: RunRepository) -> None:
    session = SessionFactory()
    db.commit()
    runs.create(body(session.id), idempotency_key="k")
    for other in (
        body(session.id, "another message"),
        body(session.id, target_pages=["p1"]),
        body(session.id, multitask_strategy="reject"),
    ):
        with pytest.raises(IdempotencyKeyReusedError, match="different create request") as caught:
            runs.create(other, idempotency_key="k")
        assert caught.value.status_code == 422
    assert count(db, SessionRun) == 1


def test_create_keys_are_scoped_to_the_session(db: DbSession, runs: RunRepository) -> None:
    one, two = SessionFactory(), SessionFactory()
    db.commit()
    first = runs.create(body(one.id), idempotency_key="same")
    second = runs.create(body(two.id), idempotency_key="same")
    assert first.id != second.id and not runs.was_replayed(second)


def test_the_same_keyed_resume_returns_the_run_and_writes_nothing(
    db: DbSession, runs: RunRepository
) -> None:
    run = SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="colors?")
    db.commit()
    resumed = runs.resume(run.id, {"user_feedback": "blue"}, idempotency_key="r")
    assert resumed.status is RunStatus.RUNNING and not runs.was_replayed(resumed)
    events = count(db, SessionEvent)
    again = runs.resume(run.id, {"user_feedback": "blue"}, idempotency_key="r")
    assert again.id == run.id and runs.was_replayed(again)
    assert count(db, SessionEvent) == events
    with pytest.raises(IdempotencyKeyReusedError, match=f"resume request of run {run.id}"):
        runs.resume(run.id, {"user_feedback": "red"}, idempotency_key="r")
    # Without the key, the resume of a running run is a conflict, as always.
    with pytest.raises(InvalidTransitionError):
        runs.resume(run.id, {"user_feedback": "blue"})


def test_a_failed_keyed_resume_leaves_a_key_the_next_request_takes_over(
    db: DbSession, runs: RunRepository
) -> None:
    run = SessionRunFactory(status=RunStatus.QUEUED)
    db.commit()
    with pytest.raises(InvalidTransitionError):
        runs.resume(run.id, {"user_feedback": "blue"}, idempotency_key="r")
    db.commit()  # the caller went on after the 409: the key holds no result
    (key,) = keys(db)
    assert key.run_id is None
    runs.start(run.id)
    runs.wait_for_input(run.id, "now?")
    resumed = runs.resume(run.id, {"user_feedback": "blue"}, idempotency_key="r")
    assert resumed.status is RunStatus.RUNNING and not runs.was_replayed(resumed)


def test_a_key_for_an_unknown_session_or_run_is_not_stored(
    db: DbSession, runs: RunRepository
) -> None:
    with pytest.raises(SessionNotFoundError):
        runs.create(body("no-such-session"), idempotency_key="k")
    with pytest.raises(Exception, match="not found"):
        runs.resume("no-such-run", {"a": 1}, idempotency_key="k")
    assert keys(db) == []


@pytest.mark.parametrize("key", ["", "x" * 256, "ключ", "tab\there", 7])
def test_bad_idempotency_keys_are_a_400(db: DbSession, runs: RunRepository, key: Any) -> None:
    session = SessionFactory()
    db.commit()
    with pytest.raises(BadParameterError, match="idempotency_key"):
        runs.create(body(session.id), idempotency_key=key)
    assert count(db, SessionRun) == 0 and keys(db) == []


def test_an_expired_key_is_a_new_request_and_purge_removes_only_expired_keys(
    db: DbSession,
) -> None:
    session = SessionFactory()
    db.commit()
    runs = RunRepository(db, idempotency_window=timedelta(minutes=5))
    first = runs.create(body(session.id), idempotency_key="old")
    runs.create(body(session.id), idempotency_key="fresh")
    (stored,) = [key for key in keys(db) if key.key == "old"]
    assert stored.expires_at - stored.created_at == timedelta(minutes=5)
    db.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.key == "old")
        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    again = runs.create(body(session.id, "a new request"), idempotency_key="old")
    assert again.id != first.id and not runs.was_replayed(again)

    db.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.key == "old")
        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    assert runs.purge_idempotency_keys() == 1
    assert [key.key for key in keys(db)] == ["fresh"]


@pytest.mark.parametrize("window", [timedelta(0), timedelta(days=3_000_000), 60])
def test_a_window_must_be_positive_and_within_ten_years(db: DbSession, window: Any) -> None:
    with pytest.raises(BadParameterError, match="idempotency_window"):
        RunRepository(db, idempotency_window=window)
