"""The sessions router (``app.api.sessions``), ``GET /api/runs`` and run metadata over the
API, both backends: every endpoint and status, filters, cursors, and (real uvicorn)
pages read while runs are created and a session's live stream."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.api.deps import get_db_engine
from app.api.sessions import sessions_router
from app.input_limits import MAX_JSON_DEPTH
from app.models import RunStatus
from app.repositories import EventRepository
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory
from tests.servers import app_on, uvicorn_server


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(app_on(engine), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()  # noqa: S608


def new_session(client: TestClient, title: str | None = None) -> str:
    created = client.post("/api/sessions", json={} if title is None else {"title": title})
    assert created.status_code == 201, created.text
    return created.json()["session_id"]


def create_run(client: TestClient, session_id: str, **extra: Any) -> dict[str, Any]:
    created = client.post("/api/runs", json={"session_id": session_id, "message": "m", **extra})
    assert created.status_code == 201, created.text
    return created.json()


# --------------------------------------------------------------------------
# sessions


def test_create_and_get_a_session(client: TestClient) -> None:
    created = client.post("/api/sessions", json={"title": "Quarterly deck"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"session_id", "title", "created_at", "updated_at"}
    assert body["title"] == "Quarterly deck" and body["created_at"].endswith("Z")
    assert created.headers["location"] == f"/api/sessions/{body['session_id']}"
    fetched = client.get(created.headers["location"])
    assert fetched.status_code == 200 and fetched.json() == body
    untitled = client.post("/api/sessions", json={})
    assert untitled.status_code == 201 and untitled.json()["title"] == "New chat"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"title": ""}, "title"), ({"title": 3}, "title"), ({"owner": "x"}, "owner")],
)
def test_a_bad_session_body_is_a_422_naming_the_field(
    client: TestClient, engine: Engine, body: dict[str, Any], field: str
) -> None:
    before = count(engine, "sessions")
    answer = client.post("/api/sessions", json=body)
    assert answer.status_code == 422, answer.text
    assert field in error_of(answer)["message"]
    assert count(engine, "sessions") == before


def test_a_session_body_over_the_body_limit_is_a_413(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUN_API_MAX_BODY_BYTES", "100")
    before = count(engine, "sessions")
    with TestClient(app_on(engine), raise_server_exceptions=False) as client:
        answer = client.post("/api/sessions", json={"title": "x" * 200})
    assert answer.status_code == 413 and error_of(answer)["code"] == "too_large"
    assert count(engine, "sessions") == before


def test_an_unknown_session_is_a_404_on_every_read(client: TestClient) -> None:
    for path in ("", "/runs", "/events", "/events/stream"):
        answer = client.get(f"/api/sessions/no-such-session{path}")
        assert answer.status_code == 404, (path, answer.text)
        assert error_of(answer)["code"] == "session_not_found", path


def test_the_router_mounts_alone_with_its_error_shape(engine: Engine) -> None:
    """A host app without ``create_app``: the router answers in its error shape itself."""
    host = FastAPI()
    host.include_router(sessions_router, prefix="/chat")
    host.dependency_overrides[get_db_engine] = lambda: engine
    with TestClient(host, raise_server_exceptions=False) as client:
        created = client.post("/chat/api/sessions", json={"title": "t"})
        assert created.status_code == 201
        assert created.headers["location"].startswith("/chat/api/sessions/")
        assert client.get(created.headers["location"]).status_code == 200
        missing = client.get("/chat/api/sessions/nope/runs")
        assert missing.status_code == 404 and error_of(missing)["code"] == "session_not_found"
        bad = client.get(f"{created.headers['location']}/runs", params={"limit": 0})
        assert bad.status_code == 400 and error_of(bad)["code"] == "bad_parameter"


# --------------------------------------------------------------------------
# a session's runs


def test_a_sessions_runs_page_by_page(client: TestClient) -> None:
    session_id = new_session(client)
    other = new_session(client)
    runs = [create_run(client, session_id)["run_id"] for _ in range(5)]
    create_run(client, other)
    pages, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        answer = client.get(f"/api/sessions/{session_id}/runs", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages.append([run["run_id"] for run in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == [runs[4:2:-1], runs[2:0:-1], runs[:1]]
    empty = client.get(f"/api/sessions/{new_session(client)}/runs")
    assert empty.status_code == 200 and empty.json() == {"items": [], "next_cursor": None}


def test_a_sessions_runs_by_status_and_metadata(client: TestClient) -> None:
    session_id = new_session(client)
    a = create_run(client, session_id, metadata={"team": "a", "n": 1})["run_id"]
    b = create_run(client, session_id, metadata={"team": "b"})["run_id"]
    assert client.post(f"/api/runs/{a}/cancel").status_code == 202
    url = f"/api/sessions/{session_id}/runs"
    cancelled = client.get(url, params={"status": "cancelled"}).json()["items"]
    assert [run["run_id"] for run in cancelled] == [a]
    queued = client.get(url, params={"status": "queued"}).json()["items"]
    assert [run["run_id"] for run in queued] == [b]
    by_team = client.get(url, params={"metadata": json.dumps({"team": "a"})}).json()["items"]
    assert [run["run_id"] for run in by_team] == [a]
    assert by_team[0]["metadata"] == {"team": "a", "n": 1}
    none = client.get(url, params={"metadata": '{"team":"a"}', "status": "queued"})
    assert none.json()["items"] == []


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"status": "done"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"cursor": "garbage"}, "cursor"),
        ({"metadata": "team=a"}, "metadata"),
        ({"metadata": "[1]"}, "metadata"),
        ({"metadata": '{"a":{"b":1}}'}, "metadata"),
        ({"metadata": "{}"}, "metadata"),
    ],
)
def test_bad_listing_parameters_are_400s(
    client: TestClient, params: dict[str, Any], name: str
) -> None:
    session_id = new_session(client)
    for url in (f"/api/sessions/{session_id}/runs", "/api/runs"):
        answer = client.get(url, params=params)
        assert answer.status_code == 400, (url, answer.text)
        error = error_of(answer)
        assert error["code"] == "bad_parameter" and name in error["message"], error


# --------------------------------------------------------------------------
# runs across sessions


def test_runs_across_sessions_with_time_filters(client: TestClient, engine: Engine) -> None:
    first, second = new_session(client), new_session(client)
    runs = [create_run(client, sid) for sid in (first, second, first, second)]
    ids = [run["run_id"] for run in runs]
    listed = client.get("/api/runs", params={"limit": 10}).json()
    assert [run["run_id"] for run in listed["items"]] == ids[::-1]
    assert listed["next_cursor"] is None
    after = client.get("/api/runs", params={"created_after": runs[1]["created_at"]}).json()
    assert [run["run_id"] for run in after["items"]] == ids[:1:-1]
    before = client.get("/api/runs", params={"created_before": runs[1]["created_at"]}).json()
    assert [run["run_id"] for run in before["items"]] == ids[:1]
    window = client.get(
        "/api/runs",
        params={"created_after": runs[0]["created_at"], "created_before": runs[3]["created_at"]},
    ).json()
    assert [run["run_id"] for run in window["items"]] == [ids[2], ids[1]]
    page = client.get("/api/runs", params={"limit": 3}).json()
    rest = client.get("/api/runs", params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert [run["run_id"] for run in page["items"] + rest["items"]] == ids[::-1]
    bad = client.get("/api/runs", params={"created_after": "yesterday"})
    assert bad.status_code == 400 and "created_after" in error_of(bad)["message"]


def test_runs_across_sessions_by_status_and_metadata(client: TestClient, engine: Engine) -> None:
    seed(engine, lambda db: SessionRunFactory(status=RunStatus.COMPLETED, run_metadata={"k": "v"}))
    seed(engine, lambda db: SessionRunFactory(status=RunStatus.FAILED, run_metadata={"k": "v"}))
    seed(engine, lambda db: SessionRunFactory(status=RunStatus.FAILED, run_metadata={"k": "w"}))
    failed = client.get("/api/runs", params={"status": "failed"}).json()["items"]
    assert {run["status"] for run in failed} == {"failed"} and len(failed) == 2
    both = client.get("/api/runs", params={"status": "failed", "metadata": '{"k":"v"}'})
    assert [run["metadata"] for run in both.json()["items"]] == [{"k": "v"}]


# --------------------------------------------------------------------------
# metadata on create


def test_metadata_is_stored_returned_and_defaults_to_an_object(client: TestClient) -> None:
    session_id = new_session(client)
    metadata = {"team": "a", "tags": ["x", "y"], "deep": {"n": 1.5, "ok": True, "no": None}}
    created = create_run(client, session_id, metadata=metadata)
    assert created["metadata"] == metadata
    assert client.get(f"/api/runs/{created['run_id']}").json()["metadata"] == metadata
    plain = create_run(client, session_id)
    assert plain["metadata"] == {}
    assert client.get(f"/api/runs/{plain['run_id']}").json()["metadata"] == {}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "metadata",
    [
        _nested(MAX_JSON_DEPTH + 1),
        {"big": "x" * 200},
        ["not", "an", "object"],
        {"n": 2**63},
        {"bad": "nul\u0000"},
    ],
    ids=["too-deep", "too-big", "not-an-object", "huge-int", "nul"],
)
def test_bad_metadata_is_a_422_naming_the_field_and_writes_nothing(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch, metadata: Any
) -> None:
    monkeypatch.setenv("RUN_DATA_MAX_JSON_BYTES", "150")
    session_id = seed(engine, lambda db: SessionFactory().id)
    before = (count(engine, "session_runs"), count(engine, "session_events"))
    answer = client.post(
        "/api/runs", json={"session_id": session_id, "message": "m", "metadata": metadata}
    )
    assert answer.status_code == 422, answer.text
    assert "metadata" in error_of(answer)["message"]
    assert (count(engine, "session_runs"), count(engine, "session_events")) == before


def test_metadata_at_the_depth_limit_is_accepted(client: TestClient) -> None:
    session_id = new_session(client)
    created = create_run(client, session_id, metadata=_nested(MAX_JSON_DEPTH))
    assert created["metadata"] == _nested(MAX_JSON_DEPTH)


def test_a_replay_with_other_metadata_is_another_request(client: TestClient) -> None:
    session_id = new_session(client)
    headers = {"Idempotency-Key": "k-1"}
    body = {"session_id": session_id, "message": "m", "metadata": {"team": "a"}}
    first = client.post("/api/runs", json=body, headers=headers)
    assert first.status_code == 201
    again = client.post("/api/runs", json=body, headers=headers)
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    other = client.post("/api/runs", json=body | {"metadata": {"team": "b"}}, headers=headers)
    assert other.status_code == 422, other.text
    assert error_of(other)["code"] == "idempotency_key_reused"
    plain_key = {"Idempotency-Key": "k-2"}
    plain = {"session_id": session_id, "message": "m"}
    assert client.post("/api/runs", json=plain, headers=plain_key).status_code == 201
    with_empty = client.post("/api/runs", json=plain | {"metadata": {}}, headers=plain_key)
    assert with_empty.headers.get("idempotent-replayed") == "true"  # {} is no metadata


# --------------------------------------------------------------------------
# a session's events


def test_a_sessions_events_page_by_page(client: TestClient, engine: Engine) -> None:
    session_id = new_session(client)
    note = seed(engine, lambda db: EventRepository(db).append(session_id, "note", {"n": 1}))
    runs = [create_run(client, session_id)["run_id"] for _ in range(3)]
    url = f"/api/sessions/{session_id}/events"
    everything = client.get(url).json()
    types = [(event["type"], event["run_id"]) for event in everything["items"]]
    assert types == [("note", None)] + [("run_created", run) for run in runs]
    assert everything["items"][0]["seq"] == note.seq
    assert everything["next_since_seq"] == everything["items"][-1]["seq"]
    first = client.get(url, params={"limit": 3}).json()
    rest = client.get(url, params={"since_seq": first["next_since_seq"]}).json()
    assert first["items"] + rest["items"] == everything["items"]
    assert client.get(url, params={"since_seq": -1}).status_code == 400
    empty = client.get(f"/api/sessions/{new_session(client)}/events")
    assert empty.status_code == 200 and empty.json() == {"items": [], "next_since_seq": 0}


def test_a_bad_last_event_id_is_a_400_before_the_stream(client: TestClient) -> None:
    session_id = new_session(client)
    answer = client.get(
        f"/api/sessions/{session_id}/events/stream", headers={"Last-Event-ID": "abc"}
    )
    assert answer.status_code == 400 and "Last-Event-ID" in error_of(answer)["message"]


# --------------------------------------------------------------------------
# real HTTP


@pytest.fixture
def server(engine: Engine, database_url: str) -> Iterator[str]:
    with uvicorn_server(database_url) as base_url:
        yield base_url


@pytest.mark.slow
def test_paging_over_http_while_runs_are_created(server: str) -> None:
    """Clients create runs over HTTP while another pages through ``GET /api/runs`` and a
    session's runs: every run that existed at the start comes exactly once, in order."""
    with httpx.Client(base_url=server, timeout=30) as http:
        sessions = [http.post("/api/sessions", json={}).json()["session_id"] for _ in range(2)]

        def create(session_id: str, team: str) -> None:
            body = {"session_id": session_id, "message": "m", "metadata": {"team": team}}
            assert http.post("/api/runs", json=body).status_code == 201

        for index in range(24):
            create(sessions[index % 2], "a" if index % 3 else "b")

        def listing(path: str, params: dict[str, Any]) -> list[str]:
            seen, cursor = [], None
            for _ in range(100):
                page = http.get(path, params=params | ({"cursor": cursor} if cursor else {}))
                assert page.status_code == 200, page.text
                body = page.json()
                seen += [run["run_id"] for run in body["items"]]
                cursor = body["next_cursor"]
                if cursor is None:
                    return seen
            raise AssertionError("more than 100 pages")

        before = listing("/api/runs", {"limit": 1000})
        before_team_a = listing("/api/runs", {"limit": 1000, "metadata": '{"team":"a"}'})
        before_session = listing(f"/api/sessions/{sessions[0]}/runs", {"limit": 1000})
        stop, errors = threading.Event(), []

        def writer(session_id: str) -> None:
            with httpx.Client(base_url=server, timeout=30) as own:
                try:
                    for index in range(200):
                        if stop.is_set():
                            return
                        body = {"session_id": session_id, "message": "m", "metadata": {"team": "a"}}
                        assert own.post("/api/runs", json=body).status_code == 201
                        if index == 0:
                            started.set()
                except BaseException as exc:  # reported below
                    errors.append(exc)

        started = threading.Event()
        writers = [threading.Thread(target=writer, args=(sid,)) for sid in sessions]
        for thread in writers:
            thread.start()
        try:
            assert started.wait(30)
            paged = listing("/api/runs", {"limit": 5})
            paged_team_a = listing("/api/runs", {"limit": 3, "metadata": '{"team":"a"}'})
            paged_session = listing(f"/api/sessions/{sessions[0]}/runs", {"limit": 4})
        finally:
            stop.set()
            for thread in writers:
                thread.join(30)
        assert not errors, errors
        for got, want in (
            (paged, before),
            (paged_team_a, before_team_a),
            (paged_session, before_session),
        ):
            assert len(got) == len(set(got)), "a run came twice"
            assert [run for run in got if run in set(want)] == want, "a gap or a reorder"


@pytest.mark.slow
def test_a_sessions_stream_is_live_and_resumes_after_last_event_id(server: str) -> None:
    with httpx.Client(base_url=server, timeout=30) as http:
        session_id = http.post("/api/sessions", json={}).json()["session_id"]
        first = http.post("/api/runs", json={"session_id": session_id, "message": "m"}).json()
        received: list[tuple[str, str, dict[str, Any]]] = []
        ready = threading.Event()

        def follow(headers: dict[str, str], want: int) -> None:
            url = f"{server}/api/sessions/{session_id}/events/stream"
            timeout = httpx.Timeout(30, read=30)
            with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                ready.set()
                message: dict[str, str] = {}
                for line in response.iter_lines():
                    if line:
                        field, _, value = line.partition(": ")
                        message[field] = value
                        continue
                    if "data" in message:
                        received.append(
                            (message["id"], message.get("event", ""), json.loads(message["data"]))
                        )
                    message = {}
                    if len(received) >= want:
                        return

        reader = threading.Thread(target=follow, args=({}, 3), daemon=True)
        reader.start()
        assert ready.wait(30)
        second = http.post("/api/runs", json={"session_id": session_id, "message": "m"}).json()
        assert http.post(f"/api/runs/{first['run_id']}/cancel").status_code == 202
        reader.join(30)
        assert not reader.is_alive(), received
        assert [(event, data["run_id"]) for _, event, data in received] == [
            ("run_created", first["run_id"]),
            ("run_created", second["run_id"]),
            ("run_cancelled", first["run_id"]),
        ]
        assert [int(seq) for seq, _, _ in received] == [data["seq"] for _, _, data in received]

        # an EventSource that reconnects sends the last id it saw
        last_seen = received[0][0]
        received.clear()
        ready.clear()
        again = threading.Thread(target=follow, args=({"Last-Event-ID": last_seen}, 2), daemon=True)
        again.start()
        again.join(30)
        assert not again.is_alive(), received
        assert [event for _, event, _ in received] == ["run_created", "run_cancelled"]
        assert received[0][2]["run_id"] == second["run_id"]
