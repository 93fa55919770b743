"""The event log of a session: ``seq`` allocation, de-duplication and replay.

``append`` gives the session's next ``seq`` without duplicates or gaps among
committed events, also next to v0.7 writers; writers of one session commit in
``seq`` order; a known ``event_id`` returns the stored event; no statement of
an append fails inside the caller's transaction. Pages are snapshots that
belong to no session. The transaction must use READ COMMITTED on PostgreSQL.

This module checks the caller's arguments and reads the pages; the writes follow
the event log's rule, written once in ``_event_log`` (which ``RunRepository``'s
lifecycle events use too). On PostgreSQL ``append`` and ``append_many`` call
``pg_notify`` (channel ``EVENTS_CHANNEL``, payload the session id) in their
statement, so a commit wakes ``app.feed``'s followers; bursts: docs/events.md.

Contract: docs/reference.md (EventRepository). How and why: docs/design.md
(``seq`` allocation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import Executable, Integer, String, bindparam, select
from sqlmodel import Session as DbSession

from app._params import (
    described,
    enum_param,
    json_object_param,
    optional_text_param,
    page_size,
    since_seq_param,
    text_param,
)
from app.errors import BadParameterError, RunNotFoundError
from app.input_limits import max_json_bytes
from app.models import EventSource, SessionEvent, SessionRun
from app.repositories._driver import execute_core
from app.repositories._event_log import EVENT_COLUMNS, MAX_BATCH, OVERLAP_MIN_EVENTS, EventLog
from app.repositories._rows import snapshots
from app.repositories._sql import LIMIT, RUN_EXISTS, RUN_ID, SESSION_ID
from app.state_machine import LIFECYCLE_EVENT_TYPES, RUN_SCOPED_EVENT_TYPES

EVENTS = SessionEvent.__table__
RUNS = SessionRun.__table__

TYPE_MAX_LENGTH = cast(String, EVENTS.c.type.type).length
EVENT_ID_MAX_LENGTH = 255
"""``event_id`` is in a unique index; PostgreSQL cannot index an entry over ~2.7 kB."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event of an ``append_many`` batch: the arguments of ``append``."""

    type: str
    payload: dict[str, Any] | None = None
    source: EventSource | str = EventSource.SESSION
    run_id: str | None = None
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Statements:
    """The pages of one dialect (the writes: ``_event_log.log_statements``).

    Parameters: ``session_id`` or ``run_id``, ``since_seq`` and ``limit``.
    """

    page_for_session: Executable
    page_for_run: Executable


@cache
def _statements(dialect: str) -> _Statements:
    since = bindparam("since_seq", type_=Integer())
    run_session = select(RUNS.c.session_id).where(RUNS.c.id == RUN_ID).scalar_subquery()
    return _Statements(
        # Pages are Core selects read into detached events (``_page``).
        page_for_session=select(*EVENTS.c)
        .where(EVENTS.c.session_id == SESSION_ID, EVENTS.c.seq > since)
        .order_by(EVENTS.c.seq)
        .limit(LIMIT),
        # The session_id term lets idx_session_event_run_seq serve the query.
        page_for_run=select(*EVENTS.c)
        .where(
            EVENTS.c.session_id == run_session,
            EVENTS.c.run_id == RUN_ID,
            EVENTS.c.seq > since,
        )
        .order_by(EVENTS.c.seq)
        .limit(LIMIT),
    )


class EventRepository:
    """Appends to and reads the per-session event log; flushes, never commits.

    Pages (``list_for_*``) are snapshots in no session: events never change,
    and skipping the ORM's loading halves a page's cost (``app.repositories._rows``).
    """

    def __init__(self, session: DbSession) -> None:
        self._session = session
        self._sql = _statements(session.get_bind().dialect.name)
        self._log = EventLog(session)

    def append(
        self,
        session_id: str,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        source: EventSource | str = EventSource.SESSION,
        run_id: str | None = None,
        event_id: str | None = None,
    ) -> SessionEvent:
        """Append an event with the session's next ``seq`` (see module docstring).

        With an ``event_id`` already stored for the session, the stored event
        comes back and nothing is written. Raises ``SessionNotFoundError``,
        ``RunNotFoundError`` (the run is not in that session) or
        ``BadParameterError`` before anything is written: also for a run-scoped
        type without ``run_id`` (``RUN_SCOPED_EVENT_TYPES``) and for a lifecycle
        type (``LIFECYCLE_EVENT_TYPES``: ``RunRepository`` writes those with the
        run's change); ``append_many`` keeps the same rules (``_checked_item``).
        """
        limit = max_json_bytes()  # read once for the call's arguments
        params = {
            "session_id": text_param(session_id, "session_id", max_bytes=limit),
            **_checked_item(NewEvent(type, payload, source, run_id, event_id), limit, _ITEM_FIELDS),
        }
        return self._log.append(params)

    def append_many(
        self, session_id: str, events: Sequence[NewEvent | Mapping[str, Any]]
    ) -> list[SessionEvent]:
        """Append a burst of events in one statement, with consecutive seqs in the order given.

        Each item is a ``NewEvent`` (or a mapping of its fields) and is checked
        as ``append`` checks its arguments; one bad item raises
        ``BadParameterError`` naming it (``events[3].type``) and nothing is
        written. Returns one event per item, in order: an ``event_id`` already
        stored comes back as stored and takes no seq; an ``event_id`` repeated
        in the batch is stored once (the first item) and returned for each.
        Raises ``SessionNotFoundError`` / ``RunNotFoundError`` as ``append``
        does. At most ``MAX_BATCH`` items (docs/events.md).
        """
        session_id = text_param(session_id, "session_id")
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
            raise BadParameterError(
                "events", f"expected a sequence of events, got {described(events)}"
            )
        if len(events) > MAX_BATCH:
            raise BadParameterError("events", f"at most {MAX_BATCH} per call, got {len(events)}")
        limit = max_json_bytes()  # read once for the batch, not three times an item
        items = [_batch_item(index, item, limit) for index, item in enumerate(events)]
        return self._log.append_many(session_id, items)

    def list_for_session(
        self, session_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> list[SessionEvent]:
        """Events of the session with ``seq > since_seq``, oldest first, legacy ones included."""
        params = {
            "session_id": text_param(session_id, "session_id"),
            "since_seq": since_seq_param(since_seq),
        }
        return self._page(self._sql.page_for_session, {**params, "limit": page_size(limit)})

    def list_for_run(
        self, run_id: str, *, since_seq: int = 0, limit: int = 100
    ) -> list[SessionEvent]:
        """Events of the run with ``seq > since_seq`` (session seqs, not renumbered).

        An empty page of an unknown run raises ``RunNotFoundError``.
        """
        params = {"run_id": text_param(run_id, "run_id"), "since_seq": since_seq_param(since_seq)}
        events = self._page(self._sql.page_for_run, {**params, "limit": page_size(limit)})
        if not events and not self._session.scalar(RUN_EXISTS, {"run_id": run_id}):
            raise RunNotFoundError(run_id)
        return events

    # ------------------------------------------------------------------

    def _page(self, statement: Executable, params: dict[str, Any]) -> list[SessionEvent]:
        """Snapshots, not session objects: an event never changes (see ``rows``)."""
        return snapshots(
            SessionEvent, EVENT_COLUMNS, execute_core(self._session, statement, params)
        )


_ITEM_FIELDS = ("type", "payload", "source", "run_id", "event_id")


def _batch_item(index: int, item: NewEvent | Mapping[str, Any], limit: int) -> dict[str, Any]:
    """``item`` checked as ``append`` checks its arguments; errors name ``events[index]``."""
    try:
        return _checked_item(item, limit, _ITEM_FIELDS)
    except BadParameterError:
        pass  # checked again below, outside this block, so that no error is chained
    # Only to raise with the item's place in every name.
    where = f"events[{index}]"
    return _checked_item(item, limit, tuple(f"{where}.{name}" for name in _ITEM_FIELDS), where)


def _checked_item(
    item: NewEvent | Mapping[str, Any], limit: int, names: tuple[str, ...], where: str = "events"
) -> dict[str, Any]:
    """An event's arguments checked as ``append`` and ``append_many`` take them; errors
    name each argument by ``names`` (type, payload, source, run_id, event_id) and
    describe a bad one by its type and size, never by its content."""
    if isinstance(item, Mapping):
        item = _from_mapping(item, where)
    if not isinstance(item, NewEvent):
        raise BadParameterError(where, f"expected a NewEvent or a mapping, got {described(item)}")
    type_name, payload_name, source_name, run_id_name, event_id_name = names
    checked: dict[str, Any] = {
        "type": text_param(item.type, type_name, max_length=TYPE_MAX_LENGTH, max_bytes=limit),
        "payload": json_object_param(item.payload, payload_name, max_bytes=limit),
        "source": enum_param(EventSource, item.source, source_name).value,
        "run_id": optional_text_param(item.run_id, run_id_name, max_bytes=limit),
        "event_id": optional_text_param(
            item.event_id, event_id_name, max_length=EVENT_ID_MAX_LENGTH, max_bytes=limit
        ),
    }
    _check_type_rules(checked["type"], checked["run_id"], type_name, run_id_name)
    return checked


def _from_mapping(item: Mapping[str, Any], where: str) -> NewEvent:
    """A ``NewEvent`` of a mapping of its fields; the error names none of the mapping's
    keys and is raised outside the ``except`` block (the TypeError quotes a key)."""
    try:
        return NewEvent(**item)
    except TypeError:
        pass
    raise BadParameterError(
        where,
        f"expected the fields of NewEvent {NewEvent.__slots__} (type required), "
        f"got {described(item)}",
    )


def _check_type_rules(type: str, run_id: str | None, type_name: str, run_id_name: str) -> None:
    """The rules of event types, one for ``append`` and ``append_many``: a run-scoped type
    needs its run; a lifecycle type is ``RunRepository``'s alone (its own writes,
    ``write_lifecycle_event(s)``, do not come through here)."""
    if run_id is None and type in RUN_SCOPED_EVENT_TYPES:
        raise BadParameterError(run_id_name, f"required for the run-scoped event type {type}")
    if type in LIFECYCLE_EVENT_TYPES:
        raise BadParameterError(
            type_name,
            f"{type} is a lifecycle event type: RunRepository writes it with the run's "
            "change (start, wait_for_input, resume, complete, fail, cancel); "
            "append another type",
        )


__all__ = ["MAX_BATCH", "OVERLAP_MIN_EVENTS", "EventRepository", "NewEvent"]
