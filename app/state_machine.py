"""The run state machine, in one place.

    queued -> running
    running -> waiting_input | completed | failed | cancelled
    waiting_input -> running            (resume: same run, never a new one)
    queued | waiting_input -> cancelled
    running -> queued                   (retry_expired: a dead worker's lease, run_retried;
                                         give_back: a worker shutting down, run_requeued)
    completed, failed, cancelled: terminal

Each *transition* is a named action with the statuses it may start from, the
status it ends in, the lifecycle event it appends and what it writes to the run's
row (start and finish times, the lease, the attempt count, the caller's values:
``Transition.writes``). Two actions end in ``running``: ``start`` (from queued,
event ``run_started``) and ``resume`` (from waiting_input, event ``run_resumed``);
"resumed" is an event, never a status. ``RunRepository`` turns each action into
one conditional UPDATE. The sets of statuses the layer decides by (terminal,
active, ...) are defined here too, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from app.models import RunStatus


class RunEventType(StrEnum):
    """Lifecycle event types appended with each run change."""

    RUN_CREATED = "run_created"
    RUN_STARTED = "run_started"
    RUN_WAITING_INPUT = "run_waiting_input"
    RUN_RESUMED = "run_resumed"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_CANCELLED = "run_cancelled"
    RUN_RETRIED = "run_retried"
    RUN_REQUEUED = "run_requeued"


LIFECYCLE_EVENT_TYPES: frozenset[str] = frozenset(event_type.value for event_type in RunEventType)
"""Event types only ``RunRepository`` writes, each with the run change it records:
``EventRepository.append`` and ``append_many`` refuse them (a ``run_failed`` appended
by hand would end the run's streams while the run keeps running)."""

RUN_SCOPED_EVENT_TYPES: frozenset[str] = frozenset(
    {
        *(event_type.value for event_type in RunEventType),
        "verify_start",
        "verify_pass",
        "verify_fail",
        "tool_policy_blocked",
        "tool_policy_warn",
    }
)
"""Event types that belong to a run: ``EventRepository.append``
and ``append_many`` require their ``run_id``. Rows stored earlier are read as they are."""


class Write(StrEnum):
    """How a transition sets one column of the run's row (``Set``); ``RunRepository``'s
    statements turn each into SQL (``app.repositories._run_statements``)."""

    NOW = "now"
    """The database's clock."""
    NOW_IF_UNSET = "now_if_unset"
    """The database's clock, unless the column already holds a time (a resumed run
    keeps the time it first started)."""
    CLEAR = "clear"
    """NULL."""
    PARAMETER = "parameter"
    """The caller's value, the statement parameter ``Set.parameter``."""
    MERGE = "merge"
    """The stored JSON object shallow-merged with the caller's (``Set.parameter``)."""
    ADD_ONE = "add_one"
    SUBTRACT_ONE = "subtract_one"
    ZERO = "zero"


@dataclass(frozen=True, slots=True)
class Set:
    """One column a transition writes, and how."""

    column: str
    write: Write
    parameter: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A named action: the statuses it may start from, the one it ends in, the lifecycle
    event it appends and what it writes to the run's row besides ``status`` and
    ``updated_at`` (which every transition sets: the target, the database's clock)."""

    name: str
    sources: frozenset[RunStatus]
    target: RunStatus
    event_type: RunEventType
    writes: tuple[Set, ...] = ()


_S = RunStatus
_W = Write

# What the transitions write. worker_id and lease_expires_at describe the current
# execution: claim_next sets them, start and resume begin one without a lease, every
# move out of running ends the lease, and waiting for input ends the execution (the
# worker is gone). attempt counts the claims of the current execution (migration
# 0014): every start adds one, a lease given back returns its unused one, resume
# begins anew. A run keeps waiting_reason only while it waits.
STARTED = Set("started_at", _W.NOW_IF_UNSET)
FINISHED = Set("finished_at", _W.NOW)
LEASE_ENDED = Set("lease_expires_at", _W.CLEAR)
NO_WORKER = Set("worker_id", _W.CLEAR)
NOT_WAITING = Set("waiting_reason", _W.CLEAR)

START = Transition(
    "start",
    frozenset({_S.QUEUED}),
    _S.RUNNING,
    RunEventType.RUN_STARTED,
    (STARTED, LEASE_ENDED, NO_WORKER, Set("attempt", _W.ADD_ONE)),
)
WAIT_FOR_INPUT = Transition(
    "wait_for_input",
    frozenset({_S.RUNNING}),
    _S.WAITING_INPUT,
    RunEventType.RUN_WAITING_INPUT,
    (Set("waiting_reason", _W.PARAMETER, "reason"), LEASE_ENDED, NO_WORKER),
)
RESUME = Transition(
    "resume",
    frozenset({_S.WAITING_INPUT}),
    _S.RUNNING,
    RunEventType.RUN_RESUMED,
    (
        STARTED,
        NOT_WAITING,
        LEASE_ENDED,
        NO_WORKER,
        Set("attempt", _W.ZERO),
        Set("resume_payload", _W.PARAMETER, "resume_payload"),
    ),
)
COMPLETE = Transition(
    "complete",
    frozenset({_S.RUNNING}),
    _S.COMPLETED,
    RunEventType.RUN_COMPLETED,
    (FINISHED, LEASE_ENDED, Set("metrics", _W.MERGE, "metrics")),
)
FAIL = Transition(
    "fail",
    frozenset({_S.RUNNING}),
    _S.FAILED,
    RunEventType.RUN_FAILED,
    (FINISHED, LEASE_ENDED, Set("latest_error", _W.PARAMETER, "error")),
)
CANCEL = Transition(
    "cancel",
    frozenset({_S.QUEUED, _S.RUNNING, _S.WAITING_INPUT}),
    _S.CANCELLED,
    RunEventType.RUN_CANCELLED,
    (FINISHED, NOT_WAITING, LEASE_ENDED),
)

# Back to the queue (docs/worker.md): the run heads its session's queue again (its
# created_at is older than any run queued behind it), so claim_next takes it next.
RETRY_EXPIRED = Transition(
    "retry_expired",
    frozenset({_S.RUNNING}),
    _S.QUEUED,
    RunEventType.RUN_RETRIED,
    (LEASE_ENDED, NO_WORKER),
)
GIVE_BACK = Transition(
    "give_back",
    frozenset({_S.RUNNING}),
    _S.QUEUED,
    RunEventType.RUN_REQUEUED,
    (LEASE_ENDED, NO_WORKER, Set("attempt", _W.SUBTRACT_ONE)),
)

TRANSITIONS: tuple[Transition, ...] = (START, WAIT_FOR_INPUT, RESUME, COMPLETE, FAIL, CANCEL)
"""The user-facing actions, each a ``RunRepository`` method of its name."""

REQUEUES: tuple[Transition, ...] = (RETRY_EXPIRED, GIVE_BACK)
"""The queue's own moves back to ``queued`` (``expire_leases``, ``give_back``)."""

ALL_TRANSITIONS: tuple[Transition, ...] = TRANSITIONS + REQUEUES

TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
"""A run in one of these never changes again."""

ACTIVE_STATUSES: frozenset[RunStatus] = frozenset({_S.QUEUED, _S.RUNNING, _S.WAITING_INPUT})
"""A session with a run in one of these is busy (``MultitaskStrategy``)."""

EXECUTING_STATUSES: frozenset[RunStatus] = frozenset({_S.RUNNING, _S.WAITING_INPUT})
"""A session with a run in one of these has an execution under way: ``claim_next``
takes none of its queued runs."""

RETRYABLE_STATUSES: frozenset[RunStatus] = frozenset({_S.FAILED, _S.CANCELLED})
"""``RunRepository.retry`` makes a new run of a run in one of these."""

TERMINAL_EVENT_TYPES: frozenset[str] = frozenset(
    str(t.event_type) for t in TRANSITIONS if t.target in TERMINAL_STATUSES
)
"""The lifecycle events after which a run's stream ends (``app.feed``)."""

ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    status: frozenset(t.target for t in ALL_TRANSITIONS if status in t.sources)
    for status in RunStatus
}
"""status -> the statuses it may move to; derived from ``TRANSITIONS``."""

EVENT_TARGET: dict[RunEventType, RunStatus] = {
    RunEventType.RUN_CREATED: _S.QUEUED,
    **{t.event_type: t.target for t in ALL_TRANSITIONS},
}
"""lifecycle event -> the status the run is in right after it."""


__all__ = [
    "ACTIVE_STATUSES",
    "ALLOWED",
    "ALL_TRANSITIONS",
    "CANCEL",
    "COMPLETE",
    "EVENT_TARGET",
    "EXECUTING_STATUSES",
    "FAIL",
    "FINISHED",
    "GIVE_BACK",
    "LEASE_ENDED",
    "LIFECYCLE_EVENT_TYPES",
    "NOT_WAITING",
    "NO_WORKER",
    "REQUEUES",
    "RESUME",
    "RETRYABLE_STATUSES",
    "RETRY_EXPIRED",
    "RUN_SCOPED_EVENT_TYPES",
    "START",
    "STARTED",
    "TERMINAL_EVENT_TYPES",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "WAIT_FOR_INPUT",
    "RunEventType",
    "Set",
    "Transition",
    "Write",
]
