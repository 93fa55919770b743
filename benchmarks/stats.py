"""Latency samples and the few statistics the reports show.

Medians and 95th percentiles rather than means: a single garbage collection
or scheduler hiccup moves a mean, not a median, and p95 still shows the tail.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter_ns


@dataclass(frozen=True, slots=True)
class Summary:
    """Median and p95 of one operation's samples, in microseconds."""

    count: int
    median_us: float
    p95_us: float


def summarize(samples_ns: Iterable[int]) -> Summary:
    ordered = sorted(samples_ns)
    if not ordered:
        raise ValueError("no samples to summarize")
    p95_index = min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))
    return Summary(len(ordered), statistics.median(ordered) / 1000, ordered[p95_index] / 1000)


class Samples:
    """Durations in nanoseconds, keyed by (side, operation)."""

    def __init__(self) -> None:
        self._by_key: defaultdict[tuple[str, str], list[int]] = defaultdict(list)

    def time(self, side: str, operation: str, call: Callable[[], object]) -> None:
        started = perf_counter_ns()
        call()
        self._by_key[side, operation].append(perf_counter_ns() - started)

    def has(self, side: str, operation: str) -> bool:
        return bool(self._by_key.get((side, operation)))

    def summary(self, side: str, operation: str) -> Summary:
        return summarize(self._by_key[side, operation])


def format_us(value: float) -> str:
    """Microseconds with precision that suits their size (12.3, 456, 7 890)."""
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}".replace(",", " ")
