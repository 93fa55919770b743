"""The run state machine (spec section 5.2), in one place.

    queued -> running
    running -> waiting_input | completed | failed | cancelled
    waiting_input -> running            (resume: same run, never a new one)
    queued | waiting_input -> cancelled
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

TRANSITIONS: tuple[Transition, ...] = (START, WAIT_FOR_INPUT, RESUME, COMPLETE, FAIL, CANCEL)

TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})

ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    status: frozenset(t.target for t in TRANSITIONS if status in t.sources) for status in RunStatus
}
"""status -> the statuses it may move to; derived from ``TRANSITIONS``."""

EVENT_TARGET: dict[RunEventType, RunStatus] = {
    RunEventType.RUN_CREATED: _S.QUEUED,
    **{t.event_type: t.target for t in TRANSITIONS},
}
"""lifecycle event -> the status the run is in right after it."""


__all__ = [
    "ALLOWED",
    "CANCEL",
    "COMPLETE",
    "EVENT_TARGET",
    "FAIL",
    "LIFECYCLE_EVENT_TYPES",
    "RESUME",
    "RUN_SCOPED_EVENT_TYPES",
    "START",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "WAIT_FOR_INPUT",
    "RunEventType",
    "Transition",
]
