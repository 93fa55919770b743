"""The queue's moves for the worker runtime (docs/worker.md), on both backends.

A resumed run is claimable (leased as it stands, first in the queue, FIFO in its
session); an expired lease is retried up to ``max_attempts`` with a visible
``attempt`` and a ``run_retried`` event, then failed with ``stale_run``; a
worker shutting down gives its lease back (``run_requeued``). The same with real
worker processes: ``tests/worker/``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session as DbSession

from app.errors import BadParameterError, InvalidTransitionError, LeaseNotHeldError
from app.models import RunStatus
from app.repositories import RunRepository
from tests.factories import SessionFactory
from tests.repositories.test_run_queue import _expire_lease, lifecycle, queued


@pytest.fixture
def runs(db: DbSession) -> RunRepository:
    return RunRepository(db)


def test_a_resumed_run_is_leased_by_the_next_claim_before_queued_runs(
    db: DbSession, runs: RunRepository
) -> None:
    a, b = SessionFactory(), SessionFactory()
    first, behind = queued(a, 1), queued(a, 2)
    other = queued(b, 3)
    db.commit()
    assert runs.claim_next("w1").id == first.id
    runs.wait_for_input(first.id, "which palette")
    runs.resume(first.id, {"answer": "blue"})
    db.commit()
    assert (first.status, first.worker_id, first.attempt) == (RunStatus.RUNNING, None, 0)

    claimed = runs.claim_next("w2", lease=timedelta(minutes=1))
    assert claimed is not None and claimed.id == first.id
    assert (claimed.worker_id, claimed.attempt) == ("w2", 1)
    assert claimed.lease_expires_at is not None
    assert claimed.resume_payload == {"answer": "blue"}
    # No second lifecycle event: run_resumed already said it runs again.
    assert [kind for kind, _ in lifecycle(db, first.id)][-1] == "run_resumed"
    runs.heartbeat(first.id, worker_id="w2")
    # FIFO in the session: the run behind it waits; another session's run is next.
    assert runs.claim_next("w3").id == other.id
    assert runs.claim_next("w3") is None
    runs.complete(first.id)
    assert runs.claim_next("w3").id == behind.id


def test_a_run_started_without_a_resume_is_never_taken_by_a_claim(
    db: DbSession, runs: RunRepository
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.start(run.id)
    assert runs.claim_next("w1") is None
    assert runs.claim_next("w1", resumed=False) is None
    assert run.worker_id is None


def test_an_expired_lease_is_retried_until_the_last_attempt_then_fails_stale(
    db: DbSession, runs: RunRepository
) -> None:
    a = SessionFactory()
    run, behind = queued(a, 1), queued(a, 2)
    db.commit()
    for attempt in (1, 2):
        claimed = runs.claim_next(f"w{attempt}")
        assert claimed is not None and claimed.id == run.id and claimed.attempt == attempt
        _expire_lease(db, run.id)
        assert runs.expire_leases(max_attempts=3) == ([run.id], [])
        db.commit()
        assert (run.status, run.worker_id, run.lease_expires_at) == (RunStatus.QUEUED, None, None)
        assert lifecycle(db, run.id)[-1] == (
            "run_retried",
            {"attempt": attempt, "max_attempts": 3},
        )
        with pytest.raises(InvalidTransitionError):
            runs.heartbeat(run.id, worker_id=f"w{attempt}")  # the old worker must stop
    assert runs.claim_next("w3").attempt == 3  # it heads its session again: not `behind`
    _expire_lease(db, run.id)
    assert runs.fail_stale(timedelta(hours=1), max_attempts=3) == [run.id]
    db.commit()
    assert run.status is RunStatus.FAILED and run.latest_error["code"] == "stale_run"
    assert [kind for kind, _ in lifecycle(db, run.id)].count("run_retried") == 2
    assert runs.claim_next("w4").id == behind.id


def test_fail_stale_without_max_attempts_still_fails_at_once(
    db: DbSession, runs: RunRepository
) -> None:
    run = queued(SessionFactory(), 1)
    db.commit()
    runs.claim_next("w1")
    _expire_lease(db, run.id)
    assert runs.expire_leases() == ([], [run.id])
    assert run.status is RunStatus.FAILED


def test_a_lease_given_back_is_queued_again_and_returns_its_attempt(
    db: DbSession, runs: RunRepository
) -> None:
    run, later = queued(SessionFactory(), 1), queued(SessionFactory(), 2)
    db.commit()
    runs.claim_next("w1")
    with pytest.raises(LeaseNotHeldError):
        runs.give_back(run.id, worker_id="w2")
    given = runs.give_back(run.id, worker_id="w1")
    db.commit()
    assert (given.status, given.worker_id, given.attempt) == (RunStatus.QUEUED, None, 0)
    assert lifecycle(db, run.id)[-1] == (
        "run_requeued",
        {"worker_id": "w1", "reason": "worker_shutdown"},
    )
    assert given.latest_error is None
    assert runs.claim_next("w2").id == run.id  # older than `later`: first again
    assert runs.claim_next("w2").id == later.id
    runs.complete(run.id)
    with pytest.raises(InvalidTransitionError):
        runs.give_back(run.id, worker_id="w2")


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True, "3"])
def test_max_attempts_out_of_range_is_a_bad_parameter(runs: RunRepository, bad: object) -> None:
    with pytest.raises(BadParameterError, match="max_attempts"):
        runs.expire_leases(max_attempts=bad)  # type: ignore[arg-type]
