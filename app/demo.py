"""Walk one run through its life on a migrated database and print it with its events.

    python -m app.demo [--url URL]     # default: $DATABASE_URL, else sqlite:///./runs.db

Each step commits on its own, as the Run Service's requests and workers would.
The schema must exist already (``python -m migrations upgrade``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session as DbSession

from app.db import unit_of_work
from app.errors import DataLayerError
from app.models import ChatSession, SessionRun
from app.repositories import EventRepository, RunRepository
from migrations import status
from migrations.command_line import (
    DATABASE,
    OneLineParser,
    OperatorError,
    add_connect_timeout,
    database_problem,
    open_engine,
)

T = TypeVar("T")


def _step(engine: Engine, work: Callable[[DbSession], T]) -> T:
    with unit_of_work(engine) as db:
        return work(db)


def walk_one_run(engine: Engine) -> str:
    """create -> start -> wait_for_input -> resume -> complete; returns the run id."""
    chat = _step(engine, lambda db: _added(db, ChatSession(title="demo chat")))
    body = {"session_id": chat.id, "message": "Make a 3-page deck about tides"}
    run_id = _step(engine, lambda db: RunRepository(db).create(body).id)
    _step(engine, lambda db: RunRepository(db).start(run_id))
    _step(
        engine,
        lambda db: EventRepository(db).append(
            chat.id, "verify_pass", {"page": 1}, source="task", run_id=run_id
        ),
    )
    _step(engine, lambda db: RunRepository(db).wait_for_input(run_id, "pick a color palette"))
    _step(engine, lambda db: RunRepository(db).resume(run_id, {"user_feedback": "ocean blues"}))
    _step(engine, lambda db: RunRepository(db).complete(run_id, {"tokens": 1843, "cost_usd": 0.02}))
    return run_id


def _added(db: DbSession, chat: ChatSession) -> ChatSession:
    db.add(chat)
    db.flush()
    return chat


def show(engine: Engine, run_id: str) -> None:
    with DbSession(engine) as db:
        run: SessionRun = RunRepository(db).get(run_id)
        print(f"run {run.id}  session {run.session_id}")
        print(f"  status {run.status.value}  trigger {run.trigger_source.value}")
        print(f"  started {run.started_at:%H:%M:%S.%f}  finished {run.finished_at:%H:%M:%S.%f}")
        print(f"  resume_payload {run.resume_payload}  metrics {run.metrics}")
        print("events (seq type source payload):")
        for event in EventRepository(db).list_for_run(run_id):
            print(f"  {event.seq:>3} {event.type:<18} {event.source.value:<7} {event.payload}")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes as ``python -m migrations``: 2 usage or configuration, 1 database."""
    parser = OneLineParser(prog="python -m app.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="database URL (default: $DATABASE_URL, else ./runs.db)")
    add_connect_timeout(parser)
    args = parser.parse_args(argv)
    try:
        engine = open_engine(args.url, must_exist=True, connect_timeout=args.connect_timeout)
    except OperatorError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        pending = [state for state in status(engine) if state.state != "applied"]
        if pending:
            print(
                f"demo failed: the database is not migrated ({len(pending)} migrations not "
                "applied); run: python -m migrations upgrade",
                file=sys.stderr,
            )
            return DATABASE
        show(engine, walk_one_run(engine))
    except SQLAlchemyError as exc:
        print(f"demo failed: {database_problem(exc, engine)}", file=sys.stderr)
        return DATABASE
    except DataLayerError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return DATABASE
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
