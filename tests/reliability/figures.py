"""Figures the reliability suite collects and prints at the end of a run.

Tests record what they did (``record("faults survived", 1, backend)``); the
suite's conftest prints one table per run and writes ``reports/reliability.json``
so the table in docs/reliability.md can be refreshed from a real run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

FIGURES: defaultdict[tuple[str, str], int] = defaultdict(int)

ORDER = (
    "lifecycle operations",
    "conflicts refused",
    "events appended",
    "violations found",
    "faults survived",
    "bad inputs tried",
    "bad inputs accepted",
    "rows lost",
)


def record(name: str, amount: int, backend: str) -> None:
    FIGURES[(name, backend)] += amount


def table() -> list[tuple[str, dict[str, int]]]:
    names = sorted(
        {name for name, _ in FIGURES},
        key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n),
    )
    return [
        (name, {backend: FIGURES[(name, backend)] for (n, backend) in FIGURES if n == name})
        for name in names
    ]


def write_json(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({name: values for name, values in table()}, indent=2, sort_keys=True)
    )
