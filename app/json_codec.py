"""JSON for the engines (``json_deserializer`` / ``json_serializer``) and the batch transport.

Reading is the hot part of a page: a run row holds four JSON columns and an
event its payload, and ``json.loads`` takes about 1.1 µs for a small object
where orjson takes 0.2 µs. ``loads`` is orjson's, falling back to ``json.loads``
for what orjson refuses or would read differently (``NaN``, lone surrogates,
and integers beyond 64 bits, which orjson turns into floats), as rows that v0.7
wrote may hold: the values read are the same as before.

``dumps`` writes a flat object of plain scalars (the usual event payload,
error, metrics) with orjson, as compact UTF-8 text, when it is certainly
storable as it is (``app.input_limits._flat_and_storable``: no NaN, no integer beyond
64 bits, no lone surrogate); anything else goes to ``json.dumps`` exactly as
SQLAlchemy's default would, so a value that escaped validation is stored or
refused as before instead of orjson writing ``NaN`` as ``null``.
``dumps_transport`` encodes the ``append_many`` batch array, whose items were
validated and which the database unpacks in the same statement.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from sqlalchemy import String, TypeDecorator

from app.input_limits import _flat_and_storable
from app.types import TrackedJSONDict

_INT64 = 2.0**63


def loads(text: str | bytes) -> Any:
    """``json.loads``, with orjson's speed for everything orjson reads exactly."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:  # NaN, Infinity, lone surrogates
        return json.loads(text)
    # orjson reads an integer beyond 64 bits as a float, losing digits; the text is
    # read again by json then (floats that large are refused on write, so only
    # legacy rows get there).
    return json.loads(text) if _has_huge_float(value) else value


def _has_huge_float(value: Any) -> bool:
    """Whether a float of magnitude 2**63 or more is anywhere in ``value`` (iterative)."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            item = item.values()
        elif kind is not list:
            if kind is float and not -_INT64 < item < _INT64:
                return True
            continue
        for child in item:
            kind = type(child)
            if kind is float:
                if not -_INT64 < child < _INT64:
                    return True
            elif kind is dict or kind is list:
                stack.append(child)
    return False


def dumps(value: Any) -> str:
    """JSON text of a value to store (module docstring); ``json.loads`` of it is the
    value, as with ``json.dumps``."""
    if type(value) in _OBJECTS and _flat_and_storable(value, _ANY_SIZE):
        return orjson.dumps(value).decode()
    return json.dumps(value)


_OBJECTS = frozenset({dict, TrackedJSONDict})
_ANY_SIZE = 2**62
"""Size is the validation's business; any size is stored as it is."""


def dumps_transport(value: Any) -> str:
    """Compact JSON text of a validated value that only travels to the database."""
    return orjson.dumps(value).decode()


class JSONText(TypeDecorator[str]):
    """Text of a JSON document the layer encoded itself (``dumps_transport``: the
    ``append_many`` batch arrays): bound as text; the benchmarks' raw side encodes it
    again per call, as driver code would."""

    impl = String
    cache_ok = True


__all__ = ["JSONText", "dumps", "dumps_transport", "loads"]
