"""``functools.cache`` as the type checker should see it: with the signature of the
function it wraps.

The layer caches per model class and per dialect class; mypy takes a class for an
unhashable argument of ``lru_cache``'s ``*args: Hashable``, so each call of a plain
``@cache`` function on a class would need an ignore.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")


def cache(function: Callable[P, R]) -> Callable[P, R]:
    """``functools.cache(function)``, typed as ``function``."""
    return cast("Callable[P, R]", functools.cache(function))


__all__ = ["cache"]
