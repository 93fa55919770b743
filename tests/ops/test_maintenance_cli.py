"""``python -m app.maintenance``: fail-stale and purge-keys as an operator runs them."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select, update
from sqlmodel import Session as DbSession

from app.models import IdempotencyKey, RunStatus, SessionRun
from app.repositories import RunRepository
from tests.concurrency import ROOT, in_own_transaction, seed
from tests.factories import SessionFactory, SessionRunFactory

PAST = datetime.now(UTC) - timedelta(minutes=1)


pytestmark = pytest.mark.slow  # each test runs the CLI in Python processes


def maintenance(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app.maintenance", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_fail_stale_and_purge_keys_do_their_work_and_say_so(
    engine: Engine, database_url: str
) -> None:
    leased = seed(engine, lambda db: SessionRunFactory(status=RunStatus.QUEUED).id)
    session_id = seed(engine, lambda db: SessionFactory().id)

    def prepare(db: DbSession) -> None:
        runs = RunRepository(db)
        runs.claim_next("gone-worker")
        runs.create({"session_id": session_id, "message": "x"}, idempotency_key="old")
        runs.create({"session_id": session_id, "message": "y"}, idempotency_key="new")
        db.execute(update(SessionRun).values(lease_expires_at=PAST))
        old_key = IdempotencyKey.key == "old"
        db.execute(update(IdempotencyKey).where(old_key).values(expires_at=PAST))

    in_own_transaction(engine, prepare)

    stale = maintenance("fail-stale", "--older-than", "3600", "--url", database_url)
    assert stale.returncode == 0, stale.stderr
    assert stale.stdout.splitlines() == ["failed 1 stale runs", leased]
    purge = maintenance("purge-keys", "--url", database_url)
    assert (purge.returncode, purge.stdout.strip()) == (0, "purged 1 expired idempotency keys")

    with DbSession(engine) as db:
        assert db.get(SessionRun, leased).status is RunStatus.FAILED
        assert list(db.scalars(select(IdempotencyKey.key))) == ["new"]
        assert db.scalar(select(func.count()).select_from(SessionRun)) == 3


def test_usage_mistakes_exit_2_in_one_line() -> None:
    bad = maintenance("fail-stale", "--older-than", "soon")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--older-than" in bad.stderr
    assert maintenance("no-such-command").returncode == 2


def test_fail_stale_with_max_attempts_requeues_a_run_before_its_last_attempt(
    engine: Engine, database_url: str
) -> None:
    """As the workers' ``--max-attempts``: a lease that expired on the first of two
    attempts is retried, on the second it is failed."""
    run_id = seed(engine, lambda db: SessionRunFactory(status=RunStatus.QUEUED).id)

    def claim_and_expire(db: DbSession) -> None:
        RunRepository(db).claim_next("gone-worker")
        db.execute(update(SessionRun).values(lease_expires_at=PAST))

    in_own_transaction(engine, claim_and_expire)
    first = maintenance(
        "fail-stale", "--older-than", "3600", "--max-attempts", "2", "--url", database_url
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["retried 1 runs", run_id, "failed 0 stale runs"]
    with DbSession(engine) as db:
        assert db.get(SessionRun, run_id).status is RunStatus.QUEUED

    in_own_transaction(engine, claim_and_expire)
    second = maintenance(
        "fail-stale", "--older-than", "3600", "--max-attempts", "2", "--url", database_url
    )
    assert second.stdout.splitlines() == ["retried 0 runs", "failed 1 stale runs", run_id]
    with DbSession(engine) as db:
        assert db.get(SessionRun, run_id).status is RunStatus.FAILED
    for bad in ("0", "1001", "two"):
        refused = maintenance("fail-stale", "--older-than", "1", "--max-attempts", bad)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert "--max-attempts" in refused.stderr and "1 to 1000" in refused.stderr
