"""A client generated from ``/openapi.json`` type-checks against real answers of every
endpoint, errors included.

``openapi-python-client`` generates a client from the schema ``create_app`` serves
(``tests.api.generated_client``); a script written against that client calls every run
endpoint and the health check, success and error answers, with assertions on the typed
values. mypy (strict) checks the script with the client once (the schema is the same on
both backends), then the script runs against ``create_app`` under uvicorn on 127.0.0.1,
on each backend. Required fields, the per-endpoint error code enums and the body and
error models are what make the script type-check: a field the schema left optional
would be ``X | Unset`` and the assignment to ``X`` would fail.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from app.models import RunStatus
from tests.api.generated_client import run, type_check
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory
from tests.servers import uvicorn_server

pytestmark = pytest.mark.slow  # uvicorn, the generator and mypy

SCRIPT = '''
"""Every run endpoint and the health check through the generated client."""

import sys

from run_api_client import Client
from run_api_client.api.health import get_health
from run_api_client.api.runs import (
    cancel_run,
    create_run,
    get_run,
    list_run_events,
    resume_run,
    stream_run_events,
)
from run_api_client.models import (
    CancelRunError,
    CancelRunErrorCode,
    CreateRunError,
    CreateRunErrorCode,
    EventPage,
    GetRunError,
    GetRunErrorCode,
    HealthResponse,
    ListRunEventsError,
    ListRunEventsErrorCode,
    MultitaskStrategy,
    ResumeRunError,
    ResumeRunErrorCode,
    RunCreate,
    RunResponse,
    RunResumeRequest,
    RunResumeRequestResume,
    RunStatus,
    StreamRunEventsError,
    StreamRunEventsErrorCode,
)


def main(base_url: str, session_id: str, waiting_run_id: str) -> None:
    client = Client(base_url=base_url, raise_on_unexpected_status=True, timeout=None)

    health = get_health.sync(client=client)
    assert isinstance(health, HealthResponse)
    version: int = health.schema_version
    assert version > 0

    body = RunCreate(session_id=session_id, message="hello")
    created = create_run.sync_detailed(client=client, body=body, idempotency_key="key-1")
    assert created.status_code == 201
    run = created.parsed
    assert isinstance(run, RunResponse)
    status: RunStatus = run.status
    attempt: int = run.attempt
    assert status is RunStatus.QUEUED and attempt == 0
    assert created.headers["Location"] == f"/api/runs/{run.run_id}"
    assert "Idempotent-Replayed" not in created.headers
    again = create_run.sync_detailed(client=client, body=body, idempotency_key="key-1")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert isinstance(again.parsed, RunResponse) and again.parsed.run_id == run.run_id

    reused = create_run.sync(
        client=client, body=RunCreate(session_id=session_id, message="other"),
        idempotency_key="key-1",
    )
    assert isinstance(reused, CreateRunError)
    reused_code: CreateRunErrorCode = reused.error.code
    assert reused_code is CreateRunErrorCode.IDEMPOTENCY_KEY_REUSED
    rejected = create_run.sync(
        client=client,
        body=RunCreate(
            session_id=session_id, message="m", multitask_strategy=MultitaskStrategy.REJECT
        ),
    )
    assert isinstance(rejected, CreateRunError)
    assert rejected.error.code is CreateRunErrorCode.ACTIVE_RUN_EXISTS
    no_session = create_run.sync(client=client, body=RunCreate(session_id="nope", message="m"))
    assert isinstance(no_session, CreateRunError)
    assert no_session.error.code is CreateRunErrorCode.SESSION_NOT_FOUND

    fetched = get_run.sync(run.run_id, client=client)
    assert isinstance(fetched, RunResponse) and fetched.created_at == run.created_at
    missing = get_run.sync("nope", client=client)
    assert isinstance(missing, GetRunError)
    missing_code: GetRunErrorCode = missing.error.code
    assert missing_code is GetRunErrorCode.RUN_NOT_FOUND
    message: str = missing.error.message
    assert message == "run 'nope' not found"

    resume = RunResumeRequest(resume=RunResumeRequestResume.from_dict({"answer": 42}))
    resumed = resume_run.sync_detailed(waiting_run_id, client=client, body=resume)
    assert resumed.status_code == 202
    assert isinstance(resumed.parsed, RunResponse)
    assert resumed.parsed.status is RunStatus.RUNNING
    wrong_state = resume_run.sync(run.run_id, client=client, body=resume)
    assert isinstance(wrong_state, ResumeRunError)
    resume_code: ResumeRunErrorCode = wrong_state.error.code
    assert resume_code is ResumeRunErrorCode.INVALID_TRANSITION

    cancelled = cancel_run.sync_detailed(run.run_id, client=client)
    assert cancelled.status_code == 202
    assert isinstance(cancelled.parsed, RunResponse)
    assert cancelled.parsed.status is RunStatus.CANCELLED
    unchanged = cancel_run.sync_detailed(run.run_id, client=client)
    assert unchanged.status_code == 200 and isinstance(unchanged.parsed, RunResponse)
    cancel_missing = cancel_run.sync("nope", client=client)
    assert isinstance(cancel_missing, CancelRunError)
    assert cancel_missing.error.code is CancelRunErrorCode.RUN_NOT_FOUND

    page = list_run_events.sync(run.run_id, client=client, since_seq=0, limit=10)
    assert isinstance(page, EventPage)
    types = [event.type_ for event in page.items]
    assert types == ["run_created", "run_cancelled"], types
    next_since: int = page.next_since_seq
    assert next_since == page.items[-1].seq
    bad_limit = list_run_events.sync(run.run_id, client=client, limit=0)
    assert isinstance(bad_limit, ListRunEventsError)
    limit_code: ListRunEventsErrorCode = bad_limit.error.code
    assert limit_code is ListRunEventsErrorCode.BAD_PARAMETER
    assert bad_limit.error.message == "limit: must be at least 1"

    stream = stream_run_events.sync(run.run_id, client=client)
    assert isinstance(stream, str)
    assert "event: run_cancelled" in stream and "event: end" in stream
    gone = stream_run_events.sync("nope", client=client)
    assert isinstance(gone, StreamRunEventsError)
    assert gone.error.code is StreamRunEventsErrorCode.RUN_NOT_FOUND
    bad_header = stream_run_events.sync(run.run_id, client=client, last_event_id="x")
    assert isinstance(bad_header, StreamRunEventsError)
    assert bad_header.error.code is StreamRunEventsErrorCode.BAD_PARAMETER
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
'''


@pytest.fixture
def server(engine: Engine, database_url: str) -> Iterator[str]:
    with uvicorn_server(database_url) as base_url:
        yield base_url


def test_the_script_type_checks_against_the_generated_client(generated_client: Path) -> None:
    """mypy --strict, once: the schema and so the client are the same on both backends."""
    (generated_client / "check_api.py").write_text(textwrap.dedent(SCRIPT))
    type_check(generated_client, "check_api.py")


def test_the_generated_client_works_against_every_endpoint(
    engine: Engine, server: str, generated_client: Path
) -> None:
    (generated_client / "check_api.py").write_text(textwrap.dedent(SCRIPT))
    session_id = seed(engine, lambda db: SessionFactory().id)
    waiting = seed(
        engine,
        lambda db: SessionRunFactory(status=RunStatus.WAITING_INPUT, waiting_reason="why").id,
    )
    output = run([sys.executable, "check_api.py", server, session_id, waiting], generated_client)
    assert output.strip() == "ok"
