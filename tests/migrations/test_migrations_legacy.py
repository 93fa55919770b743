"""Legacy data that used to block or escape the upgrade: JSON jsonb refuses, 64-bit ids,
runs 0006 superseded, indexes skipped for duplicates."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, inspect, text
from sqlmodel import Session as DbSession

from app.repositories import EventRepository
from migrations import MIGRATIONS, status, upgrade
from tests.migrations.test_migrations import V07_EVENTS, _storable, make_v07_database

# --------------------------------------------------------------------------
# JSON that jsonb refuses (PostgreSQL)

LEGACY_PAYLOADS = {
    # refused by jsonb
    "nul": '{"text": "a\\u0000b"}',
    "lone_surrogate": '{"text": "x\\ud800y", "n": 1}',
    "huge_number": '{"n": 1e1000000}',
    # stored as they are (the last one looks like a NUL escape, but is an escaped backslash)
    "surrogate_pair": '{"emoji": "\\ud83d\\ude00"}',
    "escaped_backslash": '{"path": "C:\\\\u0000"}',
    "plain": '{"k": [1, 2.5, null]}',
}
REFUSED = {"nul", "lone_surrogate", "huge_number"}


def _insert_raw_payloads(engine: Engine) -> dict[str, int]:
    ids = {}
    with engine.begin() as conn:
        for seq, (name, payload) in enumerate(LEGACY_PAYLOADS.items(), start=10):
            ids[name] = conn.execute(
                text(
                    "INSERT INTO session_events (session_id, seq, type, payload, source) "
                    "VALUES ('s1', :seq, :type, :payload, 'session') RETURNING id"
                ),
                {"seq": seq, "type": name, "payload": payload},
            ).scalar_one()
    return ids


@pytest.mark.parametrize("backend", ["postgresql"])
def test_json_that_jsonb_refuses_is_kept_as_text_and_reported(empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    ids = _insert_raw_payloads(empty_engine)

    applied = upgrade(empty_engine)

    (note,) = next(m.notes for m in applied if m.version == 9)
    assert note.startswith("3 legacy JSON values could not be stored as jsonb")
    for name, event_id in ids.items():
        assert (f"session_events.payload id {event_id}" in note) == (name in REFUSED), name
    assert "unsupported Unicode escape sequence" in note
    recorded = {state.version: state.recorded for state in status(empty_engine)}
    assert recorded[9] is not None and recorded[9].notes == (note,)
    with empty_engine.connect() as conn:
        stored = dict(
            conn.execute(text("SELECT type, payload FROM session_events WHERE seq >= 10")).all()
        )
        column_type = conn.execute(
            text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'session_events' "
                "AND column_name = 'payload'"
            )
        ).scalar_one()
    assert column_type == "jsonb"
    for name, original in LEGACY_PAYLOADS.items():
        if name in REFUSED:
            assert stored[name] == {"_legacy_json": original}  # the exact text, no loss
        else:
            assert stored[name] == json.loads(original)
    assert stored["surrogate_pair"] == {"emoji": "\U0001f600"}


def test_legacy_json_without_trouble_gets_no_note(empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    applied = upgrade(empty_engine)
    assert all(migration.notes == () for migration in applied)
    assert [m.version for m in applied] == [m.version for m in MIGRATIONS]


# --------------------------------------------------------------------------
# 64-bit event ids

INT4_MAX = 2**31 - 1


def _event_id_past_int4(engine: Engine) -> int:
    """Move the id source to int4's maximum, then append through the repository."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(
                text("SELECT setval(CAST(:seq AS regclass), :value)"),
                {"seq": "session_events_id_seq", "value": INT4_MAX},
            )
        else:  # the rowid continues after the highest id
            conn.execute(
                text(
                    "INSERT INTO session_events (id, session_id, seq, type, source) "
                    "VALUES (:id, 's1', 99, 'filler', 'session')"
                ),
                {"id": INT4_MAX},
            )
    with DbSession(engine) as db:
        event = EventRepository(db).append("s1", "after_int4")
        db.commit()
        assert event.id is not None
        return event.id


def test_event_ids_go_past_int4_on_an_adopted_database(empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    upgrade(empty_engine)

    assert _event_id_past_int4(empty_engine) == INT4_MAX + 1
    with empty_engine.connect() as conn:
        stored = conn.execute(
            text("SELECT id FROM session_events WHERE type = 'after_int4'")
        ).scalar_one()
    assert stored == INT4_MAX + 1


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_id_column_and_sequence_are_bigint(empty_engine: Engine) -> None:
    make_v07_database(empty_engine)
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        column = conn.execute(
            text(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = "
                "current_schema() AND table_name = 'session_events' AND column_name = 'id'"
            )
        ).scalar_one()
        sequence = conn.execute(
            text(
                "SELECT CAST(data_type AS TEXT), max_value FROM pg_sequences "
                "WHERE schemaname = current_schema() AND sequencename = 'session_events_id_seq'"
            )
        ).one()
    assert column == "bigint"
    assert tuple(sequence) == ("bigint", 2**63 - 1)


# --------------------------------------------------------------------------
# run_failed events for the runs 0006 supersedes


def _running_runs_in_one_session(engine: Engine) -> None:
    """s1: three legacy events with a counter a v0.7 writer left behind, three running runs."""
    runs = [  # (id, session, created_at)
        ("a-old", "s1", datetime(2024, 1, 1, 9, 0, tzinfo=UTC)),
        ("b-new", "s1", datetime(2024, 1, 1, 10, 0, tzinfo=UTC)),
        ("a-tie", "s1", datetime(2024, 1, 1, 10, 0, tzinfo=UTC)),
        ("c-only", "s2", datetime(2024, 1, 1, 8, 0, tzinfo=UTC)),
    ]
    with engine.begin() as conn:
        for session_id in ("s1", "s2"):
            conn.execute(
                text("INSERT INTO sessions (id, title) VALUES (:id, :id)"), {"id": session_id}
            )
        for seq in (1, 2, 3):
            conn.execute(
                text(
                    "INSERT INTO session_events (session_id, seq, type, source) "
                    "VALUES ('s1', :seq, 'legacy', 'session')"
                ),
                {"seq": seq},
            )
        conn.execute(
            text("INSERT INTO session_event_sequences (session_id, next_seq) VALUES ('s1', 2)")
        )
        for run_id, session_id, created in runs:
            conn.execute(
                text(
                    "INSERT INTO session_runs (id, session_id, trigger_source, status, "
                    "created_at, updated_at) VALUES (:id, :session_id, 'chat', 'running', "
                    ":created_at, :created_at)"
                ),
                _storable(conn, {"id": run_id, "session_id": session_id, "created_at": created}),
            )


def test_runs_failed_by_0006_get_a_run_failed_event_with_the_next_seq(empty_engine: Engine) -> None:
    upgrade(empty_engine, migrations=MIGRATIONS[:5])
    _running_runs_in_one_session(empty_engine)

    applied = upgrade(empty_engine)

    (note,) = next(m.notes for m in applied if m.version == 11)
    assert note.startswith("2 runs failed by 0006 had no run_failed event")
    with DbSession(empty_engine) as db:
        events = EventRepository(db).list_for_session("s1")
        failed = [(e.seq, e.type, e.run_id, e.source.value) for e in events if e.seq > 3]
        assert failed == [
            (4, "run_failed", "a-old", "session"),
            (5, "run_failed", "a-tie", "session"),
        ]
        payload = events[3].payload
        assert payload is not None and payload["error"]["code"] == "superseded_running_run"
        assert payload["migration"] == "0006_one_running_run_per_session"
        assert events[3].event_id == "run_failed:a-old"
        assert EventRepository(db).list_for_session("s2") == []
        # The counter moved past them: the next append continues the log.
        assert EventRepository(db).append("s1", "after_upgrade").seq == 6
        db.commit()
    # Once only: the migration run again (as a function) appends nothing.
    with empty_engine.begin() as conn:
        assert MIGRATIONS[10].apply(conn) == []
    with empty_engine.connect() as conn:
        count = conn.execute(
            text("SELECT COUNT(*) FROM session_events WHERE type = 'run_failed'")
        ).scalar_one()
    assert count == 2


# --------------------------------------------------------------------------
# An index skipped for legacy duplicates is retried


def test_a_skipped_unique_index_stays_pending_until_the_data_allows_it(
    empty_engine: Engine,
) -> None:
    duplicated = [*V07_EVENTS, {**V07_EVENTS[1], "type": "racing_writer"}]
    make_v07_database(empty_engine, events=duplicated)
    upgrade(empty_engine)

    for _ in range(2):  # every upgrade retries it while the duplicates remain
        states = {state.version: state for state in status(empty_engine)}
        assert states[8].state == "pending" and states[8].recorded is not None
        assert "uq_session_events_session_seq was NOT created" in states[8].recorded.notes[0]
        assert [v for v, s in states.items() if s.state != "applied"] == [8]
        (retried,) = upgrade(empty_engine)
        assert retried.version == 8 and "NOT created" in retried.notes[0]

    with empty_engine.begin() as conn:  # the operator resolves the duplicate
        conn.execute(text("UPDATE session_events SET seq = 3 WHERE type = 'racing_writer'"))
    (done,) = upgrade(empty_engine)

    assert done.version == 8 and done.notes == ()
    indexes = {index["name"] for index in inspect(empty_engine).get_indexes("session_events")}
    assert "uq_session_events_session_seq" in indexes
    states = {state.version: state for state in status(empty_engine)}
    assert all(state.state == "applied" for state in states.values())
    assert states[8].recorded is not None and states[8].recorded.notes == ()
    assert upgrade(empty_engine) == []
