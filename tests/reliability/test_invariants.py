"""The judge is tested too: each kind of damage the suite looks for is actually reported.

A lawful history is written through the repositories, then damaged behind
their back with plain SQL; ``invariants.violations`` must name the damage.
Without this, "0 violations" in the figures could mean a blind checker.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from tests.concurrency import seed
from tests.reliability import invariants


def _lawful_history(engine: Engine) -> tuple[str, str]:
    """A session with a completed run, a waiting run and a free event; (session id, run id)."""

    def write(db: object) -> tuple[str, str]:
        session_id = db.merge(ChatSession(title="judge")).id  # type: ignore[attr-defined]
        runs, events = RunRepository(db), EventRepository(db)  # type: ignore[arg-type]
        done = runs.create({"session_id": session_id, "message": "one"})
        runs.start(done.id)
        runs.complete(done.id)
        waiting = runs.create({"session_id": session_id, "message": "two"})
        runs.start(waiting.id)
        runs.wait_for_input(waiting.id, "which colour?")
        events.append(session_id, "message", {"x": 1}, event_id="e1")
        return session_id, waiting.id

    return seed(engine, write)


DAMAGE = {
    "seq gap": (
        "DELETE FROM session_events WHERE seq = 3",
        "seqs are not 1..",
    ),
    "status without its event": (
        "UPDATE session_runs SET status = 'cancelled', finished_at = updated_at, "
        "waiting_reason = NULL WHERE id = :run_id",
        "lifecycle events end in waiting_input",
    ),
    "event without its status": (
        "UPDATE session_events SET type = 'run_resumed', run_id = :run_id WHERE type = 'message'",
        "stored status waiting_input, lifecycle events end in running",
    ),
    "illegal path": (
        "UPDATE session_events SET type = 'run_completed' "
        "WHERE run_id = :run_id AND type = 'run_started'",
        "illegal completed -> run_waiting_input",
    ),
    "stale counter": (
        "UPDATE session_event_sequences SET next_seq = 2",
        "counter next_seq=2",
    ),
    "waiting without a reason": (
        "UPDATE session_runs SET waiting_reason = NULL WHERE id = :run_id",
        "with waiting_reason=None",
    ),
}


def test_a_lawful_history_has_no_violation(engine: Engine) -> None:
    _lawful_history(engine)
    assert invariants.violations(engine) == []


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_kind_of_damage_is_reported(engine: Engine, damage: str) -> None:
    _session_id, run_id = _lawful_history(engine)
    statement, expected = DAMAGE[damage]
    with engine.begin() as conn:
        conn.execute(text(statement), {"run_id": run_id})
    found = invariants.violations(engine)
    assert any(expected in problem for problem in found), found


def test_fingerprint_sees_any_change(engine: Engine) -> None:
    _lawful_history(engine)
    before = invariants.fingerprint(engine)
    assert before == invariants.fingerprint(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE session_events SET payload = :p WHERE seq = 1"), {"p": '{"a":1}'})
    after = invariants.fingerprint(engine)
    assert after["session_events"] != before["session_events"]
    assert after["session_runs"] == before["session_runs"]
