"""Running a test with the fast paths on and off (``app.repositories.set_fast_paths``).

    from tests.fast_paths import both_ways, fast_paths  # noqa: F401 (the fixture)

    @both_ways
    def test_x(engine): ...        # test_x[fast-sqlite], test_x[plain-sqlite], ...

``fast`` is the driver path and the read path's direct rows; ``plain`` sends every
statement through SQLAlchemy's own execution and validates every read row
(docs/design.md). The switch is the process's: the fixture restores it after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from app.repositories import set_fast_paths

F = TypeVar("F", bound=Callable[..., Any])


@pytest.fixture
def fast_paths(request: pytest.FixtureRequest) -> Iterator[bool]:
    """The fast paths on (the default) or off, as the test is parametrized."""
    enabled = bool(getattr(request, "param", True))
    previous = set_fast_paths(enabled)
    try:
        yield enabled
    finally:
        set_fast_paths(previous)


def both_ways(test: F) -> F:
    """Run ``test`` with the fast paths on (``fast``) and off (``plain``)."""
    test = pytest.mark.usefixtures("fast_paths")(test)
    return pytest.mark.parametrize(
        "fast_paths", [True, False], ids=["fast", "plain"], indirect=True
    )(test)
