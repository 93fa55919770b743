"""The worker runtime: ``RunWorker`` runs a callable for each run it claims (docs/worker.md).

    python -m app.worker mypackage.agent:run_turn --concurrency 4

Each of ``concurrency`` slots claims a run (``RunRepository.claim_next``: queued
runs, and resumed runs nobody executes), calls ``target(context)`` in its thread
with no transaction open, and maps the outcome:

* returns ``None`` or a dict: ``complete`` (the dict merged into ``metrics``);
* returns or raises ``WaitForInput(reason)``: ``wait_for_input`` (an interrupt);
* raises anything else: ``fail`` with ``latest_error = {"code": "worker_error",
  "type": <exception class>, "message": <its first line, at most 500 characters>}``;
* the run was cancelled meanwhile (or its lease lost): nothing is written.

Every outcome is written in one transaction that first extends the lease
(``heartbeat(worker_id=...)``), so a worker whose lease was lost (cancelled, or
requeued after expiry and maybe claimed by another worker) never writes over it.

Alongside: one heartbeat thread extends every lease every ``lease / 3`` and
also requeues or fails expired leases of dead workers (``expire_leases`` with
``max_attempts``); one cancel watcher per running run follows the run's events
through the process's ``EventFeed`` (LISTEN/NOTIFY on PostgreSQL, ``PRAGMA
data_version`` on SQLite) and sets ``context.cancelled`` when a ``run_cancelled``
(or any event ending this execution) commits. An ``async def`` target is run in
its own event loop, and a cancel cancels its task: ``CancelledError`` at its next
``await``.

``stop()`` (SIGTERM, SIGINT): no more claims; running runs get ``grace`` seconds to
finish; then their leases are given back (``give_back``: queued again, not
failed), their tokens are set, and ``run()`` returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlmodel import col

from app.db import create_db_engine, unit_of_work
from app.errors import ConflictError, DataLayerError, InvalidTransitionError, LeaseNotHeldError
from app.feed import get_feed
from app.models import SessionEvent
from app.repositories import EventRepository, RunRepository
from app.state_machine import RunEventType

logger = logging.getLogger("app.worker")

ENDS_EXECUTION = frozenset(
    {
        RunEventType.RUN_CANCELLED.value,
        RunEventType.RUN_FAILED.value,
        RunEventType.RUN_COMPLETED.value,
        RunEventType.RUN_RETRIED.value,
        RunEventType.RUN_REQUEUED.value,
        RunEventType.RUN_WAITING_INPUT.value,
    }
)
"""A run's events after which this worker's execution of it is over."""
ERROR_MESSAGE_MAX = 500


class WaitForInput(Exception):
    """Return or raise it from the target: the run waits for input with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunCancelled(Exception):
    """Raised by ``RunContext.check()`` once the run is cancelled or its lease lost."""


@dataclass
class RunContext:
    """What the target gets: the claimed run's fields, a cancel token, an event sink."""

    run_id: str
    session_id: str
    input_message: str | None
    options: dict[str, Any] | None
    resume_payload: dict[str, Any] | None
    checkpoint_thread: str | None
    checkpoint_ns: str | None
    attempt: int
    worker_id: str
    engine: Engine
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str | None = None
    _on_cancel: list[Callable[[], object]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        """Raise ``RunCancelled`` if the run was cancelled (call it between steps)."""
        if self.cancelled.is_set():
            raise RunCancelled(self.cancel_reason or "cancelled")

    def emit(self, events: Sequence[dict[str, Any]]) -> None:
        """Append ``events`` (``{"type": ..., "payload": ...}``) to the session, with
        this run's ``run_id``, in one ``append_many``."""
        if not events:
            return
        items = [{**event, "run_id": self.run_id} for event in events]
        with unit_of_work(self.engine) as db:
            EventRepository(db).append_many(self.session_id, items)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        with self._lock:
            self._on_cancel.append(callback)
            fire = self.cancelled.is_set()
        if fire:
            callback()

    def _cancel(self, reason: str) -> None:
        with self._lock:
            if self.cancelled.is_set():
                return
            self.cancel_reason = reason
            self.cancelled.set()
            callbacks = list(self._on_cancel)
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback()


@dataclass
class _Slot:
    context: RunContext
    since_seq: int
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False


class RunWorker:
    """Claims runs and executes ``target`` for each, ``concurrency`` at a time."""

    def __init__(
        self,
        engine: Engine,
        target: Callable[[RunContext], Any],
        *,
        concurrency: int = 1,
        lease: timedelta = timedelta(seconds=30),
        max_attempts: int = 3,
        grace: float = 10.0,
        poll: float = 0.5,
        worker_id: str | None = None,
    ) -> None:
        if not 1 <= concurrency <= 256:
            raise ValueError("concurrency must be 1 to 256")
        self.engine = engine
        self.target = target
        self.concurrency = concurrency
        self.lease = lease
        self.max_attempts = max_attempts
        self.grace = grace
        self.poll = poll
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._running: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self.completed = 0

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Stop claiming; ``run()`` then waits ``grace`` and gives the rest back."""
        self._stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def run(self, *, until_idle: bool = False) -> None:
        """Work until ``stop()`` (or, with ``until_idle``, until nothing is claimable
        and nothing runs). Leases still held after the grace period are given back."""
        feed = get_feed(self.engine)
        feed.start()
        keeper = threading.Thread(target=self._keep_leases, name="worker-leases", daemon=True)
        keeper.start()
        slots = [
            threading.Thread(
                target=self._slot, args=(n, until_idle), name=f"worker-{n}", daemon=True
            )
            for n in range(self.concurrency)
        ]
        for thread in slots:
            thread.start()
        while any(thread.is_alive() for thread in slots) and not self._stopping.is_set():
            self._stopping.wait(0.2)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            with self._lock:
                left = [slot for slot in self._running.values() if not slot.done.is_set()]
            if not left:
                break
            time.sleep(0.05)
        self._give_back_all()
        self._stopping.set()
        # Idle slots end at once; a slot whose target ignores its token is a daemon
        # thread left behind (its outcome is dropped): one second for all, not each.
        joined_by = time.monotonic() + 1.0
        for thread in slots:
            thread.join(timeout=max(joined_by - time.monotonic(), 0.0))

    # ------------------------------------------------------------ slots

    def _slot(self, number: int, until_idle: bool) -> None:
        while not self._stopping.is_set():
            try:
                claimed = self._claim()
            except ConflictError:
                continue
            except Exception:
                logger.exception("claim failed; retrying")
                self._stopping.wait(self.poll)
                continue
            if claimed is None:
                if until_idle and not self._running:
                    return
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            self._execute(claimed)

    def _claim(self) -> _Slot | None:
        with unit_of_work(self.engine) as db:
            run = RunRepository(db).claim_next(self.worker_id, lease=self.lease)
            if run is None:
                return None
            since = db.scalar(
                select(func.coalesce(func.max(col(SessionEvent.seq)), 0)).where(
                    col(SessionEvent.session_id) == run.session_id
                )
            )
            context = RunContext(
                run_id=run.id,
                session_id=run.session_id,
                input_message=run.input_message,
                options=run.options,
                resume_payload=run.resume_payload,
                checkpoint_thread=run.checkpoint_thread,
                checkpoint_ns=run.checkpoint_ns,
                attempt=run.attempt,
                worker_id=self.worker_id,
                engine=self.engine,
            )
        slot = _Slot(context, int(since or 0))
        with self._lock:
            self._running[context.run_id] = slot
        return slot

    def _execute(self, slot: _Slot) -> None:
        context = slot.context
        watcher = threading.Thread(
            target=self._watch, args=(slot,), name=f"cancel-{context.run_id}", daemon=True
        )
        watcher.start()
        try:
            outcome: Any = self._call(context)
        except WaitForInput as exc:
            outcome = exc
        except (RunCancelled, asyncio.CancelledError):
            outcome = _CANCELLED
        except Exception as exc:  # the target's failure is the run's
            outcome = exc
        try:
            if not slot.abandoned:
                self._report(context, outcome)
        finally:
            slot.done.set()
            with self._lock:
                self._running.pop(context.run_id, None)

    def _call(self, context: RunContext) -> Any:
        if inspect.iscoroutinefunction(self.target):
            return asyncio.run(self._call_async(context))
        return self.target(context)

    async def _call_async(self, context: RunContext) -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.target(context))
        context.on_cancel(lambda: loop.call_soon_threadsafe(task.cancel))
        return await task

    def _report(self, context: RunContext, outcome: Any) -> None:
        """Write the outcome, unless this worker no longer holds the run."""
        if outcome is _CANCELLED and context.cancelled.is_set():
            return
        try:
            with unit_of_work(self.engine) as db:
                runs = RunRepository(db)
                runs.heartbeat(context.run_id, worker_id=self.worker_id, lease=self.lease)
                if isinstance(outcome, WaitForInput):
                    runs.wait_for_input(context.run_id, outcome.reason)
                elif isinstance(outcome, BaseException) or outcome is _CANCELLED:
                    runs.fail(context.run_id, _error(outcome))
                else:
                    metrics = outcome if isinstance(outcome, dict) else {}
                    runs.complete(context.run_id, metrics)
                    self.completed += 1
        except (InvalidTransitionError, LeaseNotHeldError):
            logger.info("run %s is no longer ours; outcome dropped", context.run_id)
        except DataLayerError:
            logger.exception("could not record the outcome of run %s", context.run_id)

    # ------------------------------------------------------------ leases and cancels

    def _keep_leases(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.05)
        while not self._stopping.wait(interval):
            with self._lock:
                slots = [s for s in self._running.values() if not s.done.is_set()]
            for slot in slots:
                try:
                    with unit_of_work(self.engine) as db:
                        RunRepository(db).heartbeat(
                            slot.context.run_id, worker_id=self.worker_id, lease=self.lease
                        )
                except (InvalidTransitionError, LeaseNotHeldError):
                    slot.context._cancel("lease lost")  # noqa: SLF001 the worker cancels its own contexts
                except Exception:
                    logger.exception("heartbeat failed")
            try:
                with unit_of_work(self.engine) as db:
                    retried, _failed = RunRepository(db).expire_leases(
                        max_attempts=self.max_attempts
                    )
                if retried:
                    self._wake.set()
            except Exception:
                logger.debug("expire_leases failed", exc_info=True)

    def _watch(self, slot: _Slot) -> None:
        feed = get_feed(self.engine)
        context, since = slot.context, slot.since_seq
        while not slot.done.is_set() and not context.cancelled.is_set():
            try:
                events = feed.wait(
                    context.session_id, since_seq=since, run_id=context.run_id, timeout=1.0
                )
            except DataLayerError:
                context._cancel("run gone")  # noqa: SLF001 the worker cancels its own contexts
                return
            except Exception:
                logger.debug("cancel watch failed", exc_info=True)
                time.sleep(0.2)
                continue
            for event in events:
                since = max(since, event.seq)
                if event.type in ENDS_EXECUTION and not slot.done.is_set():
                    context._cancel(event.type)  # noqa: SLF001 the worker cancels its own contexts
                    return

    def _give_back_all(self) -> None:
        with self._lock:
            slots = [s for s in self._running.values() if not s.done.is_set()]
        for slot in slots:
            slot.abandoned = True
            try:
                with unit_of_work(self.engine) as db:
                    RunRepository(db).give_back(slot.context.run_id, worker_id=self.worker_id)
                logger.info("gave run %s back", slot.context.run_id)
            except (InvalidTransitionError, LeaseNotHeldError):
                pass
            except Exception:
                logger.exception("could not give run %s back", slot.context.run_id)
            slot.context._cancel("worker_shutdown")  # noqa: SLF001 the worker cancels its own contexts


_CANCELLED = object()


def _error(outcome: Any) -> dict[str, Any]:
    if not isinstance(outcome, BaseException):
        return {"code": "worker_error", "type": "cancelled", "message": "the target stopped"}
    lines = str(outcome).splitlines()
    return {
        "code": "worker_error",
        "type": type(outcome).__name__,
        "message": (lines[0] if lines else "")[:ERROR_MESSAGE_MAX],
    }


def load_target(spec: str) -> Callable[[RunContext], Any]:
    """``module:callable`` (dots allowed after the colon) as a callable."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError("target: expected module:callable")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError("target: not callable")
    return target


def _positive(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number from {low:g} to {high:g}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("target", help="module:callable, called with a RunContext per run")
    parser.add_argument(
        "--concurrency", type=int, default=1, choices=range(1, 257), metavar="1..256"
    )
    parser.add_argument("--lease", type=_positive(0.1, 86400), default=30.0, help="seconds")
    parser.add_argument(
        "--max-attempts", type=int, default=3, choices=range(1, 1001), metavar="1..1000"
    )
    parser.add_argument("--grace", type=_positive(0, 3600), default=10.0, help="seconds")
    parser.add_argument("--poll", type=_positive(0.01, 60), default=0.5, help="seconds")
    parser.add_argument("--until-idle", action="store_true", help="exit when nothing is left")
    parser.add_argument("--url", help="database URL (default: $DATABASE_URL, else ./runs.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("WORKER_LOG_LEVEL", "WARNING"))
    sys.path.insert(0, os.getcwd())
    try:
        target = load_target(args.target)
    except (ValueError, ImportError, AttributeError) as exc:
        print(f"worker: cannot load the target: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    engine = create_db_engine(args.url, must_exist=True)
    worker = RunWorker(
        engine,
        target,
        concurrency=args.concurrency,
        lease=timedelta(seconds=args.lease),
        max_attempts=args.max_attempts,
        grace=args.grace,
        poll=args.poll,
    )
    worker.install_signal_handlers()
    try:
        worker.run(until_idle=args.until_idle)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    # Through the imported module, not this __main__ copy: the target imports
    # app.worker, and its WaitForInput must be the class the worker checks for.
    from app.worker import main as _main

    sys.exit(_main())
