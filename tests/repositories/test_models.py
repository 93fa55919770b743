"""Models on both backends: CRUD, defaults, cascades, constraints, time and JSON."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session as DbSession

from app.models import (
    ChatSession,
    EventSource,
    RunStatus,
    SessionEvent,
    SessionRun,
    TriggerSource,
)
from tests.factories import SessionEventFactory, SessionFactory, SessionRunFactory


def test_session_run_crud(db: DbSession) -> None:
    chat = SessionFactory()
    run = SessionRun(session_id=chat.id, trigger_source=TriggerSource.CHAT, input_message="hi")
    db.add(run)
    db.commit()

    loaded = db.get(SessionRun, run.id)
    assert loaded is not None
    assert loaded.input_message == "hi"
    assert loaded.session.id == chat.id
    assert [r.id for r in chat.runs] == [run.id]

    loaded.checkpoint_ns = "ns-1"
    db.commit()
    db.expire_all()
    assert db.get(SessionRun, run.id).checkpoint_ns == "ns-1"

    db.delete(loaded)
    db.commit()
    assert db.get(SessionRun, run.id) is None


def test_session_run_defaults(db: DbSession) -> None:
    chat = SessionFactory()
    before = datetime.now(UTC)
    run = SessionRun(session_id=chat.id, trigger_source=TriggerSource.SYSTEM)
    db.add(run)
    db.commit()
    db.expire_all()

    loaded = db.get(SessionRun, run.id)
    assert loaded.status is RunStatus.QUEUED
    assert len(loaded.id) == 32 and int(loaded.id, 16) >= 0
    assert before <= loaded.created_at <= datetime.now(UTC)
    assert loaded.updated_at >= loaded.created_at
    assert loaded.started_at is None and loaded.finished_at is None
    assert loaded.metrics is None and loaded.latest_error is None


def test_status_server_default_applies_to_raw_inserts(db: DbSession) -> None:
    chat = SessionFactory()
    db.commit()
    db.execute(
        text(
            "INSERT INTO session_runs (id, session_id, trigger_source, created_at, updated_at) "
            "VALUES ('r1', :sid, 'chat', :now, :now)"
        ),
        {"sid": chat.id, "now": datetime(2026, 1, 1)},
    )
    assert db.scalar(text("SELECT status FROM session_runs WHERE id = 'r1'")) == "queued"


def test_updated_at_moves_on_every_change(db: DbSession) -> None:
    run = SessionRunFactory()
    db.commit()
    first = run.updated_at
    run.checkpoint_ns = "changed"
    db.commit()
    db.refresh(run)
    assert run.updated_at > first


def test_ids_are_unique_uuid_hex(db: DbSession) -> None:
    ids = {SessionRunFactory().id for _ in range(20)}
    assert len(ids) == 20


def test_deleting_a_session_cascades_to_runs_and_events(db: DbSession) -> None:
    chat = SessionFactory()
    other = SessionFactory()
    run = SessionRunFactory(session=chat)
    SessionEventFactory(session=chat, run_id=run.id)
    SessionEventFactory(session=chat)
    kept = SessionRunFactory(session=other)
    db.commit()

    db.execute(text("DELETE FROM sessions WHERE id = :id"), {"id": chat.id})
    db.commit()

    assert db.scalar(select(func.count()).select_from(SessionRun)) == 1
    assert db.scalar(select(func.count()).select_from(SessionEvent)) == 0
    assert db.get(SessionRun, kept.id) is not None


def test_orm_delete_of_session_relies_on_database_cascade(db: DbSession) -> None:
    chat = SessionFactory()
    SessionRunFactory(session=chat)
    db.commit()
    db.expire_all()
    db.delete(db.get(ChatSession, chat.id))
    db.commit()
    assert db.scalar(select(func.count()).select_from(SessionRun)) == 0


def test_run_requires_an_existing_session(db: DbSession) -> None:
    db.add(SessionRun(session_id="missing", trigger_source=TriggerSource.CHAT))
    with pytest.raises(IntegrityError):
        db.flush()


def test_deleting_a_parent_run_keeps_the_child(db: DbSession) -> None:
    parent = SessionRunFactory(status=RunStatus.FAILED)
    child = SessionRunFactory(
        session=parent.session, parent_run_id=parent.id, trigger_source=TriggerSource.RETRY
    )
    db.commit()
    db.execute(text("DELETE FROM session_runs WHERE id = :id"), {"id": parent.id})
    db.commit()
    db.expire_all()
    assert db.get(SessionRun, child.id).parent_run_id is None


@pytest.mark.parametrize(
    ("column", "value"),
    [("status", "paused"), ("status", "QUEUED"), ("trigger_source", "webhook")],
)
def test_check_constraints_reject_raw_sql(db: DbSession, column: str, value: str) -> None:
    run = SessionRunFactory()
    db.commit()
    with pytest.raises(IntegrityError):
        db.execute(
            # the column name is one of the parametrize constants above
            text(f"UPDATE session_runs SET {column} = :value WHERE id = :id"),  # noqa: S608
            {"value": value, "id": run.id},
        )
    db.rollback()
    db.expire_all()
    assert db.get(SessionRun, run.id).status is RunStatus.QUEUED


def test_enums_are_stored_by_value(db: DbSession) -> None:
    run = SessionRunFactory(status=RunStatus.WAITING_INPUT, trigger_source=TriggerSource.RETRY)
    SessionEventFactory(session=run.session, source=EventSource.PLAN)
    db.commit()
    row = db.execute(
        text("SELECT status, trigger_source FROM session_runs WHERE id = :id"), {"id": run.id}
    ).one()
    assert tuple(row) == ("waiting_input", "retry")
    assert db.scalar(text("SELECT CAST(source AS VARCHAR) FROM session_events")) == "plan"


def test_an_unknown_enum_value_is_refused_at_assignment(db: DbSession) -> None:
    chat = SessionFactory()
    with pytest.raises(ValueError, match=r"SessionRun\.status: expected one of queued, .*'paused'"):
        SessionRun(session_id=chat.id, status="paused")
    run = SessionRun(session_id=chat.id)
    with pytest.raises(ValueError, match=r"SessionRun\.trigger_source: .*'webhook'"):
        run.trigger_source = "webhook"
    with pytest.raises(ValueError, match=r"SessionRun\.started_at: expected a datetime"):
        run.started_at = "2026-01-01"
    run.status = "running"  # a value of the enum is taken, as the member
    assert run.status is RunStatus.RUNNING


def test_timestamps_are_aware_utc_after_a_round_trip(db: DbSession) -> None:
    plus_two = timezone(timedelta(hours=2))
    started = datetime(2026, 3, 1, 14, 30, 15, 123456, tzinfo=plus_two)
    run = SessionRunFactory(started_at=started)
    db.commit()
    db.expire_all()

    loaded = db.get(SessionRun, run.id)
    for value in (loaded.started_at, loaded.created_at, loaded.updated_at):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert loaded.started_at == started
    assert loaded.started_at.hour == 12


def test_a_naive_datetime_is_taken_as_utc(db: DbSession) -> None:
    run = SessionRunFactory(started_at=datetime(2026, 3, 1, 12, 0))
    db.commit()
    db.expire_all()
    assert db.get(SessionRun, run.id).started_at == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_naive_legacy_timestamps_read_as_utc(db: DbSession) -> None:
    db.execute(
        text("INSERT INTO sessions (id, title, created_at) VALUES ('legacy', 't', :at)"),
        {"at": datetime(2025, 6, 1, 8, 0)},
    )
    db.commit()
    assert db.get(ChatSession, "legacy").created_at == datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


def test_json_columns_round_trip_and_track_top_level_changes(db: DbSession) -> None:
    nested = {"tokens": {"in": 10, "out": 20}, "cost": 0.25, "tags": ["a", "ü"], "ok": True}
    run = SessionRunFactory(metrics=nested, latest_error=None)
    db.commit()
    db.expire_all()

    loaded = db.get(SessionRun, run.id)
    assert loaded.metrics == nested
    loaded.options = {"pages": 3}
    db.commit()
    loaded.options["duration_ms"] = 1500
    db.commit()
    db.expire_all()
    assert db.get(SessionRun, run.id).options == {"pages": 3, "duration_ms": 1500}
    assert db.scalar(text("SELECT COUNT(*) FROM session_runs WHERE latest_error IS NULL")) == 1


def test_event_run_and_event_ids_are_nullable(db: DbSession) -> None:
    event = SessionEventFactory(run_id=None, event_id=None)
    db.commit()
    db.expire_all()
    loaded = db.get(SessionEvent, event.id)
    assert loaded.run_id is None and loaded.event_id is None
    assert loaded.source is EventSource.SESSION


def test_models_declare_the_phase_document_indexes(engine: Engine) -> None:
    inspector = inspect(engine)
    run_indexes = {ix["name"]: ix["column_names"] for ix in inspector.get_indexes("session_runs")}
    event_indexes = {
        ix["name"]: ix["column_names"] for ix in inspector.get_indexes("session_events")
    }
    assert run_indexes["idx_session_runs_session_created"] == ["session_id", "created_at"]
    assert run_indexes["idx_session_runs_status"] == ["status"]
    assert run_indexes["idx_session_runs_parent"] == ["parent_run_id"]
    assert event_indexes["idx_session_event_run_seq"] == ["session_id", "run_id", "seq"]
    assert event_indexes["idx_session_event_seq"] == ["session_id", "seq"]


def test_session_runs_has_every_phase_document_column(engine: Engine) -> None:
    columns = {c["name"]: c for c in inspect(engine).get_columns("session_runs")}
    required = {"id", "session_id", "trigger_source", "status", "created_at", "updated_at"}
    required.add("attempt")  # migration 0014
    required.add("run_metadata")  # migration 0016: the caller's metadata, {} by default
    optional = {
        "parent_run_id",
        "input_message",
        "resume_payload",
        "checkpoint_thread",
        "checkpoint_ns",
        "latest_error",
        "metrics",
        "started_at",
        "finished_at",
        "waiting_reason",
        "options",
        "worker_id",
        "lease_expires_at",
    }
    assert set(columns) == required | optional
    assert {name for name, c in columns.items() if not c["nullable"]} == required
    assert columns["status"]["type"].length == 20
    assert columns["trigger_source"]["type"].length == 20


DEEP: dict[str, object] = {}
_level = DEEP
for _ in range(70):
    _level["a"] = _level = {}


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("options", {"x": float("nan")}, "not a JSON number"),
        ("options", {"x": 1e20}, "float of magnitude 1e16"),
        ("options", {"x": 10**30}, "outside the signed 64-bit range"),
        ("options", {"a": {"a": {"a": {"a": {}}}}} | {"deep": DEEP}, "deeper than 64 levels"),
        ("options", {"x": "a\x00b"}, "NUL"),
        ("options", ["not", "an", "object"], "must be a JSON object"),
        ("input_message", "a\x00b", "NUL"),
        ("input_message", "\ud800", "lone surrogate"),
        ("input_message", b"bytes", "expected a string"),
        ("checkpoint_ns", 7, "expected a string"),
    ],
)
def test_assignment_applies_the_storage_rules_on_both_backends(
    session: DbSession, field: str, value: object, problem: str
) -> None:
    """Values set by assignment meet the rules the repositories apply: refused at
    once, naming the field, before either backend could store them differently."""
    run = SessionRunFactory(options={"kept": 1}, input_message="kept", checkpoint_ns="kept")
    session.commit()
    before = getattr(run, field)
    with pytest.raises(ValueError, match=f"SessionRun\\.{field}.*{re.escape(problem)}"):
        setattr(run, field, value)
    assert getattr(run, field) == before
    session.commit()
    session.expire_all()
    assert getattr(session.get(SessionRun, run.id), field) == before
