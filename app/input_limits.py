"""The limits of what enters the layer: JSON objects and text that both backends
store unchanged, bounded in depth, integer range and size. The reference, with
each limit's why and the error it raises: docs/input-limits.md.

* ``ensure_json_object(value, name)``: the one rule for JSON that enters the layer
  (schemas, repository arguments, model attributes), with its limits beside it:
  ``MAX_JSON_DEPTH``, ``JSON_INT_MIN``/``JSON_INT_MAX``, ``FLOAT_EXACT_LIMIT`` and the
  size limit ``max_json_bytes()`` (``RUN_DATA_MAX_JSON_BYTES``, default 1 MiB).
* ``text_problem`` / ``text_size_problem`` / ``ensure_storable_text``: the same for
  text (no NUL, no lone surrogate, within the size limit).
* ``is_name``: which keys an error message may quote (short identifiers); any other
  key is named by its position, so an error never quotes a value.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from itertools import repeat
from typing import Any

FLOAT_EXACT_LIMIT = 1e16
"""Floats from this magnitude up print in exponent form; PostgreSQL's JSONB keeps
numbers as ``numeric`` and gives them back as integers, so both backends would
disagree."""

MAX_JSON_DEPTH = 64
"""Containers nested at most this deep (the top-level object is level 1). Every
reader parses that back from any call stack; a value ~980 levels deep would be
stored and then fail to load from an async route."""

JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**63 - 1
"""Integers are signed 64-bit: SQLite's JSON functions read larger ones as floats
and PostgreSQL casts them to ``bigint`` only within this range; Python's encoder
refuses integers of more than 4300 digits outright."""

MAX_JSON_BYTES_ENV = "RUN_DATA_MAX_JSON_BYTES"
DEFAULT_MAX_JSON_BYTES = 1024 * 1024
"""Largest JSON value (UTF-8 bytes of its compact encoding) and largest text argument."""

_NAME_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
"""Keys that error messages quote: short identifiers are names. Any other key is
payload content and is named by its position (``[key 3]``)."""


def is_name(key: str) -> bool:
    """Whether an error message may quote ``key`` (a short identifier), see ``_NAME_KEY``."""
    return _NAME_KEY.fullmatch(key) is not None


def max_json_bytes() -> int:
    """The size limit: ``RUN_DATA_MAX_JSON_BYTES`` if set, else 1 MiB (read at each call)."""
    raw = os.environ.get(MAX_JSON_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_JSON_BYTES
    if not raw.isdigit() or int(raw) <= 0:
        raise RuntimeError(f"{MAX_JSON_BYTES_ENV} must be a positive number of bytes")
    return int(raw)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored verbatim on both backends, or None.

    PostgreSQL refuses NUL characters in text and JSON; a lone surrogate (which
    a decoded JSON body may carry) is not UTF-8, so no driver can send it.
    """
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate, which is not valid Unicode"
    return None


_Path = str | tuple[Any, Any]
"""A place in a value: the argument's name, or (parent place, list index or (key, position))."""


def _render(path: _Path) -> str:
    steps: list[str] = []
    while isinstance(path, tuple):
        path, step = path
        if isinstance(step, int):
            steps.append(f"[{step}]")
        else:
            key, position = step
            steps.append(f".{key}" if is_name(key) else f"[key {position}]")
    steps.reverse()
    if len(steps) > 8:  # deep places: their start and end say enough
        steps[4:-4] = [f"...({len(steps) - 8} levels)..."]
    return str(path) + "".join(steps)


_LEAVE = object()


def _find_unstorable(value: Any, name: str, max_depth: int, max_bytes: int) -> str | None:
    """Why ``value`` cannot be stored verbatim as JSON on both backends, or None.

    An iterative walk (no recursion, whatever the depth) that stops at the first
    problem: a container deeper than ``max_depth`` or inside itself, an integer
    outside 64 bits, a float JSONB would change, text PostgreSQL refuses, a type
    JSON lacks, or more than ``max_bytes`` (counted from below as it goes, so a
    huge value is refused without being walked whole). Messages name the place
    and the limit, never a value.
    """
    size = 1  # every value takes a byte at least, counted when it is met; the rest when read
    most = 0  # and at most: 6 bytes a character (\u001f), 20 an integer, 24 a float
    ancestors: set[int] = set()
    stack: list[tuple[Any, Any, int]] = [(value, name, 1)]
    while stack:
        item, path, depth = stack.pop()
        if item is _LEAVE:
            ancestors.discard(path)
            continue
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{_render(path)} {problem}"
            size += len(item) + 1
            most += 6 * len(item) + 2
        elif item is None or isinstance(item, bool):
            size += 3
            most += 5
        elif isinstance(item, int):
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return (
                    f"{_render(path)} is an integer outside the signed 64-bit range "
                    "(-2**63 to 2**63-1) that both backends read back exactly; send a string"
                )
            most += 20
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_render(path)} is NaN or infinite, not a JSON number"
            if abs(item) >= FLOAT_EXACT_LIMIT:
                return (
                    f"{_render(path)} is a float of magnitude 1e16 or more, which PostgreSQL's "
                    "JSONB does not store exactly; send an integer or a string"
                )
            most += 24
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return f"{_render(path)} is nested deeper than {max_depth} levels"
            if id(item) in ancestors:
                return f"{_render(path)} contains itself; a self-referencing value is not JSON"
            ancestors.add(id(item))
            stack.append((_LEAVE, id(item), depth))
            children: list[tuple[Any, Any, int]] = []
            size += 1
            most += 2 + max(len(item) - 1, 0)  # brackets and commas
            # A wide container is refused before its elements are looked at: each
            # takes 2 bytes at least (``0,``), an object member 5 (``"":0,``).
            floor = len(item) * (5 if isinstance(item, dict) else 2) - 1
            if size + floor > max_bytes:
                size += floor
                break
            if isinstance(item, dict):
                for position, (key, child) in enumerate(item.items()):
                    if not isinstance(key, str):
                        kind = type(key).__name__
                        return f"{_render(path)} has a key of type {kind}, not a string"
                    problem = text_problem(key)
                    if problem:
                        return f"{_render(path)} has a key that {problem}"
                    size += len(key) + 4 + (position > 0)  # "key": value, and a comma
                    most += 6 * len(key) + 3
                    if size > max_bytes:
                        break
                    children.append((child, (path, (key, position)), depth + 1))
            else:
                for index, child in enumerate(item):
                    size += 1 + (index > 0)  # the value and a comma
                    if size > max_bytes:
                        break
                    children.append((child, (path, index), depth + 1))
            stack.extend(reversed(children))
        else:
            return f"{_render(path)} is a {type(item).__name__}, which JSON cannot represent"
        if size > max_bytes:
            break
    if size <= max_bytes < most:
        # The exact count, once the walk has proved the value finite and encodable.
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > max_bytes:
        return (
            f"{name} is larger than {max_bytes} bytes as JSON "
            f"(the limit is set by {MAX_JSON_BYTES_ENV})"
        )
    return None


_FLAT_MEMBERS = 16


_ELEMENT = object()
"""The key ``_most_bytes`` gets with an array's elements (None is a dict key JSON refuses)."""


def _flat_and_storable(value: dict[Any, Any], max_bytes: int, *, nested: bool = False) -> bool:
    """True when ``value`` is a small object of scalars that ``_find_unstorable`` would
    pass (the common event payload), decided without its walk; False means "walk it",
    so every refusal and its message still come from ``_find_unstorable``.

    ``nested``: its members may also be small objects of scalars or small lists of
    scalars, one level down (a lifecycle event's ``{"metrics": {...}}``, the create
    options' ``"target_pages": []``); only where two levels are allowed.
    """
    if len(value) > _FLAT_MEMBERS:
        return False
    most = _most_bytes(value.items(), len(value), nested)
    return 0 <= most <= max_bytes


def _most_bytes(members: Iterable[tuple[Any, Any]], count: int, nested: bool) -> int:
    """At most how many bytes a container takes as JSON, given its ``count`` members as
    (key, value) pairs, the key ``_ELEMENT`` for an array's elements; -1 unless every key
    is a storable string and every value a storable scalar (with ``nested``, or a small
    object or list of them)."""
    most = 2 + count  # brackets and commas, as _find_unstorable counts them
    for key, item in members:
        if key is not _ELEMENT:
            if type(key) is not str or "\x00" in key or not key.isascii():
                return -1
            most += 6 * len(key) + 3
        kind = type(item)
        if kind is str:
            if "\x00" in item or not item.isascii():
                return -1
            most += 6 * len(item) + 2
        elif kind is int:
            if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                return -1
            most += 20
        elif kind is float:
            if not math.isfinite(item) or abs(item) >= FLOAT_EXACT_LIMIT:
                return -1
            most += 24
        elif item is None or kind is bool:
            most += 5
        elif nested and (kind is dict or kind is list) and len(item) <= _FLAT_MEMBERS:
            pairs = item.items() if kind is dict else zip(repeat(_ELEMENT), item)
            inner = _most_bytes(pairs, len(item), False)
            if inner < 0:
                return -1
            most += inner
        else:
            return -1
    return most


def ensure_json_object(
    value: Any,
    name: str = "payload",
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object both backends store unchanged.

    The one rule for JSON that enters the layer (schemas, repository arguments,
    model attributes); the limits are in ``docs/input-limits.md``. PostgreSQL's
    JSONB rejects NUL characters, lone surrogates and NaN, and turns floats from
    1e16 up into integers; SQLite would keep them. The value is bounded in depth
    (``MAX_JSON_DEPTH``), integer range (signed 64-bit) and encoded size
    (``max_json_bytes()``), and must not contain itself. Raises ``ValueError``
    naming the offending place and the limit, never quoting a value.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    limit = max_json_bytes() if max_bytes is None else max_bytes
    if max_depth >= 1 and _flat_and_storable(value, limit, nested=max_depth >= 2):
        return value
    problem = _find_unstorable(value, name, max_depth, limit)
    if problem:
        raise ValueError(problem)
    return value


def text_size_problem(value: str, max_bytes: int | None = None) -> str | None:
    """Why ``value`` is too long to take as a text argument, or None (see ``max_json_bytes``;
    ``max_bytes``: that limit, read once by a caller checking many values)."""
    limit = max_json_bytes() if max_bytes is None else max_bytes
    if len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit:
        return f"is longer than {limit} bytes (the limit is set by {MAX_JSON_BYTES_ENV})"
    return None


def ensure_storable_text(value: str, name: str) -> str:
    """Text that both backends store verbatim, within the size limit; ``ValueError``
    naming ``name`` otherwise."""
    problem = text_problem(value) or text_size_problem(value)
    if problem:
        raise ValueError(f"{name} {problem}")
    return value
