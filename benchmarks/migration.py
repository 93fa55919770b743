"""Migration at scale: a v0.7 database with 1M events across 10k sessions, upgraded.

The v0.7 database is made the way v0.7 made it: the baseline migration's
SQL alone (``MIGRATIONS[0]``), run without the runner, so there is no version
table, then rows loaded in bulk. The upgrade runs in a child process
(``python -m benchmarks.migration <url>``), so its wall time and its peak
resident memory (``VmHWM``) are the upgrade's alone, imports included.
Targets (SQLite): at most 60 s and under 200 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.db import create_db_engine
from benchmarks.bulk import event_log, load_in_bulk
from benchmarks.environment import ScratchDatabases
from migrations import MIGRATIONS, upgrade

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class MigrationResult:
    backend: str
    events: int
    sessions: int
    build_seconds: float
    upgrade_seconds: float
    peak_rss_mb: float
    applied: list[dict[str, object]]


def build_v07_database(backend: str, url: str, events: int, sessions: int) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            MIGRATIONS[0].apply(conn)
    finally:
        engine.dispose()
    log = event_log(events, session_size=max(1, events // sessions), with_runs=False)
    load_in_bulk(backend, url, log, v07=True)


def measure_migration(
    backend: str, databases: ScratchDatabases, *, events: int, sessions: int
) -> MigrationResult:
    url = databases.url(backend, "migration")
    try:
        started = time.perf_counter()
        build_v07_database(backend, url, events, sessions)
        build_seconds = time.perf_counter() - started
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.migration", url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"upgrade failed ({child.returncode}):\n{child.stderr}")
        report = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        databases.drop(url)
    return MigrationResult(
        backend=backend,
        events=events,
        sessions=sessions,
        build_seconds=build_seconds,
        upgrade_seconds=report["seconds"],
        peak_rss_mb=report["peak_rss_kb"] / 1024,
        applied=report["applied"],
    )


def _peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _upgrade_child(url: str) -> None:
    """Child process: upgrade ``url`` and print one JSON line with time, memory and notes."""
    engine = create_db_engine(url)
    started = time.perf_counter()
    applied = upgrade(engine)
    seconds = time.perf_counter() - started
    engine.dispose()
    report = {
        "seconds": seconds,
        "peak_rss_kb": _peak_rss_kb(),
        "applied": [
            {"migration": f"{m.version:04d}_{m.name}", "ms": m.duration_ms, "notes": m.notes}
            for m in applied
        ],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    _upgrade_child(sys.argv[1])
