"""Command line for periodic upkeep: ``python -m app.maintenance fail-stale|purge-keys``.

* ``fail-stale --older-than SECONDS``: ``RunRepository.fail_stale``: fail the
  running runs whose ``claim_next`` lease has expired, and those without a
  lease silent for that long (0.001 to 315360000 seconds, ten years); prints
  their ids. With ``--max-attempts N`` (as the workers' ``--max-attempts``) a run
  whose lease expired before its N-th attempt is requeued for another worker
  instead (``expire_leases``), and its id printed as retried.
* ``purge-keys``: ``RunRepository.purge_idempotency_keys``: delete the
  idempotency keys whose window has passed; prints how many. A bad
  ``RUN_IDEMPOTENCY_WINDOW_SECONDS`` is refused first.

Run both from cron or a scheduler every minute or so; several at once are safe
(each is one transaction of guarded statements). The database is ``--url``,
else ``DATABASE_URL``, else ``./runs.db``. Exit codes as for ``python -m
migrations``: 0 done, 1 a database problem, 2 a usage or configuration mistake
(a number out of its range included: one line naming the option and the range).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from app.db import unit_of_work
from app.errors import DataLayerError
from app.repositories import RunRepository, idempotency_window
from app.repositories.runs import MAX_ATTEMPTS, MAX_DURATION
from migrations.command_line import (
    DATABASE,
    USAGE,
    OneLineParser,
    OperatorError,
    add_connect_timeout,
    database_problem,
    open_engine,
    seconds_between,
)

MIN_OLDER_THAN = 0.001


def _attempts(raw: str) -> int:
    """An argparse type: a whole number of attempts from 1 to ``MAX_ATTEMPTS``."""
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 6 else 0
    if not 1 <= value <= MAX_ATTEMPTS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_ATTEMPTS}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m app.maintenance", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stale = commands.add_parser("fail-stale", help="fail runs whose worker is presumed dead")
    stale.add_argument(
        "--older-than",
        type=seconds_between(MIN_OLDER_THAN, MAX_DURATION.total_seconds()),
        required=True,
        help="seconds without a heartbeat after which a run without a lease is failed "
        f"({MIN_OLDER_THAN:g} to {MAX_DURATION.total_seconds():.0f}, ten years)",
    )
    stale.add_argument(
        "--max-attempts",
        type=_attempts,
        default=1,
        help=f"attempts a run gets before an expired lease fails it (1 to {MAX_ATTEMPTS}; "
        "default 1: never requeued). Set it as the workers' --max-attempts",
    )
    commands.add_parser("purge-keys", help="delete expired idempotency keys")
    for command in commands.choices.values():
        command.add_argument("--url", help="database URL (default: $DATABASE_URL, else ./runs.db)")
        add_connect_timeout(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "purge-keys":
        try:
            idempotency_window()  # a bad setting is the operator's to fix, before any work
        except ValueError as exc:
            print(f"{args.command} failed: configuration error: {exc}", file=sys.stderr)
            return USAGE
    try:
        engine = open_engine(args.url, must_exist=True, connect_timeout=args.connect_timeout)
    except OperatorError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        with unit_of_work(engine) as db:
            runs = RunRepository(db)
            if args.command == "fail-stale":
                retried, failed = runs.expire_leases(max_attempts=args.max_attempts)
                failed += runs.fail_stale(timedelta(seconds=args.older_than))
                if args.max_attempts > 1:
                    print(f"retried {len(retried)} runs" + "".join(f"\n{i}" for i in retried))
                print(f"failed {len(failed)} stale runs" + "".join(f"\n{i}" for i in failed))
            else:
                print(f"purged {runs.purge_idempotency_keys()} expired idempotency keys")
        return 0
    except DataLayerError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return DATABASE
    except SQLAlchemyError as exc:
        print(f"{args.command} failed: {database_problem(exc, engine)}", file=sys.stderr)
        return DATABASE
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
