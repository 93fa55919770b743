"""Command line: ``python -m migrations upgrade|status|sql|history|current [--url URL]``.

The database is ``--url``, else ``DATABASE_URL``, else the embedded SQLite
file ``./runs.db`` (``app.db.resolve_database_url``).

Exit codes: 0 success / up to date; 1 ``status`` found pending or changed
migrations, or a database problem (unreachable, no database at a SQLite path
for ``status``/``sql``, not writable, ``upgrade`` failed, refused or gave up
waiting); 2 a usage or configuration mistake (bad option, URL, dialect or
environment variable). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from migrations.command_line import (
    DATABASE,
    OneLineParser,
    OperatorError,
    add_connect_timeout,
    database_problem,
    open_engine,
    seconds,
    seconds_or_zero,
)
from migrations.psql import NotRunnableError, runnable_sql
from migrations.runner import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    pending_sql,
    status,
    upgrade,
)
from migrations.steps import MigrationError

REVIEW_HEADER = (
    "-- A review listing, NOT runnable as it is: guarded statements are preceded by their\n"
    "-- condition in words and keep their :placeholders; upgrade decides and binds them.\n"
    "-- On PostgreSQL, python -m migrations sql (without --review) prints a psql script."
)


def _upgrade(engine: Engine, args: argparse.Namespace) -> int:
    if engine.dialect.name == "postgresql":
        statement = f"{args.statement_timeout:g} s" if args.statement_timeout else "no limit"
        print(
            f"waits: {args.lock_timeout:g} s in all for locks, each statement's lock wait "
            f"{args.statement_lock_timeout:g} s then retried; statement run time {statement}"
        )
    applied = upgrade(
        engine,
        allow_changed=args.allow_changed,
        lock_timeout=args.lock_timeout,
        statement_lock_timeout=args.statement_lock_timeout,
        statement_timeout=args.statement_timeout,
    )
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name} in {migration.duration_ms} ms")
        for note in migration.notes:
            print(f"  note: {note}")
    states = status(engine)
    incomplete = [f"{s.version:04d}_{s.name}" for s in states if s.state == "pending"]
    if incomplete:
        print(
            f"{len(applied)} applied now; still pending: {', '.join(incomplete)} "
            "(see the notes above; the next upgrade retries)"
        )
    elif applied:
        print(f"up to date: {len(applied)} applied now, {len(states)} in all")
    else:
        print(f"nothing to do: all {len(states)} migrations already applied")
    return 0


def _status(engine: Engine, _args: argparse.Namespace) -> int:
    problems = 0
    for state in status(engine):
        label = f"{state.version:04d}_{state.name}"
        record = state.recorded
        if record is None:
            print(f"pending  {label}")
            problems += 1
            continue
        when = f"applied {record.applied_at:%Y-%m-%d %H:%M:%S} UTC in {record.duration_ms} ms"
        if state.state == "pending":
            problems += 1
            print(f"pending  {label} ({when}, incomplete: the next upgrade retries it)")
        elif state.state == "changed":
            problems += 1
            print(
                f"CHANGED  {label} ({when}): code checksum {(state.checksum or '')[:12]} "
                f"!= recorded {record.checksum[:12]}; upgrade refuses it without --allow-changed"
            )
        elif state.state == "unknown":
            print(f"unknown  {label} ({when}): recorded by a newer version of this layer")
        else:
            print(f"applied  {label} ({when})")
        for note in record.notes:
            print(f"  note: {note}")
    print("up to date" if problems == 0 else f"{problems} pending or changed")
    return 0 if problems == 0 else 1


def _history(engine: Engine, args: argparse.Namespace) -> int:
    """Every recorded migration in the order it was applied, with its time and notes."""
    records = sorted(
        (state.recorded for state in status(engine) if state.recorded is not None),
        key=lambda record: (record.applied_at, record.version),
    )
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "version": record.version,
                        "name": record.name,
                        "applied_at": record.applied_at.isoformat(),
                        "duration_ms": record.duration_ms,
                        "checksum": record.checksum,
                        "notes": list(record.notes),
                    }
                    for record in records
                ]
            )
        )
        return 0
    for record in records:
        print(
            f"{record.applied_at:%Y-%m-%d %H:%M:%S} UTC  {record.version:04d}_{record.name}"
            f"  {record.duration_ms} ms  checksum {record.checksum[:12]}"
        )
        for note in record.notes:
            print(f"  note: {note}")
    print(f"{len(records)} recorded" if records else "no migration recorded (an empty database)")
    return 0


def _current(engine: Engine, args: argparse.Namespace) -> int:
    """The newest applied version, and what is pending (exit 0 either way)."""
    states = status(engine)
    applied = [s for s in states if s.state in ("applied", "unknown")]
    newest = max(applied, key=lambda s: s.version, default=None)
    pending = [f"{s.version:04d}_{s.name}" for s in states if s.state in ("pending", "changed")]
    label = f"{newest.version:04d}_{newest.name}" if newest is not None else None
    if args.json:
        print(json.dumps({"current": label, "pending": pending}))
    else:
        print(label or "none (no migration applied)")
        if pending:
            print(f"pending: {', '.join(pending)}")
    return 0


def _sql(engine: Engine, args: argparse.Namespace) -> int:
    """PostgreSQL: a psql script that runs as it is (``migrations.psql``); with
    ``--review``, or on SQLite, the review listing: not runnable (guards in words)."""
    if engine.dialect.name == "postgresql" and not args.review:
        print(runnable_sql(engine))
    else:
        print(REVIEW_HEADER)
        print(pending_sql(engine))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m migrations", description="Schema migrations of the Run data layer."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "upgrade": "apply pending migrations, printing each with its duration",
        "status": "list applied, pending and changed migrations (exit 1 unless up to date)",
        "sql": "print the SQL upgrade would run, without running it (PostgreSQL: a psql "
        "script, runnable as it is; --review or SQLite: a listing to read)",
        "history": "list the recorded migrations in the order they were applied",
        "current": "print the newest applied migration and what is pending",
    }
    for name, help_text in helps.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--url", help="database URL (default: $DATABASE_URL, else sqlite:///./runs.db)"
        )
        add_connect_timeout(command)
        if name in ("history", "current"):
            command.add_argument("--json", action="store_true", help="JSON output")
        if name == "sql":
            command.add_argument(
                "--review",
                action="store_true",
                help="print the review listing (guards in words, placeholders unbound; "
                "not runnable) instead of the psql script",
            )
        if name == "upgrade":
            command.add_argument(
                "--allow-changed",
                action="store_true",
                help="accept applied migrations whose code changed (records the new checksum)",
            )
            command.add_argument(
                "--lock-timeout",
                type=seconds,
                default=DEFAULT_LOCK_TIMEOUT,
                help="seconds to wait in all for locks: another upgrade's, and those the "
                "statements need (default %(default)g)",
            )
            command.add_argument(
                "--statement-lock-timeout",
                type=seconds,
                default=DEFAULT_STATEMENT_LOCK_TIMEOUT,
                help="PostgreSQL: longest wait of one statement for a lock before its "
                "migration is rolled back and retried (default %(default)g)",
            )
            command.add_argument(
                "--statement-timeout",
                type=seconds_or_zero,
                default=DEFAULT_STATEMENT_TIMEOUT,
                help="PostgreSQL: longest run time of one statement, 0 for none "
                "(default %(default)g)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Notes are printed below; the log would repeat them on stderr.
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    logging.getLogger("migrations.waits").setLevel(logging.WARNING)  # each retry, on stderr
    try:
        engine = open_engine(
            args.url,
            must_exist=args.command != "upgrade",
            connect_timeout=args.connect_timeout,
        )
    except OperatorError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return exc.exit_code
    if not getattr(args, "json", False):  # --json: stdout holds the one document
        # sql: stdout is SQL, so the line is a SQL comment
        comment = "-- " if args.command == "sql" else ""
        print(f"{comment}database: {engine.url.render_as_string(hide_password=True)}")
    try:
        commands = {
            "upgrade": _upgrade,
            "status": _status,
            "sql": _sql,
            "history": _history,
            "current": _current,
        }
        return commands[args.command](engine, args)
    except (MigrationError, NotRunnableError) as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return DATABASE
    except SQLAlchemyError as exc:
        print(f"{args.command} failed: {database_problem(exc, engine)}", file=sys.stderr)
        return DATABASE
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
