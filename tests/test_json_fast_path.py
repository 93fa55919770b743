"""``app.types``: the shortcut for small flat objects never passes what the full walk refuses."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.types import MAX_JSON_DEPTH, _find_unstorable, _flat_and_storable

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
flat = st.dictionaries(st.text(max_size=12), scalars, max_size=20)


@settings(max_examples=400, deadline=None)
@given(value=flat, limit=st.integers(min_value=1, max_value=400))
def test_the_shortcut_agrees_with_the_walk(value: dict[str, Any], limit: int) -> None:
    if _flat_and_storable(value, limit):
        assert _find_unstorable(value, "payload", MAX_JSON_DEPTH, limit) is None
