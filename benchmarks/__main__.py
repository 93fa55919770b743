"""``python -m benchmarks``: every benchmark, a printed report and ``reports/benchmarks.md``.

From a fresh clone: ``scripts/install && .venv/bin/python -m benchmarks``.
PostgreSQL comes from ``BENCH_DATABASE_URL``, else ``TEST_DATABASE_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``; the benchmarks create
their own databases there (``bench_<pid>_*``) and drop them. Without a
reachable server the PostgreSQL parts are skipped and the report says why.

``--quick`` uses small sizes (for development on a busy machine); the
defaults are the sizes of the benchmarks issue and take a few minutes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.batch import batch_section, measure_batches
from benchmarks.environment import (
    PLACEMENTS,
    ScratchDatabases,
    machine_facts,
    postgresql_reachable,
    postgresql_server_url,
    scratch_databases,
)
from benchmarks.migration import measure_migration
from benchmarks.overhead import measure_overhead
from benchmarks.queue import measure_claim_cost, measure_claim_rates
from benchmarks.report import (
    header_section,
    migration_section,
    overhead_section,
    queue_section,
    scaling_section,
    throughput_section,
)
from benchmarks.scaling import measure_scaling
from benchmarks.throughput import measure_throughput

PARTS = ("overhead", "batch", "scaling", "migration", "throughput", "queue")
BACKENDS = ("sqlite", "postgresql")
QUEUE_SESSIONS = 200
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "reports" / "benchmarks.md"

FULL = {
    "rounds": 20,
    "batch": 25,
    "sizes": "10000,100000,1000000",
    "scaling_rounds": 10,
    "scaling_batch": 20,
    "migration_events": 1_000_000,
    "migration_sessions": 10_000,
    "writers": "1,4,16",
    "seconds": 10.0,
    "claimers": "1,4,16",
    "claim_seconds": 8.0,
    "claim_runs": 10_000,
}
QUICK = {
    **FULL,
    "rounds": 3,
    "batch": 8,
    "sizes": "10000,30000,100000",
    "scaling_rounds": 2,
    "scaling_batch": 5,
    "migration_events": 100_000,
    "migration_sessions": 1_000,
    "seconds": 2.0,
    "claim_seconds": 2.0,
    "claim_runs": 3_000,
}


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of the Run data layer (see benchmarks/__init__.py).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {PARTS}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="sqlite,postgresql")
    parser.add_argument("--rounds", type=int, help="overhead: measured rounds")
    parser.add_argument("--batch", type=int, help="overhead: runs per side and round")
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="apart",
        help="overhead on PostgreSQL: where the client and the server processes run "
        "(benchmarks.environment.Placement)",
    )
    parser.add_argument("--sizes", help="scaling: event counts, e.g. 10000,100000,1000000")
    parser.add_argument("--scaling-rounds", type=int)
    parser.add_argument("--scaling-batch", type=int, help="scaling: reads per page and round")
    parser.add_argument("--migration-events", type=int)
    parser.add_argument("--migration-sessions", type=int)
    parser.add_argument("--writers", help="throughput: writer counts, e.g. 1,4,16")
    parser.add_argument("--seconds", type=float, help="throughput: seconds per measurement")
    parser.add_argument("--claimers", help="queue: worker process counts, e.g. 1,4,16")
    parser.add_argument("--claim-seconds", type=float, help="queue: seconds per worker count")
    parser.add_argument("--claim-runs", type=int, help="queue: runs seeded (and most claims)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown report")
    args = parser.parse_args(argv)
    for key, default in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    unknown = set(_csv(args.only)) - set(PARTS) or set(_csv(args.backends)) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown part or backend: {sorted(unknown)}")
    return args


def _overhead(args: argparse.Namespace, databases: ScratchDatabases, backends: list[str]) -> str:
    return overhead_section(
        [
            measure_overhead(
                backend,
                databases.url(backend, "overhead"),
                rounds=args.rounds,
                batch=args.batch,
                placement=args.placement,
            )
            for backend in backends
        ]
    )


def _batch(args: argparse.Namespace, databases: ScratchDatabases, backends: list[str]) -> str:
    return batch_section(
        [
            measure_batches(
                backend, databases.url(backend, "batch"), rounds=args.rounds, batches=args.batch
            )
            for backend in backends
        ]
    )


def _scaling(args: argparse.Namespace, databases: ScratchDatabases, backends: list[str]) -> str:
    sizes = sorted(int(size) for size in _csv(args.sizes))
    return scaling_section(
        [
            measure_scaling(
                backend, databases, sizes, rounds=args.scaling_rounds, batch=args.scaling_batch
            )
            for backend in backends
        ]
    )


def _migration(args: argparse.Namespace, databases: ScratchDatabases, backends: list[str]) -> str:
    return migration_section(
        [
            measure_migration(
                backend, databases, events=args.migration_events, sessions=args.migration_sessions
            )
            for backend in backends
        ]
    )


def _throughput(
    args: argparse.Namespace, databases: ScratchDatabases, backends: list[str]
) -> str | None:
    if "postgresql" not in backends:
        return None
    results = measure_throughput(
        databases.url("postgresql", "throughput"),
        writer_counts=tuple(int(count) for count in _csv(args.writers)),
        seconds=args.seconds,
    )
    return throughput_section(results, args.seconds)


def _queue(args: argparse.Namespace, databases: ScratchDatabases, backends: list[str]) -> str:
    rates = None
    if "postgresql" in backends:
        rates = measure_claim_rates(
            databases,
            worker_counts=tuple(int(count) for count in _csv(args.claimers)),
            seconds=args.claim_seconds,
            runs=args.claim_runs,
            sessions=QUEUE_SESSIONS,
        )
    costs = []
    for backend in backends:
        # SQLite as the migrations leave it (no statistics), and after ANALYZE.
        for analyze in (False, True) if backend == "sqlite" else (True,):
            url = databases.url(backend, "queue_cost" + ("_analyzed" if analyze else ""))
            costs.append(
                measure_claim_cost(
                    backend,
                    url,
                    rounds=args.rounds,
                    batch=args.batch,
                    sessions=QUEUE_SESSIONS,
                    analyze=analyze,
                )
            )
            databases.drop(url)
    return queue_section(rates, costs, seconds=args.claim_seconds)


Runner = Callable[[argparse.Namespace, ScratchDatabases, list[str]], str | None]
RUNNERS: dict[str, Runner] = {
    "overhead": _overhead,
    "batch": _batch,
    "scaling": _scaling,
    "migration": _migration,
    "throughput": _throughput,
    "queue": _queue,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    parts, backends = _csv(args.only), _csv(args.backends)
    notes = ["quick run (small sizes): figures for development only"] if args.quick else []
    notes.append(f"load average at the start (1, 5, 15 min): {_load()}")
    postgresql_url: str | None = None
    if "postgresql" in backends:
        postgresql_url = postgresql_server_url()
        problem = postgresql_reachable(postgresql_url)
        if problem:
            notes.append(f"PostgreSQL skipped, unreachable: {problem}")
            backends.remove("postgresql")
            postgresql_url = None

    command = shlex.join([".venv/bin/python", "-m", "benchmarks", *argv])
    sections = [header_section(command, machine_facts(postgresql_url), notes)]
    _emit(sections[-1])
    with scratch_databases(postgresql_url) as databases:
        for part in parts:
            section = RUNNERS[part](args, databases, backends)
            if section is not None:
                sections.append(section)
                _emit(section)
    sections.append(f"Load average at the end (1, 5, 15 min): {_load()}")
    _emit(sections[-1])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n\n".join(sections) + "\n")
    print(f"\nreport written to {args.output}")
    return 0


def _load() -> str:
    """The machine's load average, as ``uptime`` shows it: the figures of a busy machine
    are noisier (other processes share its cores)."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _emit(section: str) -> None:
    print(section + "\n", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
