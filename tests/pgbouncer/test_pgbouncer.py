"""The layer through a real PgBouncer 1.18+ in transaction mode (``DATABASE_POOLER=transaction``).

PostgreSQL only: PgBouncer is a PostgreSQL pooler. Before the pooler mode, a pooled
engine's psycopg prepared its statements after five executions on a connection,
and PgBouncer then handed it server connections where they did not exist
(``prepared statement "_pg3_0" does not exist``), kept the ``SET TIME ZONE`` of
one client for the next, and LISTEN on a pooled connection heard nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

import app.feed_listener
from app.db import create_db_engine, direct_url, is_pooled, pooler_mode, unit_of_work
from app.feed import EventFeed
from app.models import ChatSession, new_id
from app.repositories import EventRepository, RunRepository
from app.repositories.reads import RunReads
from migrations import upgrade
from migrations.steps import MigrationError
from tests.pgbouncer.conftest import POSTGRESQL_ONLY, ROOT, PooledDatabase
from tests.servers import stop

pytestmark = POSTGRESQL_ONLY

THREADS = 6
GETS = 180


def psycopg_url(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def new_run(engine: Engine) -> tuple[str, str]:
    """A new chat session with one queued run: (session id, run id)."""
    with unit_of_work(engine) as db:
        chat = ChatSession(id=new_id(), title="through PgBouncer")
        db.add(chat)
        db.flush()
        run = RunRepository(db).create({"session_id": chat.id, "message": "hello"})
    return chat.id, run.id


# --------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("value", "mode"), [("", None), ("none", None), ("transaction", "transaction")]
)
def test_the_pooler_setting_is_read_in_one_place(
    backend: str, monkeypatch: pytest.MonkeyPatch, value: str, mode: str | None
) -> None:
    monkeypatch.setenv("DATABASE_POOLER", value)
    assert pooler_mode() == mode


def test_an_unknown_pooler_setting_is_refused(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_POOLER", "statement")
    with pytest.raises(ValueError, match="DATABASE_POOLER must be one of none, transaction"):
        create_db_engine("postgresql://postgres@127.0.0.1:6432/x")


def test_under_the_setting_every_url_but_the_direct_one_is_pooled(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pooled_url = "postgresql://postgres@127.0.0.1:6432/app"
    direct = "postgresql://postgres@127.0.0.1:5432/app"
    monkeypatch.setenv("DATABASE_POOLER", "transaction")
    monkeypatch.delenv("DATABASE_DIRECT_URL", raising=False)
    engines = [create_db_engine(pooled_url)]
    assert is_pooled(engines[0]) and direct_url(engines[0]) is None
    monkeypatch.setenv("DATABASE_DIRECT_URL", direct)
    engines += [create_db_engine(pooled_url), create_db_engine(direct)]
    assert is_pooled(engines[1]) and str(direct_url(engines[1])).endswith("127.0.0.1:5432/app")
    assert not is_pooled(engines[2]) and direct_url(engines[2]) == engines[2].url
    monkeypatch.delenv("DATABASE_POOLER")
    engines.append(create_db_engine(pooled_url))
    assert not is_pooled(engines[3]) and direct_url(engines[3]) == engines[3].url
    for engine in engines:
        engine.dispose()


def test_url_options_other_than_settings_are_refused_behind_a_pooler(backend: str) -> None:
    with pytest.raises(ValueError, match="is not a '-c name=value' setting"):
        create_db_engine("postgresql://postgres@127.0.0.1:6432/app?options=-X", pooled=True)


# --------------------------------------------------------------------------
# Requests, repositories and reads through PgBouncer


def test_gets_from_six_threads_through_pgbouncer_all_succeed(
    backend: str, pooled_engine: Engine
) -> None:
    """The issue's measurement: 22 of 180 failed with ``_pg3_0 does not exist``."""
    _, run_id = new_run(pooled_engine)
    reads = RunReads.of(pooled_engine)

    def get(n: int) -> str:
        if n % 2:  # the repository, in a unit of work
            with unit_of_work(pooled_engine, readonly=True) as db:
                return RunRepository(db).get(run_id).id
        return reads.get(run_id).run_id  # the API's read path, in autocommit

    failures: list[str] = []

    def call(n: int) -> None:
        try:
            assert get(n) == run_id
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(call, range(GETS)))
    assert failures == []


def test_a_pooled_engine_leaves_no_state_on_server_connections(
    backend: str, pooled_engine: Engine, pooled_database: PooledDatabase
) -> None:
    """Its transactions run in UTC whatever other clients of the pooler set, and the
    server connections they used hold no prepared statement afterwards, as the
    pooler's next client finds them."""
    with psycopg.connect(psycopg_url(pooled_database.pooled), autocommit=True) as client:
        client.execute("SET TIME ZONE 'America/New_York'")  # another client's session
        _, run_id = new_run(pooled_engine)
        used: set[int] = set()
        for _ in range(12):  # psycopg prepares from the 5th execution unless told not to
            with unit_of_work(pooled_engine) as db:
                RunRepository(db).get(run_id)
                pid, zone = db.execute(
                    text("SELECT pg_backend_pid(), current_setting('TimeZone')")
                ).one()
            used.add(pid)
            assert zone == "UTC"
        prepared: dict[int, int] = {}
        deadline = time.monotonic() + 10
        while not used <= prepared.keys() and time.monotonic() < deadline:
            pid, count = client.execute(
                "SELECT pg_backend_pid(), (SELECT count(*) FROM pg_prepared_statements)"
            ).fetchone()
            prepared[pid] = count
    assert used <= prepared.keys(), "the pooler never handed out the engine's connections"
    assert {prepared[pid] for pid in used} == {0}


# --------------------------------------------------------------------------
# Migrations: direct URL for what needs a session


@pytest.fixture
def empty_schema(pooled_database: PooledDatabase) -> Iterator[str]:
    schema = f"s_{new_id()[:12]}"
    with psycopg.connect(psycopg_url(pooled_database.direct), autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(psycopg_url(pooled_database.direct), autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_upgrade_through_the_pooler_builds_online_indexes_on_the_direct_url(
    backend: str, pooled_database: PooledDatabase, empty_schema: str
) -> None:
    options = {"options": f"-csearch_path={empty_schema}"}
    pooled_url = pooled_database.pooled.update_query_dict(options)
    without_direct = create_db_engine(pooled_url, pooled=True)
    with_direct = create_db_engine(
        pooled_url, pooled=True, direct_url=pooled_database.direct.update_query_dict(options)
    )
    try:
        with pytest.raises(MigrationError, match="Set DATABASE_DIRECT_URL"):
            upgrade(without_direct)
        assert upgrade(with_direct)  # the rest, online index builds included
        assert upgrade(without_direct) == []  # at head: nothing needs the direct URL
        with with_direct.connect() as conn:
            invalid = conn.execute(
                text(
                    "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relnamespace = to_regnamespace(:schema) AND NOT i.indisvalid"
                ),
                {"schema": empty_schema},
            ).scalar_one()
            assert invalid == 0
            tables = conn.execute(
                text("SELECT count(*) FROM pg_tables WHERE schemaname = :schema"),
                {"schema": empty_schema},
            ).scalar_one()
            assert tables >= 5
    finally:
        without_direct.dispose()
        with_direct.dispose()


# --------------------------------------------------------------------------
# The event feed: LISTEN on the direct URL, else polling (said once)


def test_the_feed_listens_on_the_direct_url(
    backend: str, pooled_engine: Engine, pooled_database: PooledDatabase
) -> None:
    session_id, _ = new_run(pooled_engine)
    feed = EventFeed(pooled_engine)
    try:
        feed.start()
        pid = feed.listener_backend_pid
        assert pid is not None
        with psycopg.connect(psycopg_url(pooled_database.direct), autocommit=True) as admin:
            listening = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query ILIKE 'LISTEN%%'",
                (pid,),
            ).fetchone()
        assert listening == (1,)
        assert _woken_within(feed, pooled_engine, session_id) < 1.0
    finally:
        feed.close()


def test_without_a_direct_url_the_feed_polls_and_says_so_once(
    backend: str,
    pooled_database: PooledDatabase,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app.feed_listener, "_said_pooled", threading.Event())
    engine = create_db_engine(pooled_database.pooled, pooled=True)
    feeds = [EventFeed(engine), EventFeed(engine)]
    try:
        session_id, _ = new_run(engine)
        with caplog.at_level(logging.WARNING, logger="app.feed"):
            for feed in feeds:
                feed.start()
        said = [r.getMessage() for r in caplog.records if "no direct connection" in r.message]
        assert len(said) == 1 and "DATABASE_DIRECT_URL" in said[0]
        assert feeds[0].listener_backend_pid is None
        assert _woken_within(feeds[0], engine, session_id) < 1.0
    finally:
        for feed in feeds:
            feed.close()
        engine.dispose()


def _woken_within(feed: EventFeed, engine: Engine, session_id: str) -> float:
    """Seconds from an append's commit to a waiting follower's return with it."""
    with unit_of_work(engine) as db:
        since = max(e.seq for e in EventRepository(db).list_for_session(session_id))
    got: list[float] = []

    def follow() -> None:
        events = feed.wait(session_id, since_seq=since, timeout=10)
        got.append(time.monotonic() if events else float("inf"))

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.3)  # the follower has read, found nothing, and waits
    with unit_of_work(engine) as db:
        EventRepository(db).append(session_id, "note", {"n": 1})
    committed = time.monotonic()
    follower.join(timeout=15)
    assert got, "the follower did not return"
    return got[0] - committed


# --------------------------------------------------------------------------
# Over HTTP: uvicorn through PgBouncer


@pytest.fixture(params=["listen", "poll"])
def server(
    request: pytest.FixtureRequest, pooled_database: PooledDatabase
) -> Iterator[tuple[str, str]]:
    """``uvicorn --workers 2`` with DATABASE_URL through PgBouncer: with a direct URL
    for LISTEN (``listen``) or without one (``poll``)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "DATABASE_URL": pooled_database.pooled.render_as_string(hide_password=False),
        "DATABASE_POOLER": "transaction",
    }
    env.pop("DATABASE_DIRECT_URL", None)
    if request.param == "listen":
        env["DATABASE_DIRECT_URL"] = pooled_database.direct.render_as_string(hide_password=False)
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.api.main:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    command += ["--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"uvicorn exited with {process.returncode}"
            assert time.monotonic() < deadline, "uvicorn not ready within 60 s"
            try:
                if httpx.get(f"{base_url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base_url, request.param
    finally:
        stop(process)


@pytest.mark.slow
def test_http_clients_and_an_sse_follower_through_pgbouncer(
    backend: str, server: tuple[str, str], pooled_database: PooledDatabase
) -> None:
    base_url, _mode = server
    engine = create_db_engine(pooled_database.direct, pooled=False)
    try:
        session_ids = [new_run(engine)[0] for _ in range(THREADS)]
    finally:
        engine.dispose()
    statuses: list[int] = []
    errors: list[str] = []

    def client(session_id: str) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            for n in range(10):
                try:
                    created = http.post(
                        "/api/runs", json={"session_id": session_id, "message": f"m{n}"}
                    )
                    statuses.append(created.status_code)
                    if created.status_code != 201:
                        continue
                    run_id = created.json()["run_id"]
                    for path in (f"/api/runs/{run_id}", f"/api/runs/{run_id}/events"):
                        statuses.append(http.get(path).status_code)
                    statuses.append(http.post(f"/api/runs/{run_id}/cancel").status_code)
                except httpx.TransportError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(client, session_ids))
    assert errors == []
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert statuses.count(201) == THREADS * 10

    # An SSE follower of a new run: the run's cancel reaches it promptly.
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(30, read=10)) as http:
        run_id = http.post("/api/runs", json={"session_id": session_ids[0], "message": "sse"})
        run_id = run_id.json()["run_id"]
        with http.stream("GET", f"/api/runs/{run_id}/events/stream") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            _read_until(lines, "run_created", within=10)
            time.sleep(0.3)  # the stream now waits for news
            assert http.post(f"/api/runs/{run_id}/cancel").status_code < 300
            cancelled = time.monotonic()
            _read_until(lines, "run_cancelled", within=10)
            assert time.monotonic() - cancelled < 1.0


def _read_until(lines: Iterator[str], event_type: str, *, within: float) -> None:
    deadline = time.monotonic() + within
    for line in lines:
        if line.startswith("data:") and f'"{event_type}"' in line:
            return
        assert time.monotonic() < deadline, f"no {event_type} within {within} s"
    raise AssertionError(f"the stream ended before {event_type}")
