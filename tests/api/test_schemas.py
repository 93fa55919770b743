"""API schemas: validation, enum values and JSON round-trips (no database needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from app.models import SessionRun
from app.schemas import RunCreate, RunResponse, RunResumeRequest, RunStatus, TriggerSource


def test_run_status_has_the_six_states_of_the_spec() -> None:
    assert [s.value for s in RunStatus] == [
        "queued",
        "running",
        "waiting_input",
        "completed",
        "failed",
        "cancelled",
    ]
    assert RunStatus("waiting_input") is RunStatus.WAITING_INPUT
    with pytest.raises(ValueError):
        RunStatus("resumed")


def test_trigger_source_values() -> None:
    assert {s.value for s in TriggerSource} == {"chat", "resume", "retry", "system"}
    with pytest.raises(ValueError):
        TriggerSource("cron")


def test_run_create_defaults_and_round_trip() -> None:
    body = RunCreate.model_validate({"session_id": "s1", "message": "make slides"})
    assert body.generate_now is False
    assert body.style_reference is None
    assert body.target_pages == []
    again = RunCreate.model_validate_json(body.model_dump_json())
    assert again == body


def test_run_create_accepts_the_spec_body() -> None:
    body = RunCreate.model_validate(
        {
            "session_id": "s1",
            "message": "hello",
            "generate_now": True,
            "style_reference": {"palette": ["#000"], "font": "Inter"},
            "target_pages": ["p1", "p2"],
        }
    )
    assert body.generate_now is True
    assert body.style_reference == {"palette": ["#000"], "font": "Inter"}
    assert body.target_pages == ["p1", "p2"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"message": "m"}, "session_id"),
        ({"session_id": "", "message": "m"}, "session_id"),
        ({"session_id": "s", "message": ""}, "message"),
        ({"session_id": "s", "message": "m", "surprise": 1}, "surprise"),
        ({"session_id": "s", "message": "m", "style_reference": [1]}, "style_reference"),
        ({"session_id": "s", "message": "m", "target_pages": "p1"}, "target_pages"),
        ({"session_id": "s\x00", "message": "m"}, "session_id"),
        (
            {"session_id": "s", "message": "m", "style_reference": {"x": float("inf")}},
            "style_reference",
        ),
        ({"session_id": 5, "message": "m"}, "session_id"),
    ],
)
def test_run_create_rejects_bad_input_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RunCreate.model_validate(body)
    assert field in {str(part) for error in caught.value.errors() for part in error["loc"]}


def test_resume_request_requires_an_object() -> None:
    assert RunResumeRequest.model_validate({"resume": {"user_feedback": "ok"}}).resume == {
        "user_feedback": "ok"
    }
    bad_bodies = [
        {"resume": "text"},
        {"resume": [1, 2]},
        {"resume": None},
        {},
        {"resume": {}, "x": 1},
    ]
    for bad in bad_bodies:
        with pytest.raises(ValidationError):
            RunResumeRequest.model_validate(bad)


def test_resume_request_rejects_nul_in_nested_keys() -> None:
    with pytest.raises(ValidationError, match="NUL"):
        RunResumeRequest.model_validate({"resume": {"a": [{"b\x00": 1}]}})


def test_run_response_from_a_session_run() -> None:
    started = datetime(2026, 5, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))
    run = SessionRun(
        id="abc",
        session_id="s1",
        status=RunStatus.WAITING_INPUT,
        started_at=started,
        waiting_reason="confirm outline",
        checkpoint_thread="s1:abc",
        metrics={"tokens": 5},
    )
    response = RunResponse.model_validate(run)
    assert response.run_id == "abc"
    assert response.status is RunStatus.WAITING_INPUT
    assert response.waiting_reason == "confirm outline"

    payload = json.loads(response.model_dump_json())
    assert payload["run_id"] == "abc"
    assert "id" not in payload
    assert payload["status"] == "waiting_input"
    assert payload["metrics"] == {"tokens": 5}
    assert payload["trigger_source"] == "chat"
    assert payload["created_at"] == run.created_at.isoformat().replace("+00:00", "Z")
    assert set(payload) == {
        "run_id",
        "session_id",
        "status",
        "started_at",
        "finished_at",
        "latest_error",
        "metrics",
        "checkpoint_thread",
        "checkpoint_ns",
        "waiting_reason",
        "attempt",
        "parent_run_id",
        "trigger_source",
        "input_message",
        "options",
        "created_at",
        "updated_at",
        "metadata",
    }
    assert payload["metadata"] == {}
    parsed = datetime.fromisoformat(payload["started_at"])
    assert parsed.utcoffset() is not None
    assert parsed == started


def test_run_response_round_trips_through_json() -> None:
    response = RunResponse.model_validate(
        {
            "run_id": "r",
            "session_id": "s",
            "status": "failed",
            "finished_at": datetime(2026, 1, 2, tzinfo=UTC),
            "latest_error": {"code": "boom"},
            "created_at": datetime(2026, 1, 1, tzinfo=UTC),
            "updated_at": datetime(2026, 1, 2, tzinfo=UTC),
            "options": {"target_pages": ["a"]},
            "trigger_source": "retry",
        }
    )
    assert RunResponse.model_validate_json(response.model_dump_json()) == response


def test_a_run_response_without_its_timestamps_is_refused() -> None:
    """Every stored run has both: a client may rely on them (required in the OpenAPI)."""
    with pytest.raises(ValidationError, match="created_at"):
        RunResponse.model_validate(
            {"run_id": "r", "session_id": "s", "updated_at": "2026-01-01T00:00:00Z"}
        )
    required = RunResponse.model_json_schema(mode="serialization")["required"]
    assert {"run_id", "session_id", "created_at", "updated_at"} <= set(required)


def test_run_response_rejects_an_unknown_status() -> None:
    with pytest.raises(ValidationError):
        RunResponse.model_validate({"run_id": "r", "session_id": "s", "status": "paused"})
