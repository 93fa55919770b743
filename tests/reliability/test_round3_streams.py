"""Issue 22 (round 3): streams that end, a dead listener that delays nothing, the feed's numbers.

The stream cases are a user's: real HTTP to a real uvicorn on 127.0.0.1 serving this test's
database, on both backends. The dead listener is PostgreSQL's: its backend terminated with
``pg_terminate_backend`` while its role is refused new logins (``ALTER ROLE ... NOLOGIN``),
so reconnecting fails for real while the pool's open connections still answer.

Every wait is bounded: the streams send a ``: ping`` every ``PING`` seconds here, so a
reader checks its deadline at least that often, and an endless stream fails the test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, delete, text
from sqlalchemy.engine import make_url

import app.api.sse
from app.db import create_db_engine, unit_of_work
from app.errors import BadParameterError, RunNotFoundError
from app.feed import EventFeed, get_feed
from app.models import ChatSession
from app.repositories import EventRepository, RunRepository
from tests.concurrency import seed
from tests.factories import SessionFactory
from tests.servers import run_api_in_thread

PING = 0.3
"""``SSE_PING_SECONDS`` in the stream tests: a line at least this often."""
ENDS_WITHIN = 15.0
"""A stream of a deleted run must end within the feed's re-check (5 s); slack for a busy box."""
HTTP_TIMEOUT = httpx.Timeout(10.0, read=5.0)

Message = dict[str, Any]


# --------------------------------------------------------------------------
# Helpers: a server, runs, reading a stream against a deadline


def serve(engine: Engine) -> contextlib.AbstractContextManager[str]:
    """The Run API on ``engine`` under uvicorn on 127.0.0.1 (a thread of this process)."""
    return run_api_in_thread(engine)


@pytest.fixture
def base_url(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(app.api.sse, "SSE_PING_SECONDS", PING)
    with serve(engine) as url:
        yield url


def running_run(engine: Engine) -> tuple[str, str]:
    """A new chat session with one running run (events 1 run_created, 2 run_started)."""
    session_id = seed(engine, lambda db: SessionFactory().id)
    with unit_of_work(engine) as db:
        runs = RunRepository(db)
        run = runs.create({"session_id": session_id, "message": "stream me"})
        runs.start(run.id)
    return session_id, run.id


class StillOpen(AssertionError):
    pass


class Sse:
    """An open event stream, read message by message against deadlines."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()

    def read(
        self, *, within: float, until: Callable[[Message], bool] | None = None
    ) -> list[Message]:
        """The next SSE messages (comments under ``comment``, ``data`` decoded) up to the
        first one ``until`` accepts, or else until the server closes the stream. Raises
        ``StillOpen`` if neither happens within ``within`` seconds."""
        deadline = time.monotonic() + within
        messages: list[Message] = []
        current: Message = {}
        for line in self._lines:
            if line == "":
                if current:
                    messages.append(current)
                    if until is not None and until(current):
                        return messages
                current = {}
            elif line.startswith(":"):
                current["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value
            if time.monotonic() > deadline:
                raise StillOpen(f"still open after {within} s; got {messages[-5:]}")
        if until is not None:
            raise AssertionError(f"the stream closed before the awaited message; got {messages}")
        return messages


def is_ping(message: Message) -> bool:
    return message.get("comment") == "ping"


def has_id(message: Message) -> bool:
    return "id" in message


@contextlib.contextmanager
def stream(
    base_url: str, run_id: str, *, last_event_id: str | None = None, **params: Any
) -> Iterator[Sse]:
    """``GET /api/runs/{run_id}/events/stream``, answered 200, as an ``Sse``."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    url = f"{base_url}/api/runs/{run_id}/events/stream"
    with httpx.stream("GET", url, headers=headers, params=params, timeout=HTTP_TIMEOUT) as answer:
        assert answer.status_code == 200, answer.read()
        yield Sse(answer)


def assert_ends_with_run_not_found(messages: list[Message], run_id: str) -> None:
    last = messages[-1]
    assert last.get("event") == "error", messages[-3:]
    assert set(last["data"]) == {"error"}
    assert last["data"]["error"]["code"] == "run_not_found"
    assert run_id in last["data"]["error"]["message"]
    assert not [m for m in messages if m.get("event") == "end"]


# --------------------------------------------------------------------------
# Item 2: streams that never end


@pytest.mark.slow
def test_stream_of_a_run_deleted_while_followed_ends_with_an_error_event(
    engine: Engine, base_url: str
) -> None:
    _session_id, run_id = running_run(engine)
    with stream(base_url, run_id) as sse:
        first = sse.read(within=10, until=is_ping)  # caught up, now waiting
        assert [m["id"] for m in first if has_id(m)] == ["1", "2"]
        with unit_of_work(engine) as db:
            RunRepository(db).delete(run_id)
        began = time.monotonic()
        rest = sse.read(within=ENDS_WITHIN)  # to the server's close
    assert_ends_with_run_not_found(rest, run_id)
    assert time.monotonic() - began < ENDS_WITHIN
    # and a reconnecting EventSource gets the plain 404
    again = httpx.get(f"{base_url}/api/runs/{run_id}/events/stream", timeout=HTTP_TIMEOUT)
    assert again.status_code == 404 and again.json()["error"]["code"] == "run_not_found"


@pytest.mark.slow
def test_stream_of_a_run_whose_chat_session_is_deleted_ends_with_an_error_event(
    engine: Engine, base_url: str
) -> None:
    session_id, run_id = running_run(engine)
    with stream(base_url, run_id, since_seq=1) as sse:
        first = sse.read(within=10, until=is_ping)
        assert [m["id"] for m in first if has_id(m)] == ["2"]
        with unit_of_work(engine) as db:
            db.execute(delete(ChatSession).where(ChatSession.id == session_id))  # type: ignore[arg-type]
        rest = sse.read(within=ENDS_WITHIN)
    assert_ends_with_run_not_found(rest, run_id)


@pytest.mark.slow
def test_stream_with_a_cursor_past_the_last_seq_ends_when_the_run_finishes(
    engine: Engine, base_url: str
) -> None:
    session_id, run_id = running_run(engine)
    with stream(base_url, run_id, last_event_id="50") as sse:
        assert sse.read(within=10, until=is_ping) == [{"comment": "ping"}]
        with unit_of_work(engine) as db:
            EventRepository(db).append(session_id, "step", run_id=run_id)  # seq 3
            RunRepository(db).complete(run_id)  # seq 4, below the cursor
        began = time.monotonic()
        rest = sse.read(within=ENDS_WITHIN)
    assert time.monotonic() - began < 3, "a commit wakes the stream; no 5 s timer needed"
    assert [m for m in rest if not is_ping(m)] == [
        {"event": "end", "data": {"run_id": run_id, "last_seq": 50}}
    ]
    # reconnecting with the same cursor: the run is over, the stream ends at once
    with stream(base_url, run_id, last_event_id="50") as sse:
        assert sse.read(within=5) == [{"event": "end", "data": {"run_id": run_id, "last_seq": 50}}]


# --------------------------------------------------------------------------
# Item 8: the 400 for a bad Last-Event-ID describes it, never quotes it


@pytest.mark.slow
def test_a_bad_last_event_id_is_described_by_its_size_not_quoted(
    engine: Engine, base_url: str
) -> None:
    _session_id, run_id = running_run(engine)
    marker = f"marker-{uuid.uuid4().hex}"
    header = (marker * (5000 // len(marker) + 1))[:5000]
    answer = httpx.get(
        f"{base_url}/api/runs/{run_id}/events/stream",
        headers={"Last-Event-ID": header},
        timeout=HTTP_TIMEOUT,
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "bad_parameter"
    assert "marker" not in answer.text and len(answer.content) < 300, answer.text
    assert error["message"].startswith("Last-Event-ID: ")
    assert "5000 characters" in error["message"]


# --------------------------------------------------------------------------
# Item 3: a dead listener stalls no stream (PostgreSQL)


@contextlib.contextmanager
def own_role(engine: Engine, database_url: str) -> Iterator[tuple[Engine, str]]:
    """An engine on this test's schema as a new role that may only read it; dropped after."""
    role = f"feed_reader_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        conn.exec_driver_sql(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    role_engine = create_db_engine(make_url(database_url).set(username=role))
    try:
        yield role_engine, role
    finally:
        role_engine.dispose()
        with engine.begin() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :r"),
                {"r": role},
            )
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


def first_event_after(base_url: str, run_id: str, **params: Any) -> tuple[Message, float]:
    began = time.monotonic()
    with stream(base_url, run_id, **params) as sse:
        try:
            messages = sse.read(within=8, until=has_id)
        except httpx.ReadTimeout:
            pytest.fail(f"no event within {HTTP_TIMEOUT.read} s")
    return messages[-1], time.monotonic() - began


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_dead_listener_delays_no_committed_event_and_live_ones_poll(
    engine: Engine,
    backend: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(app.api.sse, "SSE_PING_SECONDS", PING)
    caplog.set_level(logging.INFO, logger="app.feed")
    with own_role(engine, database_url) as (role_engine, role), serve(role_engine) as url:
        feed = get_feed(role_engine)
        feed.start()
        pid = feed.listener_backend_pid
        assert pid is not None
        # Four connections in the pool, as a server that has been answering holds them.
        held = [role_engine.connect() for _ in range(4)]
        for conn in held:
            conn.execute(text("SELECT 1"))
            conn.close()
        _, run_id = running_run(engine)
        event, _ = first_event_after(url, run_id)
        assert event["id"] == "1"

        with engine.begin() as conn:
            conn.exec_driver_sql(f'ALTER ROLE "{role}" NOLOGIN')
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()

        def listener_gone() -> bool:
            with engine.connect() as conn:
                query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
                return conn.execute(query, {"pid": pid}).scalar_one() == 0

        wait_until(listener_gone, 10, "the listener's backend ends")
        time.sleep(1.0)  # several reconnects refused meanwhile (backoff from 50 ms)

        # Every new stream gets its long-committed events at once, from the pool.
        for _ in range(3):
            session_id, run_id = running_run(engine)
            event, took = first_event_after(url, run_id)
            assert event["id"] == "1" and took < 2.0, took

        # A live event wakes a waiting follower by polling, well before the 5 s re-check.
        with stream(url, run_id, since_seq=2) as sse:
            sse.read(within=10, until=is_ping)
            with unit_of_work(engine) as db:
                EventRepository(db).append(session_id, "live", run_id=run_id)
            began = time.monotonic()
            live = sse.read(within=10, until=has_id)[-1]
            assert live["data"]["type"] == "live" and time.monotonic() - began < 3.0

        polling = [
            r for r in caplog.records if r.name == "app.feed" and r.levelno >= logging.WARNING
        ]
        assert len(polling) == 1, [r.getMessage() for r in polling]
        assert "poll" in polling[0].getMessage()
        assert feed.listener_connections == 1

        # Logins allowed again: the listener comes back and says so.
        with engine.begin() as conn:
            conn.exec_driver_sql(f'ALTER ROLE "{role}" LOGIN')
        wait_until(lambda: feed.listener_connections == 2, 15, "the listener reconnects")
        event, took = first_event_after(url, run_id, since_seq=2)
        assert event["data"]["type"] == "live" and took < 2.0


# --------------------------------------------------------------------------
# Item 12: the feed's numbers and unknown runs


@pytest.fixture
def feed(engine: Engine) -> Iterator[EventFeed]:
    feed = EventFeed(engine, recheck=0.5)
    try:
        yield feed
    finally:
        feed.close()


def in_thread_within(seconds: float, call: Callable[[], object]) -> object:
    """``call()``'s result or exception, from a daemon thread; fails if it takes longer."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]


BAD_SECONDS = [math.nan, math.inf, -math.inf, -1, -0.5, "1", True, [1]]


def test_wait_refuses_a_timeout_that_is_not_seconds(engine: Engine, feed: EventFeed) -> None:
    session_id, run_id = running_run(engine)
    for bad in [*BAD_SECONDS, None]:
        with pytest.raises(BadParameterError) as raised:
            in_thread_within(5, lambda bad=bad: feed.wait(session_id, since_seq=2, timeout=bad))
        assert raised.value.name == "timeout", bad
    assert feed.wait(session_id, since_seq=2, run_id=run_id, timeout=0) == []


async def first_item(feed: EventFeed, session_id: str, **kwargs: Any) -> list[Any]:
    follower = feed.follow(session_id, **kwargs)
    try:
        return await asyncio.wait_for(follower.__anext__(), 5)
    finally:
        await follower.aclose()


def test_follow_refuses_a_heartbeat_that_would_spin(engine: Engine, feed: EventFeed) -> None:
    session_id, run_id = running_run(engine)
    for bad in [0, 0.0, 1e-9, *BAD_SECONDS]:
        with pytest.raises(BadParameterError) as raised:
            asyncio.run(first_item(feed, session_id, since_seq=2, run_id=run_id, heartbeat=bad))
        assert raised.value.name == "heartbeat", bad
    assert asyncio.run(first_item(feed, session_id, since_seq=2, heartbeat=0.05)) == []


def test_wait_and_follow_refuse_an_unknown_run_alike(engine: Engine, feed: EventFeed) -> None:
    session_id, run_id = running_run(engine)
    other_session, _ = running_run(engine)
    for session, run in ((session_id, "no-such-run"), (other_session, run_id)):
        with pytest.raises(RunNotFoundError) as in_wait:
            in_thread_within(5, lambda s=session, r=run: feed.wait(s, since_seq=0, run_id=r))
        with pytest.raises(RunNotFoundError) as in_follow:
            asyncio.run(first_item(feed, session, since_seq=0, run_id=run))
        assert in_wait.value.message == in_follow.value.message


@pytest.mark.parametrize("how", ["wait", "follow"])
def test_wait_and_follow_raise_when_the_run_is_deleted_meanwhile(
    engine: Engine, feed: EventFeed, how: str
) -> None:
    """The feed's side of item 2: a follower of a deleted run learns it at its next
    re-check (0.5 s here), in ``wait`` as in ``follow``."""
    session_id, run_id = running_run(engine)

    def delete_run() -> None:
        time.sleep(0.3)
        with unit_of_work(engine) as db:
            RunRepository(db).delete(run_id)

    deleter = threading.Thread(target=delete_run)
    deleter.start()
    try:
        with pytest.raises(RunNotFoundError):
            if how == "wait":
                in_thread_within(
                    10, lambda: feed.wait(session_id, since_seq=2, run_id=run_id, timeout=30)
                )
            else:
                asyncio.run(first_item(feed, session_id, since_seq=2, run_id=run_id))
    finally:
        deleter.join()


@pytest.mark.slow
def test_stream_of_a_chat_session_deleted_while_followed_ends_with_an_error_event(
    engine: Engine, base_url: str
) -> None:
    """A whole chat's stream has no end of its own; its session's deletion ends it."""
    session_id, _run_id = running_run(engine)
    url = f"{base_url}/api/sessions/{session_id}/events/stream"
    with httpx.stream("GET", url, timeout=HTTP_TIMEOUT) as answer:
        assert answer.status_code == 200, answer.read()
        sse = Sse(answer)
        first = sse.read(within=10, until=is_ping)  # caught up, now waiting
        assert [m["id"] for m in first if has_id(m)] == ["1", "2"]
        with unit_of_work(engine) as db:
            db.execute(delete(ChatSession).where(ChatSession.id == session_id))  # type: ignore[arg-type]
        began = time.monotonic()
        rest = sse.read(within=ENDS_WITHIN)  # to the server's close
    assert time.monotonic() - began < ENDS_WITHIN
    last = rest[-1]
    assert last.get("event") == "error", rest[-3:]
    assert last["data"]["error"]["code"] == "session_not_found"
    assert session_id in last["data"]["error"]["message"]
    again = httpx.get(url, timeout=HTTP_TIMEOUT)  # a reconnecting EventSource: the plain 404
    assert again.status_code == 404 and again.json()["error"]["code"] == "session_not_found"
