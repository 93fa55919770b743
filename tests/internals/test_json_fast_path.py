"""``app.input_limits``: the shortcut for small flat objects never passes what the
full walk refuses."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.input_limits import MAX_JSON_DEPTH, _find_unstorable, _flat_and_storable

# Mostly ASCII text, which the shortcut takes, with any text now and then, which it leaves
# to the walk: with any text alone, few values would get past the shortcut's first check.
keys = st.one_of(st.text(alphabet=string.printable, max_size=12), st.text(max_size=12))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=string.printable, max_size=30),
    st.text(max_size=30),
)
flat = st.dictionaries(keys, scalars, max_size=20)


@settings(max_examples=400, deadline=None)
@given(value=flat, limit=st.integers(min_value=1, max_value=400))
def test_the_shortcut_agrees_with_the_walk(value: dict[str, Any], limit: int) -> None:
    if _flat_and_storable(value, limit):
        assert _find_unstorable(value, "payload", MAX_JSON_DEPTH, limit) is None


members = st.one_of(
    scalars,
    st.dictionaries(keys, scalars, max_size=20),
    st.lists(scalars, max_size=20),
    st.tuples(scalars),  # a tuple is an array to the walk; the shortcut leaves it to the walk
)
one_level_down = st.dictionaries(keys, members, max_size=20)


@settings(max_examples=600, deadline=None)
@given(value=one_level_down, limit=st.integers(min_value=1, max_value=300))
def test_the_nested_shortcut_agrees_with_the_walk(value: dict[str, Any], limit: int) -> None:
    if _flat_and_storable(value, limit, nested=True):
        assert _find_unstorable(value, "payload", 2, limit) is None
    if _flat_and_storable(value, limit):  # one level down only when asked for
        assert all(type(member) not in (dict, list) for member in value.values())


def test_the_payloads_transitions_write_take_the_shortcut() -> None:
    """The common shapes are decided without the walk (else the shortcut would be idle)."""
    for payload in (
        {"metrics": {"tokens": 4096, "cost_usd": 0.12}},
        {"error": {"code": "tool_error", "message": "renderer crashed"}},
        {"resume": {"user_feedback": "Use the audited ones"}},
        {"generate_now": False, "style_reference": None, "target_pages": []},
        {"target_pages": ["intro", "figures"]},
    ):
        assert _flat_and_storable(payload, 1_000, nested=True), payload
        assert not _flat_and_storable(payload, 1_000), payload
    too_deep = {"a": {"b": {"c": 1}}}
    too_big = {"metrics": {"text": "x" * 200}}
    self_ref: dict[str, Any] = {}
    self_ref["me"] = {"inner": 1}
    self_ref["me"]["loop"] = self_ref
    none_key = {"metrics": {None: 1}}  # JSON keys are strings; the walk refuses it
    for payload in (too_deep, too_big, self_ref, none_key, {None: 1}):
        assert not _flat_and_storable(
            payload, 1_000 if payload is not too_big else 100, nested=True
        )


ascii_text = st.text(alphabet=string.printable, max_size=30)
eligible_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15),
    ascii_text,
)
eligible = st.dictionaries(
    ascii_text,
    st.one_of(
        eligible_scalars,
        st.dictionaries(ascii_text, eligible_scalars, max_size=16),
        st.lists(eligible_scalars, max_size=16),
    ),
    max_size=16,
)


@settings(max_examples=400, deadline=None)
@given(value=eligible, limit=st.integers(min_value=1, max_value=3000))
def test_the_shortcut_never_passes_a_value_over_the_limit(
    value: dict[str, Any], limit: int
) -> None:
    """Values the shortcut would take when the limit allows: its bound is never below the
    value's real size (else it would pass what the walk refuses)."""
    if _flat_and_storable(value, limit, nested=True):
        assert _find_unstorable(value, "payload", 2, limit) is None
    assert _flat_and_storable(value, 10**9, nested=True)  # each of these is eligible
