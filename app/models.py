"""Tables and shared field sets of the Run data layer.

One set of SQLModel declarations serves the tables and the API schemas
(``app.schemas``): ``RunOptions`` and ``RunState`` are plain field sets that
both a table model and a schema inherit. Every constraint and index the
migrations build is declared here too; ``tests/migrations/test_schema_drift.py`` proves
the two agree.

Conventions (see ``app.types``): timestamps are aware UTC; ``RunStatus`` and
``TriggerSource`` are stored by value in ``VARCHAR(20)`` behind CHECK
constraints; JSON columns are JSONB on PostgreSQL.

``session_events.source`` keeps the v0.7 definition: ``VARCHAR(7)`` on SQLite
and the native PostgreSQL enum ``session_event_source``, so that databases
created by older versions and new ones are the same.
"""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, Column, Enum, Index, Integer, Text, text
from sqlmodel import Field, Relationship, SQLModel

from app._model_rules import StoredModel, install
from app.types import MutableJSONDict, StrEnumType, UTCDateTime, check_in, enum_values, utc_now


class RunStatus(StrEnum):
    """Stored status of a run; the transitions live in ``app.state_machine``."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING_INPUT = "waiting_input"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TriggerSource(StrEnum):
    CHAT = "chat"
    RESUME = "resume"
    RETRY = "retry"
    SYSTEM = "system"


class MultitaskStrategy(StrEnum):
    """What ``RunRepository.create`` does when the session already has an active run
    (LangGraph's *double texting*): queue the new run behind it, refuse it, or cancel
    the active runs first."""

    ENQUEUE = "enqueue"
    REJECT = "reject"
    INTERRUPT = "interrupt"


class EventSource(StrEnum):
    SESSION = "session"
    PLAN = "plan"
    TASK = "task"


def new_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------
# sessions


class ChatSession(StoredModel, table=True):
    """A chat session (v0.7 table; this layer uses only these columns).

    Databases adopted from v0.7 carry more nullable metadata columns; they are
    left as they are. "Session" in this project means the database session only.
    """

    __tablename__ = "sessions"

    id: str = Field(default_factory=new_id, primary_key=True)
    title: str
    created_at: datetime | None = Field(default_factory=utc_now, sa_type=UTCDateTime)
    updated_at: datetime | None = Field(
        default_factory=utc_now, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utc_now}
    )
    current_version: int | None = None

    runs: list["SessionRun"] = Relationship(
        back_populates="session", cascade_delete=True, passive_deletes=True
    )
    events: list["SessionEvent"] = Relationship(
        back_populates="session", cascade_delete=True, passive_deletes=True
    )


# --------------------------------------------------------------------------
# session_runs


class RunOptions(SQLModel):
    """Options given when a run is created; a worker that starts the run later needs them.

    Stored together in the ``session_runs.options`` JSON column (an extension
    of the phase document's table).
    """

    generate_now: bool = False
    style_reference: dict[str, Any] | None = None
    target_pages: list[str] = Field(default_factory=list)


class RunState(SQLModel):
    """The stored fields of a run that the Run API returns as they are."""

    session_id: str = Field(foreign_key="sessions.id", ondelete="CASCADE")
    status: RunStatus = Field(
        default=RunStatus.QUEUED,
        sa_type=StrEnumType(RunStatus),
        sa_column_kwargs={"server_default": RunStatus.QUEUED.value},
    )
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    latest_error: dict[str, Any] | None = Field(default=None, sa_type=MutableJSONDict)
    metrics: dict[str, Any] | None = Field(default=None, sa_type=MutableJSONDict)
    checkpoint_thread: str | None = None
    checkpoint_ns: str | None = None
    waiting_reason: str | None = Field(default=None, sa_type=Text)


class SessionRun(RunState, StoredModel, table=True):
    """One execution of the agent inside a session (table ``session_runs``).

    Build rows through ``RunRepository.create``. Attribute writes are checked
    (``app._model_rules``): values are validated, and once stored a run's
    status and everything its transitions write change only through
    ``RunRepository``.
    """

    __tablename__ = "session_runs"
    __table_args__ = (
        CheckConstraint(check_in("status", RunStatus), name="ck_session_runs_status"),
        CheckConstraint(
            check_in("trigger_source", TriggerSource), name="ck_session_runs_trigger_source"
        ),
        Index("idx_session_runs_session_created", "session_id", "created_at"),
        Index("idx_session_runs_status", "status"),
        Index("idx_session_runs_parent", "parent_run_id"),
        # At most one running run per session (extension).
        Index(
            "uq_session_runs_one_running",
            "session_id",
            unique=True,
            sqlite_where=text("status = 'running'"),
            postgresql_where=text("status = 'running'"),
        ),
        # The run queue (extensions, migration 0012): runs of a status oldest first
        # (queued ones for claim_next), and per session its runs by status.
        Index("idx_session_runs_queue", "status", "created_at", "id"),
        Index(
            "idx_session_runs_session_status",
            "session_id",
            "status",
            "created_at",
            "id",
            postgresql_where=text("status IN ('queued', 'running', 'waiting_input')"),
        ),
        # Retention's oldest-finished-first batches (migration 0015, built online).
        Index(
            "idx_session_runs_finished",
            "finished_at",
            "id",
            sqlite_where=text("finished_at IS NOT NULL"),
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        # Listings across sessions, newest first by (created_at, id) (migration 0016,
        # built online): keyset pages read only their rows.
        Index("idx_session_runs_created", "created_at", "id"),
        # Metadata filters (jsonb @>) on PostgreSQL (migration 0017, built online).
        Index(
            "idx_session_runs_metadata",
            "run_metadata",
            postgresql_using="gin",
            postgresql_ops={"run_metadata": "jsonb_path_ops"},
        ).ddl_if(dialect="postgresql"),
    )

    id: str = Field(default_factory=new_id, primary_key=True)
    parent_run_id: str | None = Field(
        default=None, foreign_key="session_runs.id", ondelete="SET NULL"
    )
    trigger_source: TriggerSource = Field(
        default=TriggerSource.CHAT, sa_type=StrEnumType(TriggerSource)
    )
    input_message: str | None = Field(default=None, sa_type=Text)
    resume_payload: dict[str, Any] | None = Field(default=None, sa_type=MutableJSONDict)
    options: dict[str, Any] | None = Field(default=None, sa_type=MutableJSONDict)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    updated_at: datetime = Field(
        default_factory=utc_now, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utc_now}
    )
    # The worker executing the run and until when its lease holds (claim_next,
    # heartbeat); NULL for runs started without a lease (start, resume).
    worker_id: str | None = None
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Claims of the current execution (migration 0014): claim_next adds one, a lease
    # given back returns it, resume starts again at 0; fail_stale(max_attempts=...)
    # requeues a run whose lease expired while attempt < max_attempts.
    # No Python-side column default: a Core INSERT that names no attempt gets the
    # server's 0 (the driver path sends no computed defaults).
    attempt: int = Field(
        default=0, sa_column=Column("attempt", Integer, nullable=False, server_default=text("0"))
    )
    # The caller's metadata, a JSON object given on create (migration 0016). Named
    # ``run_metadata`` (``metadata`` is SQLModel's table registry); the API's JSON key
    # is ``metadata``.
    run_metadata: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=Column(
            "run_metadata", MutableJSONDict, nullable=False, server_default=text("'{}'")
        ),
    )

    session: ChatSession = Relationship(back_populates="runs")


# --------------------------------------------------------------------------
# session_events


class SessionEvent(StoredModel, table=True):
    """An entry of a session's event log (v0.7 table plus ``run_id`` and ``event_id``).

    ``seq`` is per session and increasing; write through ``EventRepository.append``,
    which allocates it. Events written before v0.8 have ``run_id = NULL``.
    """

    __tablename__ = "session_events"
    __table_args__ = (
        Index("idx_session_event_seq", "session_id", "seq"),
        Index("idx_session_event_run_seq", "session_id", "run_id", "seq"),
        # Deleting a run deletes its events by run_id (migration 0013).
        Index("idx_session_events_run", "run_id"),
        # Extensions. The first is created only where legacy rows allow it.
        Index("uq_session_events_session_seq", "session_id", "seq", unique=True),
        Index(
            "uq_session_events_session_event_id",
            "session_id",
            "event_id",
            unique=True,
            sqlite_where=text("event_id IS NOT NULL"),
            postgresql_where=text("event_id IS NOT NULL"),
        ),
    )

    # 64-bit on PostgreSQL (migration 0010); SQLite's INTEGER PRIMARY KEY is the 64-bit rowid.
    id: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer, "sqlite")
    )
    session_id: str = Field(foreign_key="sessions.id", ondelete="CASCADE")
    seq: int
    type: str = Field(max_length=100)
    payload: dict[str, Any] | None = Field(default=None, sa_type=MutableJSONDict)
    source: EventSource = Field(
        default=EventSource.SESSION,
        sa_type=Enum(
            EventSource,
            name="session_event_source",
            values_callable=enum_values,
            length=7,
            validate_strings=True,
        ),
    )
    created_at: datetime | None = Field(default_factory=utc_now, sa_type=UTCDateTime)
    run_id: str | None = Field(default=None, foreign_key="session_runs.id", ondelete="CASCADE")
    event_id: str | None = None

    session: ChatSession = Relationship(back_populates="events")


class SessionEventSequence(StoredModel, table=True):
    """The next ``seq`` to hand out per session (v0.7 table, kept true by new writers)."""

    __tablename__ = "session_event_sequences"

    session_id: str = Field(primary_key=True, foreign_key="sessions.id", ondelete="CASCADE")
    next_seq: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    updated_at: datetime | None = Field(
        default_factory=utc_now, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utc_now}
    )


# --------------------------------------------------------------------------
# run_idempotency_keys


class IdempotencyScope(StrEnum):
    """What an ``Idempotency-Key`` is scoped to: a session's creates or a run's resumes."""

    CREATE = "create"
    RESUME = "resume"


class IdempotencyKey(StoredModel, table=True):
    """One ``Idempotency-Key`` seen within its window (extension, migration 0012).

    ``scope_id`` is the session (``create``) or the run (``resume``);
    ``request_hash`` fingerprints the request, so a key reused for a different
    request is refused; ``run_id`` is the run the first request produced, NULL
    until its transaction is done. Written by ``RunRepository`` only.
    """

    __tablename__ = "run_idempotency_keys"
    __table_args__ = (
        CheckConstraint(check_in("scope", IdempotencyScope), name="ck_run_idempotency_keys_scope"),
        Index("idx_run_idempotency_keys_expires", "expires_at"),
        Index("idx_run_idempotency_keys_run", "run_id"),
    )

    scope: IdempotencyScope = Field(
        primary_key=True, sa_type=StrEnumType(IdempotencyScope, length=10)
    )
    scope_id: str = Field(primary_key=True)
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=64)
    run_id: str | None = Field(default=None, foreign_key="session_runs.id", ondelete="CASCADE")
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


# --------------------------------------------------------------------------
# Writes through attributes (app._model_rules)

RUN_FIELDS_WRITABLE_WHEN_STORED = frozenset(
    {"input_message", "options", "checkpoint_thread", "checkpoint_ns", "updated_at"}
)
"""What a caller may change on a stored run; the rest is identity, or owned by
``RunRepository``'s transitions (``update_metrics`` merges metrics)."""

install(ChatSession, read_only_when_stored=("id",), hint="a session's id never changes")
install(
    SessionRun,
    read_only_when_stored=set(SessionRun.__table__.columns.keys())
    - RUN_FIELDS_WRITABLE_WHEN_STORED,
    hint="use RunRepository (start, wait_for_input, resume, complete, fail, cancel, "
    "update_metrics)",
)
install(
    SessionEvent,
    read_only_when_stored=SessionEvent.__table__.columns.keys(),
    hint="events are immutable once written; append a new one",
)
install(SessionEventSequence, read_only_when_stored=(), hint="")
install(
    IdempotencyKey,
    read_only_when_stored=IdempotencyKey.__table__.columns.keys(),
    hint="idempotency keys are written by RunRepository",
)

__all__ = [
    "RUN_FIELDS_WRITABLE_WHEN_STORED",
    "ChatSession",
    "EventSource",
    "IdempotencyKey",
    "IdempotencyScope",
    "MultitaskStrategy",
    "RunOptions",
    "RunState",
    "RunStatus",
    "SessionEvent",
    "SessionEventSequence",
    "SessionRun",
    "TriggerSource",
    "new_id",
]
