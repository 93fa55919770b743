"""Duplicated and competing creates over real HTTP: ``uvicorn --workers 2`` on 127.0.0.1.

The requests of a burst are sent at once, so they reach both server processes
and their commits interleave; the guarantees must come from the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import Engine, text

from tests.concurrency import seed
from tests.factories import SessionFactory
from tests.servers import uvicorn_server

pytestmark = pytest.mark.slow  # each test starts uvicorn with two worker processes

BURST = 24


@pytest.fixture
def server(engine: Engine, database_url: str) -> Iterator[str]:
    with uvicorn_server(database_url, workers=2) as base_url:
        yield base_url


def burst(base_url: str, requests: list[tuple[str, dict, dict]]) -> list[httpx.Response]:
    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(client.post(path, json=body, headers=headers) for path, body, headers in requests)
            )

    return asyncio.run(send_all())


RUNS_OF_SESSION = "SELECT COUNT(*) FROM session_runs WHERE session_id = :s"


def scalar(engine: Engine, sql: str, **params: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def test_duplicated_keyed_creates_make_one_run_and_all_get_it(engine: Engine, server: str) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    body = {"session_id": session_id, "message": "three slides"}
    answers = burst(server, [("/api/runs", body, {"Idempotency-Key": "retry-me"})] * BURST)

    assert [answer.status_code for answer in answers] == [201] * BURST
    assert len({answer.json()["run_id"] for answer in answers}) == 1
    replayed = [answer.headers.get("Idempotent-Replayed") for answer in answers]
    assert replayed.count("true") == BURST - 1 and replayed.count(None) == 1
    assert scalar(engine, RUNS_OF_SESSION, s=session_id) == 1
    created = "SELECT COUNT(*) FROM session_events WHERE session_id = :s AND type = 'run_created'"
    assert scalar(engine, created, s=session_id) == 1


def test_competing_rejecting_creates_leave_one_active_run(engine: Engine, server: str) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    body = {"session_id": session_id, "message": "go", "multitask_strategy": "reject"}
    answers = burst(server, [("/api/runs", body, {})] * BURST)

    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] + [409] * (BURST - 1), [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == {
        "active_run_exists"
    }
    assert scalar(engine, RUNS_OF_SESSION, s=session_id) == 1
