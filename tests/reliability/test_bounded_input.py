"""The input limits of ``docs/input-limits.md``, at every entry point, on both backends.

Each bad value reached the driver (or Python's recursion limit) before the
limits existed: a bare ``RecursionError``, a ``StatementError`` whose ``str()``
raised, a gap in the seqs, or a value stored that no reader could load. Now
every one is a domain error naming the argument and the limit, and a caller
that commits anyway has written nothing: the next event gets the next seq.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text
from sqlmodel import Session as DbSession

from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    DataLayerError,
    InvalidTransitionError,
    RunNotFoundError,
    SessionNotFoundError,
    ValidationFailedError,
)
from app.input_limits import (
    DEFAULT_MAX_JSON_BYTES,
    JSON_INT_MAX,
    JSON_INT_MIN,
    MAX_JSON_BYTES_ENV,
    MAX_JSON_DEPTH,
)
from app.models import ChatSession, RunStatus
from app.repositories import EventRepository, RunRepository
from app.schemas import RunCreate, RunResumeRequest
from app.state_machine import RUN_SCOPED_EVENT_TYPES
from tests.concurrency import in_own_transaction
from tests.reliability import invariants
from tests.reliability.figures import record


def nested(levels: int) -> dict[str, Any]:
    """An object ``levels`` deep: ``nested(1) == {"leaf": 1}``."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def self_referencing_dict() -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    value["me"] = value
    return value


def self_referencing_list() -> dict[str, Any]:
    inner: list[Any] = [1]
    inner.append(inner)
    return {"list": inner}


BAD_VALUES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "3000 levels": (lambda: nested(3000), f"deeper than {MAX_JSON_DEPTH} levels"),
    "980 levels": (lambda: nested(980), f"deeper than {MAX_JSON_DEPTH} levels"),
    "65 levels": (lambda: nested(MAX_JSON_DEPTH + 1), f"deeper than {MAX_JSON_DEPTH} levels"),
    "self-referencing object": (self_referencing_dict, "contains itself"),
    "self-referencing list": (self_referencing_list, "contains itself"),
    "10**5000": (lambda: {"v": 10**5000}, "64-bit"),
    "2**63": (lambda: {"v": [JSON_INT_MAX + 1]}, "64-bit"),
    "-2**63 - 1": (lambda: {"v": JSON_INT_MIN - 1}, "64-bit"),
    "over 1 MiB": (lambda: {"v": "x" * DEFAULT_MAX_JSON_BYTES}, MAX_JSON_BYTES_ENV),
    "150,000 keys": (lambda: {f"k{i}": i for i in range(150_000)}, MAX_JSON_BYTES_ENV),
    # Over the limit by their element count alone (``"":0,`` takes 5 bytes, ``0,`` 2):
    "210,000 keys": (lambda: {f"k{i}": i for i in range(210_000)}, MAX_JSON_BYTES_ENV),
    "524,289 zeros": (lambda: {"v": [0] * (DEFAULT_MAX_JSON_BYTES // 2 + 1)}, MAX_JSON_BYTES_ENV),
}

Seeded = dict[str, str]
JSON_ENTRY_POINTS: dict[str, tuple[str, type[DataLayerError], Callable[..., object]]] = {
    "append": (
        "payload",
        BadParameterError,
        lambda db, ids, v: EventRepository(db).append(ids["session"], "note", v),
    ),
    "resume": (
        "resume",
        BadParameterError,
        lambda db, ids, v: RunRepository(db).resume(ids["waiting"], v),
    ),
    "complete": (
        "metrics",
        BadParameterError,
        lambda db, ids, v: RunRepository(db).complete(ids["running"], v),
    ),
    "fail": (
        "error",
        BadParameterError,
        lambda db, ids, v: RunRepository(db).fail(ids["running"], v),
    ),
    "create": (
        "style_reference",
        ValidationFailedError,
        lambda db, ids, v: RunRepository(db).create(
            {"session_id": ids["session"], "message": "m", "style_reference": v}
        ),
    ),
}


def _seed(db: DbSession) -> Seeded:
    """A session with a running run, another session with a waiting run, and one event each."""
    ids: Seeded = {}
    runs, events = RunRepository(db), EventRepository(db)
    for session_key, run_key in (("session", "running"), ("other_session", "waiting")):
        ids[session_key] = db.merge(ChatSession(title=session_key)).id
        ids[run_key] = runs.create({"session_id": ids[session_key], "message": "m"}).id
        runs.start(ids[run_key])
        events.append(ids[session_key], "note", {"n": 1})
    runs.wait_for_input(ids["waiting"], "which?")
    return ids


@pytest.fixture
def seeded(engine: Engine) -> Seeded:
    return in_own_transaction(engine, _seed)


def refused_and_committed(
    engine: Engine, call: Callable[[DbSession], object], expected: type[DataLayerError]
) -> DataLayerError:
    """The error ``call`` raises; the caller then commits anyway, as a careless one would."""
    with DbSession(engine) as db:
        with pytest.raises(expected) as refused:
            call(db)
        db.commit()
    return refused.value


def next_seqs_follow(engine: Engine, session_ids: list[str]) -> None:
    """No gap and no half-written change: one more event per session gets the next seq."""

    def append(db: DbSession) -> list[tuple[int, int]]:
        events = EventRepository(db)
        pairs = []
        for session_id in session_ids:
            stored = len(events.list_for_session(session_id, limit=1000))
            pairs.append((events.append(session_id, "after").seq, stored + 1))
        return pairs

    for got, expected in in_own_transaction(engine, append):
        assert got == expected
    assert invariants.violations(engine) == []


@pytest.mark.parametrize("value", sorted(BAD_VALUES))
@pytest.mark.parametrize("entry_point", sorted(JSON_ENTRY_POINTS))
def test_json_outside_the_limits_is_refused_and_writes_nothing(
    engine: Engine, seeded: Seeded, backend: str, entry_point: str, value: str
) -> None:
    argument, expected, call = JSON_ENTRY_POINTS[entry_point]
    make, limit = BAD_VALUES[value]
    bad = make()
    before = invariants.fingerprint(engine)
    record("bad inputs tried", 1, backend)
    error = refused_and_committed(engine, lambda db: call(db, seeded, bad), expected)
    assert argument in error.message and limit in error.message, error.message
    assert invariants.fingerprint(engine) == before
    next_seqs_follow(engine, [seeded["session"], seeded["other_session"]])


@pytest.mark.parametrize("value", sorted(BAD_VALUES))
def test_schemas_refuse_json_outside_the_limits(value: str) -> None:
    make, limit = BAD_VALUES[value]
    bad = make()
    for schema, body, field in (
        (RunResumeRequest, {"resume": bad}, "resume"),
        (RunCreate, {"session_id": "s", "message": "m", "style_reference": bad}, "style_reference"),
    ):
        with pytest.raises(ValidationError) as refused:
            schema.model_validate(body)
        (problem,) = refused.value.errors(include_input=False)
        assert problem["loc"] == (field,) and limit in problem["msg"], problem
        record("bad inputs tried", 1, "schemas")


def test_values_at_the_limits_round_trip(engine: Engine, backend: str) -> None:
    at_limits = {
        "deep": nested(MAX_JSON_DEPTH - 1),
        "ints": [JSON_INT_MAX, JSON_INT_MIN, 2**53 + 1],
        "shared": [[1, 2]] * 3,
    }

    def write(db: DbSession) -> str:
        session_id = db.merge(ChatSession(title="limits")).id
        EventRepository(db).append(session_id, "limits", at_limits)
        return session_id

    session_id = in_own_transaction(engine, write)
    payload = in_own_transaction(
        engine, lambda db: EventRepository(db).list_for_session(session_id)[0].payload
    )
    assert payload == at_limits
    assert [type(number) for number in payload["ints"]] == [int, int, int]


def test_the_size_limit_comes_from_the_environment(
    engine: Engine, seeded: Seeded, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_JSON_BYTES_ENV, "100")
    fits = {"v": "é" * 45 + "xx"}  # 100 bytes as compact UTF-8 JSON
    assert len(json.dumps(fits, ensure_ascii=False, separators=(",", ":")).encode()) == 100
    too_big = {"v": "é" * 45 + "xxx"}
    before = invariants.fingerprint(engine)
    for call, argument in (
        (lambda db: EventRepository(db).append(seeded["session"], "note", too_big), "payload"),
        (lambda db: RunRepository(db).wait_for_input(seeded["running"], "x" * 101), "reason"),
        (lambda db: RunRepository(db).fail(seeded["running"], too_big), "error"),
    ):
        error = refused_and_committed(engine, call, BadParameterError)
        assert error.name == argument and "100 bytes" in error.message, error.message
        assert MAX_JSON_BYTES_ENV in error.message
    create = {"session_id": seeded["session"], "message": "m" * 101}
    error = refused_and_committed(
        engine, lambda db: RunRepository(db).create(create), ValidationFailedError
    )
    assert "message" in error.message and "100 bytes" in error.message
    assert invariants.fingerprint(engine) == before
    in_own_transaction(
        engine, lambda db: EventRepository(db).append(seeded["session"], "note", fits)
    )


@pytest.mark.parametrize(
    ("transition", "limit"),
    [("resume", "deeper than"), ("fail", "larger than"), ("wait_for_input", "larger than")],
)
def test_an_argument_that_fits_but_not_inside_its_event_moves_nothing(
    engine: Engine,
    seeded: Seeded,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    transition: str,
    limit: str,
) -> None:
    """A transition stores its argument and appends ``{argument: value}`` as its event,
    one level deeper and a few bytes larger: checked before the run moves, so a run
    never changes without its event."""
    if limit == "larger than":
        monkeypatch.setenv(MAX_JSON_BYTES_ENV, "100")
    calls: dict[str, Callable[[DbSession], object]] = {
        "resume": lambda db: RunRepository(db).resume(seeded["waiting"], nested(MAX_JSON_DEPTH)),
        "fail": lambda db: RunRepository(db).fail(seeded["running"], {"v": "x" * 92}),
        "wait_for_input": lambda db: RunRepository(db).wait_for_input(seeded["running"], "x" * 99),
    }
    before = invariants.fingerprint(engine)
    error = refused_and_committed(engine, calls[transition], BadParameterError)
    assert "lifecycle event" in error.message and limit in error.message, error.message
    assert invariants.fingerprint(engine) == before
    next_seqs_follow(engine, [seeded["session"], seeded["other_session"]])


# ------------------------------------------------------------- run-scoped types


@pytest.mark.parametrize("event_type", sorted(RUN_SCOPED_EVENT_TYPES))
def test_run_scoped_types_require_a_run_id(
    engine: Engine, seeded: Seeded, backend: str, event_type: str
) -> None:
    before = invariants.fingerprint(engine)
    error = refused_and_committed(
        engine,
        lambda db: EventRepository(db).append(seeded["session"], event_type, {"x": 1}),
        BadParameterError,
    )
    assert error.name == "run_id" and event_type in error.message
    assert invariants.fingerprint(engine) == before


def test_other_types_need_no_run_id_and_legacy_rows_stay_readable(
    engine: Engine, seeded: Seeded, backend: str
) -> None:
    session_id = seeded["session"]

    def legacy(db: DbSession) -> None:  # a v0.7 row: a lifecycle type without run_id
        db.execute(
            text(
                "INSERT INTO session_events (session_id, seq, type, payload, source, created_at)"
                " VALUES (:session_id, 100, 'run_started', NULL, 'session', CURRENT_TIMESTAMP)"
            ),
            {"session_id": session_id},
        )

    in_own_transaction(engine, legacy)
    events = in_own_transaction(
        engine,
        lambda db: (
            EventRepository(db).append(session_id, "verify", {"x": 1}),
            EventRepository(db).list_for_session(session_id, since_seq=99),
        ),
    )
    assert events[0].seq == 101 and events[0].run_id is None
    assert [(e.seq, e.type, e.run_id) for e in events[1]] == [
        (100, "run_started", None),
        (101, "verify", None),
    ]


# ---------------------------------------------------------------- cursors


@pytest.mark.parametrize("status", [None, RunStatus.WAITING_INPUT])
def test_a_before_cursor_from_another_session_is_refused(
    engine: Engine, seeded: Seeded, backend: str, status: RunStatus | None
) -> None:
    def listing(db: DbSession) -> object:
        return RunRepository(db).list_for_session(
            seeded["session"], before=seeded["waiting"], status=status
        )

    error = refused_and_committed(engine, listing, BadParameterError)
    assert error.name == "before" and "another session" in error.message
    own = in_own_transaction(
        engine,
        lambda db: RunRepository(db).list_for_session(
            seeded["other_session"], before=seeded["waiting"]
        ),
    )
    assert own == []


# ------------------------------------------------------------ seq stays gap-free

GAP_FREE_ERRORS: dict[str, tuple[type[DataLayerError], Callable[[DbSession, Seeded], object]]] = {
    "append: bad payload": (
        BadParameterError,
        lambda db, ids: EventRepository(db).append(ids["session"], "t", {"v": 10**5000}),
    ),
    "append: run-scoped type without run": (
        BadParameterError,
        lambda db, ids: EventRepository(db).append(ids["session"], "verify_fail"),
    ),
    "append: unknown session": (
        SessionNotFoundError,
        lambda db, ids: EventRepository(db).append("no such session", "t"),
    ),
    "append: run of another session": (
        RunNotFoundError,
        lambda db, ids: EventRepository(db).append(ids["session"], "t", run_id=ids["waiting"]),
    ),
    "start: not queued": (
        InvalidTransitionError,
        lambda db, ids: RunRepository(db).start(ids["running"]),
    ),
    "start: another run is running": (
        ActiveRunExistsError,
        lambda db, ids: RunRepository(db).start(
            RunRepository(db).create({"session_id": ids["session"], "message": "m"}).id
        ),
    ),
    "resume: unknown run": (
        RunNotFoundError,
        lambda db, ids: RunRepository(db).resume("no such run", {}),
    ),
    "complete: bad metrics": (
        BadParameterError,
        lambda db, ids: RunRepository(db).complete(ids["running"], nested(3000)),
    ),
    "fail: not running": (
        InvalidTransitionError,
        lambda db, ids: RunRepository(db).fail(ids["waiting"], {"code": "x"}),
    ),
    "wait_for_input: bad reason": (
        BadParameterError,
        lambda db, ids: RunRepository(db).wait_for_input(ids["running"], "\x00"),
    ),
    "cancel: terminal is not an error, unknown is": (
        RunNotFoundError,
        lambda db, ids: RunRepository(db).cancel("no such run"),
    ),
    "heartbeat: not running": (
        InvalidTransitionError,
        lambda db, ids: RunRepository(db).heartbeat(ids["waiting"]),
    ),
    "retry: not failed": (
        InvalidTransitionError,
        lambda db, ids: RunRepository(db).retry(ids["running"]),
    ),
}


@pytest.mark.parametrize("case", sorted(GAP_FREE_ERRORS))
def test_seq_stays_gap_free_when_the_caller_commits_after_an_error(
    engine: Engine, seeded: Seeded, backend: str, case: str
) -> None:
    """``start: another run is running`` creates a run first, in the same transaction:
    that run and its event are committed with the caller's commit, and seqs stay 1..n."""
    expected, call = GAP_FREE_ERRORS[case]
    refused_and_committed(engine, lambda db: call(db, seeded), expected)
    next_seqs_follow(engine, [seeded["session"], seeded["other_session"]])
