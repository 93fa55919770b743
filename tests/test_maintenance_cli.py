"""``python -m app.maintenance``: fail-stale and purge-keys as an operator runs them."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, select, update
from sqlmodel import Session as DbSession

from app.models import IdempotencyKey, RunStatus, SessionRun
from app.repositories import RunRepository
from tests.concurrency import ROOT, in_own_transaction, seed
from tests.factories import SessionFactory, SessionRunFactory

PAST = datetime.now(UTC) - timedelta(minutes=1)


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
