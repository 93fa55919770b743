"""``app.state_machine``: what each transition writes to the run's row, as data, keeps
the rules the statements were built by (``app.repositories._run_statements``).

No database: the rules are about the data; the SQL it renders to is compared with
``docs/sql/`` by ``test_sql_text.py``, and the repository tests run it on both backends.
"""

from __future__ import annotations

import pytest

from app.models import RunStatus, SessionRun
from app.state_machine import (
    ACTIVE_STATUSES,
    ALL_TRANSITIONS,
    EXECUTING_STATUSES,
    FINISHED,
    LEASE_ENDED,
    NO_WORKER,
    NOT_WAITING,
    RETRYABLE_STATUSES,
    STARTED,
    TERMINAL_STATUSES,
    Transition,
    Write,
)

_NAMES = [t.name for t in ALL_TRANSITIONS]
_COLUMNS = set(SessionRun.__table__.c.keys())


def _columns(transition: Transition) -> list[str]:
    return [write.column for write in transition.writes]


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=_NAMES)
def test_each_write_names_a_column_of_the_run_once(transition: Transition) -> None:
    columns = _columns(transition)
    assert len(columns) == len(set(columns))
    assert set(columns) <= _COLUMNS - {"status", "updated_at"}
    for write in transition.writes:
        takes_value = write.write in (Write.PARAMETER, Write.MERGE)
        assert (write.parameter is not None) == takes_value, write


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=_NAMES)
def test_only_a_move_into_a_terminal_status_sets_the_finish_time(transition: Transition) -> None:
    assert (FINISHED in transition.writes) == (transition.target in TERMINAL_STATUSES)


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=_NAMES)
def test_entering_running_keeps_the_first_start_time(transition: Transition) -> None:
    entering = transition.target is RunStatus.RUNNING
    assert (STARTED in transition.writes) == entering
    assert ("started_at" in _columns(transition)) == entering


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=_NAMES)
def test_every_move_into_or_out_of_running_ends_the_lease(transition: Transition) -> None:
    touches_running = RunStatus.RUNNING in {transition.target, *transition.sources}
    assert (LEASE_ENDED in transition.writes) == touches_running


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=_NAMES)
def test_the_worker_is_cleared_unless_the_run_ends(transition: Transition) -> None:
    """A finished run keeps the worker that ran it; any other move ends the execution."""
    assert (NO_WORKER in transition.writes) == (transition.target not in TERMINAL_STATUSES)


@pytest.mark.parametrize("transition", ALL_TRANSITIONS, ids=_NAMES)
def test_a_run_keeps_its_waiting_reason_only_while_it_waits(transition: Transition) -> None:
    reason = [w for w in transition.writes if w.column == "waiting_reason"]
    if transition.target is RunStatus.WAITING_INPUT:
        assert [(w.write, w.parameter) for w in reason] == [(Write.PARAMETER, "reason")]
    elif RunStatus.WAITING_INPUT in transition.sources:
        assert reason == [NOT_WAITING]
    else:
        assert reason == []


def test_the_status_sets_partition_the_statuses_as_the_layer_decides() -> None:
    assert ACTIVE_STATUSES | TERMINAL_STATUSES == set(RunStatus)
    assert not ACTIVE_STATUSES & TERMINAL_STATUSES
    assert EXECUTING_STATUSES == ACTIVE_STATUSES - {RunStatus.QUEUED}
    assert RETRYABLE_STATUSES == TERMINAL_STATUSES - {RunStatus.COMPLETED}
