"""Runs and their state machine.

Each transition of ``app.state_machine`` is one conditional ``UPDATE ...
WHERE id = :run_id AND status IN (<allowed>) RETURNING *`` plus its lifecycle
event, in the caller's transaction. At most one run per session is running
(``ActiveRunExistsError``); a start that loses a race on PostgreSQL leaves its
transaction aborted (``_driver_errors``, ``_move``; a later ``commit()`` raises
``TransactionAbortedError``). On PostgreSQL a transition locks the
run row, then the session's event counter: move a run before appending to its
session in one transaction.

The statements themselves are built in ``_run_statements``; this module is the
behaviour around them. Contract: docs/reference.md (RunRepository). Why:
docs/design.md (Transitions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, NoReturn

from pydantic import ValidationError
from sqlalchemy import Executable
from sqlmodel import Session as DbSession

from app._params import (
    check_page_cursor,
    described,
    enum_param,
    event_payload_param,
    json_object_param,
    optional_text_param,
    page_size,
    run_page_params,
    text_param,
)
from app.errors import (
    ActiveRunExistsError,
    BadParameterError,
    ConflictError,
    DataLayerError,
    InvalidTransitionError,
    LeaseNotHeldError,
    RunNotFoundError,
    SessionNotFoundError,
    ValidationFailedError,
)
from app.input_limits import is_name
from app.models import (
    IdempotencyScope,
    MultitaskStrategy,
    RunOptions,
    RunStatus,
    SessionRun,
    TriggerSource,
    new_id,
)
from app.repositories._driver import execute_core
from app.repositories._event_log import EventLog
from app.repositories._idempotency import (
    IdempotencyKeys,
    key_param,
    window_from_environment,
    window_param,
)
from app.repositories._rows import in_session, in_session_many, inserted
from app.repositories._run_statements import RUN_COLUMNS, run_statements
from app.repositories._sql import SESSION_EXISTS
from app.schemas.run import RunCreate, RunResumeRequest
from app.state_machine import (
    CANCEL,
    COMPLETE,
    FAIL,
    GIVE_BACK,
    RESUME,
    RETRY_EXPIRED,
    RETRYABLE_STATUSES,
    START,
    TERMINAL_STATUSES,
    WAIT_FOR_INPUT,
    RunEventType,
    Transition,
)

OPTION_FIELDS = frozenset(RunOptions.model_fields)
DEFAULT_LEASE = timedelta(minutes=5)
"""How long a ``claim_next`` lease holds without a ``heartbeat``."""
MAX_DURATION = timedelta(days=3650)
"""The longest lease and ``fail_stale`` age (ten years, as an idempotency window)."""
WORKER_ID_MAX_LENGTH = 255
MAX_ATTEMPTS = 1000
"""The largest ``max_attempts`` of ``fail_stale`` / ``expire_leases``."""


class RunRepository:
    """Creates, reads and moves runs; flushes, never commits (the caller owns the transaction)."""

    def __init__(self, session: DbSession, *, idempotency_window: timedelta | None = None) -> None:
        """``idempotency_window``: how long an ``Idempotency-Key`` is remembered; default
        ``RUN_IDEMPOTENCY_WINDOW_SECONDS``, else 24 hours."""
        self._session = session
        self._sql = run_statements(session.get_bind().dialect.name)
        self._event_log: EventLog | None = None
        # Checked now (a bad window is the caller's error), read from the
        # environment only when a key is used.
        self._idempotency_window = (
            None if idempotency_window is None else window_param(idempotency_window)
        )
        self._keys: IdempotencyKeys | None = None
        self._replayed: set[str] = set()

    # ---------------------------------------------------------------- create

    def create(
        self,
        data: RunCreate | Mapping[str, Any],
        *,
        trigger_source: TriggerSource | str = TriggerSource.CHAT,
        parent_run_id: str | None = None,
        checkpoint_ns: str | None = None,
        multitask_strategy: MultitaskStrategy | str | None = None,
        idempotency_key: str | None = None,
    ) -> SessionRun:
        """A new ``queued`` run and its ``run_created`` event.

        ``data`` is validated through ``RunCreate`` (``ValidationFailedError``);
        the options are stored in ``session_runs.options``, the caller's
        ``metadata`` in ``session_runs.run_metadata``. An unknown session
        raises ``SessionNotFoundError``; a parent run outside that session
        ``RunNotFoundError``.

        ``multitask_strategy`` (else the body's, default ``enqueue``) says what
        happens when the session has a queued, running or waiting run:
        ``enqueue`` queues the new run behind it; ``reject`` raises
        ``ActiveRunExistsError``; ``interrupt`` cancels every active run (each
        with its ``run_cancelled`` event) and then creates the run. ``reject``
        and ``interrupt`` lock the session row first, so creates that check
        never race each other.

        With ``idempotency_key``, the same request with the same key within the
        window returns the run the first one created and writes nothing
        (``was_replayed(run)`` is then true); another request with that key
        raises ``IdempotencyKeyReusedError``. Keys are scoped to the session.
        """
        body = _run_create(data)
        strategy = _strategy(body, multitask_strategy)
        values = {
            "session_id": body.session_id,
            "input_message": body.message,
            "options": body.model_dump(include=set(OPTION_FIELDS)),
            "trigger_source": enum_param(TriggerSource, trigger_source, "trigger_source"),
            "parent_run_id": optional_text_param(parent_run_id, "parent_run_id"),
            "checkpoint_ns": optional_text_param(checkpoint_ns, "checkpoint_ns"),
            "run_metadata": body.run_metadata,
        }
        if idempotency_key is None:
            return self._create(strategy, **values)
        # Metadata is part of the request; none and {} are the same request, whose
        # fingerprint is the one a key got before runs had metadata.
        unfingerprinted = {"multitask_strategy"} | (
            set() if body.run_metadata else {"run_metadata"}
        )
        request = {
            "body": body.model_dump(mode="json", exclude=unfingerprinted),
            "multitask_strategy": strategy.value,
            **{name: values[name] for name in ("trigger_source", "parent_run_id", "checkpoint_ns")},
        }
        return self._once(
            (IdempotencyScope.CREATE, body.session_id, idempotency_key),
            request,
            lambda: self._create(strategy, **values),
            lambda: SessionNotFoundError(body.session_id),
        )

    def was_replayed(self, run: SessionRun) -> bool:
        """Whether the latest keyed ``create`` or ``resume`` that returned ``run`` was a
        replay of an earlier request (the Run API answers it with ``Idempotent-Replayed``)."""
        return run.id in self._replayed

    def purge_idempotency_keys(self) -> int:
        """Delete the idempotency keys whose window has passed; returns how many.

        Expired keys already count as unused; purging only keeps the table
        small. Run it periodically (``python -m app.maintenance purge-keys``).
        """
        return self._idempotency_keys().purge_expired()

    def retry(self, run_id: str) -> SessionRun:
        """A new queued run with the input, options and metadata of a failed or cancelled run.

        Terminal runs never change, so reading the source run first is safe.
        """
        source = self.get(run_id)
        if source.status not in RETRYABLE_STATUSES:
            raise InvalidTransitionError(run_id, source.status, "retry", RETRYABLE_STATUSES)
        return self._insert(
            session_id=source.session_id,
            input_message=source.input_message,
            options=source.options,
            trigger_source=TriggerSource.RETRY,
            parent_run_id=source.id,
            checkpoint_ns=source.checkpoint_ns,
            run_metadata=source.run_metadata,
        )

    # ------------------------------------------------------------------ read

    def get(self, run_id: str) -> SessionRun:
        run = self.get_or_none(run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    def get_or_none(self, run_id: str) -> SessionRun | None:
        """The run as stored now (the session's copy is refreshed)."""
        return self._run(self._sql.by_id, {"run_id": text_param(run_id, "run_id")})

    def list_for_session(
        self,
        session_id: str,
        *,
        status: RunStatus | str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[SessionRun]:
        """The session's runs, newest first (``created_at``, then ``id``, descending).

        Keyset pagination: ``before`` is the ``id`` of the last run of the
        previous page; the page holds the runs that come after it in this
        order. An unknown ``before`` run raises ``RunNotFoundError``, a run of
        another session ``BadParameterError``.
        """
        params, key = run_page_params(session_id, status, limit, before)
        page = self._sql.pages[key]
        runs = self._runs(page, params)
        if not runs and before is not None:
            cursor = self.get_or_none(before)
            check_page_cursor(before, session_id, None if cursor is None else cursor.session_id)
        return runs

    def list_by_status(self, status: RunStatus | str, *, limit: int) -> list[SessionRun]:
        """Runs in ``status``, oldest first (the order in which to pick queued runs)."""
        params = {"status": enum_param(RunStatus, status, "status"), "limit": page_size(limit)}
        return self._runs(self._sql.by_status, params)

    def children(self, run_id: str) -> list[SessionRun]:
        """Runs whose ``parent_run_id`` is ``run_id`` (its retries), oldest first."""
        runs = self._runs(self._sql.children, {"run_id": text_param(run_id, "run_id")})
        if not runs:
            self.get(run_id)
        return runs

    def latest_waiting(self, session_id: str) -> SessionRun | None:
        """The session's newest run that waits for input, if any."""
        params = {"session_id": text_param(session_id, "session_id")}
        return next(iter(self._runs(self._sql.latest_waiting, params)), None)

    # ----------------------------------------------------------- transitions

    def start(self, run_id: str) -> SessionRun:
        return self._transition(run_id, START, {}, {})

    def wait_for_input(self, run_id: str, reason: str) -> SessionRun:
        reason = text_param(reason, "reason")
        return self._transition(run_id, WAIT_FOR_INPUT, {"reason": reason}, {"reason": reason})

    def resume(
        self,
        run_id: str,
        payload: dict[str, Any] | RunResumeRequest,
        *,
        idempotency_key: str | None = None,
    ) -> SessionRun:
        """Back to ``running`` with the user's answer (``BadParameterError`` if not an object).

        With ``idempotency_key`` (scoped to the run), the same answer sent again
        within the window returns the run and writes nothing, also when both
        arrive at once; a different answer with that key raises
        ``IdempotencyKeyReusedError``.
        """
        if isinstance(payload, RunResumeRequest):
            payload = payload.resume
        if payload is None:
            raise BadParameterError("resume", "expected a JSON object, got None")
        payload = json_object_param(payload, "resume")
        if idempotency_key is None:
            return self._resume(run_id, payload)
        run_id = text_param(run_id, "run_id")
        return self._once(
            (IdempotencyScope.RESUME, run_id, idempotency_key),
            {"resume": payload},
            lambda: self._resume(run_id, payload),
            lambda: RunNotFoundError(run_id),
        )

    def _resume(self, run_id: str, payload: dict[str, Any]) -> SessionRun:
        return self._transition(run_id, RESUME, {"resume_payload": payload}, {"resume": payload})

    def complete(self, run_id: str, metrics: dict[str, Any] | None = None) -> SessionRun:
        """Completed; ``metrics`` is merged key by key into the stored ones."""
        metrics = json_object_param(metrics, "metrics")
        return self._transition(run_id, COMPLETE, {"metrics": metrics}, {"metrics": metrics})

    def fail(self, run_id: str, error: dict[str, Any]) -> SessionRun:
        error = json_object_param(error, "error")
        return self._transition(run_id, FAIL, {"error": error}, {"error": error})

    def cancel(self, run_id: str) -> tuple[SessionRun, bool]:
        """Cancel, idempotently: a terminal run comes back unchanged with ``False``."""
        run = self._move(run_id, CANCEL, {}, {})
        if run is not None:
            return run, True
        current = self.get(run_id)
        if current.status in TERMINAL_STATUSES:
            return current, False
        raise InvalidTransitionError(run_id, current.status, CANCEL.target, CANCEL.sources)

    def update_metrics(self, run_id: str, metrics: dict[str, Any]) -> SessionRun:
        """Merge ``metrics`` into the run's metrics (keys given replace stored ones), in
        any status: token and cost figures while a run works, or after it ended.

        The merge happens inside the UPDATE, as ``complete``'s does, so two
        writers never lose each other's keys.
        """
        params = {
            "run_id": text_param(run_id, "run_id"),
            "metrics": json_object_param(metrics, "metrics"),
        }
        run = self._run(self._sql.update_metrics, params)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    # ------------------------------------------------------------ the queue

    def claim_next(
        self, worker_id: str, *, lease: timedelta = DEFAULT_LEASE, resumed: bool = True
    ) -> SessionRun | None:
        """Take the next runnable queued run: ``running``, leased to ``worker_id``, with
        its ``run_started`` event; ``None`` when no run is runnable.

        First (unless ``resumed=False``), a resumed run nobody executes yet (running,
        with a ``resume_payload``, no worker and no lease): it is leased to
        ``worker_id`` as it stands, without another lifecycle event (its
        ``run_resumed`` was written by ``resume``). Every claim adds one to ``attempt``.

        Runnable: the oldest queued run of its session (``created_at``, then ``id``)
        in a session with no running and no waiting run; across sessions the oldest
        runnable run goes first. One UPDATE picks and moves it. On PostgreSQL
        claimers never wait for each other (``FOR UPDATE SKIP LOCKED``) and never
        take the same run; on SQLite the write lock serializes them. The lease
        ends ``lease`` (at most ``MAX_DURATION``) from now by the database's clock,
        as every time here is (``_sql``): ``heartbeat(run_id, worker_id=...)``
        extends it, and ``fail_stale`` fails the run once it has expired.
        """
        worker_id = text_param(worker_id, "worker_id", max_length=WORKER_ID_MAX_LENGTH)
        params = {"worker": worker_id, "lease_seconds": _seconds(lease, "lease")}
        if resumed:
            run = self._run(self._sql.claim_resumed, params)
            if run is not None:
                return run
        # Only a ``start`` of another run of the same session at the same moment can
        # trip the one-running index here (``ActiveRunExistsError``, transaction aborted).
        return self._change(
            self._sql.claim,
            self._sql.claim_with_event,
            params,
            START.event_type,
            {"worker_id": worker_id},
        )

    def heartbeat(
        self, run_id: str, *, worker_id: str | None = None, lease: timedelta = DEFAULT_LEASE
    ) -> SessionRun:
        """Tell ``fail_stale`` that a running run is alive.

        A run claimed with ``claim_next`` takes its ``worker_id``, and only that
        worker may extend the lease (to ``lease`` from now; ``LeaseNotHeldError``
        for anyone else). A run started without a lease (``start``, ``resume``)
        takes no ``worker_id``: its ``updated_at`` is touched. A run that is no
        longer running (failed as stale, cancelled) raises
        ``InvalidTransitionError``: the worker should stop.
        """
        params: dict[str, Any] = {"run_id": text_param(run_id, "run_id")}
        if worker_id is None:
            statement = self._sql.heartbeat
        else:
            params["worker"] = text_param(worker_id, "worker_id", max_length=WORKER_ID_MAX_LENGTH)
            params["lease_seconds"] = _seconds(lease, "lease")
            statement = self._sql.heartbeat_leased
        run = self._run(statement, params)
        if run is None:
            current = self.get(run_id)
            if current.status is not RunStatus.RUNNING:
                raise InvalidTransitionError(
                    run_id, current.status, "running (heartbeat)", {RunStatus.RUNNING}
                )
            raise LeaseNotHeldError(run_id, current.worker_id, worker_id)
        return run

    def give_back(self, run_id: str, *, worker_id: str) -> SessionRun:
        """Return a claimed run to the queue unfinished (a worker shutting down): back to
        ``queued`` with a ``run_requeued`` event, worker and lease cleared, the unused
        attempt returned. It heads its session's queue again, so the next
        ``claim_next`` of any worker takes it. Only the lease holder may
        (``LeaseNotHeldError``); a run no longer running raises ``InvalidTransitionError``.
        """
        run_id = text_param(run_id, "run_id")
        worker_id = text_param(worker_id, "worker_id", max_length=WORKER_ID_MAX_LENGTH)
        run = self._change(
            self._sql.give_back,
            self._sql.give_back_with_event,
            {"run_id": run_id, "worker": worker_id},
            GIVE_BACK.event_type,
            {"worker_id": worker_id, "reason": "worker_shutdown"},
        )
        if run is None:
            current = self.get(run_id)
            if current.status is not RunStatus.RUNNING:
                raise InvalidTransitionError(
                    run_id, current.status, GIVE_BACK.target, GIVE_BACK.sources
                )
            raise LeaseNotHeldError(run_id, current.worker_id, worker_id)
        return run

    def expire_leases(self, *, max_attempts: int = 1) -> tuple[list[str], list[str]]:
        """Deal with the running runs whose lease has expired (their worker is presumed
        dead); returns ``(retried, failed)`` run ids.

        A run whose ``attempt`` is below ``max_attempts`` goes back to the queue with a
        ``run_retried`` event (``{"attempt": n, "max_attempts": m}``); it heads its
        session's queue, so the next claim takes it. The others fail with
        ``latest_error.code = "stale_run"`` and a ``run_failed`` event.
        """
        max_attempts = _max_attempts(max_attempts)
        retried: list[str] = []
        if max_attempts > 1:
            requeued = self._runs(self._sql.retry_expired, {"max_attempts": max_attempts})
            for run in requeued:
                payload = {"attempt": run.attempt, "max_attempts": max_attempts}
                self._log.write_lifecycle_event(
                    run.session_id, RETRY_EXPIRED.event_type, payload, run.id
                )
            retried = [run.id for run in requeued]
        return retried, self._fail(self._sql.fail_expired_leases, _LEASE_ERROR, {})

    def fail_stale(self, older_than: timedelta, *, max_attempts: int = 1) -> list[str]:
        """Fail the running runs whose worker is presumed dead; returns their ids.

        Those are the runs whose ``claim_next`` lease has expired, and the runs
        without a lease left without a heartbeat for ``older_than``. Each gets
        ``latest_error.code = "stale_run"`` and a ``run_failed`` event. The
        UPDATE picks and fails them at once; a worker that comes back late
        cannot overwrite that: its ``complete`` raises ``InvalidTransitionError``.
        With ``max_attempts`` above 1, a run whose lease expired before its last
        attempt is requeued instead (``expire_leases``) and not returned.
        """
        seconds = _seconds(older_than, "older_than")
        stale_error = {
            "code": "stale_run",
            "message": f"no heartbeat for more than {seconds:g} s (older_than)",
        }
        _, failed = self.expire_leases(max_attempts=max_attempts)
        return failed + self._fail(self._sql.fail_stale, stale_error, {"cutoff_seconds": -seconds})

    def _fail(
        self, statement: Executable, error: dict[str, Any], extra: dict[str, Any]
    ) -> list[str]:
        stale = self._runs(statement, {"error": error, **extra})
        for run in stale:
            self._log.write_lifecycle_event(
                run.session_id, FAIL.event_type, {"error": error}, run.id
            )
        return [run.id for run in stale]

    def delete(self, run_id: str) -> None:
        """Delete the run and its events; its retries keep living with ``parent_run_id`` NULL."""
        result = execute_core(
            self._session, self._sql.delete, {"run_id": text_param(run_id, "run_id")}
        )
        if result.rowcount == 0:
            raise RunNotFoundError(run_id)

    # -------------------------------------------------------------- internal

    def _create(self, strategy: MultitaskStrategy, **values: Any) -> SessionRun:
        """``_insert`` after the strategy's check of the session's active runs."""
        if strategy is MultitaskStrategy.ENQUEUE:
            return self._insert(**values)
        session_id = values["session_id"]
        params = {"session_id": session_id}
        if execute_core(self._session, self._sql.lock_session, params).first() is None:
            raise SessionNotFoundError(session_id)
        if strategy is MultitaskStrategy.REJECT:
            active = execute_core(self._session, self._sql.first_active, params).first()
            if active is not None:
                active_id, active_status = active
                raise ActiveRunExistsError.rejected(session_id, active_id, active_status)
            return self._insert(**values)
        run_id = new_id()
        cancelled = self._runs(self._sql.interrupt, {"busy_session": session_id})
        if cancelled:
            payload = {"multitask_strategy": strategy.value, "interrupted_by": run_id}
            self._log.write_lifecycle_events(
                session_id, CANCEL.event_type, payload, [run.id for run in cancelled]
            )
        return self._insert(**values, run_id=run_id)

    def _once(
        self,
        key: tuple[IdempotencyScope, str, Any],
        request: dict[str, Any],
        work: Callable[[], SessionRun],
        missing: Callable[[], DataLayerError],
    ) -> SessionRun:
        """``work()`` once per idempotency key (scope, owner, key): claim the key, do the
        work, record its run; or replay the run of the request that did it first
        (``app.repositories._idempotency``). ``missing()`` is raised when the owner
        (session or run) does not exist."""
        scope, owner, text = key[0], key[1], key_param(key[2])
        keys = self._idempotency_keys()
        claim = keys.claim(scope, owner, text, request)
        if not claim.owned:
            if claim.replay_run_id is None:
                raise missing()
            run = self.get(claim.replay_run_id)
            self._replayed.add(run.id)
            return run
        run = work()
        keys.record(scope, owner, text, run.id)
        self._replayed.discard(run.id)
        return run

    def _idempotency_keys(self) -> IdempotencyKeys:
        if self._keys is None:
            window = self._idempotency_window
            if window is None:
                window = window_from_environment()
            self._keys = IdempotencyKeys(self._session, window)
        return self._keys

    @property
    def _log(self) -> EventLog:
        """The event log the lifecycle events go to (``_event_log``), made on first use."""
        if self._event_log is None:
            self._event_log = EventLog(self._session)
        return self._event_log

    def _insert(
        self,
        *,
        session_id: str,
        input_message: str | None,
        options: dict[str, Any] | None,
        trigger_source: TriggerSource,
        parent_run_id: str | None,
        checkpoint_ns: str | None,
        run_metadata: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> SessionRun:
        run_id = run_id or new_id()
        params = {
            "run_id": run_id,
            "session_id": session_id,
            "queued": RunStatus.QUEUED,
            "trigger_source": trigger_source,
            "parent_run_id": parent_run_id,
            "input_message": input_message,
            "options": options,
            "checkpoint_thread": f"{session_id}:{run_id}",
            "checkpoint_ns": checkpoint_ns,
            "run_metadata": run_metadata or {},
        }
        event = {"trigger_source": trigger_source.value, "parent_run_id": parent_run_id}
        one_statement = self._sql.create_with_event
        statement = self._sql.create if one_statement is None else one_statement
        if one_statement is not None:
            params |= {"event_type": RunEventType.RUN_CREATED.value, "event_payload": event}
        row = execute_core(self._session, statement, params).one_or_none()
        if row is None:
            if not self._session.scalar(SESSION_EXISTS, {"session_id": session_id}):
                raise SessionNotFoundError(session_id)
            raise RunNotFoundError(str(parent_run_id), session_id=session_id)
        values = dict(zip(RUN_COLUMNS, row, strict=False))
        run = inserted(self._session, SessionRun, values)
        self._lifecycle_event(run, RunEventType.RUN_CREATED, event, row)
        return run

    def _transition(
        self,
        run_id: str,
        transition: Transition,
        params: dict[str, Any],
        event_payload: dict[str, Any],
    ) -> SessionRun:
        run = self._move(run_id, transition, params, event_payload)
        if run is None:
            current = self.get(run_id)
            if current.status in transition.sources:  # only the one-running guard refuses that
                self._raise_active_run_exists(run_id)
            raise InvalidTransitionError(
                run_id, current.status, transition.target, transition.sources
            )
        return run

    def _move(
        self,
        run_id: str,
        transition: Transition,
        params: dict[str, Any],
        event_payload: dict[str, Any],
    ) -> SessionRun | None:
        """Apply ``transition`` with one conditional UPDATE and append its event.

        None when the run is not in a source status (or does not exist).
        """
        params = {**params, "run_id": text_param(run_id, "run_id")}
        event_payload = event_payload_param(event_payload)
        with_event = self._sql.transitions_with_event
        try:
            return self._change(
                self._sql.transitions[transition.name],
                None if with_event is None else with_event[transition.name],
                params,
                transition.event_type,
                event_payload,
            )
        except ConflictError as exc:
            if transition.target is not RunStatus.RUNNING or isinstance(exc, ActiveRunExistsError):
                raise
        # A deadlock while entering running (``_driver_errors`` maps it to a plain
        # ConflictError): a transaction that created a run, so holds its session's
        # event counter, and then starts it, against a concurrent start that holds
        # the one-running index entry and waits for that counter. PostgreSQL aborts
        # one of the two; for the caller, another run of the session got there first.
        raise ActiveRunExistsError(None, params["run_id"])

    def _raise_active_run_exists(self, run_id: str) -> NoReturn:
        ((session_id, active_run_id),) = execute_core(
            self._session, self._sql.active_run, {"run_id": run_id}
        )
        raise ActiveRunExistsError(session_id, run_id, active_run_id)

    def _change(
        self,
        statement: Executable,
        with_event: Executable | None,
        params: dict[str, Any],
        event_type: RunEventType,
        event_payload: dict[str, Any],
    ) -> SessionRun | None:
        """A run's change and its lifecycle event: ``with_event`` (PostgreSQL: one
        statement that also writes the event) when the dialect has it, else
        ``statement`` and then ``append``; the run as the session's, or None."""
        if with_event is not None:
            statement = with_event
            params = {**params, "event_type": event_type.value, "event_payload": event_payload}
        row = execute_core(self._session, statement, params).one_or_none()
        if row is None:
            return None
        run = in_session(self._session, SessionRun, RUN_COLUMNS, row[: len(RUN_COLUMNS)])
        self._lifecycle_event(run, event_type, event_payload, row)
        return run

    def _lifecycle_event(
        self,
        run: SessionRun,
        event_type: str,
        payload: dict[str, Any],
        row: Any,
    ) -> None:
        """The event of a run's change: written by the same statement (PostgreSQL),
        else, or when that insert collided with a v0.7 writer's seq, by the event log."""
        written = row[len(RUN_COLUMNS) :]
        self._log.settle_lifecycle_event(run.session_id, run.id, event_type, payload, written)

    def _run(self, statement: Executable, params: dict[str, Any]) -> SessionRun | None:
        """One row of a Core statement as the session's run (see ``app.repositories._rows``).

        For a single row this is about twice as cheap as the ORM's loading.
        """
        row = execute_core(self._session, statement, params).one_or_none()
        return None if row is None else in_session(self._session, SessionRun, RUN_COLUMNS, row)

    def _runs(self, statement: Executable, params: dict[str, Any]) -> list[SessionRun]:
        """Rows of a Core statement as the session's runs (``app.repositories._rows``)."""
        rows = execute_core(self._session, statement, params)
        return in_session_many(self._session, SessionRun, RUN_COLUMNS, rows)


def _loc_part(part: str | int) -> str:
    """A field name or index; an unknown field that is not a name is not quoted."""
    return str(part) if isinstance(part, int) or is_name(part) else "(unknown field)"


def _strategy(body: RunCreate, given: MultitaskStrategy | str | None) -> MultitaskStrategy:
    """The keyword's strategy, else the body's; the two must agree when both are set."""
    if given is None:
        return body.multitask_strategy
    strategy = enum_param(MultitaskStrategy, given, "multitask_strategy")
    if "multitask_strategy" in body.model_fields_set and body.multitask_strategy is not strategy:
        raise BadParameterError(
            "multitask_strategy",
            f"the body says {body.multitask_strategy.value}, the argument {strategy.value}",
        )
    return strategy


def _duration(value: Any, name: str) -> timedelta:
    """A positive ``timedelta`` of at most ``MAX_DURATION``."""
    if not isinstance(value, timedelta) or not timedelta(0) < value <= MAX_DURATION:
        raise BadParameterError(
            name,
            f"expected a positive timedelta of at most {MAX_DURATION.days} days, "
            f"got {described(value)}",
        )
    return value


_LEASE_ERROR = {
    "code": "stale_run",
    "message": "the worker's lease expired (the database's clock passed lease_expires_at)",
}


def _max_attempts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPTS:
        raise BadParameterError(
            "max_attempts",
            f"expected an integer from 1 to {MAX_ATTEMPTS}, got {described(value)}",
        )
    return value


def _seconds(value: Any, name: str) -> float:
    """``_duration`` in seconds, the offset the statements add to the database's clock."""
    return _duration(value, name).total_seconds()


def _run_create(data: RunCreate | Mapping[str, Any]) -> RunCreate:
    if isinstance(data, RunCreate):
        return data
    try:
        return RunCreate.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(_loc_part(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
    # Raised outside the except block: the ValidationError (which holds the input)
    # must not travel along as the error's context.
    raise ValidationFailedError(f"invalid run: {problems}")


__all__ = ["RunRepository"]
