"""Reads from a real streaming replica: routing, read-your-writes, and the replica's death.

PostgreSQL only: SQLite has no replicas (``DATABASE_READ_URL`` is ignored there).
The replica is ``scripts/ensure-replica``'s standby (tests/replicas/conftest.py).
The HTTP tests run a real uvicorn with ``DATABASE_URL`` on the test's database of the
primary and ``DATABASE_READ_URL`` on the same database of the replica, and talk to it
with httpx as a user would: the token from the write's ``Consistency-Token`` header
sent back in the same header, or left to the client's cookie jar.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, event

from app.db import unit_of_work
from app.feed import EventFeed
from app.replicas import (
    CONSISTENCY_HEADER,
    attach_replica,
    detach_replica,
    parse_lsn,
)
from app.repositories import EventRepository, RunRepository
from app.repositories.reads import EventReads, RunReads
from app.schemas import RunCreate
from tests.concurrency import ROOT, seed
from tests.factories import SessionFactory
from tests.replicas.conftest import Replica, wait_replayed
from tests.servers import stop

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])  # replicas are PostgreSQL's

HOST = "127.0.0.1"
PAIRS = 1000
LANES = 4


@contextmanager
def serve(
    database_url: str, read_url: str, log: Path, workers: int = 1, **env: str
) -> Iterator[str]:
    """A uvicorn serving the Run API on ``database_url`` with ``read_url`` as its replica;
    its stderr goes to ``log``."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.api.main:create_app"]
    command += ["--host", HOST, "--port", str(port), "--workers", str(workers)]
    command += ["--log-level", "warning"]
    environment = {**os.environ, "DATABASE_URL": database_url, "DATABASE_READ_URL": read_url}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**environment, **env}, stderr=stderr, stdout=stderr
        )
    base_url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"uvicorn exited: {log.read_text()}"
            assert time.monotonic() < deadline, "uvicorn not ready within 30 s"
            try:
                if httpx.get(f"{base_url}/api/runs/ready-probe", timeout=1).status_code == 404:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base_url
    finally:
        stop(process)


def new_session(engine: Engine) -> str:
    return seed(engine, lambda db: SessionFactory().id)


def run_index_scans(replica: Replica, database_url: str) -> int:
    """Index scans of ``session_runs`` counted by the replica (its own statistics)."""
    return int(
        replica.sql(
            "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_tables "
            "WHERE relname = 'session_runs' AND schemaname = current_schema()",
            database_url,
        )
        or 0
    )


# --------------------------------------------------------------------------
# Read-your-writes over HTTP


@pytest.mark.slow
def test_reads_carrying_the_token_see_their_writes_1000_pairs(
    engine: Engine, database_url: str, shared_replica: Replica, tmp_path: Path
) -> None:
    """1,000 creates, each followed at once by GETs through the read URL carrying the
    create's token: of the new run, and of the run the create interrupted, which the
    replica holds already as queued: a read served by a replica that has not replayed
    the create would answer 'queued' there, not a 404 the primary would mend.

    Four clients at once, each in a session of its own, against two server processes;
    each create closes its connection, so the GET may reach the other process (the
    token, not the process's memory, carries the position). Two clients send the
    header, two rely on their cookie jar."""
    replica = shared_replica
    sessions = [new_session(engine) for _ in range(LANES)]
    wait_replayed(replica, engine)
    scans_before = run_index_scans(replica, database_url)
    stale: list[tuple[int, int, str]] = []

    def pairs(base_url: str, lane: int) -> None:
        by_header = lane % 2 == 0
        with httpx.Client(base_url=base_url, timeout=60) as client:
            previous = None
            for pair in range(PAIRS // LANES):
                body = {
                    "session_id": sessions[lane],
                    "message": f"pair {pair}",
                    "multitask_strategy": "interrupt",
                }
                created = client.post("/api/runs", json=body, headers={"Connection": "close"})
                assert created.status_code == 201, created.text
                token = created.headers[CONSISTENCY_HEADER]
                assert parse_lsn(token) is not None
                if by_header:
                    client.cookies.clear()  # the header alone carries the token
                    headers = {CONSISTENCY_HEADER: token}
                else:
                    assert client.cookies["consistency_token"] == token
                    headers = {}
                run_id = created.json()["run_id"]
                got = client.get(f"/api/runs/{run_id}", headers=headers)
                assert got.status_code == 200, got.text
                assert (got.json()["run_id"], got.json()["status"]) == (run_id, "queued")
                if previous is not None:
                    before = client.get(f"/api/runs/{previous}", headers=headers)
                    assert before.status_code == 200, before.text
                    if before.json()["status"] != "cancelled":
                        stale.append((lane, pair, before.json()["status"]))
                previous = run_id

    log = tmp_path / "uvicorn.log"
    with serve(database_url, replica.url_for(database_url), log, workers=2) as url:
        with ThreadPoolExecutor(LANES) as lanes:
            for done in [lanes.submit(pairs, url, lane) for lane in range(LANES)]:
                done.result()
    assert stale == []
    # The server is gone: its replica connections have reported their statistics.
    deadline = time.monotonic() + 15
    while (scans := run_index_scans(replica, database_url) - scans_before) < PAIRS:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert scans >= PAIRS, f"only {scans} run reads reached the replica"


# --------------------------------------------------------------------------
# Reads without a token go to the replica


def test_reads_without_a_token_run_on_the_replica(
    engine: Engine, database_url: str, shared_replica: Replica
) -> None:
    """In process: the read path and the feed's catch-up run their statements on
    connections where ``pg_is_in_recovery()`` is true, the replica's."""
    replica = shared_replica
    session_id = new_session(engine)
    with unit_of_work(engine) as db:
        run = RunRepository(db).create(RunCreate(session_id=session_id, message="hi"))
        EventRepository(db).append(session_id, "note", {"n": 1}, run_id=run.id)
    wait_replayed(replica, engine)
    router = attach_replica(engine, replica.url_for(database_url))
    assert router is not None
    in_recovery: list[bool] = []

    @event.listens_for(router.replica, "before_cursor_execute")
    def _where(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        with conn.connection.driver_connection.cursor() as probe:
            in_recovery.append(probe.execute("SELECT pg_is_in_recovery()").fetchone()[0])

    try:
        assert RunReads.of(engine).get(run.id).run_id == run.id
        assert [e.seq for e in EventReads.of(engine).list_for_run(run.id)]
        assert in_recovery and all(in_recovery), in_recovery
        reads = len(in_recovery)
        feed = EventFeed(engine)

        async def catch_up() -> list:
            follower = feed.follow(session_id, since_seq=0)
            try:
                return await follower.__anext__()
            finally:
                await follower.aclose()

        try:
            caught_up = asyncio.run(catch_up())
        finally:
            feed.close()
        assert [e.type for e in caught_up][-1] == "note"
        assert len(in_recovery) > reads and all(in_recovery)
        assert router.replica_reads >= 3 and router.primary_reads == 0
    finally:
        detach_replica(engine)
        router.replica.dispose()


def _pause_replay(replica: Replica) -> None:
    replica.sql("SELECT pg_wal_replay_pause()")
    deadline = time.monotonic() + 10
    while replica.sql("SELECT pg_get_wal_replay_pause_state()") != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_http_reads_without_a_token_are_the_replicas_and_with_one_the_writes(
    engine: Engine, database_url: str, exclusive_replica: Replica, tmp_path: Path
) -> None:
    """With the replica's replay paused, a cancel committed on the primary: a GET
    without a token answers the replica's stale 'queued' (so it was served there),
    the same GET with the cancel's token answers 'cancelled' (the bounded wait ran
    out, the primary answered), and once replay resumes the token-less GET catches up."""
    replica = exclusive_replica
    session_id = new_session(engine)
    log = tmp_path / "uvicorn.log"
    with serve(database_url, replica.url_for(database_url), log) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            created = client.post("/api/runs", json={"session_id": session_id, "message": "x"})
            run_id = created.json()["run_id"]
            wait_replayed(replica, engine)
            _pause_replay(replica)
            try:
                cancelled = client.post(f"/api/runs/{run_id}/cancel")
                assert cancelled.status_code == 202
                token = cancelled.headers[CONSISTENCY_HEADER]
                client.cookies.clear()
                started = time.monotonic()
                without = client.get(f"/api/runs/{run_id}")
                assert (without.status_code, without.json()["status"]) == (200, "queued")
                with_token = client.get(f"/api/runs/{run_id}", headers={CONSISTENCY_HEADER: token})
                assert (with_token.status_code, with_token.json()["status"]) == (200, "cancelled")
                assert time.monotonic() - started < 5
                # The event page and the stream's catch-up follow the same rule.
                page = client.get(f"/api/runs/{run_id}/events")
                assert "run_cancelled" not in [e["type"] for e in page.json()["items"]]
                page = client.get(f"/api/runs/{run_id}/events", headers={CONSISTENCY_HEADER: token})
                assert page.json()["items"][-1]["type"] == "run_cancelled"
            finally:
                replica.sql("SELECT pg_wal_replay_resume()")
            deadline = time.monotonic() + 10
            while client.get(f"/api/runs/{run_id}").json()["status"] != "cancelled":
                assert time.monotonic() < deadline, "the replica never caught up"
                time.sleep(0.05)
    assert "replica" not in log.read_text()  # no failure was logged: none happened


# --------------------------------------------------------------------------
# The replica dies, and comes back


@pytest.mark.slow
def test_replica_killed_mid_test_reads_fall_back_then_recover(
    engine: Engine, database_url: str, exclusive_replica: Replica, tmp_path: Path
) -> None:
    """Readers keep reading (with and without tokens) while the replica is stopped with
    ``pg_ctl stop -m immediate``: every answer is a 200 with the right run, one warning
    is logged, and after the replica is back (and the retry interval has passed) the
    token-less reads are the replica's again (shown with its replay paused)."""
    replica = exclusive_replica
    session_id = new_session(engine)
    log = tmp_path / "uvicorn.log"
    read_url = replica.url_for(database_url)
    with serve(database_url, read_url, log, DB_READ_RETRY_SECONDS="1") as url:
        with httpx.Client(base_url=url, timeout=30) as writer:
            runs = []
            for n in range(5):
                body = {"session_id": session_id, "message": f"run {n}"}
                runs.append(writer.post("/api/runs", json=body).json()["run_id"])
            token = writer.cookies["consistency_token"]
        wait_replayed(replica, engine)

        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def read_on() -> None:
            with httpx.Client(base_url=url, timeout=30) as reader:
                turn = 0
                while not stop.is_set():
                    run_id = runs[turn % len(runs)]
                    headers = {CONSISTENCY_HEADER: token} if turn % 2 else {}
                    for path in (f"/api/runs/{run_id}", f"/api/runs/{run_id}/events"):
                        try:
                            got = reader.get(path, headers=headers)
                        except httpx.HTTPError as exc:
                            failures.append(f"{path}: {exc!r}")
                            continue
                        if got.status_code != 200:
                            failures.append(f"{path}: {got.status_code} {got.text}")
                        elif path.endswith(run_id) and got.json()["run_id"] != run_id:
                            failures.append(f"{path}: {got.text}")
                        else:
                            answered[0] += 1
                    turn += 1

        readers = [threading.Thread(target=read_on) for _ in range(2)]
        for thread in readers:
            thread.start()
        try:
            time.sleep(1.0)
            before_kill = answered[0]
            replica.kill()
            time.sleep(2.0)
            during = answered[0] - before_kill
            replica.restart()
            time.sleep(1.5)  # past the retry interval
        finally:
            stop.set()
            for thread in readers:
                thread.join(timeout=30)
        assert failures == []
        assert before_kill > 0 and during > 0, (before_kill, during)
        warnings = [line for line in log.read_text().splitlines() if "read replica" in line]
        assert len(warnings) == 1, log.read_text()
        assert "reads go to the primary" in warnings[0]

        # Back on the replica: a change the paused replica has not replayed is not seen.
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_replayed(replica, engine)
            assert client.get(f"/api/runs/{runs[0]}").status_code == 200
            _pause_replay(replica)
            try:
                assert client.post(f"/api/runs/{runs[0]}/cancel").status_code == 202
                client.cookies.clear()
                stale = client.get(f"/api/runs/{runs[0]}")
                assert (stale.status_code, stale.json()["status"]) == (200, "queued")
            finally:
                replica.sql("SELECT pg_wal_replay_resume()")
