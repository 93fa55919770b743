"""The benchmark report: markdown tables, printed and written to ``reports/benchmarks.md``.

Markdown so that the tables can be pasted into docs/benchmarks.md as they are; each
section says how it was measured and which target applies, and marks every
figure that misses its target.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.migration import MigrationResult
from benchmarks.overhead import (
    ADVANCED_ALCHEMY,
    FLOOR,
    NAIVE,
    NOT_REPORTED,
    OPERATIONS,
    PAGES,
    RAW,
    RAW_OBJECTS,
    RAW_READ,
    RAW_READ_SCHEMAS,
    READ_PATH,
    READ_PATH_READS,
    REPOSITORY,
    SCHEMA_BUILDS,
    SCHEMA_CASES,
    OverheadResult,
)
from benchmarks.queue import CLAIM, COMPLETE, ClaimCostResult, ClaimRate
from benchmarks.scaling import ScalingResult
from benchmarks.stats import Summary, format_us
from benchmarks.throughput import ThroughputResult

RATIO_TARGETS = {"sqlite": 3.0, "postgresql": 1.5}
READ_TARGETS = {  # issue 14: get and pages of 100 have targets of their own
    "sqlite": {
        "get run": 7.0,
        **dict.fromkeys(("list_for_run (page of 100)", "list_for_session (page of 100 runs)"), 7.0),
    },
    "postgresql": {
        "get run": 2.0,
        **dict.fromkeys(("list_for_run (page of 100)", "list_for_session (page of 100 runs)"), 2.0),
    },
}
READ_PATH_TARGETS = {  # issue 21: the read path outside the Session
    "sqlite": {"get run": 3.0},
    "postgresql": {"get run": 1.5},
}
PAGE_OBJECTS_TARGET = 1.5
FLATNESS_TARGET = 1.5
MIGRATION_SECONDS_TARGET = 60.0
MIGRATION_MEMORY_TARGET_MB = 200.0
BACKEND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A markdown table; ``align`` holds one ``l``/``r`` per column (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _verdict(met: bool) -> str:
    return "yes" if met else "**no**"


def _median_p95(summary: Summary) -> str:
    return f"{format_us(summary.median_us)} ({format_us(summary.p95_us)})"


def overhead_section(results: Sequence[OverheadResult]) -> str:
    parts = [
        "## Overhead: repository versus raw driver",
        "",
        "Per operation, one transaction each, median (p95) in microseconds. *repository*: a "
        "`sqlmodel` Session on `app.db.create_db_engine`'s engine, one repository call, "
        "`commit`. *raw*: the statements that call sent to the driver, captured once with "
        "SQLAlchemy's cursor events and replayed with the same SQL and parameters on one "
        "`sqlite3` / `psycopg` connection (fresh ids, timestamps and JSON per call), in the same "
        "transaction (SQLite: `BEGIN IMMEDIATE` ... `COMMIT`, WAL, `synchronous=NORMAL` on both "
        "sides; PostgreSQL: psycopg's implicit `BEGIN` ... `COMMIT`), all rows fetched. Sides "
        "alternate step by step; the first round is a warm-up. On PostgreSQL the engine pings "
        "only connections that sat idle for `DB_POOL_PING_AFTER_IDLE` seconds, so these busy "
        "connections are not pinged. The last operation is no hot path but the "
        "floor: a Session that begins its transaction and commits with no statement, what "
        "every call pays before its own SQL.",
    ]
    for result in results:
        target = RATIO_TARGETS[result.backend]
        samples = result.samples
        rows = []
        for operation in OPERATIONS:
            repository = samples.summary(REPOSITORY, operation)
            raw = samples.summary(RAW, operation)
            ratio = repository.median_us / raw.median_us
            row = [operation, _median_p95(repository), _median_p95(raw), f"{ratio:.2f}"]
            limit = READ_TARGETS[result.backend].get(operation, target)
            verdict = "(floor)" if operation == FLOOR else _verdict(ratio <= limit)
            row.append(verdict if limit == target else f"{verdict} (≤ {limit})")
            rows.append(row)
        header = ["operation", "repository µs", "raw µs", "ratio", f"≤ {target}"]
        count = samples.summary(REPOSITORY, "get run").count
        parts += [
            "",
            f"### {BACKEND_NAMES[result.backend]} ({count} samples per operation and side)",
            "",
            *([f"Placement: {result.placement}.", ""] if result.placement else []),
            table(header, rows, "lrrrl"),
            "",
            _read_bounds(result),
            "",
            _pages_table(result),
            "",
            _read_path_table(result),
            "",
            _schema_builds_table(result),
            "",
            _peers_table(result),
            "",
            _replayed_sql(result, "start"),
        ]
    return "\n".join(parts)


def _read_bounds(result: OverheadResult) -> str:
    """What this run's own figures leave for the read targets: the Session alone against
    ``get``'s budget, and a raw driver building the page's instances against the page's."""
    samples = result.samples
    targets = READ_TARGETS[result.backend]
    raw_get = samples.summary(RAW, "get run").median_us
    floor = samples.summary(REPOSITORY, FLOOR).median_us
    get = samples.summary(REPOSITORY, "get run").median_us
    budget = targets["get run"] * raw_get
    lines = [
        "What bounds the reads in this run:",
        "",
        f"- `get`: its target allows {format_us(budget)} µs ({targets['get run']} x "
        f"{format_us(raw_get)}). The Session alone takes {format_us(floor)} µs "
        f"({floor / raw_get:.2f}x raw `get`), which leaves {format_us(budget - floor)} µs "
        f"for the statement, its row and the instance; the repository spends "
        f"{format_us(get - floor)} µs on them.",
    ]
    for operation in PAGES:
        raw = samples.summary(RAW, operation).median_us
        built = samples.summary(RAW_OBJECTS, operation).median_us
        lines.append(
            f"- {operation}: a raw driver that only builds the model instances from the rows "
            f"takes {built / raw:.2f}x raw, against the target of {targets[operation]}x raw."
        )
    return "\n".join(lines)


def _pages_table(result: OverheadResult) -> str:
    """Pages against a raw driver that also builds the same model instances."""
    samples = result.samples
    rows = []
    for operation in PAGES:
        repository = samples.summary(REPOSITORY, operation)
        built = samples.summary(RAW_OBJECTS, operation)
        ratio = repository.median_us / built.median_us
        rows.append(
            [
                operation,
                _median_p95(repository),
                _median_p95(built),
                f"{ratio:.2f}",
                _verdict(ratio <= PAGE_OBJECTS_TARGET),
            ]
        )
    header = ["page", "repository µs", "raw + objects µs", "ratio", f"≤ {PAGE_OBJECTS_TARGET}"]
    return (
        "Pages versus the raw driver building the same model instances from the rows "
        "(aware datetimes, enums, decoded JSON; in no session):\n\n" + table(header, rows, "lrrrl")
    )


def _read_path_table(result: OverheadResult) -> str:
    """The read path outside the Session (``app.repositories.reads``) against the raw driver
    sending the same statement the same way, and against the repository's raw transaction."""
    samples = result.samples
    targets = READ_PATH_TARGETS[result.backend]
    rows = []
    for operation in READ_PATH_READS:
        mine = samples.summary(READ_PATH, operation)
        raw_read = samples.summary(RAW_READ, operation)
        raw = samples.summary(RAW, operation)
        row = [operation, _median_p95(mine), _median_p95(raw_read)]
        ratio = mine.median_us / raw_read.median_us
        row.append(f"{ratio:.2f}")
        if operation in targets:
            row.append(f"{_verdict(ratio <= targets[operation])} (≤ {targets[operation]})")
        else:
            row.append("")
        schemas = samples.summary(RAW_READ_SCHEMAS, operation)
        row += [_median_p95(schemas), f"{mine.median_us / schemas.median_us:.2f}"]
        if operation in PAGES:
            row[-1] += f" {_verdict(mine.median_us / schemas.median_us <= PAGE_OBJECTS_TARGET)}"
            row[-1] += f" (≤ {PAGE_OBJECTS_TARGET})"
        if operation in PAGES:
            objects = samples.summary(RAW_OBJECTS, operation).median_us
            row += [format_us(objects), f"{mine.median_us / objects:.2f}"]
        else:
            row += ["", ""]
        row += [format_us(raw.median_us), f"{mine.median_us / raw.median_us:.2f}"]
        row.append(f"{samples.summary(REPOSITORY, operation).median_us / mine.median_us:.1f}x")
        rows.append(row)
    header = [
        "read",
        "read path µs",
        "raw read µs",
        "ratio",
        "target",
        "raw read + schemas µs",
        "ratio",
        "raw + objects µs",
        "ratio",
        "raw µs (repository's tx)",
        "ratio",
        "repository / read path",
    ]
    return (
        "Reads outside the ORM Session (`RunReads` / `EventReads`: a pooled connection, the "
        "repository's statement in autocommit, response schemas from the rows), median (p95) "
        "µs, interleaved with the rows above. *raw read*: the same statement replayed as the "
        "read path sends it (one statement in autocommit; PostgreSQL: a connection in "
        "autocommit). *raw read + schemas*: that, plus each value converted by hand (aware "
        "datetimes, enums, decoded JSON) and `model_construct` per row. *raw + objects*: the "
        "pages' comparison above (the model instances in no session, in the repository's "
        "transaction). *raw*: the repository's replay above (in a transaction: SQLite "
        "`BEGIN IMMEDIATE` ... `COMMIT`, PostgreSQL `BEGIN` ... `COMMIT`).\n\n"
        + table(header, rows, "lrrrlrrrrrrr")
    )


def _schema_builds_table(result: OverheadResult) -> str:
    """The ways of making the response schemas from values already read, side by side."""
    samples = result.samples
    rows = []
    for case in SCHEMA_CASES:
        medians = [samples.summary(way, case).median_us for way in SCHEMA_BUILDS]
        rows.append([case, *(format_us(median) for median in medians)])
    return (
        "Making the response schemas from the same stored values, median µs per case "
        "(interleaved; the routes today validate the repository's instance):\n\n"
        + table(["schemas", *SCHEMA_BUILDS], rows)
    )


def _peers_table(result: OverheadResult) -> str:
    """The same operations written the usual ways, median µs and the ratio to raw."""
    samples = result.samples
    peers = [name for name in (NAIVE, ADVANCED_ALCHEMY) if samples.has(name, "get run")]
    rows = []
    for operation in OPERATIONS:
        raw = samples.summary(RAW, operation).median_us
        row = [operation, f"{format_us(samples.summary(REPOSITORY, operation).median_us)}"]
        row[-1] += f" ({samples.summary(REPOSITORY, operation).median_us / raw:.2f}x)"
        for peer in peers:
            if (peer, operation) in NOT_REPORTED or not samples.has(peer, operation):
                row.append(NOT_REPORTED.get((peer, operation), "n/a"))
            else:
                median = samples.summary(peer, operation).median_us
                row.append(f"{format_us(median)} ({median / raw:.2f}x)")
        row.append(format_us(raw))
        rows.append(row)
    header = ["operation", "repository µs (/raw)", *(f"{p} µs (/raw)" for p in peers), "raw µs"]
    return "Peers, same operations on the same schema in the same run:\n\n" + table(header, rows)


def _replayed_sql(result: OverheadResult, operation: str) -> str:
    """The captured statements of one operation, as evidence of what the raw side runs."""
    postgresql = result.backend == "postgresql"
    return "\n".join(
        [
            f"<details><summary>SQL of <code>{operation}</code> as captured and replayed on "
            f"{BACKEND_NAMES[result.backend]}</summary>",
            "",
            "```sql",
            "-- BEGIN: sent by psycopg before the first statement"
            if postgresql
            else "BEGIN IMMEDIATE;  -- sent by the dialect's do_begin (app._dialects)",
            result.scripts[operation].describe() + ";",
            "-- COMMIT: the driver's commit()",
            "```",
            "</details>",
        ]
    )


def scaling_section(results: Sequence[ScalingResult]) -> str:
    parts = [
        "## Scaling: pages of 100 events as `session_events` grows",
        "",
        "Median µs per page through the repositories (one Session per page). A big session "
        "holds a tenth of all rows, shared by two alternating runs; the other sessions hold "
        "100 events each. Data loaded in bulk, then `ANALYZE`.",
    ]
    for result in results:
        smallest, largest = result.sizes[0], result.sizes[-1]
        header = ["page", *(f"{size:,} rows" for size in result.sizes)]
        header += [f"{_short(largest)} / {_short(smallest)}", f"≤ {FLATNESS_TARGET}"]
        rows = []
        for label in result.labels:
            medians = [result.samples.summary(str(size), label).median_us for size in result.sizes]
            ratio = medians[-1] / medians[0]
            rows.append(
                [
                    label,
                    *(format_us(m) for m in medians),
                    f"{ratio:.2f}",
                    _verdict(ratio <= FLATNESS_TARGET),
                ]
            )
        builds = ", ".join(
            f"{_short(size)} in {seconds:.1f} s" for size, seconds in result.build_seconds.items()
        )
        parts += [
            "",
            f"### {BACKEND_NAMES[result.backend]} (databases built: {builds})",
            "",
            table(header, rows, "l" + "r" * (len(header) - 2) + "l"),
        ]
    return "\n".join(parts)


def _short(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return str(size)


def migration_section(results: Sequence[MigrationResult]) -> str:
    rows = []
    for result in results:
        sqlite = result.backend == "sqlite"
        met = (
            result.upgrade_seconds <= MIGRATION_SECONDS_TARGET
            and result.peak_rss_mb < MIGRATION_MEMORY_TARGET_MB
        )
        rows.append(
            [
                BACKEND_NAMES[result.backend],
                f"{result.events:,}",
                f"{result.sessions:,}",
                f"{result.upgrade_seconds:.1f}",
                f"{result.peak_rss_mb:.0f}",
                _verdict(met) if sqlite else "(reported)",
            ]
        )
    steps = []
    for result in results:
        slow = ", ".join(
            f"{entry['migration']} {int(entry['ms']) / 1000:.1f} s"  # type: ignore[call-overload]
            for entry in result.applied
            if int(entry["ms"]) >= 100  # type: ignore[call-overload]
        )
        steps.append(f"- {BACKEND_NAMES[result.backend]}: {slow or 'every migration under 0.1 s'}")
    return "\n".join(
        [
            "## Migration at scale: a v0.7 database upgraded",
            "",
            "The v0.7 schema made by the baseline migration's SQL alone (no version table), rows "
            "loaded in bulk; `upgrade()` in a child process whose wall time and peak resident "
            "memory (`VmHWM`, imports included) are shown. Target on SQLite: ≤ "
            f"{MIGRATION_SECONDS_TARGET:.0f} s and < {MIGRATION_MEMORY_TARGET_MB:.0f} MB.",
            "",
            table(
                ["backend", "events", "sessions", "upgrade s", "peak RSS MB", "target met"],
                rows,
                "lrrrrl",
            ),
            "",
            "Migrations taking 0.1 s or more:",
            "",
            *steps,
        ]
    )


def throughput_section(results: Sequence[ThroughputResult], seconds: float) -> str:
    by_writers: dict[int, dict[str, ThroughputResult]] = {}
    for result in results:
        by_writers.setdefault(result.writers, {})[result.target] = result
    rows = [
        [
            str(writers),
            f"{targets['distinct sessions'].per_second:,.0f}",
            f"{targets['one session'].per_second:,.0f}",
        ]
        for writers, targets in by_writers.items()
    ]
    return "\n".join(
        [
            "## Throughput: appends per second on PostgreSQL",
            "",
            f"Threads, each appending with its own Session and committing every append, for "
            f"{seconds:g} s; pool size = writers. Afterwards every session's seqs are checked "
            "to be exactly 1..n.",
            "",
            table(["writers", "distinct sessions /s", "one session /s"], rows),
        ]
    )


def queue_section(
    rates: Sequence[ClaimRate] | None, costs: Sequence[ClaimCostResult], *, seconds: float
) -> str:
    parts = ["## Run queue: `claim_next`"]
    if rates:
        first = rates[0]
        rows = [
            [
                str(rate.workers),
                f"{rate.claims:,}",
                f"{rate.seconds:.1f}",
                f"{rate.per_second:,.0f}",
                _median_p95_ms(rate.claim),
                _median_p95_ms(rate.complete),
                f"{rate.client_cpu_ms:.2f}",
                "?" if rate.server_cpu_ms is None else f"{rate.server_cpu_ms:.2f}",
                str(rate.conflicts),
                "drained" if rate.drained else "no",
                "ok" if not rate.problems else "**FAILED**",
            ]
            for rate in rates
        ]
        parts += [
            "",
            "### Claims per second on PostgreSQL, worker processes",
            "",
            f"Each worker a process (spawn) with its own engine (a pool of one connection) that "
            f"loops `claim_next` in one unit of work, then `complete` in another, for at most "
            f"{seconds:g} s (clock started when every worker was connected). A new database "
            f"per worker count, with {first.seeded:,} queued runs over {first.sessions} "
            "sessions (round-robin, as `create` leaves them, then `ANALYZE`); that is also the "
            "most claims. Latencies: one unit of work each, median (p95) ms. Afterwards the "
            "database is checked against the workers' reports: no run claimed twice (one "
            "`run_started` per run, claimed by the one worker whose `worker_id` it holds), "
            "every claimed run completed exactly once and the rest still queued, and in each "
            "session's event log `run_started` / `run_completed` alternate for the same run "
            "(never two running runs in a session). CPU: per claim (with its complete), "
            "of the worker processes and of their PostgreSQL backends (`/proc`).",
            "",
            table(
                [
                    "workers",
                    "claims",
                    "s",
                    "claims/s",
                    "claim ms",
                    "complete ms",
                    "client CPU ms",
                    "server CPU ms",
                    "conflicts",
                    "queue",
                    "check",
                ],
                rows,
                "rrrrrrrrrll",
            ),
            "",
        ]
        failed = [rate for rate in rates if rate.problems]
        if failed:
            parts += [
                f"- **check failed** with {rate.workers} workers: {'; '.join(rate.problems)}"
                for rate in failed
            ]
        else:
            total = sum(rate.claims for rate in rates)
            parts.append(
                f"- check: **0 double claims** in {total:,} claims, every claimed run "
                "completed exactly once, never two running runs in a session"
            )
        fifo = all(rate.fifo for rate in rates)
        parts.append(
            "- each session's runs started in their queue order (FIFO per session): "
            + ("yes" if fifo else "**no**")
        )
        for rate in rates:
            shares = ", ".join(
                f"{state} {share:.0%}" for state, share in rate.backend_states if share >= 0.01
            )
            parts.append(
                f"- {rate.workers} worker{'s' if rate.workers > 1 else ''}: where their "
                f"backends were (`pg_stat_activity` every 20 ms): {shares or 'no samples'}"
            )
        parts.append(
            "- process start-up (spawn, imports, connect), not counted: "
            + ", ".join(f"{rate.spawn_seconds:.1f} s for {rate.workers}" for rate in rates)
        )
    if costs:
        rows = []
        for cost in costs:
            target = RATIO_TARGETS[cost.backend]
            row = [
                BACKEND_NAMES[cost.backend]
                + ("" if cost.analyzed else " (no statistics, as migrated)")
            ]
            for operation in (CLAIM, COMPLETE):
                repository = cost.samples.summary(REPOSITORY, operation)
                raw = cost.samples.summary(RAW, operation)
                ratio = repository.median_us / raw.median_us
                row += [_median_p95(repository), _median_p95(raw), f"{ratio:.2f}"]
                if operation == CLAIM:
                    row.append(_verdict(ratio <= target) + f" (≤ {target})")
            row.append("ok" if not cost.problems else "**FAILED**: " + "; ".join(cost.problems))
            rows.append(row)
        first_cost = costs[0]
        count = first_cost.samples.summary(REPOSITORY, CLAIM).count
        parts += [
            "",
            "### `claim_next` versus the raw driver",
            "",
            "One transaction per operation, median (p95) µs, "
            f"{count} samples per operation and side. *repository*: `claim_next` in "
            "`unit_of_work`. *raw*: the statements one `claim_next` sent (SQLite's `BEGIN "
            "IMMEDIATE`, the claim UPDATE, the `run_started` append), captured and replayed "
            "on one `sqlite3` / `psycopg` connection, then the driver's commit; the run id "
            "and session for the append come from the UPDATE's returned row, the lease is "
            "now plus the captured 5 minutes. Both sides claim from one queue of "
            f"{first_cost.depth} runs over {first_cost.sessions} sessions, batch by batch "
            f"({first_cost.batch} per side), swapping who goes first every round; then each "
            "completes its runs the same way, and the queue is refilled to its depth. "
            "Every claim took a run; the check confirms both sides claimed and completed "
            "the same number of runs, each with one `run_started` and one `run_completed`.",
            "",
            table(
                [
                    "backend",
                    "claim_next repo µs",
                    "raw µs",
                    "ratio",
                    "target met",
                    "complete repo µs",
                    "raw µs",
                    "ratio",
                    "check",
                ],
                rows,
                "lrrrlrrrl",
            ),
        ]
        parts.append("")
        for cost in costs:
            name = BACKEND_NAMES[cost.backend] + ("" if cost.analyzed else " without statistics")
            parts.append(f"- plan of the claim UPDATE on {name}: " + "; ".join(cost.plan))
        for cost in costs:
            if cost.analyzed:
                parts += ["", _claim_sql(cost)]
    return "\n".join(parts)


def _median_p95_ms(summary: Summary) -> str:
    return f"{summary.median_us / 1000:.1f} ({summary.p95_us / 1000:.1f})"


def _claim_sql(cost: ClaimCostResult) -> str:
    postgresql = cost.backend == "postgresql"
    return "\n".join(
        [
            "<details><summary>SQL of <code>claim_next</code> as captured and replayed on "
            f"{BACKEND_NAMES[cost.backend]}</summary>",
            "",
            "```sql",
            *(["-- BEGIN: sent by psycopg before the first statement"] if postgresql else []),
            cost.claim_script.describe() + ";",
            "-- COMMIT: the driver's commit()",
            "```",
            "</details>",
        ]
    )


def header_section(command: str, facts: dict[str, str], notes: Sequence[str]) -> str:
    rows = [[key, value] for key, value in facts.items()]
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{command}`",
        "",
        table(["", ""], rows, "ll"),
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)
