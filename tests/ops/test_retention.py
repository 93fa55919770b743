"""Retention (``app.retention.purge``, ``python -m app.runs purge``) on both backends.

* What goes and what stays: old finished runs and their events go; queued,
  running (leased), waiting runs and their events stay even when their
  timestamps are old; so does a finished run whose retry is still active,
  session-level events, and recent finished runs. Expired idempotency keys go.
* ``--events-only`` keeps the runs; ``--dry-run`` changes nothing.
* Real processes: workers append to live runs and check after every append
  that they read back every event of their run, seqs without a gap, while
  purgers with a zero cutoff delete every run the moment it finishes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text, update

from app import retention
from app.db import unit_of_work
from app.models import ChatSession, IdempotencyKey, SessionRun
from app.repositories import EventRepository, RunRepository

ROOT = Path(__file__).resolve().parents[2]


def _backdate(engine: Engine, run_ids: list[str], days: int) -> None:
    runs = SessionRun.__table__
    with engine.begin() as conn:
        for run_id in run_ids:
            row = conn.execute(
                select(runs.c.finished_at, runs.c.created_at).where(runs.c.id == run_id)
            ).one()
            shifted = {
                column: value - timedelta(days=days)
                for column, value in row._mapping.items()  # noqa: SLF001 Row._mapping is public API
                if value is not None
            }
            conn.execute(update(runs).where(runs.c.id == run_id).values(**shifted))


def _seed(engine: Engine) -> dict[str, str]:
    """One run of each kind, each with a custom event; returns name -> run id."""
    ids: dict[str, str] = {}
    with unit_of_work(engine) as db:
        chats = [ChatSession(title=f"retention {n}") for n in range(7)]
        db.add_all(chats)
        db.flush()
        runs, events = RunRepository(db), EventRepository(db)

        def new(name: str, chat: ChatSession) -> str:
            run = runs.create({"session_id": chat.id, "message": name})
            ids[name] = run.id
            return run.id

        done = new("old_completed", chats[0])
        runs.start(done)
        events.append(chats[0].id, "note", {"n": 1}, run_id=done)
        runs.complete(done)
        failed = new("old_failed", chats[1])
        runs.start(failed)
        runs.fail(failed, {"code": "boom"})
        retry = runs.retry(failed)
        ids["active_retry"] = retry.id  # queued: keeps its parent
        new("old_queued", chats[2])
        leased = new("old_leased", chats[3])
        assert runs.claim_next("worker-1") is not None
        events.append(chats[3].id, "note", {"n": 2}, run_id=leased)
        waiting = new("old_waiting", chats[4])
        runs.start(waiting)
        runs.wait_for_input(waiting, "question")
        recent = new("recent_cancelled", chats[5])
        runs.cancel(recent)
        events.append(chats[6].id, "session_note", {"n": 3})
        ids["session_with_note"] = chats[6].id
        keyed = runs.create(
            {"session_id": chats[6].id, "message": "keyed"}, idempotency_key="key-1"
        )
        ids["keyed"] = keyed.id
        runs.cancel(keyed.id)
    old = [name for name in ids if name.startswith("old_")]
    _backdate(engine, [ids[name] for name in old], 40)
    with engine.begin() as conn:  # active runs with an (artificial) old finished_at too
        conn.execute(
            text(
                "UPDATE session_runs SET finished_at = created_at "
                "WHERE status IN ('queued', 'running', 'waiting_input')"
            )
        )
        keys = IdempotencyKey.__table__
        conn.execute(update(keys).values(expires_at=datetime(2000, 1, 1, tzinfo=UTC)))
    return ids


def _state(engine: Engine) -> tuple[dict[str, int], int, int]:
    """Run id -> its event count; session-level events; idempotency keys."""
    with engine.connect() as conn:
        runs = dict(
            conn.execute(
                text(
                    "SELECT r.id, (SELECT count(*) FROM session_events e WHERE e.run_id = r.id) "
                    "FROM session_runs r"
                )
            ).all()
        )
        loose = conn.execute(
            text("SELECT count(*) FROM session_events WHERE run_id IS NULL")
        ).scalar_one()
        keys = conn.execute(text("SELECT count(*) FROM run_idempotency_keys")).scalar_one()
    return runs, loose, keys


def test_purge_deletes_only_old_finished_runs(engine: Engine) -> None:
    ids = _seed(engine)
    before = _state(engine)
    dry = retention.purge(engine, timedelta(days=30), dry_run=True)
    assert (dry.runs, dry.events, dry.idempotency_keys) == (
        1,
        4,
        1,
    )  # created, started, note, completed
    assert _state(engine) == before  # dry run: nothing changed

    result = retention.purge(engine, timedelta(days=30), batch=1)
    runs, loose, keys = _state(engine)
    # old_failed stays: its retry is queued. old_completed had 4 events.
    assert (result.runs, result.events, result.idempotency_keys) == (1, 4, 1)
    assert ids["old_completed"] not in runs
    kept = set(ids) - {"old_completed", "session_with_note"}
    assert {ids[name] for name in kept} <= set(runs)
    for name in kept:
        assert runs[ids[name]] == before[0][ids[name]], name  # every event kept
    assert loose == before[1]
    assert keys == 0

    # Once the retry ends and is old too, the parent and the retry go.
    with unit_of_work(engine) as db:
        RunRepository(db).cancel(ids["active_retry"])
    _backdate(engine, [ids["active_retry"]], 40)
    again = retention.purge(engine, timedelta(days=30))
    assert again.runs == 2
    runs, _, _ = _state(engine)
    assert ids["old_failed"] not in runs and ids["active_retry"] not in runs
    for name in ("old_queued", "old_leased", "old_waiting", "recent_cancelled", "keyed"):
        assert ids[name] in runs


def test_purge_events_only_keeps_the_runs(engine: Engine) -> None:
    ids = _seed(engine)
    before, loose_before, _ = _state(engine)
    result = retention.purge(engine, timedelta(days=30), events_only=True, batch=1)
    runs, loose, _ = _state(engine)
    assert result.runs == 0 and result.events == before[ids["old_completed"]]
    assert set(runs) == set(before)
    assert runs[ids["old_completed"]] == 0
    assert {k: v for k, v in runs.items() if k != ids["old_completed"]} == {
        k: v for k, v in before.items() if k != ids["old_completed"]
    }
    assert loose == loose_before
    assert retention.purge(engine, timedelta(days=30), events_only=True).events == 0


def test_purge_arguments_and_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert retention.parse_age("30d") == timedelta(days=30)
    assert retention.parse_age("12h") == timedelta(hours=12)
    assert retention.parse_age("7") == timedelta(days=7)
    for bad in ("", "30x", "-1d", "99999d"):
        with pytest.raises(ValueError, match="expected an age"):
            retention.parse_age(bad)
    monkeypatch.delenv("RUN_RETENTION_DAYS", raising=False)
    assert retention.retention_from_environment() is None
    monkeypatch.setenv("RUN_RETENTION_DAYS", "90")
    assert retention.retention_from_environment() == timedelta(days=90)
    monkeypatch.setenv("RUN_RETENTION_DAYS", "abc")
    with pytest.raises(ValueError, match="RUN_RETENTION_DAYS"):
        retention.retention_from_environment()


_WORKER = textwrap.dedent(
    """
    import sys, time
    from app.db import create_db_engine, unit_of_work
    from app.models import ChatSession, IdempotencyKey, SessionRun
    from app.repositories import EventRepository, RunRepository
    from app.repositories.reads import EventReads

    url, seconds, wait_every = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    engine = create_db_engine(url)
    reads = EventReads.of(engine)
    deadline = time.monotonic() + seconds
    finished = waiting = 0
    n = 0
    while time.monotonic() < deadline:
        n += 1
        with unit_of_work(engine) as db:
            chat = ChatSession(title="live")
            db.add(chat)
            db.flush()
            runs = RunRepository(db)
            run = runs.create({"session_id": chat.id, "message": "live"})
            runs.start(run.id)
            session_id, run_id = chat.id, run.id
        for k in range(6):
            with unit_of_work(engine) as db:
                EventRepository(db).append(session_id, "step", {"k": k}, run_id=run_id)
            seqs = [e.seq for e in reads.list_for_run(run_id, limit=1000)]
            # run_created, run_started, then k + 1 steps, every seq, no gap
            assert seqs == list(range(1, k + 4)), (run_id, seqs)
        with unit_of_work(engine) as db:
            runs = RunRepository(db)
            if n % wait_every == 0:
                runs.wait_for_input(run_id, "question")
                waiting += 1
            else:
                runs.complete(run_id)
                finished += 1
    print(finished, waiting)
    """
)

_PURGER = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime, timedelta
    from app import retention
    from app.db import create_db_engine

    url, seconds = sys.argv[1], float(sys.argv[2])
    engine = create_db_engine(url)
    deadline = time.monotonic() + seconds
    runs = events = 0
    while time.monotonic() < deadline:
        result = retention.purge(engine, timedelta(0), batch=2)
        runs += result.runs
        events += result.events
    print(runs, events)
    """
)


@pytest.mark.slow
def test_concurrent_purgers_never_touch_live_runs(engine: Engine, database_url: str) -> None:
    seconds = 4.0
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, database_url, str(seconds), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, extra in [(_WORKER, ["3"])] * 3 + [(_PURGER, [])] * 2
    ]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err[-2000:]
        outputs.append([int(x) for x in out.split()])
    finished = sum(out[0] for out in outputs[:3])
    waiting = sum(out[1] for out in outputs[:3])
    purged = sum(out[0] for out in outputs[3:])
    assert finished > 0 and waiting > 0
    # A last purge takes what the purgers' final loop missed; then only waiting runs stay.
    purged += retention.purge(engine, timedelta(0)).runs
    assert purged == finished
    with engine.connect() as conn:
        statuses = conn.execute(
            text("SELECT status, count(*) FROM session_runs GROUP BY status")
        ).all()
        steps = conn.execute(
            text(
                "SELECT count(*) FROM session_events e JOIN session_runs r ON r.id = e.run_id "
                "WHERE e.type = 'step'"
            )
        ).scalar_one()
    assert dict(statuses) == {"waiting_input": waiting}
    assert steps == 6 * waiting
