"""Hypothesis strategies for JSON values beyond the limits of ``docs/input-limits.md``.

Deep (past 64 levels, up to thousands), wide (hundreds of thousands of
elements), self-referencing (a dict or list inside itself, at any depth),
huge (past the 1 MiB size limit in ASCII, two-byte and four-byte characters)
and integers outside signed 64 bits (up to 10**5000, which Python's encoder
cannot write). Each is built in one step from a few drawn numbers, so
generating a megabyte costs no more than generating a byte.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from app.input_limits import DEFAULT_MAX_JSON_BYTES, JSON_INT_MAX, JSON_INT_MIN, MAX_JSON_DEPTH


def nest(levels: int, leaf: Any, key: str = "a", in_list: bool = False) -> dict[str, Any]:
    """``levels`` containers around ``leaf``, the outermost an object (every other one
    a list when ``in_list``)."""
    value: Any = leaf
    for level in range(levels):
        value = [value] if in_list and (levels - 1 - level) % 2 else {key: value}
    return value


def inside_itself(levels: int, as_list: bool) -> dict[str, Any]:
    """An object that contains itself ``levels`` down (through a list when ``as_list``)."""
    top: dict[str, Any] = {"top": 1}
    holder: Any = top
    for _ in range(levels):
        child: Any = [] if as_list else {}
        if isinstance(holder, dict):
            holder["next"] = child
        else:
            holder.append(child)
        holder = child
    if isinstance(holder, dict):
        holder["back"] = top
    else:
        holder.append(top)
    return top


_LIMIT = DEFAULT_MAX_JSON_BYTES
_scalar_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5)

too_deep = st.builds(
    nest,
    st.integers(MAX_JSON_DEPTH + 1, 5000),
    _scalar_leaf,
    st.sampled_from(["a", "key with spaces", ""]),
    st.booleans(),
)
self_referencing = st.builds(inside_itself, st.integers(0, 70), st.booleans())
too_wide = (
    st.builds(lambda n: {"v": [0] * n}, st.integers(_LIMIT // 2 + 1, _LIMIT))
    | st.builds(lambda n: {f"k{i}": i for i in range(n)}, st.integers(_LIMIT // 5 + 1, _LIMIT // 4))
    | st.builds(
        lambda n, char, length: {f"k{i}": [char * length] for i in range(n)},
        st.integers(1800, 2500),
        st.sampled_from(["x", "é", "\t"]),
        st.integers(600, 700),
    )
)
"""Over the limit by count alone (``0,`` takes 2 bytes, ``"":0,`` 5), or only once
its members are read (1800 members and more of 600 characters and more)."""
too_big = st.builds(
    lambda char, extra: {"v": char * (DEFAULT_MAX_JSON_BYTES // len(char.encode()) + extra)},
    st.sampled_from(["x", "é", "😀", "\n"]),
    st.integers(1, 1000),
)
out_of_range_integer = st.builds(
    lambda n, place: {"v": n} if place else {"v": [1, {"n": n}]},
    st.integers(min_value=JSON_INT_MAX + 1)
    | st.integers(max_value=JSON_INT_MIN - 1)
    | st.just(10**5000)
    | st.just(-(10**400)),
    st.booleans(),
)

beyond_the_limits = too_deep | self_referencing | too_wide | too_big | out_of_range_integer
"""JSON objects that no entry point may take."""
