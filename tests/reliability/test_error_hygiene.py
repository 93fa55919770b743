"""No error carries user content: bad input with a marker in every text and JSON argument.

Each call below is refused; the marker (in values, in keys that are not names,
in wrongly typed arguments) must not appear in the error's ``str``, ``repr``,
``args``, anything chained to it, nor in a log record. The delete races of
``test_delete_races.py`` make the same check for the errors of concurrent deletes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from app.errors import DataLayerError
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from app.schemas import RunCreate, RunResumeRequest
from tests.concurrency import in_own_transaction
from tests.reliability.figures import record
from tests.reliability.test_delete_races import MARKER, leaks

Ids = tuple[str, str]  # (session_id, id of a running run)
M = MARKER

BAD_CALLS: dict[str, Callable[[DbSession, Ids], object]] = {
    "append: NUL in a payload value": lambda db, ids: EventRepository(db).append(
        ids[0], "note", {"k": M + "\x00"}
    ),
    "append: NaN under a marked key": lambda db, ids: EventRepository(db).append(
        ids[0], "note", {M: {M: float("nan")}}
    ),
    "append: integer too large": lambda db, ids: EventRepository(db).append(
        ids[0], "note", {M: [M, 10**5000]}
    ),
    "append: type too long": lambda db, ids: EventRepository(db).append(ids[0], M * 5),
    "append: marked source": lambda db, ids: EventRepository(db).append(ids[0], "t", source=M),
    "append: payload not an object": lambda db, ids: EventRepository(db).append(
        ids[0], "note", [M]
    ),
    "append: run-scoped type without run": lambda db, ids: EventRepository(db).append(
        ids[0], "run_failed", {"error": M}
    ),
    "wait_for_input: reason not a string": lambda db, ids: RunRepository(db).wait_for_input(
        ids[1], {"why": M}
    ),
    "complete: self-referencing metrics": lambda db, ids: RunRepository(db).complete(
        ids[1], _self_referencing()
    ),
    "fail: marked error to a waiting-only transition": lambda db, ids: RunRepository(db).resume(
        ids[1], {M: M}
    ),
    "list_for_session: marked status": lambda db, ids: RunRepository(db).list_for_session(
        ids[0], status=M
    ),
    "list_for_session: marked limit": lambda db, ids: RunRepository(db).list_for_session(
        ids[0], limit=M
    ),
    "create: unknown field named by the marker": lambda db, ids: RunRepository(db).create(
        {"session_id": ids[0], "message": M, M: M}
    ),
    "create: bad style_reference": lambda db, ids: RunRepository(db).create(
        {"session_id": ids[0], "message": M, "style_reference": {M: [M, float("inf")]}}
    ),
    "create: message not a string": lambda db, ids: RunRepository(db).create(
        {"session_id": ids[0], "message": [M], "target_pages": [M, 3]}
    ),
}


def _self_referencing() -> dict[str, object]:
    value: dict[str, object] = {M: M}
    value["again"] = value
    return value


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_refusals_carry_no_content(
    engine: Engine, backend: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    def seed(db: DbSession) -> Ids:
        session_id = db.merge(ChatSession(title="hygiene")).id
        runs = RunRepository(db)
        run_id = runs.create({"session_id": session_id, "message": "m"}).id
        runs.start(run_id)
        return session_id, run_id

    ids = in_own_transaction(engine, seed)
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="app")
    with DbSession(engine) as db, pytest.raises(DataLayerError) as refused:
        BAD_CALLS[case](db, ids)
    record("errors searched for content", 1, backend)
    assert leaks(refused.value, caplog.records) == []


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        (RunResumeRequest, {"resume": {M: [M, float("nan")]}}),
        (RunResumeRequest, {"resume": M}),
        (RunCreate, {"session_id": M + "\x00", "message": M, "style_reference": {M: 2**64}}),
        (RunCreate, {"session_id": "s", "message": M, "target_pages": M}),
    ],
)
def test_schema_errors_carry_no_content(schema: type[RunCreate], body: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as refused:
        schema.model_validate(body)
    record("errors searched for content", 1, "schemas")
    assert MARKER not in str(refused.value) and MARKER not in repr(refused.value)
    for problem in refused.value.errors(include_input=False):
        assert MARKER not in str(problem)
