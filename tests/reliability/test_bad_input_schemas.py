"""Property tests: the API schemas accept exactly the storable input and say why not.

The database is not involved here; ``test_bad_input_repositories.py`` drives the
same kind of input through the repositories and checks the database is unchanged.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.input_limits import ensure_json_object
from app.schemas import RunCreate, RunResumeRequest
from tests.reliability.figures import record
from tests.reliability.strategies import beyond_the_limits

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
anything = json_values | st.binary() | st.tuples(st.integers())


def _storable(value: Any) -> bool:
    """The rule, restated: what PostgreSQL's text and JSONB keep exactly, as SQLite does."""
    if isinstance(value, str):
        return "\x00" not in value and value.encode("utf-8", "replace").decode() == value
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) < 1e16
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


@pytest.mark.slow  # 300 examples: seconds
@SETTINGS
@given(
    session_id=st.text(max_size=300) | anything,
    message=st.text(max_size=2000) | anything,
    style_reference=json_values,
    target_pages=st.lists(st.text(max_size=50), max_size=5) | anything,
    extra=st.dictionaries(
        st.text(min_size=1).filter(lambda k: k not in RunCreate.model_fields), anything, max_size=2
    ),
)
def test_run_create_accepts_exactly_storable_input(
    session_id: Any, message: Any, style_reference: Any, target_pages: Any, extra: dict
) -> None:
    body = {
        "session_id": session_id,
        "message": message,
        "style_reference": style_reference,
        "target_pages": target_pages,
        **extra,
    }
    valid = (
        not extra
        and isinstance(session_id, str)
        and session_id != ""
        and isinstance(message, str)
        and message != ""
        and (style_reference is None or isinstance(style_reference, dict))
        and isinstance(target_pages, list)
        and all(isinstance(p, str) and p != "" for p in target_pages)
        and _storable([session_id, message, style_reference, target_pages])
    )
    record("bad inputs tried", 0 if valid else 1, "schemas")
    try:
        parsed = RunCreate.model_validate(body)
    except ValidationError as error:
        assert not valid, f"valid body refused: {error}"
        assert error.errors(), "a refusal names at least one field"
        return
    assert valid, f"invalid body accepted: {body!r}"
    assert parsed.session_id == session_id and parsed.message == message
    again = RunCreate.model_validate_json(parsed.model_dump_json())
    assert again == parsed
    json.loads(parsed.model_dump_json())


@pytest.mark.slow  # 300 examples: seconds
@SETTINGS
@given(resume=anything)
def test_resume_request_accepts_only_storable_objects(resume: Any) -> None:
    valid = isinstance(resume, dict) and _storable(resume)
    record("bad inputs tried", 0 if valid else 1, "schemas")
    try:
        parsed = RunResumeRequest.model_validate({"resume": resume})
    except ValidationError:
        assert not valid
        return
    assert valid
    assert parsed.resume == resume


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=beyond_the_limits, field=st.sampled_from(["resume", "style_reference"]))
def test_json_beyond_the_limits_is_refused_by_the_schemas(bad: dict, field: str) -> None:
    """Deep, wide, self-referencing, huge, or with an integer past 64 bits: a validation
    error on the field, never a RecursionError or an encoder error."""
    record("bad inputs tried", 1, "schemas")
    body: dict[str, Any] = {"resume": bad}
    schema: type[RunCreate | RunResumeRequest] = RunResumeRequest
    if field == "style_reference":
        schema, body = RunCreate, {"session_id": "s", "message": "m", field: bad}
    try:
        schema.model_validate(body)
    except ValidationError as error:
        (problem,) = error.errors(include_input=False)
        assert problem["loc"] == (field,), problem
        return
    record("bad inputs accepted", 1, "schemas")
    raise AssertionError(f"{field} accepted a value beyond the limits")


storable_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=8
)
storable_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(-1e15, 1e15)
    | st.floats(-1e-300, 1e-300)
    | storable_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(storable_text, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(value=st.dictionaries(storable_text, storable_json, max_size=4))
def test_the_size_limit_counts_the_compact_utf8_encoding_exactly(value: dict) -> None:
    """A value of n bytes fits a limit of n and not of n - 1, whichever of the walk's
    bounds (from below, from above) or the exact count decides."""
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    assert ensure_json_object(value, "v", max_bytes=size) is value
    with pytest.raises(ValueError, match="larger than"):
        ensure_json_object(value, "v", max_bytes=size - 1)
