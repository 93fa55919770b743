"""Replica routing without a running replica: on both backends.

SQLite ignores a read URL; on PostgreSQL a replica that cannot be reached (a port
nothing listens on) costs the reads nothing but one warning. The answers to writes
carry a consistency token only when a replica is attached.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.replicas import (
    CONSISTENCY_COOKIE,
    CONSISTENCY_HEADER,
    attach_replica,
    detach_replica,
    format_lsn,
    parse_lsn,
)
from app.repositories.reads import RunReads
from tests.concurrency import seed
from tests.factories import SessionFactory, SessionRunFactory
from tests.servers import app_on

NOWHERE = "postgresql+psycopg://postgres@127.0.0.1:1/none"  # refused at once


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(app_on(engine)) as test_client:
        yield test_client


def test_lsn_text_round_trips_and_malformed_text_is_refused() -> None:
    for text_lsn in ("0/0", "0/3A1F6C8", "16/B374D848", "FFFFFFFF/FFFFFFFF"):
        lsn = parse_lsn(text_lsn)
        assert lsn is not None and format_lsn(lsn) == text_lsn
    assert parse_lsn("16/B374D848") > parse_lsn("16/B374D847") > parse_lsn("15/FFFFFFFF")
    for bad in ("", "0", "0/", "/1", "x/1", "0/123456789", "1/2/3", "0x1/2"):
        assert parse_lsn(bad) is None


def test_the_read_url_is_ignored_on_sqlite_and_a_dead_replica_costs_nothing_on_postgresql(
    engine: Engine, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = seed(engine, lambda db: SessionRunFactory().id)
    caplog.set_level(logging.WARNING, logger="app.replicas")
    router = attach_replica(engine, NOWHERE, retry_seconds=60)
    try:
        if backend == "sqlite":
            assert router is None
            assert "ignored" in caplog.text and "sqlite" in caplog.text
            assert isinstance(RunReads.of(engine), RunReads)
            assert RunReads.of(engine).get(run_id).run_id == run_id
            return
        assert router is not None
        answers = [RunReads.of(engine).get(run_id).run_id for _ in range(3)]
        assert answers == [run_id] * 3
        failures = [r for r in caplog.records if "read replica" in r.getMessage()]
        assert len(failures) == 1 and "reads go to the primary" in failures[0].getMessage()
        assert (router.replica_reads, router.primary_reads) == (0, 3)
    finally:
        detach_replica(engine)
        if router is not None:
            router.replica.dispose()
    assert isinstance(RunReads.of(engine), RunReads)  # detached: the plain reads again


def test_write_answers_carry_a_token_only_with_a_replica(
    engine: Engine, backend: str, client: TestClient
) -> None:
    session_id = seed(engine, lambda db: SessionFactory().id)
    body = {"session_id": session_id, "message": "one"}
    created = client.post("/api/runs", json=body)
    assert created.status_code == 201
    assert CONSISTENCY_HEADER not in created.headers
    assert CONSISTENCY_COOKIE not in created.cookies
    if backend == "sqlite":
        return
    router = attach_replica(engine, NOWHERE, retry_seconds=60)
    assert router is not None
    try:
        created = client.post("/api/runs", json=body)
        assert created.status_code == 201
        token = parse_lsn(created.headers[CONSISTENCY_HEADER])
        assert token is not None and created.cookies[CONSISTENCY_COOKIE] == format_lsn(token)
        with engine.connect() as conn:
            now = conn.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
        assert 0 < token <= parse_lsn(now)
        run_id = created.json()["run_id"]
        got = client.get(f"/api/runs/{run_id}", headers={CONSISTENCY_HEADER: "not a token"})
        assert got.status_code == 200 and got.json()["run_id"] == run_id
        assert CONSISTENCY_HEADER not in got.headers  # a read has nothing to report
    finally:
        detach_replica(engine)
        router.replica.dispose()
