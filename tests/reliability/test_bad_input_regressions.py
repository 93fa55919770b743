"""Bad input the property tests found reaching the driver, pinned as plain examples.

Each case raised a raw driver or Python error (or was stored on one backend
and refused by the other) instead of a ``DataLayerError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from app.errors import BadParameterError
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from tests.concurrency import in_own_transaction
from tests.reliability import invariants

LONE_SURROGATE = "\ud800"

CASES: dict[str, tuple[str, Callable[[DbSession, str, str], object]]] = {
    "surrogate in a run id": ("run_id", lambda db, s, r: RunRepository(db).get(LONE_SURROGATE)),
    "surrogate in an event type": (
        "type",
        lambda db, s, r: EventRepository(db).append(s, f"t{LONE_SURROGATE}"),
    ),
    "surrogate in a session id": (
        "session_id",
        lambda db, s, r: EventRepository(db).list_for_session(LONE_SURROGATE),
    ),
    "surrogate in a waiting reason": (
        "reason",
        lambda db, s, r: RunRepository(db).wait_for_input(r, LONE_SURROGATE),
    ),
    "surrogate in a payload value": (
        "payload",
        lambda db, s, r: EventRepository(db).append(s, "t", {"k": LONE_SURROGATE}),
    ),
    "surrogate in a payload key": (
        "metrics",
        lambda db, s, r: RunRepository(db).complete(r, {LONE_SURROGATE: 1}),
    ),
    "event_id longer than an index entry": (
        "event_id",
        lambda db, s, r: EventRepository(db).append(s, "t", event_id="x" * 300_000),
    ),
    "older_than beyond any date": (
        "older_than",
        lambda db, s, r: RunRepository(db).fail_stale(timedelta(days=999_999_999)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_input_that_reached_the_driver_is_refused(engine: Engine, case: str) -> None:
    def running_run(db: DbSession) -> tuple[str, str]:
        session_id = db.merge(ChatSession(title="regressions")).id
        runs = RunRepository(db)
        run = runs.create({"session_id": session_id, "message": "m"})
        runs.start(run.id)
        return session_id, run.id

    session_id, run_id = in_own_transaction(engine, running_run)
    before = invariants.fingerprint(engine)
    argument, call = CASES[case]
    with DbSession(engine) as db, pytest.raises(BadParameterError) as refused:
        call(db, session_id, run_id)
    assert refused.value.name == argument
    assert invariants.fingerprint(engine) == before
