"""Issue 22, item 10: time that is compared across processes comes from the database's clock.

Each test runs real processes whose own clock is skewed: the process fakes
``app.types.utc_now`` (and every module's copy of it) one hour ahead or behind,
then claims, heartbeats, creates runs or keys, or runs ``fail_stale`` and the
key purge, through the repositories as a worker or a server would. Their
leases, the order of their runs and the expiry of their keys must not move
with that clock. The database runs on this machine, so its clock is the test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlmodel import Session as DbSession

import app.types
from app.models import IdempotencyKey, RunStatus, SessionRun
from app.repositories import RunRepository
from tests.concurrency import ROOT, in_own_transaction, seed
from tests.factories import SessionFactory

HOUR = 3600.0
LEASE = timedelta(minutes=10)
SLACK = timedelta(minutes=2)
"""How far a timestamp may be from this process's clock (the database's): far less than
the hour of skew, far more than a slow machine's delays."""

_SKEWED_PROCESS = textwrap.dedent(
    """
    import json, sys
    from datetime import UTC, datetime, timedelta

    import app.types
    from app.db import create_db_engine, unit_of_work
    from app.repositories import RunRepository
    import app.repositories.events, app.repositories.runs, app.repositories._idempotency
    import app.models

    url, skew = sys.argv[1], timedelta(seconds=float(sys.argv[2]))
    real = app.types.utc_now

    def skewed():
        return real() + skew

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("app", "migrations") and getattr(module, "utc_now", None) is real:
            module.utc_now = skewed
    assert abs(app.types.utc_now() - datetime.now(UTC) - skew) < timedelta(seconds=5)

    engine = create_db_engine(url)
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        action, args = json.loads(line)
        with unit_of_work(engine) as db:
            runs = RunRepository(db)
            if action == "claim":
                run = runs.claim_next(args["worker"], lease=timedelta(seconds=args["lease"]))
                answer = None if run is None else run.id
            elif action == "heartbeat":
                lease = timedelta(seconds=args["lease"])
                answer = runs.heartbeat(args["run_id"], worker_id=args["worker"], lease=lease).id
            elif action == "create":
                body = {"session_id": args["session_id"], "message": args["message"]}
                run = runs.create(body, idempotency_key=args.get("key"))
                answer = [run.id, runs.was_replayed(run)]
            elif action == "fail_stale":
                answer = runs.fail_stale(timedelta(seconds=args["older_than"]))
            elif action == "purge":
                answer = runs.purge_idempotency_keys()
            else:
                raise ValueError(action)
        print(json.dumps(answer), flush=True)
    """
)


class SkewedProcess:
    """A process of this project whose clock is ``skew`` seconds off; ``call`` runs one
    action of it in a transaction of its own and returns its answer."""

    def __init__(self, url: str, skew: float, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SKEWED_PROCESS, url, str(skew)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self._answer() == "ready"

    def _answer(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            assert self.process.stderr is not None
            raise AssertionError(f"the skewed process died: {self.process.stderr.read()[-2000:]}")
        return json.loads(line)

    def call(self, action: str, **args: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([action, args]) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=30)


@contextmanager
def skewed(url: str, *skews: float, env: dict[str, str] | None = None) -> Iterator[Any]:
    processes = []
    try:
        for skew in skews:
            processes.append(SkewedProcess(url, skew, env))
        yield processes if len(processes) > 1 else processes[0]
    finally:
        for process in processes:
            process.close()


def near(value: datetime | None, expected: datetime) -> bool:
    return value is not None and abs(value - expected) < SLACK


def stored(engine: Engine, run_id: str) -> SessionRun:
    with DbSession(engine, expire_on_commit=False) as db:
        run = db.get(SessionRun, run_id)
        assert run is not None
        return run


def queued_run(engine: Engine) -> str:
    def make(db: DbSession) -> str:
        chat = SessionFactory()
        db.flush()
        return RunRepository(db).create({"session_id": chat.id, "message": "m"}).id

    return seed(engine, make)


@pytest.mark.slow
@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_a_skewed_worker_leases_and_heartbeats_on_the_database_clock(
    engine: Engine, database_url: str, backend: str, skew: float
) -> None:
    run_id = queued_run(engine)
    with skewed(database_url, skew) as worker:
        assert worker.call("claim", worker="w", lease=LEASE.total_seconds()) == run_id
        claimed = stored(engine, run_id)
        now = datetime.now(UTC)
        assert near(claimed.lease_expires_at, now + LEASE), (claimed.lease_expires_at, now)
        assert near(claimed.started_at, now) and near(claimed.updated_at, now)

        # fail-stale of a process on time: the lease has not expired, whatever the worker's clock
        failed = in_own_transaction(engine, lambda db: RunRepository(db).fail_stale(LEASE))
        assert failed == [] and stored(engine, run_id).status is RunStatus.RUNNING

        assert worker.call("heartbeat", run_id=run_id, worker="w", lease=60.0) == run_id
        beat = stored(engine, run_id)
        now = datetime.now(UTC)
        assert near(beat.lease_expires_at, now + timedelta(seconds=60)), beat.lease_expires_at


@pytest.mark.slow
@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_fail_stale_of_a_skewed_process_measures_leases_on_the_database_clock(
    engine: Engine, database_url: str, backend: str, skew: float
) -> None:
    run_id = queued_run(engine)
    in_own_transaction(engine, lambda db: RunRepository(db).claim_next("w", lease=LEASE))
    # a run without a lease, silent for 30 minutes by the database's clock
    silent_id = queued_run(engine)

    def started_long_ago(db: DbSession) -> None:
        run = RunRepository(db).start(silent_id)
        run.updated_at = datetime.now(UTC) - timedelta(minutes=30)

    in_own_transaction(engine, started_long_ago)
    with skewed(database_url, skew) as operator:
        # older than 45 minutes: nothing is, by the database's clock
        assert operator.call("fail_stale", older_than=45 * 60.0) == []
        assert operator.call("fail_stale", older_than=15 * 60.0) == [silent_id]
    assert stored(engine, run_id).status is RunStatus.RUNNING
    assert stored(engine, silent_id).status is RunStatus.FAILED


@pytest.mark.slow
def test_runs_created_by_skewed_servers_keep_their_commit_order(
    engine: Engine, database_url: str, backend: str
) -> None:
    chats = seed(engine, lambda db: [SessionFactory().id for _ in range(2)])
    with skewed(database_url, HOUR, -HOUR) as (ahead, behind):
        order = []
        for server, chat in ((ahead, chats[0]), (behind, chats[0]), (ahead, chats[1])):
            order.append(server.call("create", session_id=chat, message="turn")[0])
            order.append(behind.call("create", session_id=chats[1], message="turn")[0])
    runs = [stored(engine, run_id) for run_id in order]
    now = datetime.now(UTC)
    assert all(near(run.created_at, now) for run in runs), [run.created_at for run in runs]
    assert [run.created_at for run in runs] == sorted(run.created_at for run in runs)

    with DbSession(engine) as db:
        newest_first = [run.id for run in RunRepository(db).list_for_session(chats[0])]
        by_status = [run.id for run in RunRepository(db).list_by_status("queued", limit=10)]
    assert newest_first == [order[2], order[0]]
    assert by_status == order

    def claim_all(db: DbSession) -> list[str]:
        runs = RunRepository(db)
        claimed = []
        while (run := runs.claim_next("w")) is not None:
            claimed.append(run.id)
            runs.complete(run.id)
        return claimed

    assert in_own_transaction(engine, claim_all) == order


@pytest.mark.slow
@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_idempotency_keys_expire_on_the_database_clock(
    engine: Engine, database_url: str, backend: str, skew: float
) -> None:
    chat = seed(engine, lambda db: SessionFactory().id)
    window = {"RUN_IDEMPOTENCY_WINDOW_SECONDS": "1800"}  # 30 minutes: less than the skew
    with skewed(database_url, skew, env=window) as server:
        run_id, replayed = server.call("create", session_id=chat, message="m", key="k1")
        assert not replayed
        with DbSession(engine) as db:
            key = db.scalars(select(IdempotencyKey)).one()
        now = datetime.now(UTC)
        assert near(key.created_at, now) and near(key.expires_at, now + timedelta(minutes=30))

        # the same request again, from the skewed server: a replay within the window
        assert server.call("create", session_id=chat, message="m", key="k1") == [run_id, True]
        # its purge deletes no live key
        assert server.call("purge") == 0
    with DbSession(engine) as db:
        assert [key.run_id for key in db.scalars(select(IdempotencyKey))] == [run_id]


def test_runs_created_back_to_back_keep_their_order_on_a_millisecond_clock(
    engine: Engine, backend: str
) -> None:
    """SQLite's clock counts milliseconds: many runs created within one must still
    sort in creation order (per session, and across sessions in the queue)."""
    chats = seed(engine, lambda db: [SessionFactory().id for _ in range(3)])

    def create_many(db: DbSession) -> list[str]:
        runs = RunRepository(db)
        return [runs.create({"session_id": chats[n % 3], "message": "m"}).id for n in range(60)]

    order = in_own_transaction(engine, create_many)
    with DbSession(engine) as db:
        created = dict(db.execute(select(SessionRun.id, SessionRun.created_at)).all())
        queue = [run.id for run in RunRepository(db).list_by_status("queued", limit=100)]
        newest_first = [run.id for run in RunRepository(db).list_for_session(chats[0])]
    times = [created[run_id] for run_id in order]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert queue == order and newest_first == order[::3][::-1]
    assert all(near(moment, datetime.now(UTC)) for moment in times)


@pytest.mark.parametrize("skew", [-HOUR, HOUR])
def test_this_process_with_a_skewed_clock_writes_and_compares_database_time(
    engine: Engine, backend: str, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast loop's version of the tests above: this process's ``utc_now`` (every
    module's copy) skewed, a claim, a keyed create, a stale check and a purge."""
    real = app.types.utc_now
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("app", "migrations") and getattr(module, "utc_now", None) is real:
            monkeypatch.setattr(module, "utc_now", lambda: real() + timedelta(seconds=skew))
    monkeypatch.setenv("RUN_IDEMPOTENCY_WINDOW_SECONDS", "1800")
    chat = seed(engine, lambda db: SessionFactory().id)

    def work(db: DbSession) -> tuple[str, list[str], int]:
        runs = RunRepository(db)
        run = runs.create({"session_id": chat, "message": "m"}, idempotency_key="k")
        runs.claim_next("w", lease=LEASE)
        return run.id, runs.fail_stale(timedelta(minutes=5)), runs.purge_idempotency_keys()

    run_id, failed, purged = in_own_transaction(engine, work)
    assert (failed, purged) == ([], 0)
    run, now = stored(engine, run_id), datetime.now(UTC)
    assert near(run.created_at, now) and near(run.lease_expires_at, now + LEASE)
    with DbSession(engine) as db:
        key = db.scalars(select(IdempotencyKey)).one()
    assert near(key.expires_at, now + timedelta(minutes=30))
