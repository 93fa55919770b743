"""Property tests: every repository entry point refuses bad input cleanly and writes nothing.

Each example makes one argument bad (random unicode with lone surrogates, NUL
bytes, very long strings, wrong types, unknown fields, huge or negative
limits, non-object payloads, JSON past the depth, size and integer limits or
containing itself, unknown ids, a transition from the wrong status)
and keeps the others valid. The call must raise a ``DataLayerError`` whose
message names what was wrong, never a driver error; then the caller commits
anyway (as a careless caller would) and every table's fingerprint must equal
the one taken before the first example.

Hostile but valid text (SQL injection attempts and random unicode) goes
through every text field and must come back verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlmodel import Session as DbSession

from app.errors import DataLayerError
from app.models import ChatSession, RunStatus, TriggerSource
from app.repositories import EventRepository, RunRepository
from app.state_machine import TRANSITIONS
from tests.concurrency import in_own_transaction
from tests.reliability import invariants
from tests.reliability.figures import record
from tests.reliability.strategies import beyond_the_limits

EXAMPLES = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

INJECTIONS = (
    "'; DROP TABLE session_runs; --",
    '" OR 1=1 --',
    "' OR '1'='1",
    "1; DELETE FROM session_events WHERE 1=1",
    "Robert'); DROP TABLE sessions;--",
    "%s %(x)s :run_id ? $1",
    "\\'; SELECT pg_sleep(10); --",
    "') UNION SELECT id, title FROM sessions --",
    "*/ DROP TABLE session_event_sequences; /*",
)

# ------------------------------------------------------------------ strategies

storable_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1
)
hostile_text = st.sampled_from(INJECTIONS) | storable_text
long_text = st.builds(
    lambda char, n: char * n, st.sampled_from("x'é😀\\"), st.integers(5000, 60_000)
)
with_nul = st.builds(lambda a, b: f"{a}\x00{b}", st.text(max_size=20), st.text(max_size=20))
with_surrogate = st.builds(
    lambda a, s: a + s, st.text(max_size=10), st.characters(categories=("Cs",))
)
not_a_string = (
    st.integers()
    | st.floats()
    | st.binary()
    | st.booleans()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
bad_text = st.just("") | with_nul | with_surrogate | not_a_string
bad_required_text = bad_text | st.none()
unknown_id = hostile_text.filter(lambda s: len(s) < 200) | long_text

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
not_an_object = (
    st.lists(json_scalars, max_size=3)
    | st.text()
    | st.integers()
    | st.floats()
    | st.booleans()
    | st.binary()
)


def _unstorable_objects(bad_text: st.SearchStrategy[str]) -> st.SearchStrategy[dict[Any, Any]]:
    """JSON objects that cannot be stored verbatim on both backends."""
    return st.one_of(
        st.builds(lambda k: {k: 1}, bad_text),
        st.builds(lambda v: {"k": v}, bad_text),
        st.builds(lambda v: {"k": {"deep": [v]}}, st.sampled_from([math.nan, math.inf, -math.inf])),
        st.builds(lambda k: {k: "v"}, st.integers() | st.tuples(st.integers())),
        st.builds(lambda v: {"k": v}, st.binary() | st.sets(st.integers(), min_size=1)),
    )


bad_object = not_an_object | _unstorable_objects(with_nul | with_surrogate) | beyond_the_limits
"""Never ``None``: it means ``{}``, a valid payload. Includes deep, wide, self-referencing
and huge objects and integers past 64 bits (``strategies.beyond_the_limits``)."""

bad_limit = (
    st.integers(max_value=0)
    | st.integers(min_value=1001)
    | st.integers(min_value=2**63, max_value=2**200)
    | st.floats()
    | st.text(max_size=4)
    | st.booleans()
    | st.none()
)
bad_since_seq = (
    st.integers(max_value=-1)
    | st.integers(min_value=2**31)
    | st.floats()
    | st.text(max_size=4)
    | st.booleans()
)
bad_status = st.text(max_size=20).filter(lambda s: s not in set(RunStatus)) | not_a_string
bad_older_than = (
    st.timedeltas(max_value=timedelta(0))
    | st.timedeltas(min_value=timedelta(days=10**6))
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.none()
)


# --------------------------------------------------------------------- seeded


@dataclass(frozen=True)
class Seeded:
    """A session with a run in every status, another session with its own run, one event_id."""

    session_id: str
    other_session_id: str
    other_run_id: str
    runs: dict[RunStatus, str]
    event_id: str

    def known(self, value: Any) -> bool:
        return value in {self.session_id, self.other_session_id, self.other_run_id} or (
            value in self.runs.values()
        )


def _seed(db: DbSession) -> Seeded:
    session_id = db.merge(ChatSession(title="target")).id
    other_session_id = db.merge(ChatSession(title="other")).id
    runs, events = RunRepository(db), EventRepository(db)

    def run_in(status: RunStatus) -> str:
        run = runs.create({"session_id": session_id, "message": f"a {status} run"})
        if status is RunStatus.CANCELLED:
            runs.cancel(run.id)
        elif status is not RunStatus.QUEUED:
            runs.start(run.id)
            final = {
                RunStatus.WAITING_INPUT: lambda: runs.wait_for_input(run.id, "which?"),
                RunStatus.COMPLETED: lambda: runs.complete(run.id, {"tokens": 3}),
                RunStatus.FAILED: lambda: runs.fail(run.id, {"code": "x"}),
            }.get(RunStatus(status))
            if final is not None:
                final()
        return run.id

    # One running run per session: the running one is made last.
    by_status = {status: run_in(status) for status in RunStatus if status != RunStatus.RUNNING}
    by_status[RunStatus.RUNNING] = run_in(RunStatus.RUNNING)
    other_run_id = runs.create({"session_id": other_session_id, "message": "elsewhere"}).id
    events.append(session_id, "message", {"hello": "world"}, event_id="seeded-event")
    return Seeded(session_id, other_session_id, other_run_id, by_status, "seeded-event")


@pytest.fixture
def seeded(engine: Engine) -> Iterator[tuple[Seeded, dict[str, tuple[int, str]]]]:
    state = in_own_transaction(engine, _seed)
    before = invariants.fingerprint(engine)
    yield state, before
    assert invariants.fingerprint(engine) == before


# ------------------------------------------------------------------- attempts


@dataclass(frozen=True)
class Attempt:
    """One call with one bad argument, and what its error message must mention."""

    entry_point: str
    call: Callable[[DbSession], object]
    mentions: str


def _refused(engine: Engine, before: object, attempt: Attempt, backend: str) -> None:
    record("bad inputs tried", 1, backend)
    accepted = 0
    with DbSession(engine, expire_on_commit=False) as db:
        try:
            result = attempt.call(db)
            accepted = 1
        except DataLayerError as error:
            # A caller that commits after the refusal must still write nothing.
            db.commit()
            message = error.message
        else:
            db.rollback()
        record("bad inputs accepted", accepted, backend)
    assert not accepted, f"{attempt.entry_point} accepted bad input and returned {result!r}"
    assert attempt.mentions in message, f"{attempt.entry_point}: {message!r}"
    assert invariants.fingerprint(engine) == before, f"{attempt.entry_point} changed the database"


def _unknown(seeded: Seeded) -> st.SearchStrategy[str]:
    return unknown_id.filter(lambda value: not seeded.known(value))


def _bad_id(seeded: Seeded, name: str = "run_id") -> st.SearchStrategy[tuple[Any, str]]:
    """An id that is unknown (the error quotes it) or not a storable id (it names the parameter)."""
    return _unknown(seeded).map(lambda value: (value, repr(value))) | bad_required_text.map(
        lambda value: (value, name)
    )


# ---------------------------------------------------------------------- create


@st.composite
def create_attempts(draw: st.DrawFn, seeded: Seeded) -> Attempt:
    valid = {"session_id": seeded.session_id, "message": "hello"}
    runs = RunRepository
    field = draw(
        st.sampled_from(
            ["body", "field", "extra", "session", "trigger_source", "parent", "checkpoint_ns"]
        )
    )
    if field == "body":
        body = draw(not_an_object | st.none())
        return Attempt("create(body)", lambda db: runs(db).create(body), "invalid run")
    if field == "field":
        name, bad = draw(
            st.sampled_from(["session_id", "message"]).flatmap(
                lambda n: st.tuples(st.just(n), bad_required_text)
            )
            # Lone surrogates here: see test_surrogate_in_style_reference_is_refused.
            | st.tuples(
                st.just("style_reference"),
                not_an_object | _unstorable_objects(with_nul) | beyond_the_limits,
            )
            | st.tuples(
                st.just("target_pages"),
                not_an_object.filter(lambda v: not isinstance(v, list))
                | st.lists(bad_text, min_size=1, max_size=3),
            )
            | st.tuples(st.just("generate_now"), st.text(min_size=2) | st.lists(st.integers()))
        )
        body = {**valid, name: bad}
        return Attempt(f"create({name})", lambda db: runs(db).create(body), name)
    if field == "extra":
        extra = draw(
            st.dictionaries(
                storable_text.filter(lambda k: k not in {"session_id", "message"}),
                json_scalars,
                min_size=1,
                max_size=3,
            ).filter(lambda d: set(d) - {"generate_now", "style_reference", "target_pages"})
        )
        body = {**valid, **extra}
        return Attempt("create(unknown field)", lambda db: runs(db).create(body), "invalid run")
    if field == "session":
        unknown = draw(_unknown(seeded).filter(lambda s: "\x00" not in s))
        body = {**valid, "session_id": unknown}
        return Attempt("create(unknown session)", lambda db: runs(db).create(body), repr(unknown))
    if field == "trigger_source":
        bad = draw(
            st.text(max_size=10).filter(lambda s: s not in set(TriggerSource)) | not_a_string
        )
        return Attempt(
            "create(trigger_source)",
            lambda db: runs(db).create(valid, trigger_source=bad),
            "trigger_source",
        )
    if field == "parent":
        parent, mentions = draw(
            _bad_id(seeded, "parent_run_id").filter(lambda pair: pair[0] is not None)
            | st.just((seeded.other_run_id, repr(seeded.other_run_id)))
        )
        return Attempt(
            "create(parent_run_id)",
            lambda db: runs(db).create(valid, parent_run_id=parent),
            mentions,
        )
    bad = draw(bad_text)
    return Attempt(
        "create(checkpoint_ns)",
        lambda db: runs(db).create(valid, checkpoint_ns=bad),
        "checkpoint_ns",
    )


# ----------------------------------------------------------------------- reads


@st.composite
def read_attempts(draw: st.DrawFn, seeded: Seeded) -> Attempt:
    runs, events = RunRepository, EventRepository
    session_id, run_id = seeded.session_id, seeded.runs[RunStatus.COMPLETED]
    kind = draw(st.integers(0, 11))
    if kind == 0:
        bad, mentions = draw(_bad_id(seeded))
        return Attempt("get", lambda db: runs(db).get(bad), mentions)
    if kind == 1:
        bad = draw(bad_required_text)
        return Attempt(
            "list_for_session(session_id)", lambda db: runs(db).list_for_session(bad), "session_id"
        )
    if kind == 2:
        bad = draw(bad_status)
        return Attempt(
            "list_for_session(status)",
            lambda db: runs(db).list_for_session(session_id, status=bad),
            "status",
        )
    if kind == 3:
        bad = draw(bad_limit)
        return Attempt(
            "list_for_session(limit)",
            lambda db: runs(db).list_for_session(session_id, limit=bad),
            "limit",
        )
    if kind == 4:
        bad, mentions = draw(_bad_id(seeded, "before").filter(lambda pair: pair[0] is not None))
        return Attempt(
            "list_for_session(before)",
            lambda db: runs(db).list_for_session(session_id, before=bad),
            mentions,
        )
    if kind == 5:
        status, limit, mentions = draw(
            st.tuples(bad_status.filter(lambda s: s is not None), st.just(10), st.just("status"))
            | st.tuples(st.just(RunStatus.QUEUED), bad_limit, st.just("limit"))
        )
        return Attempt(
            "list_by_status", lambda db: runs(db).list_by_status(status, limit=limit), mentions
        )
    if kind == 6:
        bad, mentions = draw(_bad_id(seeded))
        return Attempt("children", lambda db: runs(db).children(bad), mentions)
    if kind == 7:
        bad = draw(bad_required_text)
        return Attempt("latest_waiting", lambda db: runs(db).latest_waiting(bad), "session_id")
    if kind == 8:
        bad = draw(bad_required_text)
        return Attempt(
            "events.list_for_session(session_id)",
            lambda db: events(db).list_for_session(bad),
            "session_id",
        )
    if kind == 9:
        since, limit, mentions = draw(
            st.tuples(bad_since_seq, st.just(10), st.just("since_seq"))
            | st.tuples(st.just(0), bad_limit, st.just("limit"))
        )
        return Attempt(
            "events.list_for_session(page)",
            lambda db: events(db).list_for_session(session_id, since_seq=since, limit=limit),
            mentions,
        )
    if kind == 10:
        bad, mentions = draw(_bad_id(seeded))
        return Attempt("events.list_for_run", lambda db: events(db).list_for_run(bad), mentions)
    since, limit, mentions = draw(
        st.tuples(bad_since_seq, st.just(10), st.just("since_seq"))
        | st.tuples(st.just(0), bad_limit, st.just("limit"))
    )
    return Attempt(
        "events.list_for_run(page)",
        lambda db: events(db).list_for_run(run_id, since_seq=since, limit=limit),
        mentions,
    )


def test_unknown_sessions_read_as_empty(engine: Engine, seeded: tuple[Seeded, Any]) -> None:
    """Listing an unknown session is a query with no rows, not an error (unlike an unknown
    run, which the Run API answers with 404): an empty page, and nothing written."""

    def read(db: DbSession) -> tuple[object, ...]:
        runs, events = RunRepository(db), EventRepository(db)
        return (
            runs.list_for_session(INJECTIONS[0]),
            runs.latest_waiting(INJECTIONS[1]),
            events.list_for_session(INJECTIONS[2]),
        )

    assert in_own_transaction(engine, read) == ([], None, [])


# ------------------------------------------------------------------ transitions

_TRANSITION_CALLS: dict[str, Callable[[RunRepository, Any], object]] = {
    "start": lambda runs, run_id: runs.start(run_id),
    "wait_for_input": lambda runs, run_id: runs.wait_for_input(run_id, "why"),
    "resume": lambda runs, run_id: runs.resume(run_id, {"user_feedback": "ok"}),
    "complete": lambda runs, run_id: runs.complete(run_id, {"tokens": 1}),
    "fail": lambda runs, run_id: runs.fail(run_id, {"code": "x"}),
    "cancel": lambda runs, run_id: runs.cancel(run_id),
    "retry": lambda runs, run_id: runs.retry(run_id),
    "heartbeat": lambda runs, run_id: runs.heartbeat(run_id),
    "delete": lambda runs, run_id: runs.delete(run_id),
}
_WRONG_STATUSES: dict[str, frozenset[RunStatus]] = {
    **{t.name: frozenset(RunStatus) - t.sources for t in TRANSITIONS if t.name != "cancel"},
    "retry": frozenset(RunStatus) - {RunStatus.FAILED, RunStatus.CANCELLED},
    "heartbeat": frozenset(RunStatus) - {RunStatus.RUNNING},
}
_BAD_ARGUMENT: dict[str, tuple[RunStatus, str, st.SearchStrategy[Any]]] = {
    "wait_for_input": (RunStatus.RUNNING, "reason", bad_required_text),
    "resume": (RunStatus.WAITING_INPUT, "resume", bad_object | st.none()),
    "complete": (RunStatus.RUNNING, "metrics", bad_object),
    "fail": (RunStatus.RUNNING, "error", bad_object),
}


@st.composite
def transition_attempts(draw: st.DrawFn, seeded: Seeded) -> Attempt:
    kind = draw(st.sampled_from(["unknown run", "wrong status", "bad argument", "fail_stale"]))
    if kind == "unknown run":
        name = draw(st.sampled_from(sorted(_TRANSITION_CALLS)))
        bad, mentions = draw(_bad_id(seeded))
        call = _TRANSITION_CALLS[name]
        return Attempt(f"{name}(unknown)", lambda db: call(RunRepository(db), bad), mentions)
    if kind == "wrong status":
        name = draw(st.sampled_from(sorted(_WRONG_STATUSES)))
        run_id = seeded.runs[draw(st.sampled_from(sorted(_WRONG_STATUSES[name])))]
        call = _TRANSITION_CALLS[name]
        return Attempt(f"{name}(wrong status)", lambda db: call(RunRepository(db), run_id), run_id)
    if kind == "bad argument":
        name = draw(st.sampled_from(sorted(_BAD_ARGUMENT)))
        status, argument, strategy = _BAD_ARGUMENT[name]
        run_id, bad = seeded.runs[status], draw(strategy)
        return Attempt(
            f"{name}({argument})",
            lambda db: getattr(RunRepository(db), name)(run_id, bad),
            argument,
        )
    bad = draw(bad_older_than)
    return Attempt("fail_stale", lambda db: RunRepository(db).fail_stale(bad), "older_than")


# ---------------------------------------------------------------------- append


@st.composite
def append_attempts(draw: st.DrawFn, seeded: Seeded) -> Attempt:
    valid: dict[str, Any] = {
        "session_id": seeded.session_id,
        "type": "message",
        "payload": {"ok": True},
        "run_id": seeded.runs[RunStatus.RUNNING],
        "event_id": None,
    }
    name = draw(st.sampled_from(["session_id", "type", "payload", "source", "run_id", "event_id"]))
    if name == "session_id":
        bad, mentions = draw(_bad_id(seeded, "session_id"))
    elif name == "type":
        bad, mentions = draw(bad_required_text | long_text), "type"
    elif name == "payload":
        bad, mentions = draw(bad_object), "payload"
    elif name == "source":
        bad = draw(st.text(max_size=10).filter(lambda s: s not in {"session", "plan", "task"}))
        mentions = "source"
    elif name == "run_id":
        bad, mentions = draw(
            _bad_id(seeded).filter(lambda pair: pair[0] is not None)
            | st.just((seeded.other_run_id, repr(seeded.other_run_id)))
        )
    else:
        bad, mentions = draw(bad_text | long_text), "event_id"
    arguments = {**valid, name: bad}
    return Attempt(
        f"append({name})",
        lambda db: EventRepository(db).append(
            arguments.pop("session_id"), arguments.pop("type"), **arguments
        ),
        mentions,
    )


ATTEMPTS: dict[str, Callable[[Seeded], st.SearchStrategy[Attempt]]] = {
    "create": create_attempts,
    "reads": read_attempts,
    "transitions": transition_attempts,
    "append": append_attempts,
}


@pytest.mark.slow  # 120 examples per group of entry points: seconds each
@pytest.mark.parametrize("entry_points", sorted(ATTEMPTS))
@EXAMPLES
@given(data=st.data())
def test_entry_points_refuse_bad_input(
    engine: Engine,
    seeded: tuple[Seeded, Any],
    backend: str,
    entry_points: str,
    data: st.DataObject,
) -> None:
    state, before = seeded
    _refused(engine, before, data.draw(ATTEMPTS[entry_points](state)), backend)


# ------------------------------------------------------------ hostile round trip


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=hostile_text.filter(lambda s: len(s) <= 100),
    number=st.integers(-(2**63), 2**63 - 1) | st.floats(min_value=-1e15, max_value=1e15),
)
def test_hostile_text_round_trips_verbatim(engine: Engine, text: str, number: float) -> None:
    """Every text field the layer writes, and JSON keys and values, come back as given."""
    metric_key = text.replace('"', "'")

    def write(db: DbSession) -> tuple[str, str]:
        session = db.merge(
            ChatSession(id=f"{text}-{invariants.count(engine, 'sessions')}", title=text)
        )
        runs, events = RunRepository(db), EventRepository(db)
        body = {
            "session_id": session.id,
            "message": text,
            "style_reference": {text: [text, number]},
            "target_pages": [text],
        }
        run = runs.create(body, checkpoint_ns=text)
        runs.start(run.id)
        runs.wait_for_input(run.id, text)
        runs.resume(run.id, {text: text})
        # A double quote in a metrics key: see test_metric_key_with_a_double_quote_is_kept.
        runs.complete(run.id, {metric_key: number})
        events.append(session.id, text, {text: {text: number}}, run_id=run.id, event_id=text)
        return session.id, run.id

    tables = invariants.count(engine, "session_runs")
    session_id, run_id = in_own_transaction(engine, write)

    def read(db: DbSession) -> None:
        run = RunRepository(db).get(run_id)
        assert run.session_id == session_id and run.input_message == text
        assert run.options["style_reference"] == {text: [text, number]}
        assert run.options["target_pages"] == [text]
        assert run.checkpoint_ns == text and run.resume_payload == {text: text}
        assert run.metrics == {metric_key: number} and run.waiting_reason is None
        assert db.get(ChatSession, session_id).title == text
        stored = EventRepository(db).list_for_run(run_id)[-1]
        assert (stored.type, stored.event_id, stored.payload) == (
            text,
            text,
            {text: {text: number}},
        )
        again = EventRepository(db).append(session_id, "again", event_id=text)
        assert again.id == stored.id, "the same event_id must find the stored event"

    in_own_transaction(engine, read)
    assert invariants.count(engine, "session_runs") == tables + 1
    assert invariants.violations(engine) == []


# ------------------------------------------------------------ once-known gaps, now closed


def test_surrogate_in_style_reference_is_refused(
    engine: Engine, seeded: tuple[Seeded, Any], backend: str
) -> None:
    state, before = seeded
    body = {"session_id": state.session_id, "message": "m", "style_reference": {"k": "\ud800"}}
    with DbSession(engine) as db, pytest.raises(DataLayerError, match="style_reference"):
        RunRepository(db).create(body)
    assert invariants.fingerprint(engine) == before


def test_floats_that_jsonb_would_change_are_refused(
    engine: Engine, seeded: tuple[Seeded, Any], backend: str
) -> None:
    """JSONB keeps numbers as ``numeric``: 1.7976931348623157e308 would come back as a
    309-digit integer on PostgreSQL while SQLite keeps the float. Both refuse it."""
    state, before = seeded
    for too_big in (1.7976931348623157e308, -1.2345678901234567e25, 1e16):
        with DbSession(engine) as db, pytest.raises(DataLayerError, match=r"payload\.big"):
            EventRepository(db).append(state.session_id, "numbers", {"big": too_big})
    assert invariants.fingerprint(engine) == before


def test_numbers_below_the_limit_round_trip_with_their_type(engine: Engine, backend: str) -> None:
    kept = {"below": 9.999999999999998e15, "tiny": 5e-324, "third": 1 / 3, "int": 2**63 - 1}

    def write(db: DbSession) -> str:
        session_id = db.merge(ChatSession(title="numbers")).id
        EventRepository(db).append(session_id, "numbers", kept)
        return session_id

    session_id = in_own_transaction(engine, write)
    payload = in_own_transaction(
        engine, lambda db: EventRepository(db).list_for_session(session_id)[0].payload
    )
    assert payload == kept
    assert {key: type(value) for key, value in payload.items()} == {
        "below": float,
        "tiny": float,
        "third": float,
        "int": int,
    }


def test_metric_keys_with_double_quotes_merge_verbatim(engine: Engine, backend: str) -> None:
    """``complete`` merges key by key inside the UPDATE; no key or value is mangled."""
    stored = {'say "hi"': 1, "kept": 0.1 + 0.2, "nested": {"a": None}}
    patch = {'say "hi"': 2, '" OR 1=1 --': 0.5, "nil": None, "deep": {"x": [1, {"y": None}]}}

    def complete(db: DbSession) -> str:
        session_id = db.merge(ChatSession(title="metrics")).id
        runs = RunRepository(db)
        run = runs.create({"session_id": session_id, "message": "m"})
        runs.update_metrics(run.id, stored)
        runs.start(run.id)
        runs.complete(run.id, patch)
        return run.id

    run_id = in_own_transaction(engine, complete)
    merged = in_own_transaction(engine, lambda db: RunRepository(db).get(run_id).metrics)
    assert merged == {**stored, **patch}
    assert merged["kept"] == 0.30000000000000004
