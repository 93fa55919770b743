"""The column types' own conversions equal SQLAlchemy's general ones, and the
lighter JSON change tracking behaves as ``sqlalchemy.ext.mutable`` expects.

``UTCDateTime`` and ``StrEnumType`` convert in one function per value
(``app.types``), and rows are decoded by ``app.json_codec.loads``: each is compared
here with the two-step conversion SQLAlchemy would do, and with ``json.loads``.
"""

from __future__ import annotations

import ast
import gc
import inspect
import json
import math
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext import mutable
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session as DbSession

from app.json_codec import dumps, loads
from app.models import RunStatus, SessionRun
from app.repositories import RunRepository
from app.types import StrEnumType, TrackedJSONDict, UTCDateTime, _Parents
from tests.factories import SessionRunFactory

SQLITE, POSTGRESQL = sqlite.dialect(), postgresql.dialect()  # type: ignore[attr-defined]

aware = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    ),
)
naive = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))


def _general(type_: TypeDecorator[Any], dialect: Any, direction: str) -> Any:
    """SQLAlchemy's own two-step conversion: ``process_*_value`` around the impl's."""
    impl = type_.dialect_impl(dialect)
    return getattr(TypeDecorator, f"{direction}_processor")(
        impl, dialect, *((None,) if direction == "result" else ())
    )


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(aware, naive))
def test_utc_datetime_writes_what_sqlalchemy_writes_on_sqlite(value: datetime) -> None:
    impl = UTCDateTime().dialect_impl(SQLITE)
    fast = impl.bind_processor(SQLITE)
    assert fast is not None and fast.__qualname__.startswith("UTCDateTime.")
    assert fast(value) == _general(UTCDateTime(), SQLITE, "bind")(value)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(aware, naive))
def test_utc_datetime_reads_what_sqlalchemy_reads_on_sqlite(value: datetime) -> None:
    stored = _general(UTCDateTime(), SQLITE, "bind")(value)
    fast = UTCDateTime().dialect_impl(SQLITE).result_processor(SQLITE, None)
    read = fast(stored)
    assert read == _general(UTCDateTime(), SQLITE, "result")(stored)
    assert read.tzinfo is UTC


@pytest.mark.parametrize(
    "stored",
    ["2026-12-06T03:18:27", "2026-12-06 03:18:27+02:00", "2026-12-06", "2026-12-06 03:18:27.5"],
)
def test_utc_datetime_reads_other_stored_forms_as_before(stored: str) -> None:
    """Legacy text in other forms (a T, an offset, no time) takes the general way."""
    fast = UTCDateTime().dialect_impl(SQLITE).result_processor(SQLITE, None)
    assert fast(stored) == _general(UTCDateTime(), SQLITE, "result")(stored)


@given(value=st.one_of(aware, naive))
def test_utc_datetime_reads_psycopg_values_as_aware_utc(value: datetime) -> None:
    fast = UTCDateTime().dialect_impl(POSTGRESQL).result_processor(POSTGRESQL, None)
    assert fast(value) == _general(UTCDateTime(), POSTGRESQL, "result")(value)
    assert fast(value).tzinfo is UTC


def test_utc_datetime_refuses_what_is_no_datetime() -> None:
    fast = UTCDateTime().dialect_impl(SQLITE).bind_processor(SQLITE)
    with pytest.raises(TypeError, match="expected a datetime"):
        fast("2026-12-06")


def test_str_enum_reads_members_and_refuses_unknown_values() -> None:
    fast = StrEnumType(RunStatus).dialect_impl(SQLITE).result_processor(SQLITE, None)
    for member in RunStatus:
        assert fast(member.value) is member
    assert fast(None) is None
    with pytest.raises(ValueError, match="paused"):
        fast("paused")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, ascii=st.booleans())
def test_rows_decode_as_json_loads_decodes(value: Any, ascii: bool) -> None:
    text_ = json.dumps(value, ensure_ascii=ascii)
    assert loads(text_) == json.loads(text_)
    assert loads(text_.encode()) == json.loads(text_)  # psycopg hands over bytes


storable_flat = st.dictionaries(
    st.text(max_size=12),
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15)
    | st.text(max_size=20),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(storable_flat, json_values))
def test_stored_text_reads_back_as_json_dumps_text_does(value: Any) -> None:
    assert json.loads(dumps(value)) == json.loads(json.dumps(value))
    if isinstance(value, dict):
        assert json.loads(dumps(TrackedJSONDict(value))) == json.loads(json.dumps(value))


@pytest.mark.parametrize(
    "value",
    [
        {"score": float("nan")},
        {"big": 2**70},
        {"text": "x\ud800y"},
        {1: "integer key"},
        {"nested": {"a": 1}},
        [1, 2],
    ],
)
def test_what_is_not_certainly_storable_is_written_by_json_dumps(value: Any) -> None:
    """A value that escaped validation is stored (or refused) as before, never changed."""
    assert dumps(value) == json.dumps(value)


@pytest.mark.parametrize(
    "legacy",
    ['{"v": NaN}', '{"v": Infinity}', '{"v": 123456789012345678901234567890}', '"\\ud800"'],
)
def test_what_orjson_refuses_is_read_by_json(legacy: str) -> None:
    """v0.7 stored what Python's encoder wrote; it still reads back the same."""
    expected = json.loads(legacy)
    read = loads(legacy)
    if (
        isinstance(expected, dict)
        and isinstance(expected["v"], float)
        and math.isnan(expected["v"])
    ):
        assert math.isnan(read["v"])
    else:
        assert read == expected


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_legacy_nan_payload_reads_through_the_repositories(engine: Engine) -> None:
    with DbSession(engine, expire_on_commit=False) as db:
        run = SessionRunFactory.build()
        db.add(run.session)
        db.add(run)
        db.commit()
        db.execute(
            text("UPDATE session_runs SET metrics = :m WHERE id = :id"),
            {"m": '{"score": NaN, "big": 123456789012345678901234567890}', "id": run.id},
        )
        db.commit()
    with DbSession(engine) as db:
        metrics = RunRepository(db).get(run.id).metrics
    assert math.isnan(metrics["score"]) and metrics["big"] == 123456789012345678901234567890


# --------------------------------------------------------------------------
# TrackedJSONDict: the parents registry


def test_mutable_uses_only_what_the_parents_registry_offers() -> None:
    """``sqlalchemy.ext.mutable`` reads ``_parents`` by ``[state] = key``,
    ``.pop(state, None)`` and ``.items()`` only (``app.types._Parents``)."""
    tree = ast.parse(inspect.getsource(mutable))
    parents_of = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "_parents":
            outer = parents_of[node]
            if isinstance(outer, ast.Subscript) and isinstance(outer.ctx, ast.Store):
                uses.append("setitem")
            elif isinstance(outer, ast.Attribute) and outer.attr in ("pop", "items"):
                uses.append(outer.attr)
            elif isinstance(outer, ast.FunctionDef):
                uses.append("definition")
            else:
                uses.append(ast.dump(outer))
    assert set(uses) <= {"setitem", "pop", "items", "definition"}, uses
    assert {"setitem", "pop", "items"} <= set(uses)


def test_a_change_in_place_flags_every_parent(db: DbSession) -> None:
    shared = TrackedJSONDict({"pages": 1})
    first, second = SessionRunFactory(), SessionRunFactory()
    db.commit()
    first.options = shared
    second.options = shared
    db.commit()
    shared["pages"] = 2
    assert first in db.dirty and second in db.dirty
    db.commit()
    db.expire_all()
    assert first.options == second.options == {"pages": 2}


def test_a_replaced_value_no_longer_flags_its_old_parent(db: DbSession) -> None:
    run = SessionRunFactory(options={"pages": 1})
    db.commit()
    old = run.options
    run.options = {"pages": 3}
    db.commit()
    old["pages"] = 99
    assert run not in db.dirty
    assert old._parents.items() == []


def test_a_value_outliving_its_parent_holds_no_reference_to_it() -> None:
    run = SessionRun(session_id="s", options={"pages": 1})
    value = run.options
    assert isinstance(value, TrackedJSONDict)
    assert len(value._parents.items()) == 1
    del run
    gc.collect()
    assert value._parents.items() == []
    value["pages"] = 2  # no parent left to flag: nothing happens


def test_a_tracked_value_pickles_as_a_plain_dict_of_its_items() -> None:
    value = SessionRun(session_id="s", options={"pages": 1}).options
    copy = pickle.loads(pickle.dumps(value))
    assert copy == {"pages": 1} and copy._parents.items() == []


def test_the_parents_registry_keeps_each_parent_once_and_forgets_the_dead() -> None:
    class State:  # stands for InstanceState: only identity and weak references matter
        pass

    a, b, c = State(), State(), State()
    parents = _Parents()
    parents[a] = "options"
    parents[a] = "metrics"  # the same parent again: its key is replaced
    parents[b] = "options"
    parents[c] = "payload"
    assert parents.items() == [(a, "metrics"), (b, "options"), (c, "payload")]
    assert parents.pop(a) == "metrics"
    assert parents.pop(a, "gone") == "gone"
    assert parents.items() == [(b, "options"), (c, "payload")]
    del b
    gc.collect()
    assert parents.items() == [(c, "payload")]
    parents[a] = "options"
    assert sorted(key for _state, key in parents.items()) == ["options", "payload"]
    assert parents.pop(c) == "payload" and parents.items() == [(a, "options")]
