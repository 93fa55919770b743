"""A client generated from ``/openapi.json`` type-checks against real answers of the
sessions router and ``GET /api/runs``, errors included (as ``test_api_generated_client``
does for the run endpoints: uvicorn, openapi-python-client, mypy --strict, then the
script against the server). Both backends.

The session stream's success answer is live until the client leaves, so only its
error answers (404, 400) go through the generated client; ``test_sessions_api`` reads
the stream itself.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.api.generated_client import run, type_check
from tests.api.test_api_generated_client import server

__all__ = ["server"]  # the fixture, shared with test_api_generated_client

pytestmark = pytest.mark.slow  # uvicorn, the generator and mypy

SCRIPT = '''
"""The sessions endpoints and the run listing through the generated client."""

import sys
from datetime import datetime

from run_api_client import Client
from run_api_client.api.runs import create_run, list_runs
from run_api_client.api.sessions import (
    create_session,
    get_session,
    list_session_events,
    list_session_runs,
    stream_session_events,
)
from run_api_client.models import (
    CreateSessionError,
    CreateSessionErrorCode,
    EventPage,
    GetSessionError,
    GetSessionErrorCode,
    ListRunsError,
    ListRunsErrorCode,
    ListSessionEventsError,
    ListSessionEventsErrorCode,
    ListSessionRunsError,
    ListSessionRunsErrorCode,
    RunCreate,
    RunCreateMetadata,
    RunPage,
    RunResponse,
    RunStatus,
    SessionCreate,
    SessionResponse,
    StreamSessionEventsError,
    StreamSessionEventsErrorCode,
)


def main(base_url: str) -> None:
    client = Client(base_url=base_url, raise_on_unexpected_status=True, timeout=None)

    created = create_session.sync_detailed(client=client, body=SessionCreate(title="deck"))
    assert created.status_code == 201
    session = created.parsed
    assert isinstance(session, SessionResponse)
    session_id: str = session.session_id
    title: str = session.title
    assert title == "deck"
    assert created.headers["Location"] == f"/api/sessions/{session_id}"
    bad_title = create_session.sync(client=client, body=SessionCreate(title=""))
    assert isinstance(bad_title, CreateSessionError)
    bad_title_code: CreateSessionErrorCode = bad_title.error.code
    assert bad_title_code is CreateSessionErrorCode.VALIDATION_FAILED

    fetched = get_session.sync(session_id, client=client)
    assert isinstance(fetched, SessionResponse) and fetched.session_id == session_id
    missing = get_session.sync("nope", client=client)
    assert isinstance(missing, GetSessionError)
    missing_code: GetSessionErrorCode = missing.error.code
    assert missing_code is GetSessionErrorCode.SESSION_NOT_FOUND

    run_ids = []
    for team in ("a", "b", "a"):
        body = RunCreate(
            session_id=session_id,
            message="m",
            metadata=RunCreateMetadata.from_dict({"team": team}),
        )
        run = create_run.sync(client=client, body=body)
        assert isinstance(run, RunResponse)
        assert run.metadata.to_dict() == {"team": team}
        run_ids.append(run.run_id)

    first = list_session_runs.sync(session_id, client=client, limit=2)
    assert isinstance(first, RunPage)
    assert [run.run_id for run in first.items] == run_ids[:0:-1]
    cursor = first.next_cursor
    assert isinstance(cursor, str)
    rest = list_session_runs.sync(session_id, client=client, limit=2, cursor=cursor)
    assert isinstance(rest, RunPage) and rest.next_cursor is None
    assert [run.run_id for run in rest.items] == run_ids[:1]
    team_a = list_session_runs.sync(
        session_id, client=client, metadata='{"team": "a"}', status=RunStatus.QUEUED
    )
    assert isinstance(team_a, RunPage)
    assert [run.run_id for run in team_a.items] == [run_ids[2], run_ids[0]]
    no_session = list_session_runs.sync("nope", client=client)
    assert isinstance(no_session, ListSessionRunsError)
    no_session_code: ListSessionRunsErrorCode = no_session.error.code
    assert no_session_code is ListSessionRunsErrorCode.SESSION_NOT_FOUND
    bad_cursor = list_session_runs.sync(session_id, client=client, cursor="x")
    assert isinstance(bad_cursor, ListSessionRunsError)
    assert bad_cursor.error.code is ListSessionRunsErrorCode.BAD_PARAMETER

    across = list_runs.sync(client=client, metadata='{"team": "b"}')
    assert isinstance(across, RunPage)
    assert [run.run_id for run in across.items] == [run_ids[1]]
    since: datetime = across.items[0].created_at
    newer = list_runs.sync(client=client, created_after=since, limit=10)
    assert isinstance(newer, RunPage)
    assert [run.run_id for run in newer.items] == [run_ids[2]]
    bad_metadata = list_runs.sync(client=client, metadata="team=a")
    assert isinstance(bad_metadata, ListRunsError)
    bad_metadata_code: ListRunsErrorCode = bad_metadata.error.code
    assert bad_metadata_code is ListRunsErrorCode.BAD_PARAMETER

    events = list_session_events.sync(session_id, client=client, since_seq=0, limit=10)
    assert isinstance(events, EventPage)
    assert [event.run_id for event in events.items] == run_ids
    no_events = list_session_events.sync("nope", client=client)
    assert isinstance(no_events, ListSessionEventsError)
    no_events_code: ListSessionEventsErrorCode = no_events.error.code
    assert no_events_code is ListSessionEventsErrorCode.SESSION_NOT_FOUND

    gone = stream_session_events.sync("nope", client=client)
    assert isinstance(gone, StreamSessionEventsError)
    gone_code: StreamSessionEventsErrorCode = gone.error.code
    assert gone_code is StreamSessionEventsErrorCode.SESSION_NOT_FOUND
    bad_header = stream_session_events.sync(session_id, client=client, last_event_id="x")
    assert isinstance(bad_header, StreamSessionEventsError)
    assert bad_header.error.code is StreamSessionEventsErrorCode.BAD_PARAMETER
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
'''


def test_the_sessions_script_type_checks_against_the_generated_client(
    generated_client: Path,
) -> None:
    """mypy --strict, once: the schema and so the client are the same on both backends."""
    (generated_client / "check_sessions.py").write_text(textwrap.dedent(SCRIPT))
    type_check(generated_client, "check_sessions.py")


def test_the_generated_client_works_against_the_sessions_endpoints(
    engine: Engine, server: str, generated_client: Path
) -> None:
    (generated_client / "check_sessions.py").write_text(textwrap.dedent(SCRIPT))
    output = run([sys.executable, "check_sessions.py", server], generated_client)
    assert output.strip() == "ok"
