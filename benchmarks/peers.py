"""Peers of the repositories for the overhead benchmark, on the same migrated schema.

* ``naive SQLModel``: the ORM code a typical SQLModel user writes: plain table
  models (no validation on assignment, no read-only fields), ``session.get``,
  attribute assignment, ``session.add``, ``select(...)`` pages; the next event
  ``seq`` read from the session's counter row and written back.
* ``advanced-alchemy``: ``SQLAlchemySyncRepository`` over the same plain models
  (``pip install -e '.[bench]'``); skipped when the package is not installed.
  Paths without a natural equivalent there (``claim_next``) are not faked.

Neither peer gives this layer's guarantees (atomic conditional transitions,
one running run per session, gap-free seqs under concurrency): they are what
the same work costs when written the usual way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Enum, MetaData, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel
from sqlmodel import Session as DbSession

from app.models import new_id
from app.types import utc_now

_JSON = JSON().with_variant(JSONB(), "postgresql")
_registry = registry(metadata=MetaData())


class NaiveBase(SQLModel, registry=_registry):
    """Own registry and metadata: the same table names as ``app.models``."""


class NaiveRun(NaiveBase, table=True):
    __tablename__ = "session_runs"

    id: str = Field(default_factory=new_id, primary_key=True)
    session_id: str
    status: str = "queued"
    trigger_source: str = "chat"
    parent_run_id: str | None = None
    input_message: str | None = None
    options: dict[str, Any] | None = Field(default=None, sa_type=_JSON)
    resume_payload: dict[str, Any] | None = Field(default=None, sa_type=_JSON)
    latest_error: dict[str, Any] | None = Field(default=None, sa_type=_JSON)
    metrics: dict[str, Any] | None = Field(default=None, sa_type=_JSON)
    checkpoint_thread: str | None = None
    checkpoint_ns: str | None = None
    waiting_reason: str | None = None
    worker_id: str | None = None
    lease_expires_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    created_at: datetime = Field(default_factory=utc_now)
    updated_at: datetime = Field(default_factory=utc_now)
    run_metadata: dict[str, Any] = Field(default_factory=dict, sa_type=_JSON)


class NaiveEvent(NaiveBase, table=True):
    __tablename__ = "session_events"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str
    seq: int
    type: str
    payload: dict[str, Any] | None = Field(default=None, sa_type=_JSON)
    source: str = Field(
        default="session", sa_type=Enum("session", "plan", "task", name="session_event_source")
    )
    created_at: datetime = Field(default_factory=utc_now)
    run_id: str | None = None
    event_id: str | None = None


class NaiveCounter(NaiveBase, table=True):
    __tablename__ = "session_event_sequences"

    session_id: str = Field(primary_key=True)
    next_seq: int = 1
    updated_at: datetime | None = Field(default_factory=utc_now)


def next_seq(db: DbSession, session_id: str) -> int:
    """The usual way: read the counter row, take its number, write it back."""
    counter = db.get(NaiveCounter, session_id)
    if counter is None:
        counter = NaiveCounter(session_id=session_id, next_seq=1)
        db.add(counter)
    seq = counter.next_seq
    counter.next_seq = seq + 1
    counter.updated_at = utc_now()
    return seq


def add_event(
    db: DbSession, session_id: str, type_: str, payload: dict[str, Any], run_id: str
) -> NaiveEvent:
    event = NaiveEvent(
        session_id=session_id,
        seq=next_seq(db, session_id),
        type=type_,
        payload=payload,
        run_id=run_id,
    )
    db.add(event)
    return event


def move(db: DbSession, run_id: str, allowed: tuple[str, ...], **values: Any) -> NaiveRun:
    """Load the run, check its status, set the new values (the usual read-check-write)."""
    run = db.get(NaiveRun, run_id)
    if run is None or run.status not in allowed:
        raise RuntimeError(f"run {run_id} cannot move to {values.get('status')}")
    now = utc_now()
    for name, value in values.items():
        setattr(run, name, value)
    run.updated_at = now
    return run


def events_of_run(db: DbSession, run_id: str, limit: int) -> list[NaiveEvent]:
    statement = (
        select(NaiveEvent)
        .join(NaiveRun, NaiveRun.id == NaiveEvent.run_id)
        .where(NaiveEvent.run_id == run_id, NaiveEvent.session_id == NaiveRun.session_id)
        .order_by(NaiveEvent.seq)
        .limit(limit)
    )
    return list(db.scalars(statement))


def runs_of_session(db: DbSession, session_id: str, limit: int) -> list[NaiveRun]:
    statement = (
        select(NaiveRun)
        .where(NaiveRun.session_id == session_id)
        .order_by(NaiveRun.created_at.desc(), NaiveRun.id.desc())
        .limit(limit)
    )
    return list(db.scalars(statement))


# --------------------------------------------------------------------------
# advanced-alchemy (optional: the ``bench`` extra)

try:
    from advanced_alchemy.filters import LimitOffset, OrderBy
    from advanced_alchemy.repository import SQLAlchemySyncRepository
except ImportError:  # pragma: no cover - the bench extra is not installed
    SQLAlchemySyncRepository = None  # type: ignore[assignment,misc]


def advanced_alchemy_available() -> bool:
    return SQLAlchemySyncRepository is not None


if SQLAlchemySyncRepository is not None:

    class AARunRepository(SQLAlchemySyncRepository[NaiveRun]):  # type: ignore[misc]
        model_type = NaiveRun

    class AAEventRepository(SQLAlchemySyncRepository[NaiveEvent]):  # type: ignore[misc]
        model_type = NaiveEvent

    class AACounterRepository(SQLAlchemySyncRepository[NaiveCounter]):  # type: ignore[misc]
        model_type = NaiveCounter
        id_attribute = "session_id"

    def aa_add_event(
        db: DbSession, session_id: str, type_: str, payload: dict[str, Any], run_id: str
    ) -> NaiveEvent:
        """The counter through its repository (get_one_or_none, update), then ``add``."""
        counters = AACounterRepository(session=db)
        counter = counters.get_one_or_none(session_id=session_id)
        if counter is None:
            counter = counters.add(NaiveCounter(session_id=session_id, next_seq=1))
        seq = counter.next_seq
        counter.next_seq = seq + 1
        counter.updated_at = utc_now()
        counters.update(counter)
        event = NaiveEvent(
            session_id=session_id, seq=seq, type=type_, payload=payload, run_id=run_id
        )
        return AAEventRepository(session=db).add(event)

    def aa_move(db: DbSession, run_id: str, allowed: tuple[str, ...], **values: Any) -> NaiveRun:
        runs = AARunRepository(session=db)
        run = runs.get(run_id)
        if run.status not in allowed:
            raise RuntimeError(f"run {run_id} cannot move to {values.get('status')}")
        for name, value in values.items():
            setattr(run, name, value)
        run.updated_at = utc_now()
        return runs.update(run)

    def aa_events_of_run(db: DbSession, run_id: str, limit: int) -> list[NaiveEvent]:
        return AAEventRepository(session=db).list(
            NaiveEvent.run_id == run_id,
            OrderBy(field_name="seq", sort_order="asc"),
            LimitOffset(limit=limit, offset=0),
        )

    def aa_runs_of_session(db: DbSession, session_id: str, limit: int) -> list[NaiveRun]:
        return AARunRepository(session=db).list(
            NaiveRun.session_id == session_id,
            OrderBy(field_name="created_at", sort_order="desc"),
            LimitOffset(limit=limit, offset=0),
        )
