"""Legacy data that used to block or escape the upgrade: JSON jsonb refuses, 64-bit ids,
runs 0006 superseded, indexes skipped for duplicates."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine, text

from migrations import MIGRATIONS, status, upgrade
from tests.test_migrations import make_v07_database

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
