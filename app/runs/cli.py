"""``python -m app.runs``: list, show, follow, cancel, retry, delete and purge runs.

Commands (each with ``--json``, ``--url`` and ``--connect-timeout``)::

    list    [--session ID] [--status S]... [--worker W] [--created-after T]
            [--created-before T] [--updated-after T] [--updated-before T]
            [--metadata KEY=VALUE|JSON]... [--limit N]
    show    RUN
    events  RUN [--since-seq N] [--follow [--timeout SECONDS]]
    cancel  RUN...
    retry   RUN...          a new queued run with parent_run_id = RUN (RunRepository.retry)
    delete  RUN... [--dry-run]
    purge   [--finished-before AGE] [--events-only] [--batch N] [--dry-run]

``--json`` prints one JSON document (``events --follow``: one JSON object per
line). A progress bar goes to stderr for bulk commands only when stderr is a
terminal. Exit codes (``docs/operations.md``): 0 done; 1 a database problem;
2 a usage or configuration mistake; 3 a run named was not found or refused
the action (the other runs named were still handled); 130 interrupted.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from app import retention
from app.db import unit_of_work
from app.errors import BadParameterError, DataLayerError, NotFoundError
from app.models import RunStatus, SessionRun
from app.repositories import RunRepository
from app.repositories.reads import EventReads, RunReads, metadata_filter, metadata_matches
from app.schemas.event import EventResponse
from app.state_machine import TERMINAL_STATUSES
from migrations.command_line import (
    DATABASE,
    USAGE,
    OneLineParser,
    OperatorError,
    add_connect_timeout,
    database_problem,
    first_line,
    open_engine,
    seconds_between,
)

REFUSED = 3
INTERRUPTED = 130
MAX_LIST = 1000
MAX_RUN_IDS = 10_000


# --------------------------------------------------------------------- parsing


def _timestamp(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected an ISO 8601 time such as 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _age(raw: str) -> Any:
    try:
        return retention.parse_age(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _metadata(raw: str) -> dict[str, Any]:
    """``KEY=VALUE`` (the value a string), or a JSON object such as ``{"priority": 1}``
    for numbers, booleans and null; checked as the API checks its ``metadata`` filter."""
    if raw.lstrip().startswith("{"):
        try:
            wanted = json.loads(raw)
        except ValueError:
            wanted = None
        if not isinstance(wanted, dict):
            raise argparse.ArgumentTypeError("expected KEY=VALUE or a JSON object")
    else:
        key, sign, value = raw.partition("=")
        if not sign or not key:
            raise argparse.ArgumentTypeError("expected KEY=VALUE or a JSON object")
        wanted = {key: value}
    try:
        return metadata_filter(wanted)
    except BadParameterError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}")
        return value

    parse.__name__ = "integer"
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m app.runs", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="runs, newest first, filtered")
    listing.add_argument("--session", help="only this session's runs")
    listing.add_argument(
        "--status", action="append", choices=[s.value for s in RunStatus], help="repeatable"
    )
    listing.add_argument("--worker", help="only runs leased to this worker id")
    for name in ("created-after", "created-before", "updated-after", "updated-before"):
        listing.add_argument(f"--{name}", type=_timestamp, metavar="TIME", help="ISO 8601")
    listing.add_argument(
        "--metadata",
        action="append",
        type=_metadata,
        metavar="KEY=VALUE|JSON",
        help="only runs whose metadata has KEY with the string VALUE, or every key of a JSON "
        "object with its value ('{\"priority\": 1}'); repeatable, all must match",
    )
    listing.add_argument("--limit", type=_int_between(1, MAX_LIST), default=50)
    commands.add_parser("show", help="one run").add_argument("run_id", metavar="RUN")
    events = commands.add_parser("events", help="a run's events in seq order")
    events.add_argument("run_id", metavar="RUN")
    events.add_argument("--since-seq", type=_int_between(0, 2**31 - 1), default=0)
    events.add_argument(
        "--follow", action="store_true", help="keep printing new events until the run ends"
    )
    events.add_argument(
        "--timeout",
        type=seconds_between(0.001, 86400.0),
        default=None,
        help="with --follow: stop after this many seconds (exit 0)",
    )
    for name, help_text in (
        ("cancel", "cancel runs (a finished run is left as it is)"),
        ("retry", "a new queued run, parent_run_id = RUN, for each failed or cancelled RUN"),
        ("delete", "delete runs and their events"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("run_ids", metavar="RUN", nargs="+")
        if name == "delete":
            command.add_argument("--dry-run", action="store_true")
    purge = commands.add_parser("purge", help="delete finished runs (or their events) in batches")
    purge.add_argument(
        "--finished-before",
        type=_age,
        metavar="AGE",
        help="30d, 12h, 90m, 45s, 2w (default: $RUN_RETENTION_DAYS days; unset: off)",
    )
    purge.add_argument("--events-only", action="store_true", help="keep the runs")
    purge.add_argument(
        "--batch",
        type=_int_between(1, retention.MAX_BATCH),
        default=retention.DEFAULT_BATCH,
        help="runs per transaction (default %(default)s)",
    )
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    for command in commands.choices.values():
        command.add_argument("--json", action="store_true", help="JSON output")
        command.add_argument("--url", help="database URL (default: $DATABASE_URL, else ./runs.db)")
        add_connect_timeout(command)
    return parser


# -------------------------------------------------------------------- output


def _emit(document: Any) -> None:
    sys.stdout.write(json.dumps(document, default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _run_line(run: SessionRun) -> str:
    worker = f" worker={run.worker_id}" if run.worker_id else ""
    return (
        f"{run.id}  {run.status.value:<13} session={run.session_id} "
        f"created={run.created_at:%Y-%m-%d %H:%M:%S} updated={run.updated_at:%Y-%m-%d %H:%M:%S}"
        f"{worker}"
    )


class _Progress:
    """A one-line bar on stderr, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.shown = sys.stderr.isatty()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.shown or total <= 0:
            return
        share = min(done / total, 1.0)
        bar = "#" * round(share * 30)
        sys.stderr.write(f"\r{self.what} [{bar:<30}] {done}/{total}")
        sys.stderr.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


_JSON_NAMES = {"run_metadata": "metadata"}
"""Columns whose JSON key is the API's name for them."""


def _run_json(run: SessionRun) -> dict[str, Any]:
    """Every stored column of the run under the API's names (``run_id``, ``metadata``),
    JSON-ready."""
    values: dict[str, Any] = {"run_id": run.id}
    for key in SessionRun.__table__.c.keys():
        if key != "id":
            value = getattr(run, key)
            values[_JSON_NAMES.get(key, key)] = (
                value.isoformat() if isinstance(value, datetime) else value
            )
    return json.loads(json.dumps(values, default=str))


# ------------------------------------------------------------------ commands


def _list(engine: Engine, args: argparse.Namespace) -> int:
    table = SessionRun
    query = select(SessionRun)
    if args.session is not None:
        query = query.where(table.session_id == args.session)
    if args.status:
        query = query.where(col(table.status).in_(args.status))
    if args.worker is not None:
        query = query.where(table.worker_id == args.worker)
    for name, column, op in (
        ("created_after", table.created_at, "ge"),
        ("created_before", table.created_at, "lt"),
        ("updated_after", table.updated_at, "ge"),
        ("updated_before", table.updated_at, "lt"),
    ):
        value = getattr(args, name)
        if value is not None:
            query = query.where(getattr(col(column), f"__{op}__")(value))
    if args.metadata:
        wanted: dict[str, Any] = {}
        for one in args.metadata:
            wanted |= one
        try:
            query = query.where(metadata_matches(engine.dialect.name, wanted))
        except BadParameterError as exc:
            _error(args.command, str(exc), args.json, exc.code)
            return USAGE
    query = query.order_by(col(table.created_at).desc(), col(table.id).desc()).limit(args.limit)
    with unit_of_work(engine, readonly=True) as db:
        runs = list(db.exec(query))
    if args.json:
        _emit({"runs": [_run_json(run) for run in runs]})
    else:
        for run in runs:
            print(_run_line(run))
        print(f"{len(runs)} runs" + (" (--limit reached)" if len(runs) == args.limit else ""))
    return 0


def _show(engine: Engine, args: argparse.Namespace) -> int:
    with unit_of_work(engine, readonly=True) as db:
        run = RunRepository(db).get(args.run_id)
    if args.json:
        _emit(_run_json(run))
    else:
        for key, value in _run_json(run).items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _event_json(event: Any) -> dict[str, Any]:
    return event.model_dump(mode="json")


def _event_line(event: Any) -> str:
    payload = json.dumps(event.payload, default=str, separators=(",", ":"))
    return f"{event.seq:>8} {event.timestamp:%Y-%m-%d %H:%M:%S} {event.type} {payload}"


def _events(engine: Engine, args: argparse.Namespace) -> int:
    reads = EventReads.of(engine)
    since = args.since_seq
    collected: list[dict[str, Any]] = []

    def show(batch: Sequence[Any]) -> None:
        for event in batch:
            if args.json and not args.follow:
                collected.append(_event_json(event))
            elif args.json:
                _emit(_event_json(event))
            else:
                print(_event_line(event), flush=True)

    while True:  # the backlog, page by page
        page = reads.list_for_run(args.run_id, since_seq=since, limit=500)
        show(page)
        if len(page) < 500:
            break
        since = page[-1].seq
    if page:
        since = page[-1].seq
    if not args.follow:
        if args.json:
            _emit({"run_id": args.run_id, "events": collected})
        return 0
    from app.feed import get_feed  # the listener thread only for --follow

    run = RunReads.of(engine).get(args.run_id)
    feed = get_feed(engine)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        if run.status in TERMINAL_STATUSES:
            show(reads.list_for_run(args.run_id, since_seq=since, limit=500))
            return 0
        wait = 5.0 if deadline is None else min(5.0, deadline - time.monotonic())
        if wait <= 0:
            return 0
        batch = feed.wait(run.session_id, since_seq=since, run_id=args.run_id, timeout=wait)
        if batch:
            show([_event_response(e) for e in batch])
            since = batch[-1].seq
        run = RunReads.of(engine).get(args.run_id)


def _event_response(event: Any) -> EventResponse:
    return EventResponse.model_validate(event, from_attributes=True)


def _bulk(
    engine: Engine,
    args: argparse.Namespace,
    verb: str,
    act: Callable[[RunRepository, str], dict[str, Any]],
) -> int:
    results: list[dict[str, Any]] = []
    progress = _Progress(verb)
    ids = list(dict.fromkeys(args.run_ids))
    for done, run_id in enumerate(ids, 1):
        try:
            with unit_of_work(engine) as db:
                outcome = act(RunRepository(db), run_id)
            results.append({"run_id": run_id, "ok": True, **outcome})
        except DataLayerError as exc:
            results.append({"run_id": run_id, "ok": False, "error": exc.code, "message": str(exc)})
        if len(ids) > 20:
            progress(done, len(ids))
    progress.end()
    failed = sum(not result["ok"] for result in results)
    if args.json:
        _emit({"command": verb, "results": results, "failed": failed})
    else:
        for result in results:
            if result["ok"]:
                detail = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("ok",))
                print(detail)
            else:
                print(f"{result['run_id']}: {result['message']}", file=sys.stderr)
        print(f"{verb}: {len(results) - failed} done, {failed} refused or not found")
    return REFUSED if failed else 0


def _cancel(repo: RunRepository, run_id: str) -> dict[str, Any]:
    run, changed = repo.cancel(run_id)
    return {"status": run.status.value, "changed": changed}


def _retry(repo: RunRepository, run_id: str) -> dict[str, Any]:
    run = repo.retry(run_id)
    return {"new_run_id": run.id, "status": run.status.value}


def _delete(dry_run: bool) -> Callable[[RunRepository, str], dict[str, Any]]:
    def act(repo: RunRepository, run_id: str) -> dict[str, Any]:
        run = repo.get(run_id)
        if not dry_run:
            repo.delete(run_id)
        return {"status": run.status.value, "deleted": not dry_run}

    return act


def _purge(engine: Engine, args: argparse.Namespace) -> int:
    older_than = args.finished_before
    if older_than is None:
        older_than = retention.retention_from_environment()
        if older_than is None:
            message = (
                "retention is off: RUN_RETENTION_DAYS is unset and no --finished-before given; "
                "nothing purged"
            )
            if args.json:
                _emit({"off": True, "runs": 0, "events": 0, "idempotency_keys": 0})
            else:
                print(message)
            return 0
    progress = _Progress("purge")
    result = retention.purge(
        engine,
        older_than,
        events_only=args.events_only,
        batch=args.batch,
        dry_run=args.dry_run,
        progress=lambda so_far, total: progress(
            so_far.events if so_far.events_only else so_far.runs, total
        ),
    )
    progress.end()
    if args.json:
        _emit(
            {"off": False, "finished_before_seconds": older_than.total_seconds()} | result.as_dict()
        )
    else:
        verb = "would purge" if result.dry_run else "purged"
        runs = "" if result.events_only else f"{result.runs} runs, "
        print(
            f"{verb} {runs}{result.events} events, {result.idempotency_keys} expired "
            f"idempotency keys (finished more than {older_than} ago"
            f"{', events only' if result.events_only else ''}; {result.batches} batches)"
        )
    return 0


def _commands() -> dict[str, Callable[[Engine, argparse.Namespace], int]]:
    return {
        "list": _list,
        "show": _show,
        "events": _events,
        "cancel": lambda engine, args: _bulk(engine, args, "cancel", _cancel),
        "retry": lambda engine, args: _bulk(engine, args, "retry", _retry),
        "delete": lambda engine, args: _bulk(
            engine,
            args,
            "delete" if not args.dry_run else "delete (dry run)",
            _delete(args.dry_run),
        ),
        "purge": _purge,
    }


def _error(command: str, message: str, as_json: bool, code: str) -> None:
    print(f"{command} failed: {message}", file=sys.stderr)
    if as_json:
        _emit({"error": code, "message": message})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "run_ids", None) is not None and len(args.run_ids) > MAX_RUN_IDS:
        print(f"{args.command} failed: at most {MAX_RUN_IDS} RUN arguments", file=sys.stderr)
        return USAGE
    if args.command == "purge" and args.finished_before is None:
        try:
            retention.retention_from_environment()
        except ValueError as exc:
            _error(args.command, f"configuration error: {exc}", args.json, "configuration")
            return USAGE
    try:
        engine = open_engine(args.url, must_exist=True, connect_timeout=args.connect_timeout)
    except OperatorError as exc:
        _error(args.command, str(exc), args.json, "usage" if exc.exit_code == USAGE else "database")
        return exc.exit_code
    try:
        return _commands()[args.command](engine, args)
    except NotFoundError as exc:
        _error(args.command, str(exc), args.json, exc.code)
        return REFUSED
    except DataLayerError as exc:
        _error(args.command, str(exc), args.json, exc.code)
        return REFUSED if exc.status_code < 500 else DATABASE
    except SQLAlchemyError as exc:
        _error(args.command, database_problem(exc, engine), args.json, "database")
        return DATABASE
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # never a traceback; the kind and first line say what broke
        _error(
            args.command,
            f"unexpected {type(exc).__name__}: {first_line(exc)}",
            args.json,
            "internal_error",
        )
        return DATABASE
    finally:
        from app.feed import close_feed

        close_feed(engine)
        engine.dispose()
