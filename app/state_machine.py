"""The run state machine (spec section 5.2), in one place.

    queued -> running
    running -> waiting_input | completed | failed | cancelled
    waiting_input -> running            (resume: same run, never a new one)
    queued | waiting_input -> cancelled
    running -> queued                   (retry_expired: a dead worker's lease, run_retried;
                                         give_back: a worker shutting down, run_requeued)
    completed, failed, cancelled: terminal

Each *transition* is a named action with the statuses it may start from, the
status it ends in and the lifecycle event it appends. Two actions end in
``running``: ``start`` (from queued, event ``run_started``) and ``resume``
(from waiting_input, event ``run_resumed``); "resumed" is an event, never a
status. ``RunRepository`` turns each action into one conditional UPDATE.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from app.models import RunStatus


class RunEventType(StrEnum):
    """Lifecycle event types appended with each run change (spec section 7)."""

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
"""Event types that belong to a run (spec section 7): ``EventRepository.append``
and ``append_many`` require their ``run_id``. Rows stored earlier are read as they are."""


@dataclass(frozen=True, slots=True)
class Transition:
    name: str
    sources: frozenset[RunStatus]
    target: RunStatus
    event_type: RunEventType


_S = RunStatus

START = Transition("start", frozenset({_S.QUEUED}), _S.RUNNING, RunEventType.RUN_STARTED)
WAIT_FOR_INPUT = Transition(
    "wait_for_input", frozenset({_S.RUNNING}), _S.WAITING_INPUT, RunEventType.RUN_WAITING_INPUT
)
RESUME = Transition("resume", frozenset({_S.WAITING_INPUT}), _S.RUNNING, RunEventType.RUN_RESUMED)
COMPLETE = Transition("complete", frozenset({_S.RUNNING}), _S.COMPLETED, RunEventType.RUN_COMPLETED)
FAIL = Transition("fail", frozenset({_S.RUNNING}), _S.FAILED, RunEventType.RUN_FAILED)
CANCEL = Transition(
    "cancel",
    frozenset({_S.QUEUED, _S.RUNNING, _S.WAITING_INPUT}),
    _S.CANCELLED,
    RunEventType.RUN_CANCELLED,
)

# Back to the queue (docs/worker.md): the run heads its session's queue again (its
# created_at is older than any run queued behind it), so claim_next takes it next.
RETRY_EXPIRED = Transition(
    "retry_expired", frozenset({_S.RUNNING}), _S.QUEUED, RunEventType.RUN_RETRIED
)
GIVE_BACK = Transition("give_back", frozenset({_S.RUNNING}), _S.QUEUED, RunEventType.RUN_REQUEUED)

TRANSITIONS: tuple[Transition, ...] = (START, WAIT_FOR_INPUT, RESUME, COMPLETE, FAIL, CANCEL)
"""The user-facing actions, each a ``RunRepository`` method of its name."""

REQUEUES: tuple[Transition, ...] = (RETRY_EXPIRED, GIVE_BACK)
"""The queue's own moves back to ``queued`` (``expire_leases``, ``give_back``)."""

ALL_TRANSITIONS: tuple[Transition, ...] = TRANSITIONS + REQUEUES

TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})

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
    "ALLOWED",
    "ALL_TRANSITIONS",
    "CANCEL",
    "COMPLETE",
    "EVENT_TARGET",
    "FAIL",
    "GIVE_BACK",
    "LIFECYCLE_EVENT_TYPES",
    "REQUEUES",
    "RESUME",
    "RETRY_EXPIRED",
    "RUN_SCOPED_EVENT_TYPES",
    "START",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "WAIT_FOR_INPUT",
    "RunEventType",
    "Transition",
]
